"""Where each transformers architecture keeps its FFN, as data.

A native conditional-computation model (`modeling_condcomp.py`) is the transformers model of
its source, built from the source's own config by the installed transformers, with the FFN of
every MoE layer swapped for an MoE block. All it needs to know of an architecture is one
`FFNLayout`: which attribute of a layer holds the FFN, the weights that compute it, its
activation, and what must become the identity. A new architecture whose FFN is a standard MLP is
one entry of `LAYOUTS`; one that is not listed is recognised from its layer's modules
(`detect_layout`), and its FFN is checked numerically against the layout at upcycling time.

This file travels to the Hub with every saved model: only sibling relative imports.
"""

import dataclasses
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class FFNLayout:
    """One architecture's FFN: output = out(act(in(x))) (gated: out(act(gate(x)) * up(x))).

    module: the layer's attribute replaced by the MoE block (it takes the FFN input, B x T x H).
    inputs: weights, relative to the layer, of the input projection(s): one, or [gate, up].
    output: the output projection's weights, relative to the layer.
    identity: modules of the layer, outside `module`, that become the identity because the MoE
        block already computes them (BERT's `output.dense`, OPT's `activation_fn` and `fc2`).
    act: config attributes naming the activation, the first one present wins.
    gated: SwiGLU-style FFN (act(gate) * up).
    fused: one input matrix holds [gate; up] (Phi-3, ModernBERT).
    conv1d: GPT-2 `Conv1D` weights, stored (in, out).
    dropout: config attribute of a dropout the replaced module applies to its output, kept.
    inner_dropout: attribute of the layer holding the rate of a dropout applied inside the FFN
        (the BART family's `activation_dropout`), which experts have no place for: set to 0 in
        MoE layers (T5's dropout inside `DenseReluDense` goes with the module it replaces).
    causal: a decoder (expert choice then routes causally at inference, moe.py).
    bias: the FFN's projections have biases (the experts then carry (E, out) biases).
    """

    module: str
    inputs: tuple
    output: str
    act: tuple
    causal: bool
    identity: tuple = ()
    gated: bool = False
    fused: bool = False
    conv1d: bool = False
    dropout: str | None = None
    bias: bool = False  # set from the source's weights at upcycling time
    inner_dropout: str | None = None


_LLAMA = FFNLayout("mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", ("hidden_act",), True, gated=True)
_BERT = FFNLayout("intermediate", ("intermediate.dense",), "output.dense", ("hidden_act",), False, ("output.dense",))

LAYOUTS = {
    # encoders
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "electra": _BERT,
    "deberta-v2": _BERT,
    "distilbert": FFNLayout("ffn", ("ffn.lin1",), "ffn.lin2", ("activation",), False, dropout="dropout"),
    "modernbert": FFNLayout(
        "mlp", ("mlp.Wi",), "mlp.Wo", ("hidden_activation",), False, gated=True, fused=True, dropout="mlp_dropout"
    ),
    # decoders
    "gpt2": FFNLayout("mlp", ("mlp.c_fc",), "mlp.c_proj", ("activation_function",), True, conv1d=True,
                      dropout="resid_pdrop"),
    "gpt_neo": FFNLayout("mlp", ("mlp.c_fc",), "mlp.c_proj", ("activation_function",), True, dropout="resid_dropout"),
    "gpt_neox": FFNLayout("mlp", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", ("hidden_act",), True),
    "opt": FFNLayout("fc1", ("fc1",), "fc2", ("activation_function",), True, ("activation_fn", "fc2")),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": FFNLayout(**{**_LLAMA.__dict__, "act": ("hidden_activation", "hidden_act")}),
    "gemma2": FFNLayout(**{**_LLAMA.__dict__, "act": ("hidden_activation", "hidden_act")}),
    "phi3": FFNLayout("mlp", ("mlp.gate_up_proj",), "mlp.down_proj", ("hidden_act",), True, gated=True, fused=True),
}


def _bart_family(config, layer, causal):
    return FFNLayout("fc1", ("fc1",), "fc2", ("activation_function",), causal, ("activation_fn", "fc2"),
                     inner_dropout="activation_dropout")


def _t5(config, layer, causal):
    ff = f"layer.{len(layer.layer) - 1}.DenseReluDense"  # after self-attention (and cross-attention)
    inputs = (f"{ff}.wi_0", f"{ff}.wi_1") if config.is_gated_act else (f"{ff}.wi",)
    return FFNLayout(ff, inputs, f"{ff}.wo", ("dense_act_fn",), causal, gated=config.is_gated_act)


# Encoder-decoder sources: (source config, a layer of the stack, causal) -> the layout of that stack's
# FFN, for the encoder (causal=False) and the decoder (causal=True) apart.
SEQ2SEQ_LAYOUTS = {
    "t5": _t5,
    "mt5": _t5,
    "bart": _bart_family,
    "mbart": _bart_family,
    "marian": _bart_family,
    "m2m_100": _bart_family,
}

# The config attributes that transformers' configs name an FFN's activation by, tried in this order
# for an architecture `LAYOUTS` does not name: `hidden_act` (most), `hidden_activation` (the Gemma
# family, ModernBERT), `activation_function` (GPT-2, OPT, BART), `activation` (DistilBERT, Falcon),
# `mlp_hidden_act` (Nemotron-H), `ff_activation` (XLNet), `afn` (OpenAI GPT), `dense_act_fn` (T5).
# The installed configs that carry two of them give both the same value (EXAONE's alias), and the
# numerical check of the FFN at upcycling time catches a wrong pick.
FFN_ACTIVATIONS = ("hidden_act", "hidden_activation", "activation_function", "activation", "mlp_hidden_act",
                   "ff_activation", "afn", "dense_act_fn")

# Shapes recognised in architectures that `LAYOUTS` does not name: (child modules of `module`, layout),
# the first match wins, so a shape comes before the shapes it contains (gate/up/down before up/down).
_SHAPES = (
    # Llama's, and Gemma 3, OLMo 2, SmolLM3, Granite, Cohere, ...
    (("gate_proj", "up_proj", "down_proj"), _LLAMA),
    # Phi-3's fused [gate; up]: GLM, GLM-4
    (("gate_up_proj", "down_proj"), LAYOUTS["phi3"]),
    # an ungated FFN: Arcee (AFM), Nemotron, Apertus, Jais 2
    (("up_proj", "down_proj"), FFNLayout("mlp", ("mlp.up_proj",), "mlp.down_proj", FFN_ACTIVATIONS, True)),
    (("c_fc", "c_proj"), FFNLayout("mlp", ("mlp.c_fc",), "mlp.c_proj", FFN_ACTIVATIONS, True)),
    (("fc1", "fc2"), FFNLayout("mlp", ("mlp.fc1",), "mlp.fc2", FFN_ACTIVATIONS, True)),
)


def find_layers(model: nn.Module, num_layers: int):
    """(dotted path, ModuleList) of the model's transformer layers: the ModuleList of `num_layers`
    modules of one class that holds the most parameters (the layers, not per-layer heads)."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != num_layers:
            continue
        # (a routed or gated layer is a subclass of its source class: depth.py)
        if len({getattr(type(m), "_condcomp_source_class", type(m)) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, module, size)
    if best is None:
        raise ValueError(f"no list of {num_layers} transformer layers found in {type(model).__name__}")
    return best[0], best[1]


def decoder_depth(config) -> int | None:
    """The decoder's depth of an encoder-decoder config (T5's `num_decoder_layers`, BART's
    `decoder_layers`), None for other configs."""
    if not getattr(config, "is_encoder_decoder", False):
        return None
    return getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)


def seq2seq_stacks(model: nn.Module) -> list:
    """[(stack name, dotted path of the stack, dotted path of its layers within `model`, layers)] of an
    encoder-decoder model: its encoder, then its decoder."""
    config = model.config
    names = {id(module): name for name, module in model.named_modules()}
    counts = {"encoder": config.num_hidden_layers, "decoder": decoder_depth(config)}
    stacks = []
    for name, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
        path = names[id(stack)]
        inner, layers = find_layers(stack, counts[name])
        stacks.append((name, path, f"{path}.{inner}" if path else inner, layers))
    return stacks


def seq2seq_layout(config, layer: nn.Module, causal: bool) -> FFNLayout:
    """The FFN layout of one stack of an encoder-decoder source; refuses naming the type."""
    if config.model_type not in SEQ2SEQ_LAYOUTS:
        raise ValueError(
            f"unsupported encoder-decoder source `model_type`={config.model_type!r}: supported encoder-decoder types "
            f"are {', '.join(sorted(SEQ2SEQ_LAYOUTS))}."
        )
    return SEQ2SEQ_LAYOUTS[config.model_type](config, layer, causal)


def detect_layout(model_type: str, layer: nn.Module, causal: bool) -> FFNLayout:
    """The layout of `LAYOUTS`, or one recognised from the layer's modules, whose activation is
    read from any of `FFN_ACTIVATIONS`; refuses naming the type."""
    if model_type in LAYOUTS:
        return LAYOUTS[model_type]
    for children, layout in _SHAPES:
        mlp = getattr(layer, layout.module, None)
        if mlp is not None and all(isinstance(getattr(mlp, c, None), nn.Linear) for c in children):
            return dataclasses.replace(layout, act=FFN_ACTIVATIONS, causal=causal)
    intermediate, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    if (isinstance(getattr(intermediate, "dense", None), nn.Linear)
            and isinstance(getattr(output, "dense", None), nn.Linear)):
        return dataclasses.replace(_BERT, act=FFN_ACTIVATIONS, causal=causal)
    raise ValueError(
        f"unsupported source architecture `model_type`={model_type!r}: supported are {', '.join(sorted(LAYOUTS))}, "
        "and architectures whose layers hold an FFN of a known shape (an `mlp` with gate_proj/up_proj/down_proj, "
        f"gate_up_proj/down_proj, up_proj/down_proj, c_fc/c_proj or fc1/fc2, or BERT's intermediate/output); its "
        f"{type(layer).__name__} has {', '.join(n for n, _ in layer.named_children())}."
    )


def activation_of(config, layout: FFNLayout) -> str:
    """The FFN's activation (an `ACT2FN` name): the first of the layout's config attributes set."""
    for name in layout.act:
        value = getattr(config, name, None)
        if isinstance(value, str):
            return value
    raise ValueError(
        f"source model type {getattr(config, 'model_type', None)!r}: its config names the FFN's activation under none "
        f"of {', '.join(layout.act)}; add an entry for it to hf_condcomp.modeling.architectures.LAYOUTS."
    )


def layout_to_dict(layout: FFNLayout) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in layout.__dict__.items()}


def layout_from_dict(values: dict) -> FFNLayout:
    return FFNLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
