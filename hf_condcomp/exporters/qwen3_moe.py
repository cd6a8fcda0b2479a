"""`qwen3_moe`: a Qwen3 source (per-head query/key norms), every layer or mixed (`mlp_only_layers`),
`norm_topk_prob` as ours; the only format for such a model, since neither Mixtral nor Qwen2-MoE
normalises queries and keys."""

from .base import register_export_format
from .llama_family import LlamaFamilyFormat, common_fields


@register_export_format
class Qwen3MoeFormat(LlamaFamilyFormat):
    name = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    def view_blocker(self, view) -> str | None:
        if not view.qk_norm:
            return (f"`{self.name}` needs a Qwen3 source, whose attention normalises queries and keys per head; "
                    f"this model was upcycled from {view.source!r}, which does not")
        if view.qkv_bias != view.attention_bias:
            return self.cannot("q/k/v biases apart from the output projection's (Qwen3-MoE has one "
                               "`attention_bias`)")
        return None

    def config_from_view(self, view):
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**common_fields(view), head_dim=view.head_dim, intermediate_size=view.intermediate_size,
                              moe_intermediate_size=view.expert_size, num_experts=view.num_local_experts,
                              decoder_sparse_step=1, mlp_only_layers=view.dense_layers,
                              norm_topk_prob=view.norm_topk_prob, attention_bias=view.attention_bias,
                              use_sliding_window=False)
