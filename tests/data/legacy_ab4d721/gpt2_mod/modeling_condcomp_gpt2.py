"""GPT-2-family decoders with Mixture-of-Experts FFNs and gated layers.

Attention and dense FFNs keep GPT-2's `Conv1D` layout (weight (in, out)) and names
(`transformer.h.0.attn.c_attn.weight`, ...), so dense weights copy over unchanged. Experts use
the (E, out, in) layout of `experts.py`: upcycling transposes `c_fc` / `c_proj` explicitly.
"""

import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D

from .common import CondCompInitMixin, ForwardContext, attention
from .configuration_condcomp import CondCompGPT2Config, intermediate_size_of
from .decoder import CondCompCausalLMMixin, CondCompDecoderMixin
from .gating import wrap_gated_layers
from .moe import MoEFeedForward


class CondCompGPT2Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale

    def forward(self, x, ctx: ForwardContext):
        B, T, H = x.shape
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(H, dim=-1))
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v, self.layer_idx)  # (B, h, L, d)
        out = attention(q, k, v, ctx, self.attn_dropout if self.training else 0.0, self.scale)  # (B, T, H)
        return self.resid_dropout(self.c_proj(out))


class CondCompGPT2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = intermediate_size_of(config)
        self.c_fc = Conv1D(inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, inner)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class CondCompGPT2Block(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CondCompGPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.is_moe = layer_idx in config.moe_layers
        if self.is_moe:
            self.mlp = MoEFeedForward(
                config, config.n_embd, gated=False, bias=True, hidden_act=config.activation_function, causal=True
            )
            self.mlp_dropout = nn.Dropout(config.resid_pdrop)
        else:
            self.mlp = CondCompGPT2MLP(config)

    def forward(self, x, ctx: ForwardContext):
        x = x + self.attn(self.ln_1(x), ctx)
        h = self.ln_2(x)
        if self.is_moe:
            ffn, logits = self.mlp(h, ctx.token_mask)
            ctx.router_logits.append(logits)
            return x + self.mlp_dropout(ffn)
        return x + self.mlp(h)


class CondCompGPT2PreTrainedModel(CondCompInitMixin, PreTrainedModel):
    config_class = CondCompGPT2Config
    base_model_prefix = "transformer"
    _supports_sdpa = True
    _no_split_modules = ["CondCompGPT2Block"]
    _auto_heads = {"AutoModel": "CondCompGPT2Model", "AutoModelForCausalLM": "CondCompGPT2ForCausalLM"}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Conv1D):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)


class CondCompGPT2Model(CondCompDecoderMixin, CondCompGPT2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([CondCompGPT2Block(config, i) for i in range(config.n_layer)])
        wrap_gated_layers(self.h, config, causal=True)
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def embed(self, input_ids, inputs_embeds, position_ids, token_type_ids=None):
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        x = inputs_embeds + self.wpe(position_ids)
        if token_type_ids is not None:  # GPT-2 embeds token types with the token embedding matrix
            x = x + self.wte(token_type_ids)
        return self.drop(x)

    def decoder_layers(self):
        return self.h

    def final_norm(self, x):
        return self.ln_f(x)


class CondCompGPT2ForCausalLM(CondCompCausalLMMixin, CondCompGPT2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.transformer = CondCompGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()


CondCompGPT2Config.register_for_auto_class()
CondCompGPT2Model.register_for_auto_class("AutoModel")
CondCompGPT2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
