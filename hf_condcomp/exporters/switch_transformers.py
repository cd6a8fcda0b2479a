"""`switch_transformers`: T5 sources to `SwitchTransformersForConditionalGeneration`.

Switch Transformers is T5 (v1.0: ReLU, not gated) with top-1 MoE FFNs in some layers of each
stack. Its router weights the one expert of each token by the router probability p, so it
computes an upcycled model exactly when that model routes by dropless token choice with top-1
and weights by p too (`norm_topk_prob=False`; the default top-1 weight is p / stopgrad(p), value
1, which Switch cannot express). Switch's per-sequence `expert_capacity` is set above any length,
so it drops nothing, as our model does. The MoE layers of each stack must be those Switch places
from its `num_sparse_*_layers` (every layer, every other from layer 1, ...).

Refused, naming the difference: gated T5 FFNs (v1.1, Flan-T5, mT5), top-k > 1, unit or
renormalised top-1 weights, expert widths apart from `d_ff`, and layer sets Switch does not place.

Key map (ours -> Switch), per stack and layer: `layer.k.DenseReluDense.wi/wo` ->
`layer.k.mlp.wi/wo` (dense layers); `layer.k.DenseReluDense.gate.weight` ->
`layer.k.mlp.router.classifier.weight`; `experts.up_proj[e]` / `experts.down_proj[e]` ->
`mlp.experts.expert_e.wi.weight` / `.wo.weight`; everything else keeps its T5 name.
"""

import re

from .base import register_export_format
from .encoder_decoder import DROPLESS_CAPACITY, EncoderDecoderFormat, first_blocker, layer_setting


def switch_sparse_layers(count: int, num_layers: int) -> list[int]:
    """The layers Switch makes MoE for `num_sparse_*_layers`=count (its own rule, layer 1 even for 0)."""
    step = num_layers // count if count else num_layers
    return [i for i in range(num_layers) if step > 0 and (i % step == 1 or step == 1)]


@register_export_format
class SwitchTransformersFormat(EncoderDecoderFormat):
    name = "switch_transformers"
    architecture = "SwitchTransformersForConditionalGeneration"
    architecture_name = "Switch"
    sources = ("t5",)

    def blocker(self, config) -> str | None:
        text = config.text_config
        width = config.moe_expert_intermediate_size or text.d_ff
        return first_blocker([
            (text.is_gated_act, f"a gated FFN (`feed_forward_proj`={text.feed_forward_proj!r}): Switch's experts "
                                "are T5 v1.0's ReLU FFN, not gated"),
            (config.num_experts_per_tok != 1, f"top-{config.num_experts_per_tok} routing: Switch routes top-1"),
            (config.router_unit_weights or config.norm_topk_prob,
             "the top-1 expert weighted by 1 (`norm_topk_prob`=True or `router_unit_weights`=True): Switch weights "
             "it by the router probability; upcycle with norm_topk_prob=False for a Switch-exportable model"),
            (width != text.d_ff, f"expert width {width} apart from the dense FFN's {text.d_ff} (Switch has one "
                                 "`d_ff`)"),
            *self.stack_blockers(config, switch_sparse_layers,
                                 "places its sparse layers every `num_layers // num_sparse_layers` layers from "
                                 "layer 1"),
        ])

    def stacks(self, config):
        text = config.text_config
        return (("encoder", config.moe_layers, text.num_layers),
                ("decoder", config.decoder_moe_layers, text.num_decoder_layers))

    def build_config(self, config):
        from transformers import SwitchTransformersConfig

        text = config.text_config
        sparse = [layer_setting(layers, n, switch_sparse_layers) for _, layers, n in self.stacks(config)]
        return SwitchTransformersConfig(
            vocab_size=text.vocab_size, d_model=text.d_model, d_kv=text.d_kv, d_ff=text.d_ff,
            num_layers=text.num_layers, num_decoder_layers=text.num_decoder_layers, num_heads=text.num_heads,
            relative_attention_num_buckets=text.relative_attention_num_buckets,
            relative_attention_max_distance=text.relative_attention_max_distance, dropout_rate=text.dropout_rate,
            layer_norm_epsilon=text.layer_norm_epsilon, initializer_factor=text.initializer_factor,
            dense_act_fn=text.dense_act_fn, use_cache=text.use_cache, pad_token_id=text.pad_token_id,
            eos_token_id=text.eos_token_id, tie_word_embeddings=text.tie_word_embeddings,
            num_experts=config.num_local_experts, expert_capacity=DROPLESS_CAPACITY, router_bias=False,
            router_jitter_noise=config.router_jitter_noise, router_z_loss_coef=config.router_z_loss_coef,
            router_aux_loss_coef=config.router_aux_loss_coef,
            num_sparse_encoder_layers=sparse[0], num_sparse_decoder_layers=sparse[1],
        )

    def map_state_dict(self, state: dict, native) -> dict:
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
