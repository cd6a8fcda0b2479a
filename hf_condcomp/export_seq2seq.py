"""Export a model upcycled from a T5 source to transformers' native `SwitchTransformersForConditionalGeneration`.

Switch Transformers is T5 (v1.0: ReLU, not gated) with top-1 MoE FFNs in some layers of each
stack. Its router weights the one expert of each token by the router probability p, so it
computes an upcycled model exactly when that model routes by dropless token choice with top-1
and weights by p too (`norm_topk_prob=False`; the default top-1 weight is p / stopgrad(p), value
1, which Switch cannot express). Switch's per-sequence `expert_capacity` is set above any length,
so it drops nothing, as our model does. The MoE layers of each stack must be those Switch places
from its `num_sparse_*_layers` (every layer, every other from layer 1, ...).

Refused, naming the difference: other sources (an export of M2M100 / NLLB sources to NLLB-MoE is
not written: its top-2 router has not been checked against ours), gated T5 FFNs (v1.1, Flan-T5, mT5), expert choice,
capacity limits, top-k > 1, unit or renormalised top-1 weights, expert widths apart from `d_ff`,
and layer sets Switch does not place.

Key map (ours -> Switch), per stack and layer: `layer.k.DenseReluDense.wi/wo` ->
`layer.k.mlp.wi/wo` (dense layers); `layer.k.DenseReluDense.router.weight` ->
`layer.k.mlp.router.classifier.weight`; `experts.up_proj[e]` / `experts.down_proj[e]` ->
`mlp.experts.expert_e.wi.weight` / `.wo.weight`; everything else keeps its T5 name.
"""

import re

import torch

from .modeling.routing import get_routing_method

SEQ2SEQ_FORMATS = ("switch_transformers",)
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


def seq2seq_blocker(config, requested="auto"):
    """None where `switch_transformers` computes `config`'s function, else (the difference, the fix),
    which export.py raises as its `ExportError`."""
    if requested not in ("auto", *SEQ2SEQ_FORMATS):
        return (f"`--format {requested}` is for decoder-only models; this model is an encoder-decoder",
                f"Use --format {SEQ2SEQ_FORMATS[0]} (or auto).")
    text = config.text_config
    if text.model_type != "t5":
        return (f"the model was upcycled from {text.model_type!r}; encoder-decoder models export to Switch "
                "Transformers, from T5 sources only (no export to NLLB-MoE is written)", KEEP)
    width = config.moe_expert_intermediate_size or text.d_ff
    blockers = [
        (text.is_gated_act, f"a gated FFN (`feed_forward_proj`={text.feed_forward_proj!r}): Switch's experts are "
                            "T5 v1.0's ReLU FFN, not gated"),
        (not get_routing_method(config.moe_routing).exports_natively,
         f"`moe_routing`={config.moe_routing!r}: Switch routes by token choice"),
        (config.moe_capacity_factor is not None,
         f"`moe_capacity_factor`={config.moe_capacity_factor!r}: the export is dropless"),
        (config.num_experts_per_tok != 1, f"top-{config.num_experts_per_tok} routing: Switch routes top-1"),
        (config.router_unit_weights or config.norm_topk_prob,
         "the top-1 expert weighted by 1 (`norm_topk_prob`=True or `router_unit_weights`=True): Switch weights it "
         "by the router probability; upcycle with norm_topk_prob=False for a Switch-exportable model"),
        (width != text.d_ff, f"expert width {width} apart from the dense FFN's {text.d_ff} (Switch has one `d_ff`)"),
        (not (config.moe_layers or config.decoder_moe_layers), "the model has no MoE layer"),
    ]
    for stack, layers, n in (("encoder", config.moe_layers, text.num_layers),
                             ("decoder", config.decoder_moe_layers, text.num_decoder_layers)):
        blockers.append((switch_sparse_count(layers, n) is None,
                         f"{stack} MoE layers {layers or []} of {n}: Switch places its sparse layers every "
                         "`num_layers // num_sparse_layers` layers from layer 1"))
    return next(((feature, KEEP) for blocked, feature in blockers if blocked), None)


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
    """Our state dict (backbone prefix removed) under Switch's keys."""
    out = {}
    for key, value in state.items():
        key = key.replace(".DenseReluDense.", ".mlp.").replace(".mlp.router.weight", ".mlp.router.classifier.weight")
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
