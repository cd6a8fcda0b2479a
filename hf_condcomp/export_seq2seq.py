"""Export encoder-decoder upcycles natively: T5 sources to `SwitchTransformersForConditionalGeneration`,
M2M100 / NLLB sources to `NllbMoeForConditionalGeneration`.

Switch Transformers is T5 (v1.0: ReLU, not gated) with top-1 MoE FFNs in some layers of each
stack. Its router weights the one expert of each token by the router probability p, so it
computes an upcycled model exactly when that model routes by dropless token choice with top-1
and weights by p too (`norm_topk_prob=False`; the default top-1 weight is p / stopgrad(p), value
1, which Switch cannot express). Switch's per-sequence `expert_capacity` is set above any length,
so it drops nothing, as our model does. The MoE layers of each stack must be those Switch places
from its `num_sparse_*_layers` (every layer, every other from layer 1, ...).

Refused, naming the difference: gated T5 FFNs (v1.1, Flan-T5, mT5), expert choice,
capacity limits, top-k > 1, unit or renormalised top-1 weights, expert widths apart from `d_ff`,
and layer sets Switch does not place.

NLLB-MoE is M2M100 (pre-norm layers, sinusoidal positions, FFN `fc1`/`fc2` with biases) with top-2
MoE FFNs in every `*_sparse_step`-th layer of each stack (layer i when (i + 1) % step == 0). In
evaluation its router (`NllbMoeTop2Router`) takes a float32 softmax, the top-1 expert and the best
other one (`second_expert_policy="all"`: deterministic), and weights them by their probabilities
renormalised over the two: our dropless top-2 token choice with `norm_topk_prob=True`, no router
bias. Its eval capacity is `moe_eval_capacity_token_fraction` * tokens per expert, written as 1.0:
an expert is first or second choice of at most every token once, so nothing is dropped. Written
with `moe_token_dropout=0` (its default 0.2 scales every expert's output by 0.8 in evaluation) and
`router_ignore_padding_tokens=False`, so the encoder's padding, like ours, reaches no expert.
But in transformers' `NllbMoeExperts.forward` (5.x) the experts are picked by the value of the
one-hot top-1 mask, not by expert id: each token's first weight goes to `expert_1` and its second
to `expert_0`, whatever the router chose (`nllb_moe_dispatches_by_expert`). NLLB-MoE therefore
computes our function only where the experts of each MoE layer are identical (copy-upcycled, not
yet trained): the export is written then, and refused, naming that dispatch, where experts differ.
Refused too: other routings, capacity limits, top-k other than 2, unrenormalised or unit weights,
expert widths apart from the stack's FFN width, and layer sets the sparse steps do not place.
In training NLLB-MoE drops tokens above 2 * tokens / experts per expert; the export is for inference.

Key map (ours -> Switch), per stack and layer: `layer.k.DenseReluDense.wi/wo` ->
`layer.k.mlp.wi/wo` (dense layers); `layer.k.DenseReluDense.gate.weight` ->
`layer.k.mlp.router.classifier.weight`; `experts.up_proj[e]` / `experts.down_proj[e]` ->
`mlp.experts.expert_e.wi.weight` / `.wo.weight`; everything else keeps its T5 name.
"""

import re

import torch

from .modeling.routing import get_routing_method

SEQ2SEQ_FORMATS = ("switch_transformers", "nllb_moe")
DROPLESS_CAPACITY = 1 << 30  # tokens per expert and sequence: above any length, so Switch drops none


KEEP = "Keep this model as remote code (trust_remote_code=True)."


def switch_sparse_count(moe_layers, num_layers):
    """The `num_sparse_*_layers` for which Switch places its MoE layers at `moe_layers`, or None."""
    for count in range(num_layers + 1):
        step = num_layers // count if count else num_layers
        placed = [i for i in range(num_layers) if step > 0 and (i % step == 1 or step == 1)]
        if placed == sorted(moe_layers or []):
            return count
    return None


def _dropless_token_choice_blockers(config, architecture):
    """The routing blockers every native encoder-decoder MoE shares: token choice, no capacity limit."""
    return [
        (not get_routing_method(config.moe_routing).exports_natively,
         f"`moe_routing`={config.moe_routing!r}: {architecture} routes by token choice"),
        (config.moe_capacity_factor is not None,
         f"`moe_capacity_factor`={config.moe_capacity_factor!r}: the export is dropless"),
    ]


def _first_blocker(config, blockers):
    """(the first difference, the fix) among `blockers`, then a model without MoE layers; or None."""
    blockers = [*blockers, (not (config.moe_layers or config.decoder_moe_layers), "the model has no MoE layer")]
    return next(((feature, KEEP) for blocked, feature in blockers if blocked), None)


def switch_blocker(config):
    """None where `switch_transformers` computes the function of `config` (a T5 upcycle), else (the
    difference, the fix), which export.py raises as its `ExportError`."""
    text = config.text_config
    width = config.moe_expert_intermediate_size or text.d_ff
    blockers = [
        (text.is_gated_act, f"a gated FFN (`feed_forward_proj`={text.feed_forward_proj!r}): Switch's experts are "
                            "T5 v1.0's ReLU FFN, not gated"),
        *_dropless_token_choice_blockers(config, "Switch"),
        (config.num_experts_per_tok != 1, f"top-{config.num_experts_per_tok} routing: Switch routes top-1"),
        (config.router_unit_weights or config.norm_topk_prob,
         "the top-1 expert weighted by 1 (`norm_topk_prob`=True or `router_unit_weights`=True): Switch weights it "
         "by the router probability; upcycle with norm_topk_prob=False for a Switch-exportable model"),
        (width != text.d_ff, f"expert width {width} apart from the dense FFN's {text.d_ff} (Switch has one `d_ff`)"),
    ]
    for stack, layers, n in (("encoder", config.moe_layers, text.num_layers),
                             ("decoder", config.decoder_moe_layers, text.num_decoder_layers)):
        blockers.append((switch_sparse_count(layers, n) is None,
                         f"{stack} MoE layers {layers or []} of {n}: Switch places its sparse layers every "
                         "`num_layers // num_sparse_layers` layers from layer 1"))
    return _first_blocker(config, blockers)


def switch_config(config):
    from transformers import SwitchTransformersConfig

    text = config.text_config
    return SwitchTransformersConfig(
        vocab_size=text.vocab_size, d_model=text.d_model, d_kv=text.d_kv, d_ff=text.d_ff, num_layers=text.num_layers,
        num_decoder_layers=text.num_decoder_layers, num_heads=text.num_heads,
        relative_attention_num_buckets=text.relative_attention_num_buckets,
        relative_attention_max_distance=text.relative_attention_max_distance, dropout_rate=text.dropout_rate,
        layer_norm_epsilon=text.layer_norm_epsilon, initializer_factor=text.initializer_factor,
        dense_act_fn=text.dense_act_fn, use_cache=text.use_cache, pad_token_id=text.pad_token_id,
        eos_token_id=text.eos_token_id, tie_word_embeddings=text.tie_word_embeddings,
        num_experts=config.num_local_experts, expert_capacity=DROPLESS_CAPACITY, router_bias=False,
        router_jitter_noise=config.router_jitter_noise, router_z_loss_coef=config.router_z_loss_coef,
        router_aux_loss_coef=config.router_aux_loss_coef,
        num_sparse_encoder_layers=switch_sparse_count(config.moe_layers, text.num_layers),
        num_sparse_decoder_layers=switch_sparse_count(config.decoder_moe_layers, text.num_decoder_layers),
    )


def switch_state_dict(state: dict) -> dict:
    """Our state dict under Switch's keys."""
    out = {}
    for key, value in state.items():
        key = key.replace(".DenseReluDense.", ".mlp.").replace(".mlp.gate.weight", ".mlp.router.classifier.weight")
        expert = re.fullmatch(r"(.*\.mlp)\.experts\.(up|down)_proj", key)
        if expert:
            name = "wi" if expert.group(2) == "up" else "wo"
            out.update({f"{expert.group(1)}.experts.expert_{e}.{name}.weight": w for e, w in enumerate(value)})
        else:
            out[key] = value
    return out


def verification_inputs(native):
    """A batch for the logits comparison of an encoder-decoder export."""
    g = torch.Generator().manual_seed(0)
    vocab = native.config.vocab_size
    return {"input_ids": torch.randint(0, vocab, (2, 16), generator=g),
            "decoder_input_ids": torch.randint(0, vocab, (2, 8), generator=g)}


def nllb_sparse_step(moe_layers, num_layers):
    """The `*_sparse_step` for which NLLB-MoE places its MoE layers at `moe_layers` (0: none), or None."""
    for step in range(num_layers + 1):
        placed = [i for i in range(num_layers) if step > 0 and (i + 1) % step == 0]
        if placed == sorted(moe_layers or []):
            return step
    return None


def nllb_moe_dispatches_by_expert() -> bool:
    """Whether the installed `NllbMoeSparseMLP` sends each token to the experts its router picked
    (transformers 5.x sends the top-1 weight to `expert_1` and the top-2 weight to `expert_0`)."""
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    config = NllbMoeConfig(d_model=4, num_experts=4, moe_token_dropout=0.0, moe_eval_capacity_token_fraction=1.0,
                           second_expert_policy="all")
    mlp = NllbMoeSparseMLP(config, 4).eval()
    with torch.no_grad():
        mlp.router.classifier.weight.copy_(torch.eye(4) * 10)  # token t: experts t, then the others equally
        for j in range(4):
            mlp.experts[f"expert_{j}"].fc1.weight.copy_(torch.eye(4))
            mlp.experts[f"expert_{j}"].fc1.bias.zero_()
            mlp.experts[f"expert_{j}"].fc2.weight.zero_()
            mlp.experts[f"expert_{j}"].fc2.bias.fill_(float(j))  # expert j outputs j
        out = mlp(torch.eye(4)[None])[0, :, 0]  # token t prefers expert t by far: about t where dispatch is exact
    return bool((out - torch.arange(4.0)).abs().max() < 0.1)


def seq2seq_format(config, requested="auto"):
    """(format, None) where a native encoder-decoder architecture computes `config`'s function, else
    (None, (the difference, the fix)), which export.py raises as its `ExportError`."""
    if requested not in ("auto", *SEQ2SEQ_FORMATS):
        return None, (f"`--format {requested}` is for decoder-only models; this model is an encoder-decoder",
                      "Use --format switch_transformers or nllb_moe (or auto).")
    source = config.text_config.model_type
    fmt = {"t5": "switch_transformers", "m2m_100": "nllb_moe"}.get(source)
    if fmt is None:
        return None, (f"the model was upcycled from {source!r}; encoder-decoder models export to Switch "
                      "Transformers from T5 sources and to NLLB-MoE from M2M100 / NLLB sources only", KEEP)
    if requested not in ("auto", fmt):
        return None, (f"`{requested}` is not the architecture of a model upcycled from {source!r}",
                      f"Use --format {fmt} (or auto).")
    blocker = switch_blocker(config) if fmt == "switch_transformers" else nllb_moe_blocker(config)
    return (None, blocker) if blocker else (fmt, None)


def nllb_moe_blocker(config):
    """None where NLLB-MoE's configuration can compute `config`'s function, else (the difference, the fix);
    the experts' weights are checked once read (`nllb_moe_weight_blocker`)."""
    text = config.text_config
    width = config.moe_expert_intermediate_size
    blockers = [
        *_dropless_token_choice_blockers(config, "NLLB-MoE"),
        (config.num_experts_per_tok != 2, f"top-{config.num_experts_per_tok} routing: NLLB-MoE routes top-2"),
        (config.router_unit_weights or not config.norm_topk_prob,
         "top-2 weights that are not the router probabilities renormalised over the two (`norm_topk_prob`=False "
         "or `router_unit_weights`=True): NLLB-MoE renormalises them"),
        (width is not None and (width != text.encoder_ffn_dim or width != text.decoder_ffn_dim),
         f"expert width {width} apart from the dense FFN's (NLLB-MoE's experts have the stack's ffn_dim)"),
    ]
    for stack, layers, n in (("encoder", config.moe_layers, text.encoder_layers),
                             ("decoder", config.decoder_moe_layers, text.decoder_layers)):
        blockers.append((nllb_sparse_step(layers, n) is None,
                         f"{stack} MoE layers {layers or []} of {n}: NLLB-MoE places its sparse layers at every "
                         f"`{stack}_sparse_step`-th layer (layer i where (i + 1) % step == 0)"))
    return _first_blocker(config, blockers)


def nllb_moe_weight_blocker(state: dict):
    """None where NLLB-MoE computes the model with these weights (ours, backbone prefix removed)."""
    if nllb_moe_dispatches_by_expert():
        return None
    for key, value in state.items():
        if re.search(r"\.fc1\.experts\.", key) and not bool((value == value[:1]).all()):
            layer = key.split(".fc1.experts.")[0]
            return ("experts that differ (" + layer + "): transformers' NllbMoeExperts.forward picks experts by "
                    "the value of the one-hot top-1 mask, not by expert id (each token's first weight goes to "
                    "expert_1, its second to expert_0), so NLLB-MoE computes the model only while each layer's "
                    "experts are identical (copy-upcycled, untrained)", KEEP)
    return None


def nllb_moe_config(config):
    from transformers import NllbMoeConfig

    text = config.text_config
    return NllbMoeConfig(
        vocab_size=text.vocab_size, max_position_embeddings=text.max_position_embeddings,
        encoder_layers=text.encoder_layers, encoder_ffn_dim=text.encoder_ffn_dim,
        encoder_attention_heads=text.encoder_attention_heads, decoder_layers=text.decoder_layers,
        decoder_ffn_dim=text.decoder_ffn_dim, decoder_attention_heads=text.decoder_attention_heads,
        encoder_layerdrop=text.encoder_layerdrop, decoder_layerdrop=text.decoder_layerdrop,
        use_cache=text.use_cache, is_encoder_decoder=True, activation_function=text.activation_function,
        d_model=text.d_model, dropout=text.dropout, attention_dropout=text.attention_dropout,
        activation_dropout=text.activation_dropout, init_std=text.init_std,
        decoder_start_token_id=text.decoder_start_token_id, scale_embedding=text.scale_embedding,
        pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
        tie_word_embeddings=text.tie_word_embeddings,
        num_experts=config.num_local_experts, expert_capacity=DROPLESS_CAPACITY, router_bias=False,
        router_dtype="float32", router_ignore_padding_tokens=False, second_expert_policy="all",
        normalize_router_prob_before_dropping=True, batch_prioritized_routing=False,
        moe_eval_capacity_token_fraction=1.0, moe_token_dropout=0.0,
        router_z_loss_coef=config.router_z_loss_coef, router_aux_loss_coef=config.router_aux_loss_coef,
        encoder_sparse_step=nllb_sparse_step(config.moe_layers, text.encoder_layers),
        decoder_sparse_step=nllb_sparse_step(config.decoder_moe_layers, text.decoder_layers),
    )


_NLLB_RENAMES = ((".encoder_attn_layer_norm.", ".cross_attention_layer_norm."), (".encoder_attn.", ".cross_attention."),
                 (".final_layer_norm.", ".ff_layer_norm."), (".fc1.gate.weight", ".ffn.router.classifier.weight"))
_NLLB_EXPERTS = {"up_proj": "fc1.weight", "up_proj_bias": "fc1.bias", "down_proj": "fc2.weight",
                 "down_proj_bias": "fc2.bias"}


def nllb_moe_state_dict(state: dict) -> dict:
    """Our state dict under NLLB-MoE's keys."""
    out = {}
    for key, value in state.items():
        for old, new in _NLLB_RENAMES:
            key = key.replace(old, new)
        expert = re.fullmatch(r"(.*\.layers\.\d+)\.fc1\.experts\.(\w+)", key)
        if expert:
            name = _NLLB_EXPERTS[expert.group(2)]
            out.update({f"{expert.group(1)}.ffn.experts.expert_{e}.{name}": w for e, w in enumerate(value)})
            continue
        out[re.sub(r"(\.layers\.\d+)\.(fc[12])\.", r"\1.ffn.\2.", key)] = value
    return out
