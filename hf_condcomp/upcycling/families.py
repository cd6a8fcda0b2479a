"""The target model classes of upcycling and what their configs accept.

A source is expressed by a hand-written family (`bert`, `gpt2`, `llama`: exact copies of those
architectures with MoE, Mixture-of-Depths or gated layers) when its model type is one of theirs,
else by `native` (transformers' own model with MoE blocks in its FFNs' places). This module holds
the family table, the choice of family and task checks, and the checks of config overrides.
"""

import dataclasses
import difflib
import typing

from ..modeling.configuration_condcomp import (
    CondCompBertConfig,
    CondCompConfig,
    CondCompGPT2Config,
    CondCompLlamaConfig,
)
from ..modeling.modeling_condcomp import (
    CondCompForCausalLM,
    CondCompForMaskedLM,
    CondCompForSequenceClassification,
    CondCompForTokenClassification,
    CondCompModel,
)
from ..modeling.modeling_condcomp_bert import (
    CondCompBertForMaskedLM,
    CondCompBertForSequenceClassification,
    CondCompBertForTokenClassification,
    CondCompBertModel,
)
from ..modeling.modeling_condcomp_gpt2 import CondCompGPT2ForCausalLM, CondCompGPT2Model
from ..modeling.modeling_condcomp_llama import CondCompLlamaForCausalLM, CondCompLlamaModel
from ..spec import _error

# family: (config class, {task: target class}, layer prefix in the base model, source model types)
FAMILIES = {
    "bert": (
        CondCompBertConfig,
        {
            "base": CondCompBertModel,
            "sequence-classification": CondCompBertForSequenceClassification,
            "token-classification": CondCompBertForTokenClassification,
            "masked-lm": CondCompBertForMaskedLM,
        },
        "encoder.layer.{i}.",
        ("bert", "roberta", "xlm-roberta"),
    ),
    "gpt2": (
        CondCompGPT2Config,
        {"base": CondCompGPT2Model, "causal-lm": CondCompGPT2ForCausalLM},
        "h.{i}.",
        ("gpt2",),
    ),
    "llama": (
        CondCompLlamaConfig,
        {"base": CondCompLlamaModel, "causal-lm": CondCompLlamaForCausalLM},
        "layers.{i}.",
        ("llama", "mistral", "qwen2", "qwen3"),
    ),
    # Every other architecture (and Mistral / Qwen2 with sliding windows): transformers' own model
    # with MoE blocks in its FFNs' places (modeling_condcomp.py); where the FFN is comes from
    # architectures.py, so the layer prefix is found at upcycling time.
    "native": (
        CondCompConfig,
        {
            "base": CondCompModel,
            "sequence-classification": CondCompForSequenceClassification,
            "token-classification": CondCompForTokenClassification,
            "masked-lm": CondCompForMaskedLM,
            "causal-lm": CondCompForCausalLM,
        },
        None,
        (),
    ),
}
_FAMILY_OF = {model_type: family for family, spec in FAMILIES.items() for model_type in spec[3]}
GATED_FAMILIES = ("bert", "gpt2", "llama")


def choose_family(config, choice="auto") -> str:
    """The hand-written family that expresses the source exactly, else (or when asked) `native`."""
    family = "native" if choice == "native" else _FAMILY_OF.get(config.model_type, "native")
    if family == "llama" and sliding_window(config):
        return "native"
    return family


def sliding_window(config):
    sliding = getattr(config, "sliding_window", None)
    return bool(sliding and getattr(config, "use_sliding_window", True) and sliding < config.max_position_embeddings)


def check_task(task, family):
    tasks = FAMILIES[family][1]
    if task not in tasks:
        raise _error("task", task, f"one of {sorted(tasks)} for a {family} source")


def check_overrides(overrides, config_class, src_config):
    """Every `upcycle(..., name=value)` override must name a field of the target config (or of the
    source's): a misspelt name would otherwise be stored as an unused attribute and silently ignored."""
    known = {f.name for f in dataclasses.fields(config_class)} | set(src_config.to_dict())
    for name, value in overrides.items():
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
            raise ValueError(
                f"`{name}`={value!r} is not an upcycling argument nor a field of {config_class.__name__}.{hint}"
            )


def as_floats_where_expected(config_class, values):
    """Whole numbers given for float fields (`capacity_factor=2`, `router_aux_loss_coef=0`, as YAML
    and the command line write them) become floats: the strict config would reject the int."""
    for field in dataclasses.fields(config_class):
        value = values.get(field.name)
        if isinstance(value, int) and not isinstance(value, bool):
            types = typing.get_args(field.type) or (field.type,)
            if float in types and int not in types:
                values[field.name] = float(value)
    return values
