"""Llama-family decoders (SwiGLU FFN, RoPE, RMSNorm, grouped-query attention: Llama, SmolLM2,
Mistral without sliding window, Qwen2 with q/k/v biases, Qwen3 with per-head q/k norms) with
Mixture-of-Experts FFNs and gated layers. Parameter names match `transformers`' Llama
(`model.layers.0.self_attn.q_proj.weight`); an MoE layer holds `mlp.router` and `mlp.experts.gate_up_proj` ([gate; up] stacked)."""

import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from .common import CondCompInitMixin, ForwardContext, attention
from .configuration_condcomp import CondCompLlamaConfig
from .decoder import CondCompCausalLMMixin, CondCompDecoderMixin
from .gating import wrap_gated_layers
from .moe import MoEFeedForward


class CondCompLlamaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        qkv_bias = config.attention_bias if config.qkv_bias is None else config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.dropout = config.attention_dropout
        self.qk_norm = config.qk_norm
        if self.qk_norm:  # Qwen3: per-head RMSNorm of queries and keys
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x, ctx: ForwardContext):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, h, T, d), (B, hk, T, d)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v, self.layer_idx)
        return self.o_proj(attention(q, k, v, ctx, self.dropout if self.training else 0.0))


class CondCompLlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class CondCompLlamaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = CondCompLlamaAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.is_moe = layer_idx in config.moe_layers
        if self.is_moe:
            self.mlp = MoEFeedForward(
                config, config.hidden_size, gated=True, bias=config.mlp_bias, hidden_act=config.hidden_act, causal=True
            )
        else:
            self.mlp = CondCompLlamaMLP(config)

    def forward(self, x, ctx: ForwardContext):
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            ffn, logits = self.mlp(h, ctx.token_mask)
            ctx.router_logits.append(logits)
            return x + ffn
        return x + self.mlp(h)


class CondCompLlamaPreTrainedModel(CondCompInitMixin, PreTrainedModel):
    config_class = CondCompLlamaConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _no_split_modules = ["CondCompLlamaDecoderLayer"]
    _auto_heads = {"AutoModel": "CondCompLlamaModel", "AutoModelForCausalLM": "CondCompLlamaForCausalLM"}


class CondCompLlamaModel(CondCompDecoderMixin, CondCompLlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([CondCompLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        wrap_gated_layers(self.layers, config, causal=True)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def embed(self, input_ids, inputs_embeds, position_ids, token_type_ids=None):
        # token_type_ids: ignored, as transformers' Llama ignores them
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def position_embeddings(self, x, position_ids):
        return self.rotary_emb(x, position_ids)  # (cos, sin), each (B, T, d)

    def decoder_layers(self):
        return self.layers

    def final_norm(self, x):
        return self.norm(x)


class CondCompLlamaForCausalLM(CondCompCausalLMMixin, CondCompLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = CondCompLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


CondCompLlamaConfig.register_for_auto_class()
CondCompLlamaModel.register_for_auto_class("AutoModel")
CondCompLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
