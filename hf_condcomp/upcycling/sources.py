"""The dense source: a Hub id, a local folder, an embedded name or a loaded model, resolved and
loaded with the head of its task, refused early when it cannot be upcycled (unreadable, already
upcycled, no known FFN), and the sentence-transformers files that travel with it."""

from pathlib import Path

import torch
from transformers import PreTrainedModel

from .. import assets
from ..modeling.common import SENTENCE_TRANSFORMERS_FILES, sentence_transformers_modules
from ..modeling.configuration_condcomp import is_condcomp_config
from ..modeling.modeling_condcomp import TASK_CLASSES
from ..spec import _error
from .convert_native import native_stacks
from .targets import check_task


def _auto_class(task):
    """The transformers Auto class that loads a source for `task` (the task's class's own)."""
    return TASK_CLASSES[task]._auto_class_of_task


# The source architecture's own task, from `config.architectures[0]`'s suffix.
_ARCH_SUFFIX_TASK = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForMaskedLM", "masked-lm"),
    ("ForPreTraining", "masked-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForCausalLM", "causal-lm"),
    ("Model", "base"),
)


def _task_of_architecture(architecture: str | None, config=None) -> str:
    if architecture and getattr(config, "is_encoder_decoder", False) and architecture.endswith(
            ("ForConditionalGeneration", "MTModel")):  # MarianMTModel
        return "seq2seq-lm"
    if architecture:
        for suffix, task in _ARCH_SUFFIX_TASK:
            if architecture.endswith(suffix):
                return task
    return "base"


def load_source(source, task, num_labels):
    """Returns (dense model, task, source name)."""
    if isinstance(source, PreTrainedModel):
        model, name = source, getattr(source.config, "_name_or_path", "") or type(source).__name__
        _refuse_upcycled(model.config, name)
        source_task = _task_of_architecture(type(model).__name__, model.config)
        task = task or source_task
        check_task(task)
        if task != source_task:
            raise ValueError(
                f"`task`={task!r} differs from the loaded model's own task {source_task!r}: pass the source as a "
                "path or Hub id to change heads, or load it with the head you want."
            )
        return model, task, name
    if not isinstance(source, (str, bytes)) and not hasattr(source, "__fspath__"):
        raise _error("source", source, "a Hub id, a local folder or a loaded `PreTrainedModel`")
    name = str(source)
    path = assets.resolve(name)
    if name.startswith((".", "/", "~")) and not Path(path).expanduser().exists():  # a path, not a Hub id
        raise ValueError(f"`source`={name!r}: no such folder. Pass an existing folder with config.json and weights, "
                         "a Hub id (org/name) or one of the embedded names: " + ", ".join(assets.EMBEDDED))
    try:
        config = assets.load_config(path, "`source`")  # config.json there but unreadable: CheckpointError naming it
    except assets.CheckpointError:
        raise
    except (OSError, ValueError) as err:
        raise ValueError(
            f"`source`={name!r} could not be read as a Transformers checkpoint ({assets.one_line(err)}). Pass a Hub "
            "id, a folder with config.json and weights, or one of the embedded names: " + ", ".join(assets.EMBEDDED)
        ) from err
    _refuse_upcycled(config, name)
    architecture = (config.architectures or [None])[0]
    task = task or _task_of_architecture(architecture, config)
    check_task(task)
    with torch.device("meta"):  # refuse an architecture without a known FFN before reading its weights
        try:
            skeleton = _auto_class(task).from_config(config)
        except ValueError as err:
            raise ValueError(f"`source`={name!r} (model type {config.model_type!r}) has no {task} model in "
                             f"transformers: {err}") from err
    native_stacks(skeleton, task)
    kwargs = {}
    if num_labels is not None and task in ("sequence-classification", "token-classification"):
        kwargs["num_labels"] = num_labels
    try:
        model = assets.load_pretrained(_auto_class(task), path, "`source`", **kwargs)
    except assets.CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"`source`={name!r}: loading its weights failed ({assets.one_line(err)}).") from err
    return model, task, name


# The expert-count fields of transformers' MoE configs (Mixtral/PhiMoE, Qwen-MoE/OLMoE, DeepSeek/GLM-MoE).
_MOE_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def _refuse_upcycled(config, name):
    for field in _MOE_COUNT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 1 and not is_condcomp_config(config):
            raise ValueError(
                f"`source`={name!r} is already a Mixture-of-Experts (model type {config.model_type!r}, `{field}`="
                f"{value}): upcycling starts from a dense checkpoint. Upcycle its dense sibling instead, or fine-tune "
                "it as it is with transformers."
            )
    if is_condcomp_config(config):
        source = (getattr(config, "upcycling", None) or {}).get("source_model_type")
        raise ValueError(
            f"`source`={name!r} is already an upcycled model (model type {config.model_type!r}"
            f"{f', upcycled from {source!r}' if source else ''}): upcycle its dense parent instead, or load it "
            "with `from_pretrained` to fine-tune it further (the recipes do so when given it)."
        )


def sentence_transformers_folder(source) -> str | None:
    """The local folder holding the sentence-transformers files (`modules.json`, ...) of `source`: the folder
    itself, an embedded name's folder, or for a Hub id its snapshot, into which those files and the module
    folders are fetched. None for a source without them (a plain transformers checkpoint)."""
    if not source:
        return None
    name = assets.resolve(str(source))
    if Path(name).is_dir():
        return str(Path(name).resolve()) if sentence_transformers_modules(name) is not None else None
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        modules = sentence_transformers_modules(Path(hf_hub_download(name, "modules.json")).parent)
        if modules is None:
            return None
        return snapshot_download(name, allow_patterns=[*SENTENCE_TRANSFORMERS_FILES, *(f"{m}/*" for m in modules)])
    except (OSError, ValueError, EntryNotFoundError):  # not on the Hub, offline and not cached, no modules.json
        return None
