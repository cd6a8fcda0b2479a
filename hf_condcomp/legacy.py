"""Folders saved with the BERT, GPT-2 and Llama model types of earlier releases (`condcomp_bert`,
`condcomp_gpt2`, `condcomp_llama`, whose classes re-implemented those architectures) load as
the one model kind of this release: transformers' own model of the source with the same MoE
blocks, routed blocks and gates, the same weights under their native names.

With hf_condcomp imported, `AutoModelFor*.from_pretrained(folder)` on such a folder converts it
(the config to a `CondCompConfig` around the source's config, every weight renamed and none
dropped) and returns the native model; `save_pretrained` then writes the current format. The
folder's own remote code still loads it without this package (`trust_remote_code=True`).
"""

import json
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, PreTrainedConfig
from transformers.utils import cached_file

from .assets import CheckpointError
from .modeling.architectures import activation_of, layout_to_dict
from .modeling.configuration_condcomp import CondCompConfig, CondCompFields
from .modeling.modeling_condcomp import LEGACY_KEY_MAPPING, TASK_CLASSES
from .upcycling.convert_native import native_layout

# model type of an earlier release -> (path of its layers, name of its MoE blocks in a layer)
LEGACY_TYPES = {
    "condcomp_bert": ("encoder.layer", "mlp"),
    "condcomp_gpt2": ("h", "mlp"),
    "condcomp_llama": ("layers", "mlp"),
}
_OWN_FIELDS = {name for name in CondCompFields.__dataclass_fields__}
_DROPPED = {"model_type", "architectures", "auto_map", "transformers_version", "classifier_head",
            "padding_offset_positions", "qkv_bias", "qk_norm", "_name_or_path", "dtype", "torch_dtype"}
# RoBERTa sources were held under BERT's names.
_ROBERTA_KEYS = (
    ("bert.", "roberta."),
    ("cls.predictions.transform.dense.", "lm_head.dense."),
    ("cls.predictions.transform.LayerNorm.", "lm_head.layer_norm."),
    ("cls.predictions.decoder.", "lm_head.decoder."),
    ("cls.predictions.bias", "lm_head.bias"),
)
# The earlier releases' architectures by suffix ("ForCausalLM", ...): the task classes but the encoder-decoder's,
# which those releases did not have.
_CLASSES = {cls.__name__.removeprefix("CondComp"): cls for task, cls in TASK_CLASSES.items() if task != "seq2seq-lm"}


def legacy_condcomp_config(values: dict) -> CondCompConfig:
    """The `CondCompConfig` of an earlier release's config.json (read as a dict)."""
    source_type = (values.get("upcycling") or {}).get("source_model_type") or {
        "condcomp_bert": "bert", "condcomp_gpt2": "gpt2", "condcomp_llama": "llama"}[values["model_type"]]
    fields = {k: v for k, v in values.items() if k in _OWN_FIELDS}
    text = {k: v for k, v in values.items() if k not in _OWN_FIELDS and k not in _DROPPED}
    labels = {k: text.pop(k) for k in ("id2label", "label2id") if k in text}
    if source_type in ("mistral", "qwen2") and "sliding_window" not in text:
        text["sliding_window"] = None  # the earlier release held these sources without sliding windows
    text_config = AutoConfig.for_model(source_type, **text, **labels)
    dense = _dense_skeleton(text_config)
    task = "causal-lm" if values["model_type"] != "condcomp_bert" else "base"
    _, layout, inter = native_layout(dense, task)
    if fields.get("moe_expert_intermediate_size") is None:
        fields["moe_expert_intermediate_size"] = inter  # the native config names the experts' width
    return CondCompConfig(**fields, text_config=text_config, ffn_layout=layout_to_dict(layout),
                          ffn_activation=activation_of(text_config, layout), **labels)


def _dense_skeleton(text_config):
    with torch.device("meta"):
        return AutoModel.from_config(text_config)


def legacy_state_dict(state: dict, values: dict, config: CondCompConfig) -> dict:
    """The earlier release's weights under the native model's names (every one kept)."""
    layers_path, ffn_module = LEGACY_TYPES[values["model_type"]]
    roberta = config.text_config.model_type in ("roberta", "xlm-roberta", "camembert")
    module = config.ffn_layout["module"]
    out = {}
    for key, tensor in state.items():
        if roberta:
            for old, new in _ROBERTA_KEYS:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
        for i in config.moe_layers:
            marker = f"{layers_path}.{i}.{ffn_module}."
            at = key.find(marker)
            if at >= 0 and (at == 0 or key[at - 1] == "."):
                key = key[:at] + f"{layers_path}.{i}.{module}." + key[at + len(marker):]
        for pattern, replacement in LEGACY_KEY_MAPPING.items():  # the router's name
            key = re.sub(pattern, replacement, key)
        out[key] = tensor
    return out


def convert_folder(folder, target) -> str:
    """Writes the native form of the earlier release's `folder` into the folder `target`."""
    values = json.loads(Path(cached_file(folder, "config.json")).read_text(encoding="utf-8"))
    config = legacy_condcomp_config(values)
    architecture = (values.get("architectures") or ["CondCompModel"])[0]
    suffix = next((s for s in _CLASSES if architecture.endswith(s) and s != "Model"), "Model")
    cls = _CLASSES[suffix]
    config.architectures = [cls.__name__]
    state = legacy_state_dict(load_file(cached_file(folder, "model.safetensors")), values, config)
    with torch.device("meta"):
        expected = set(cls(config).state_dict())
    tied = {k for k in expected - set(state) if k.endswith(("lm_head.weight", "decoder.weight", "decoder.bias"))}
    missing, unexpected = expected - set(state) - tied, set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: its weights do not map onto {cls.__name__} of {config.text_config.model_type!r} (missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); load it with trust_remote_code=True."
        )
    config.save_pretrained(target)
    save_file({k: v.contiguous() for k, v in state.items()}, str(Path(target) / "model.safetensors"),
              metadata={"format": "pt"})
    try:
        Path(target, "generation_config.json").write_bytes(Path(cached_file(folder, "generation_config.json"))
                                                           .read_bytes())
    except OSError:
        pass
    return target


def _legacy_config_class(model_type):
    class LegacyCondCompConfig(PreTrainedConfig):
        """An earlier release's config, read as it is; models load through `LegacyLoader`."""

    LegacyCondCompConfig.model_type = model_type
    LegacyCondCompConfig.__name__ = f"Legacy_{model_type}_Config"
    return LegacyCondCompConfig


def _loader_class(config_class, target):
    class LegacyLoader:
        """`from_pretrained` converts the folder and loads it as `target` (a native class)."""

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            kwargs.pop("config", None)
            kwargs.pop("trust_remote_code", None)
            with tempfile.TemporaryDirectory(prefix="condcomp_convert_") as tmp:
                convert_folder(pretrained_model_name_or_path, tmp)
                model = target.from_pretrained(tmp, *args, **kwargs)
            model.name_or_path = str(pretrained_model_name_or_path)
            model.config._name_or_path = str(pretrained_model_name_or_path)
            return model

        @classmethod
        def _from_config(cls, config, **kwargs):
            return target._from_config(legacy_condcomp_config(config.to_dict()), **kwargs)

    LegacyLoader.config_class = config_class
    LegacyLoader.__name__ = f"Legacy{target.__name__}"
    return LegacyLoader


def register():
    """Registers the earlier model types with transformers' Auto classes (hf_condcomp/__init__.py)."""
    for model_type in LEGACY_TYPES:
        config_class = _legacy_config_class(model_type)
        AutoConfig.register(model_type, config_class, exist_ok=True)
        for target in _CLASSES.values():
            target._auto_class_of_task.register(config_class, _loader_class(config_class, target), exist_ok=True)
