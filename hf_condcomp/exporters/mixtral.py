"""`mixtral`: MoE in every layer (`MixtralForCausalLM`); attention without biases, top-k weights
renormalised (Mixtral always renormalises); a Mistral source's sliding window kept."""

from .base import register_export_format
from .llama_family import LlamaFamilyFormat, common_fields


@register_export_format
class MixtralFormat(LlamaFamilyFormat):
    name = "mixtral"
    architecture = "MixtralForCausalLM"

    def view_blocker(self, view) -> str | None:
        if self.no_qk_norm(view):
            return self.no_qk_norm(view)
        if view.sliding_window is not None and view.dense_layers:
            return self.cannot("a sliding window with dense layers (Mixtral, which has sliding windows, is MoE in "
                               "every layer)")
        if view.attention_bias or view.qkv_bias:
            return self.cannot("attention biases (Mixtral's attention has none)")
        if view.dense_layers:
            return self.cannot(f"dense layers {view.dense_layers} (Mixtral is MoE in every layer)")
        if not (view.norm_topk_prob or view.num_experts_per_tok == 1):
            return self.cannot("`norm_topk_prob`=False (Mixtral renormalises the top-k weights)")
        return None

    def config_from_view(self, view):
        from transformers import MixtralConfig

        return MixtralConfig(**common_fields(view), head_dim=view.head_dim, intermediate_size=view.expert_size,
                             num_local_experts=view.num_local_experts, sliding_window=view.sliding_window,
                             router_jitter_noise=view.router_jitter_noise)
