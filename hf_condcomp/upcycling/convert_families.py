"""Conversion to a hand-written family (`bert`, `gpt2`, `llama`): the target config from the
source's fields, RoBERTa's weight names mapped to BERT's, and the state dict with the chosen
layers' FFNs turned into experts (same keys otherwise)."""

import dataclasses

import torch

from ..modeling.architectures import LAYOUTS
from .copy_weights import copy_rest
from .expert_init import layout_ffn, moe_block_tensors
from .families import FAMILIES, as_floats_where_expected

_CONFIG_KEYS_DROPPED = (
    "model_type",
    "architectures",
    "transformers_version",
    "quantization_config",
    "_name_or_path",
    "auto_map",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
)


def target_config(src_config, family, **fields):
    config_class = FAMILIES[family][0]
    values = {k: v for k, v in src_config.to_dict().items() if k not in _CONFIG_KEYS_DROPPED}
    if src_config.model_type == "qwen2":
        values["qkv_bias"], values["attention_bias"] = True, False
    if src_config.model_type == "qwen3":
        values["qk_norm"] = True
    if src_config.model_type in ROBERTA_TYPES:
        values["padding_offset_positions"] = True
    values.update(fields)
    return config_class(**as_floats_where_expected(config_class, values))


ROBERTA_TYPES = ("roberta", "xlm-roberta")


# RoBERTa's weight names -> the BERT family's (the encoder is BERT's; positions and heads differ).
_ROBERTA_KEYS = (
    ("roberta.", "bert."),
    ("lm_head.dense.", "cls.predictions.transform.dense."),
    ("lm_head.layer_norm.", "cls.predictions.transform.LayerNorm."),
    ("lm_head.decoder.", "cls.predictions.decoder."),
    ("lm_head.bias", "cls.predictions.bias"),
)


def source_state(dense):
    """The source's state dict under the target family's names."""
    state = dense.state_dict()
    if dense.config.model_type not in ROBERTA_TYPES:
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in _ROBERTA_KEYS:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


def convert_state_dict(src_state, target, family, config, init="copy", seed=0, noise_std=0.01, drop_ratio=0.5):
    """Map a dense state dict onto `target`'s keys; asserts that nothing is missing or dropped."""
    gen = torch.Generator().manual_seed(seed)
    layer_template = FAMILIES[family][2]
    base = "" if target.base_model is target else target.base_model_prefix + "."
    target_keys = dict(target.state_dict(keep_vars=True))
    out, consumed = {}, set()
    source_layout = LAYOUTS[family]  # the family's FFN as the source writes it (architectures.py)
    for i in config.moe_layers:
        prefix = base + layer_template.format(i=i)
        has_bias = f"{prefix}{source_layout.inputs[0]}.bias" in src_state
        ffn = layout_ffn(src_state, prefix, dataclasses.replace(source_layout, bias=has_bias))
        out.update(moe_block_tensors(ffn, f"{prefix}mlp.", target_keys, config, source_layout.gated, init, gen,
                                      noise_std, drop_ratio))
        consumed.update(ffn[4])
    return copy_rest(src_state, target, target_keys, out, consumed, config, gen, lambda key: key)
