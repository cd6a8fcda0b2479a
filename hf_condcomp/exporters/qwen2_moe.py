"""`qwen2_moe`: dense and MoE layers mixed, our default of every other layer: the dense layers go to
`mlp_only_layers`, q/k/v biases follow the source (`qkv_bias`), the shared expert has width 0 and
contributes nothing, `norm_topk_prob` as ours."""

from .base import register_export_format
from .llama_family import LlamaFamilyFormat, common_fields


@register_export_format
class Qwen2MoeFormat(LlamaFamilyFormat):
    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"

    def view_blocker(self, view) -> str | None:
        if self.no_qk_norm(view):
            return self.no_qk_norm(view)
        if view.sliding_window is not None:
            return self.cannot(f"a sliding window of {view.sliding_window} in every layer (Qwen2-MoE windows the "
                               "upper layers only)")
        if view.attention_bias:
            return self.cannot("`attention_bias`=True on the output projection (Qwen2-MoE's has none)")
        head_dim = view.head_dim or view.hidden_size // view.num_attention_heads
        if head_dim * view.num_attention_heads != view.hidden_size:
            return self.cannot(f"`head_dim`={head_dim} apart from hidden_size / num_attention_heads (Qwen2-MoE "
                               "derives it)")
        return None

    def config_from_view(self, view):
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(**common_fields(view), intermediate_size=view.intermediate_size,
                              moe_intermediate_size=view.expert_size, num_experts=view.num_local_experts,
                              shared_expert_intermediate_size=0, decoder_sparse_step=1,
                              mlp_only_layers=view.dense_layers, norm_topk_prob=view.norm_topk_prob,
                              qkv_bias=view.qkv_bias, use_sliding_window=False)
