"""The target's config and state dict: transformers' own model of the source, its weights under
their own names, with MoE blocks in its FFNs' places. Where a layer's FFN is comes from
`hf_condcomp.modeling.architectures` (its layout), checked against the dense layer before use."""

import copy
import dataclasses

import torch
from transformers.activations import ACT2FN

from ..modeling.architectures import (
    activation_of,
    detect_layout,
    find_layers,
    layout_to_dict,
    seq2seq_layout,
    seq2seq_stacks,
)
from ..modeling.configuration_condcomp import CondCompConfig
from ..modeling.variants import variant_config_fields
from .copy_weights import copy_rest
from .expert_init import layout_ffn, moe_block_tensors
from .targets import as_floats_where_expected


def native_layout(dense, task):
    """(layers' path in the dense model, FFN layout, dense FFN width) of a source built natively."""
    src_config = dense.config
    path, layers = find_layers(dense, src_config.num_hidden_layers)
    # A decoder's attention is causal whatever its head (a decoder classifier's too).
    causal = task == "causal-lm" or any(getattr(m, "is_causal", False) is True for m in layers[0].modules())
    layout = detect_layout(src_config.model_type, layers[0], causal=causal)
    return (path, *_checked_layout(layers[0], layout, src_config))


def native_stacks(dense, task) -> list:
    """[(layers' path, FFN layout, dense FFN width)] per stack of the source: one, or an
    encoder-decoder's encoder and decoder (causal), each with its own layout (T5's FFN sits after
    the decoder's cross-attention)."""
    src_config = dense.config
    if not getattr(src_config, "is_encoder_decoder", False):
        return [native_layout(dense, task)]
    stacks = []
    for name, _, path, layers in seq2seq_stacks(dense):
        layout = seq2seq_layout(src_config, layers[0], causal=name == "decoder")
        stacks.append((path, *_checked_layout(layers[0], layout, src_config)))
    if stacks[0][2] != stacks[1][2]:
        raise ValueError(
            f"source model type {src_config.model_type!r}: its encoder's FFN width {stacks[0][2]} differs from its "
            f"decoder's {stacks[1][2]}; upcycling takes one expert width for both stacks."
        )
    return stacks


def _checked_layout(layer, layout, src_config):
    """(layout with its `bias` read off the layer, the dense FFN width)."""
    try:
        first_in = layer.get_submodule(layout.inputs[0])
        out = layer.get_submodule(layout.output)
    except AttributeError as err:
        raise ValueError(
            f"source model type {src_config.model_type!r}: its layers do not have the FFN modules its layout names "
            f"({layout.inputs + (layout.output,)}): {err}"
        ) from None
    layout = dataclasses.replace(layout, bias=first_in.bias is not None)
    inter = out.weight.shape[0] if layout.conv1d else out.weight.shape[1]
    return layout, inter


def upcycled_config(src_config, stacks, fields, overrides):
    """CondCompConfig around a copy of the source's config; overrides of the source's own fields
    (`hidden_dropout_prob=0.0`, ...) go into that copy. `stacks` as `native_stacks` gives them."""
    layout = stacks[0][1]
    own = {f.name for f in dataclasses.fields(CondCompConfig)} | variant_config_fields()
    text_config = copy.deepcopy(src_config)
    for name, value in overrides.items():
        if name in own:
            fields[name] = value
        else:
            setattr(text_config, name, value)
    for name in ("num_labels", "id2label", "label2id"):
        fields.pop(name, None)  # the head's labels live in the source's config, read from there
    return CondCompConfig(
        **as_floats_where_expected(CondCompConfig, fields),
        text_config=text_config,
        ffn_layout=layout_to_dict(layout),
        decoder_ffn_layout=layout_to_dict(stacks[1][1]) if len(stacks) > 1 else None,
        ffn_activation=activation_of(src_config, layout),
        id2label=src_config.id2label,
        label2id=src_config.label2id,
    )


def _check_native_ffn(layer, layout, ffn, activation, model_type):
    """The layout must reproduce the dense layer's FFN: run both on random inputs."""
    ins, in_b, out, out_b, _ = ffn
    learned = [name for name, _ in ACT2FN[activation].named_parameters()]
    if learned:  # Apertus' xIELU: each layer learns its own, and experts build theirs from the name alone
        raise ValueError(
            f"source model type {model_type!r}: its FFN's activation {activation!r} has learned parameters "
            f"({', '.join(learned)}), which experts do not carry, so its FFNs cannot become experts; routed blocks "
            "(variant='mod') and gates (variant='gate') keep the FFN as it is."
        )
    x = torch.randn(2, 3, ins[0].shape[1], generator=torch.Generator().manual_seed(0)).to(ins[0].dtype)
    modules = [layer.get_submodule(layout.module)] + [layer.get_submodule(n) for n in layout.identity]
    was_training = layer.training
    layer.eval()
    with torch.no_grad():
        expected = x
        for module in modules:
            expected = module(expected)
        h = [torch.nn.functional.linear(x, w, None if in_b is None else b)
             for w, b in zip(ins, in_b or [None] * len(ins))]
        act = ACT2FN[activation]
        h = act(h[0]) * h[1] if layout.gated else act(h[0])
        got = torch.nn.functional.linear(h, out, out_b)
    layer.train(was_training)
    if not torch.allclose(got.float(), expected.float(), atol=1e-4, rtol=1e-3):
        raise ValueError(
            f"source model type {model_type!r}: its FFN does not compute out(act(in(x))) as its layout says "
            f"(max difference {(got - expected).abs().max().item():.3g}), so it cannot be upcycled exactly. "
            "Add an entry for it to hf_condcomp.modeling.architectures.LAYOUTS."
        )


def convert_native_state_dict(dense, target, config, stacks, init, seed, noise_std, drop_ratio,
                              expert_sources=None, routers=None):
    """The dense state dict, with the MoE layers' FFNs turned into experts (`init`, `seed`, `noise_std`,
    `drop_ratio`: the upcycling settings, whose defaults are `UpcycleSpec`'s): made
    from `dense`'s FFNs, or from those of `expert_sources` (dense models of the same architecture,
    each giving an equal share of the experts; `dense` then holds the shared weights). `stacks` as
    `native_stacks` gives them; their MoE layers are `moe_layers` (and `decoder_moe_layers`).
    `routers`: {layer: (E, H)} router starts of the first stack, random (or the split groups') where
    absent."""
    gen = torch.Generator().manual_seed(seed)
    src_state = dense.state_dict()
    target_keys = dict(target.state_dict(keep_vars=True))
    expert_states = None if expert_sources is None else [source.state_dict() for source in expert_sources]
    out, consumed = {}, set()
    stack_layers = (config.moe_layers, config.decoder_moe_layers)
    for stack, ((path, layout, _), moe_layers) in enumerate(zip(stacks, stack_layers)):
        layers = dense.get_submodule(path)  # found by `native_stacks`
        for i in moe_layers or []:
            src_prefix = f"{path}.{i}."
            ffn = layout_ffn(src_state, src_prefix, layout)
            _check_native_ffn(layers[i], layout, ffn, config.ffn_activation, dense.config.model_type)
            ffns = ffn
            if expert_sources is not None:
                ffns = [layout_ffn(state, src_prefix, layout) for state in expert_states]
            router = (routers or {}).get(i) if stack == 0 else None
            out.update(moe_block_tensors(ffns, f"{src_prefix}{layout.module}.", target_keys, config,
                                          layout.gated, init, gen, noise_std, drop_ratio, router))
            consumed.update(ffn[4])
    return copy_rest(src_state, target, target_keys, out, consumed, config, gen)
