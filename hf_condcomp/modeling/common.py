"""Pieces every conditional-computation model shares: the router and gate losses, the executed
compute, initialisation of the added modules, and the sentence-transformers files that
`save_pretrained` carries over from a sentence-transformers source.

This file travels to the Hub with every saved model: only sibling relative imports."""

import json
import shutil
import types
from pathlib import Path, PurePosixPath

import torch
from transformers import initialization as init

from .experts import EXPERTS_FUNCTIONS, Experts
from .routing import get_routing_method, load_balancing_loss, router_z_loss


def condcomp_losses(config, rec, router: bool, compute: bool):
    """Returns (weighted total or None, aux_loss, z_loss, compute_loss) of one forward's `Recorder`
    (depth.py): the router losses of its router logits, without padding (`rec.token_mask`), where
    `router` (the `output_router_logits` flag, as Mixtral and Qwen-MoE add their auxiliary loss), and
    the gated layers' losses, part of what those layers are trained on, where `compute`."""
    if not compute:
        return None, None, None, None
    aux = z = extra = None
    total = 0.0
    if router and rec.router_logits:
        layer_logits = tuple(rec.router_logits)
        mask = rec.token_mask
        if rec.prefiltered and mask is not None:
            flat = mask.reshape(-1)
            layer_logits = tuple(
                logits if i in rec.prefiltered else logits[flat] for i, logits in enumerate(layer_logits)
            )
            mask = None
        if get_routing_method(config.moe_routing).balance_loss:
            aux = load_balancing_loss(layer_logits, config.num_local_experts, config.num_experts_per_tok, mask)
            total = total + config.router_aux_loss_coef * aux
        z = router_z_loss(layer_logits, mask)
        total = total + config.router_z_loss_coef * z
    if rec.extra_losses:
        extra = torch.stack(rec.extra_losses).sum()
        total = total + extra
    if aux is None and z is None and extra is None:
        return None, None, None, None
    return total, aux, z, extra


def compute_fraction(config, rec):
    """Executed share of token-layer compute: mean over layers, ungated layers counting 1."""
    if not rec.layer_fractions:
        return 1.0, {}
    per_layer = {i: float(f) for i, f in sorted(rec.layer_fractions.items())}
    n = config.num_hidden_layers
    return (n - len(per_layer) + sum(per_layer.values())) / n, per_layer


def use_return_dict(config, return_dict) -> bool:
    return getattr(config, "return_dict", True) if return_dict is None else bool(return_dict)


def _refuse_reentrant(kwargs):
    if (kwargs or {}).get("use_reentrant"):
        raise ValueError(
            "`use_reentrant=True` gradient checkpointing is not supported: the router and gate losses are "
            "collected from inside the layers, and the reentrant variant runs them without autograd, so those "
            "losses would train nothing. Use the default `use_reentrant=False`."
        )


# The model attribute that names the local sentence-transformers folder a model was upcycled from.
SENTENCE_TRANSFORMERS_SOURCE = "_sentence_transformers_source"
# The model attribute that names the local folder whose tokenizer `save_pretrained` writes beside the model.
TOKENIZER_SOURCE = "_tokenizer_source"
# The model attribute holding the model card writer `upcycle` gives its model (`hf_condcomp.cards`):
# called as `writer(model, folder, repo_id=None)`; this code never imports it.
MODEL_CARD = "_model_card"
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def sentence_transformers_modules(folder) -> list[str] | None:
    """The module folders (`1_Pooling`, `2_Normalize`, ...) of a sentence-transformers checkpoint whose
    transformer is the folder's own model (the `modules.json` entry at path ""), or None for any other
    folder (no or unreadable `modules.json`, the transformer in a subfolder, a path leaving the folder)."""
    try:
        entries = json.loads((Path(folder) / "modules.json").read_text(encoding="utf-8"))
        paths = [str(entry.get("path", "")) for entry in entries]
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    for path in paths:
        posix = PurePosixPath(path.replace("\\", "/"))
        if posix.is_absolute() or ".." in posix.parts or ":" in path:
            return None
    if "" not in paths:
        return None
    return [path for path in paths if path]


def copy_tokenizer(source, save_directory) -> bool:
    """Writes the tokenizer of the local folder `source` into `save_directory`, unless that folder has one
    already (the caller saved its own) or `source` has none; returns whether it wrote one."""
    if not source or not Path(source).is_dir() or (Path(save_directory) / "tokenizer_config.json").exists():
        return False
    if Path(source).resolve() == Path(save_directory).resolve():
        return False
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError):  # a checkpoint without a tokenizer (random test models)
        return False
    tokenizer.save_pretrained(save_directory)
    return True


def copy_sentence_transformers_files(source, save_directory) -> list[str]:
    """Copies `modules.json`, `sentence_bert_config.json`, `config_sentence_transformers.json` and every
    module folder but the transformer's from the sentence-transformers folder `source` into
    `save_directory`; returns what was copied (nothing when `source` is not such a folder)."""
    if not source or not Path(source).is_dir():
        return []
    source, target = Path(source), Path(save_directory)
    modules = sentence_transformers_modules(source)
    if modules is None or source.resolve() == target.resolve():
        return []
    copied = []
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    for path in modules:
        if (source / path).is_dir():  # a module without settings (`Normalize`) may have no folder
            shutil.copytree(source / path, target / path, dirs_exist_ok=True)
            copied.append(path)
    return copied


def has_moe_layers(config) -> bool:
    """Whether a model of `config` has MoE layers (in its encoder's or decoder's stack)."""
    return bool(getattr(config, "moe_layers", None) or getattr(config, "decoder_moe_layers", None))


class _ClassOrInstanceMethod:
    """A classmethod that, looked up on an instance, is bound to the instance instead."""

    def __init__(self, function):
        self.function = function
        self.__doc__ = function.__doc__

    def __get__(self, instance, owner=None):
        return types.MethodType(self.function, owner if instance is None else instance)


class CondCompInitMixin:
    """Initialisation of the modules this package adds (experts, routers, gates), and an
    `auto_map` that lists every head class, so a saved base model also loads with
    `AutoModelForSequenceClassification` (and so on) through `trust_remote_code`."""

    _auto_heads: dict = {}
    supports_gradient_checkpointing = True
    # `forward` takes **kwargs but does not normalise its loss by Trainer's `num_items_in_batch`:
    # without this, Trainer would skip its own division by the accumulation steps.
    accepts_loss_kwargs = False

    @_ClassOrInstanceMethod
    def _can_set_experts_implementation(model_or_class) -> bool:
        """Whether the experts implementation can be set: our experts read `config._experts_implementation`
        themselves (experts.py), so `from_pretrained(..., experts_implementation=...)` and
        `set_experts_implementation` apply, on a model with MoE layers. A model without them (routed
        blocks or gates only) says False, as transformers' dense models do, so that transformers'
        exporters and `set_experts_implementation` leave it alone. transformers' own code asks a model;
        its common tests ask the class, which serves models with and without experts and says True."""
        if isinstance(model_or_class, type):
            return True
        return has_moe_layers(model_or_class.config)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """The requested experts implementation, else the config's `moe_implementation`; any name of
        experts.py's registry (ours and transformers' `ALL_EXPERTS_FUNCTIONS`)."""
        name = requested_experts if requested_experts is not None else self.config.moe_implementation
        if name not in EXPERTS_FUNCTIONS:
            raise ValueError(
                f"`experts_implementation` must be one of {EXPERTS_FUNCTIONS.valid_keys()}, got {name!r}."
            )
        return name

    def set_experts_implementation(self, experts_implementation: str | dict):
        """Switch the MoE blocks' experts to another registered implementation (they read
        `config._experts_implementation` at each call). Only this model's config is set: the
        source's model inside has no experts of transformers' kind, and some
        releases would check the name against it. On a model without MoE layers the name is checked
        and nothing changes, as transformers' own method does where it cannot set one."""
        name = experts_implementation
        if isinstance(name, dict):
            name = name.get("", self.config._experts_implementation)
        name = self.get_correct_experts_implementation(name)
        if self._can_set_experts_implementation():
            self.config._experts_implementation_internal = name

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        # transformers >= 5.24 routes `activation_checkpointing_enable` through an overridden
        # `gradient_checkpointing_enable`, so this one check covers both names.
        _refuse_reentrant(gradient_checkpointing_kwargs)
        return super().gradient_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes the tokenizer and the sentence-transformers files (`modules.json`, pooling,
        `Normalize`, ...) of the local checkpoint this model was upcycled or loaded from, so the folder
        is complete: `AutoTokenizer.from_pretrained(save_directory)` and `SentenceTransformer(save_directory,
        trust_remote_code=True)` work, with that checkpoint's modules and settings."""
        module = type(self).__module__.rsplit(".", 1)[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoConfig"] = f"configuration_condcomp.{type(self.config).__name__}"
        auto_map.update({auto: f"{module}.{name}" for auto, name in self._auto_heads.items()})
        self.config.auto_map = auto_map
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            # `upcycle` sets the attribute; a model loaded from a folder has that folder as `name_or_path`.
            source = getattr(self, SENTENCE_TRANSFORMERS_SOURCE, None) or self.name_or_path
            copy_sentence_transformers_files(source, save_directory)
            copy_tokenizer(getattr(self, TOKENIZER_SOURCE, None) or self.name_or_path, save_directory)
            write_card = getattr(self, MODEL_CARD, None)
            if write_card is not None:
                write_card(self, save_directory)
        return result

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        """`push_to_hub`: the card of `upcycle` replaces transformers' blank one (a repository's own card stays)."""
        write_card = getattr(self, MODEL_CARD, None)
        if write_card is not None:
            write_card(self, working_dir, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    def _init_weights(self, module):
        source = self.__dict__.get("_condcomp_source")  # the source's own init for its modules
        if source is not None:
            source._init_weights(module)
        else:
            super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Experts):
            for name, param in module.named_parameters(recurse=False):
                if name.endswith("_bias"):
                    init.zeros_(param)
                else:
                    init.normal_(param, mean=0.0, std=std)
        init_hook = getattr(module, "_condcomp_init", None)
        if init_hook is not None:
            init_hook(std)
