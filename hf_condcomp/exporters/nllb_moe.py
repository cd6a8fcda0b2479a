"""`nllb_moe`: M2M100 / NLLB sources to `NllbMoeForConditionalGeneration`.

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
Refused too: top-k other than 2, unrenormalised or unit weights, expert widths apart from the
stack's FFN width, and layer sets the sparse steps do not place.
In training NLLB-MoE drops tokens above 2 * tokens / experts per expert; the export is for inference.
"""

import re

import torch

from .base import register_export_format
from .encoder_decoder import DROPLESS_CAPACITY, EncoderDecoderFormat, first_blocker, layer_setting

_RENAMES = ((".encoder_attn_layer_norm.", ".cross_attention_layer_norm."), (".encoder_attn.", ".cross_attention."),
            (".final_layer_norm.", ".ff_layer_norm."), (".fc1.gate.weight", ".ffn.router.classifier.weight"))
_EXPERTS = {"up_proj": "fc1.weight", "up_proj_bias": "fc1.bias", "down_proj": "fc2.weight",
            "down_proj_bias": "fc2.bias"}


def nllb_sparse_layers(step: int, num_layers: int) -> list[int]:
    """The layers NLLB-MoE makes MoE for `*_sparse_step`=step (none for 0)."""
    return [i for i in range(num_layers) if step > 0 and (i + 1) % step == 0]


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


@register_export_format
class NllbMoeFormat(EncoderDecoderFormat):
    name = "nllb_moe"
    architecture = "NllbMoeForConditionalGeneration"
    architecture_name = "NLLB-MoE"
    sources = ("m2m_100",)

    def blocker(self, config) -> str | None:
        text = config.text_config
        width = config.moe_expert_intermediate_size
        return first_blocker([
            (config.num_experts_per_tok != 2, f"top-{config.num_experts_per_tok} routing: NLLB-MoE routes top-2"),
            (config.router_unit_weights or not config.norm_topk_prob,
             "top-2 weights that are not the router probabilities renormalised over the two (`norm_topk_prob`=False "
             "or `router_unit_weights`=True): NLLB-MoE renormalises them"),
            (width is not None and (width != text.encoder_ffn_dim or width != text.decoder_ffn_dim),
             f"expert width {width} apart from the dense FFN's (NLLB-MoE's experts have the stack's ffn_dim)"),
            *self.stack_blockers(config, nllb_sparse_layers, "places its sparse layers at every "
                                 "`{stack}_sparse_step`-th layer (layer i where (i + 1) % step == 0)"),
        ])

    def stacks(self, config):
        text = config.text_config
        return (("encoder", config.moe_layers, text.encoder_layers),
                ("decoder", config.decoder_moe_layers, text.decoder_layers))

    def weight_blocker(self, state: dict) -> str | None:
        if nllb_moe_dispatches_by_expert():
            return None
        for key, value in state.items():
            if re.search(r"\.fc1\.experts\.", key) and not bool((value == value[:1]).all()):
                layer = key.split(".fc1.experts.")[0]
                return ("experts that differ (" + layer + "): transformers' NllbMoeExperts.forward picks experts by "
                        "the value of the one-hot top-1 mask, not by expert id (each token's first weight goes to "
                        "expert_1, its second to expert_0), so NLLB-MoE computes the model only while each layer's "
                        "experts are identical (copy-upcycled, untrained)")
        return None

    def build_config(self, config):
        from transformers import NllbMoeConfig

        text = config.text_config
        steps = [layer_setting(layers, n, nllb_sparse_layers) for _, layers, n in self.stacks(config)]
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
            encoder_sparse_step=steps[0], decoder_sparse_step=steps[1],
        )

    def map_state_dict(self, state: dict, native) -> dict:
        out = {}
        for key, value in state.items():
            for old, new in _RENAMES:
                key = key.replace(old, new)
            expert = re.fullmatch(r"(.*\.layers\.\d+)\.fc1\.experts\.(\w+)", key)
            if expert:
                name = _EXPERTS[expert.group(2)]
                out.update({f"{expert.group(1)}.ffn.experts.expert_{e}.{name}": w for e, w in enumerate(value)})
                continue
            out[re.sub(r"(\.layers\.\d+)\.(fc[12])\.", r"\1.ffn.\2.", key)] = value
        return out
