"""What the native MoE formats of Llama-family decoders (Mixtral, Qwen2-MoE, Qwen3-MoE) share: the
view of our config they read, what none of them expresses, the fields they share, and the key map.

Key map (ours -> native): none. An MoE layer's `mlp.gate.weight` (the router) and
`mlp.experts.{gate_up_proj,down_proj}` ((E, 2I, H) / (E, H, I)) are the native names and layout;
dense layers' `mlp.{gate,up,down}_proj.weight` and everything outside the MLPs keep the source's
names, which are ours too.
"""

from types import SimpleNamespace

import torch

from .base import ExportFormat

SOURCES = ("llama", "mistral", "qwen2", "qwen3")  # source model types of the Llama family

_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                "attention_dropout", "rope_parameters", "head_dim")
_MOE_FIELDS = ("num_local_experts", "num_experts_per_tok", "moe_layers", "norm_topk_prob", "router_unit_weights",
               "router_jitter_noise", "router_aux_loss_coef", "moe_expert_intermediate_size")


def llama_family_view(config) -> SimpleNamespace:
    """What the formats read of a `CondCompConfig` over a Llama, Mistral, Qwen2 or Qwen3 `text_config`:
    the source's own fields, its MoE settings, its attention's biases and norms, and the window it uses."""
    text = config.text_config
    source = text.model_type
    view = {name: getattr(text, name, None) for name in _TEXT_FIELDS}
    view.update({name: getattr(config, name) for name in _MOE_FIELDS})
    sliding = getattr(text, "sliding_window", None)
    if source in ("qwen2", "qwen3") and not getattr(text, "use_sliding_window", False):
        sliding = None  # Qwen2 / Qwen3 configs carry a window they use only when `use_sliding_window`
    attention_bias = bool(getattr(text, "attention_bias", False))
    view.update(source=source, sliding_window=sliding, attention_bias=attention_bias,
                qkv_bias=True if source == "qwen2" else attention_bias,
                mlp_bias=bool(getattr(text, "mlp_bias", False)), qk_norm=source == "qwen3",
                dense_layers=sorted(set(range(text.num_hidden_layers)) - set(config.moe_layers or [])),
                expert_size=config.moe_expert_intermediate_size or text.intermediate_size)
    return SimpleNamespace(**view)


class LlamaFamilyFormat(ExportFormat):
    """A native MoE of Llama-family decoders. Subclasses say what of the view they cannot express
    (`view_blocker`) and build their config from the view and `common_fields`."""

    sources = SOURCES

    def blocker(self, config) -> str | None:
        view = llama_family_view(config)
        return family_blocker(view) or self.view_blocker(view)

    def view_blocker(self, view) -> str | None:
        raise NotImplementedError

    def build_config(self, config):
        return self.config_from_view(llama_family_view(config))

    def config_from_view(self, view):
        raise NotImplementedError

    def cannot(self, what: str) -> str:
        return f"`{self.name}` cannot express {what}"

    def no_qk_norm(self, view) -> str | None:
        """For the formats without per-head query/key norms."""
        if view.qk_norm:
            return (f"`{self.name}` has no per-head query/key norms, which this model (upcycled from "
                    f"{view.source!r}) has")
        return None

    def map_state_dict(self, state: dict, native) -> dict:
        """Our state dict, whose keys are the native model's; asserts that every key is matched once,
        with its shape."""
        out = dict(state)
        expected = native.state_dict()
        for key, param in expected.items():
            if key not in out and ".shared_expert" in key:
                # Qwen2-MoE's shared expert, width 0 (its gate is zero as well): it adds nothing.
                out[key] = torch.zeros_like(param)
        missing, unexpected = sorted(set(expected) - set(out)), sorted(set(out) - set(expected))
        if missing or unexpected:
            raise AssertionError(f"native key map is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, param in expected.items():
            if tuple(out[key].shape) != tuple(param.shape):
                raise AssertionError(f"{key}: shape {tuple(out[key].shape)} does not fit the native "
                                     f"{tuple(param.shape)}")
        return out


def family_blocker(view) -> str | None:
    """What none of the Llama-family formats expresses."""
    if view.sliding_window is not None and view.source in ("qwen2", "qwen3"):
        return f"{view.source!r} sliding-window attention in some layers (`max_window_layers`)"
    if view.mlp_bias:
        return "`mlp_bias`=True: native experts have no biases"
    if view.router_unit_weights and view.num_experts_per_tok > 1:
        return ("`router_unit_weights`=True with top-k > 1 (split upcycling): native models weight experts by "
                "router probabilities")
    return None


def common_fields(view) -> dict:
    """The fields every Llama-family native config takes from the view as they are."""
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
             "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_dropout", "rope_parameters",
             "num_experts_per_tok", "router_aux_loss_coef")
    return {**{name: getattr(view, name) for name in names}, "output_router_logits": False}
