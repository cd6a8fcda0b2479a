"""Pieces shared by the three model families: the per-forward context, attention masks,
scaled-dot-product attention, the output dataclass and the conditional-computation losses."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import initialization as init
from transformers.utils import ModelOutput

from .compat import CACHE_KEY, cache_field, output_cache
from .experts import Experts
from .routing import load_balancing_loss, router_z_loss


@dataclass
class CondCompModelOutput(ModelOutput):
    """Output of the base models (`CondCompBertModel`, ...), in transformers' order:
    `last_hidden_state` first, so `outputs[0]` is it in every mode, as for any base model.

    Beside the usual fields it carries:
        router_logits: one (batch * seq, E) tensor per MoE layer (with `output_router_logits`).
        aux_loss: Switch load-balancing loss over all MoE layers (unweighted).
        z_loss: router z-loss (unweighted).
        compute_loss: the gated layers' losses (allocation penalty, causal predictor), weighted.
        routing_loss: the weighted sum of the three, which every head adds to its task loss.
        compute_fraction: executed share of token-layer compute in this forward (1.0 = dense).
        layer_compute_fractions: {layer index: executed share} for the gated layers.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    # The KV cache, under the name the installed transformers gives it (compat.py): a dataclass
    # field must carry that exact name for `generate()` and `output["..."]` to find it.
    if CACHE_KEY == "cache":
        cache: object | None = None
    else:
        past_key_values: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    router_logits: tuple | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    compute_loss: torch.FloatTensor | None = None
    routing_loss: torch.FloatTensor | None = None
    compute_fraction: float | None = None
    layer_compute_fractions: dict | None = None


@dataclass
class CondCompOutput(ModelOutput):
    """Output of every head (sequence / token classification, masked and causal LM), in
    transformers' order: `loss` (task loss + routing loss; with labels), `logits`, the cache,
    `hidden_states`, `attentions`, then the router and gate fields of `CondCompModelOutput`."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_KEY == "cache":
        cache: object | None = None
    else:
        past_key_values: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    router_logits: tuple | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    compute_loss: torch.FloatTensor | None = None
    compute_fraction: float | None = None
    layer_compute_fractions: dict | None = None


@dataclass
class ForwardContext:
    """What every layer of one forward pass needs besides its hidden states.

    token_mask: (B, T) bool, true for real (non-padding) query tokens; None when all are real.
    attn_mask / is_causal: what `scaled_dot_product_attention` takes.
    position_embeddings: RoPE (cos, sin) of the query tokens (Llama family).
    cache: the KV cache (decoders) or None.
    kv_valid: (B, L) bool validity of every key the attention sees (past + current), or None.
    query_index: (T,) index of each query token in the key sequence (past + position).
    pinned: (B, T) bool, tokens every routed or gated layer must compute (the token a pooling
        head reads: `keep_pooled_token`), or None.
    kv_states: (B, L, H) hidden states the attention takes its keys and values from, when they
        are not the queries' own (a gated layer with `skipped_tokens_as_keys`), or None.
    """

    token_mask: torch.Tensor | None
    attn_mask: torch.Tensor | None
    is_causal: bool
    causal: bool
    query_index: torch.Tensor
    kv_valid: torch.Tensor | None = None
    position_embeddings: tuple | None = None
    cache: object | None = None
    pinned: torch.Tensor | None = None
    kv_states: torch.Tensor | None = None
    # `config._attn_implementation`: "sdpa" (fused) or "eager" (explicit softmax, which can return
    # the weights); with `output_attentions` every attention appends its (B, h, T, L) weights.
    attn_implementation: str = "sdpa"
    output_attentions: bool = False
    attentions: list = field(default_factory=list)
    router_logits: list = field(default_factory=list)
    extra_losses: list = field(default_factory=list)
    layer_fractions: dict = field(default_factory=dict)
    # Indices into `router_logits` of MoE layers inside routed blocks (gating.py): their rows are
    # already restricted to the real tokens the block ran on, so `token_mask` must not mask them.
    prefiltered_logits: set = field(default_factory=set)


def build_attention_mask(kv_valid, query_index, num_keys, causal):
    """Boolean SDPA mask (B or 1, 1, T, L), or None plus an `is_causal` flag when none is needed.

    kv_valid: (B, L) bool or None. query_index: (T,) or (B, T) positions of the queries among keys.
    Every query may attend to itself, so no row is empty (padding rows give unused values, not NaN).
    """
    T = query_index.shape[-1]
    if kv_valid is None:
        if not causal or T == 1:
            return None, False
        if T == num_keys:
            return None, True
    key_index = torch.arange(num_keys, device=query_index.device)
    q = query_index.unsqueeze(-1)  # (..., T, 1)
    allowed = key_index <= q if causal else torch.ones_like(key_index, dtype=torch.bool).expand(*q.shape[:-1], num_keys)
    if kv_valid is not None:
        allowed = allowed & kv_valid.unsqueeze(-2)  # (B, T, L)
    allowed = allowed | (key_index == q)
    if allowed.dim() == 2:
        allowed = allowed.unsqueeze(0)
    return allowed.unsqueeze(1), False


def attention(q, k, v, ctx: ForwardContext, dropout: float, scale: float | None = None):
    """q (B, h, T, d), k/v (B, hk, L, d) -> (B, T, h * d)."""
    if ctx.attn_implementation == "eager" or ctx.output_attentions:
        return _eager_attention(q, k, v, ctx, dropout, scale)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=ctx.attn_mask,
        dropout_p=dropout,
        is_causal=ctx.is_causal,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )  # (B, h, T, d)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _eager_attention(q, k, v, ctx: ForwardContext, dropout: float, scale: float | None):
    """The same attention written out (softmax(q k^T * scale + mask) v), which can return its weights."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key/value head serves h / hk query heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, h, T, L)
    mask = ctx.attn_mask
    if mask is None and ctx.is_causal:
        T, L = scores.shape[-2:]
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, h, T, L)
    if ctx.output_attentions:
        ctx.attentions.append(weights)
    out = F.dropout(weights, p=dropout) @ v  # (B, h, T, d)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def attention_settings(model, ctx: ForwardContext, output_attentions):
    """Fill in the attention implementation and `output_attentions` (call, else config) of a forward."""
    config = model.config
    name = getattr(config, "_attn_implementation", None) or "sdpa"
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"`attn_implementation`={name!r} is not supported by the hand-written BERT / GPT-2 / Llama families: "
            f"use one of {ATTENTION_IMPLEMENTATIONS} (routed and gated layers pass arbitrary masks), or, for a "
            "Mixture-of-Experts model, upcycle with `family='native'`, which runs transformers' own attention "
            "(flash and flex included)."
        )
    if output_attentions is None:
        output_attentions = getattr(config, "output_attentions", False)
    if output_attentions and (config.mod_layers or config.gate_layers):
        raise ValueError(
            "`output_attentions=True` is not supported for models with Mixture-of-Depths or gated layers: a "
            "routed layer attends over its own sub-batch of tokens, whose weights have no full-sequence shape."
        )
    ctx.attn_implementation, ctx.output_attentions = name, bool(output_attentions)


def make_context(attention_mask, num_queries, past_length, causal, device, batch_size, key_length=None):
    """Context for a forward over `num_queries` new tokens after `past_length` cached ones.

    attention_mask: (B, past + T) or (B, T) 0/1 padding mask as users pass it, or None.
    key_length: the number of keys the attention sees when it exceeds past + T (a static cache
    returns all its slots; the unfilled ones are masked out).
    """
    num_keys = past_length + num_queries
    kv_valid = None
    if attention_mask is not None:
        kv_valid = attention_mask.to(device=device, dtype=torch.bool)
        if kv_valid.shape[-1] == num_queries and past_length:
            kv_valid = F.pad(kv_valid, (past_length, 0), value=True)
        if kv_valid.shape != (batch_size, num_keys):
            raise ValueError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)}, expected ({batch_size}, {num_keys}) "
                "(batch, past + new tokens)."
            )
        if not torch.compiler.is_compiling() and bool(kv_valid.all()):  # a shortcut; a graph keeps the mask
            kv_valid = None
    token_mask = None if kv_valid is None else kv_valid[:, past_length:]
    if key_length is not None and key_length > num_keys:
        if kv_valid is None:
            kv_valid = torch.ones(batch_size, num_keys, dtype=torch.bool, device=device)
        kv_valid = F.pad(kv_valid, (0, key_length - num_keys), value=False)
        num_keys = key_length
    query_index = torch.arange(past_length, past_length + num_queries, device=device)
    attn_mask, is_causal = build_attention_mask(kv_valid, query_index, num_keys, causal)
    return ForwardContext(
        token_mask=token_mask,
        attn_mask=attn_mask,
        is_causal=is_causal,
        causal=causal,
        query_index=query_index,
        kv_valid=kv_valid,
    )


def condcomp_losses(config, ctx: ForwardContext, compute: bool):
    """Returns (weighted total or None, aux_loss, z_loss, compute_loss); padding is `ctx.token_mask`."""
    if not compute:
        return None, None, None, None
    aux = z = extra = None
    total = 0.0
    if ctx.router_logits:
        layer_logits = tuple(ctx.router_logits)
        mask = ctx.token_mask
        if ctx.prefiltered_logits and mask is not None:
            flat = mask.reshape(-1)
            layer_logits = tuple(
                logits if i in ctx.prefiltered_logits else logits[flat] for i, logits in enumerate(layer_logits)
            )
            mask = None
        if config.moe_routing == "token_choice":
            aux = load_balancing_loss(layer_logits, config.num_local_experts, config.num_experts_per_tok, mask)
            total = total + config.router_aux_loss_coef * aux
        z = router_z_loss(layer_logits, mask)
        total = total + config.router_z_loss_coef * z
    if ctx.extra_losses:
        extra = torch.stack(ctx.extra_losses).sum()
        total = total + extra
    if aux is None and z is None and extra is None:
        return None, None, None, None
    return total, aux, z, extra


def compute_fraction(config, ctx: ForwardContext):
    """Executed share of token-layer compute: mean over layers, ungated layers counting 1."""
    if not ctx.layer_fractions:
        return 1.0, {}
    per_layer = {i: float(f) for i, f in sorted(ctx.layer_fractions.items())}
    n = config.num_hidden_layers
    return (n - len(per_layer) + sum(per_layer.values())) / n, per_layer


def base_output(config, ctx: ForwardContext, hidden, compute_losses, output_router_logits, return_dict=None,
                **fields):
    """A base model's output: its hidden states plus the router and gate losses and the executed
    compute of this forward (`routing_loss` is the weighted sum the heads add to their task loss);
    a tuple in that order with `return_dict=False` (or `config.return_dict=False`)."""
    total, aux, z, extra = condcomp_losses(config, ctx, compute_losses)
    fraction, per_layer = compute_fraction(config, ctx)
    if ctx.output_attentions:
        fields["attentions"] = tuple(ctx.attentions)
    out = CondCompModelOutput(
        routing_loss=total,
        last_hidden_state=hidden,
        router_logits=tuple(ctx.router_logits) if output_router_logits else None,
        aux_loss=aux,
        z_loss=z,
        compute_loss=extra,
        compute_fraction=fraction,
        layer_compute_fractions=per_layer,
        **fields,
    )
    return out if use_return_dict(config, return_dict) else out.to_tuple()


def use_return_dict(config, return_dict) -> bool:
    return getattr(config, "return_dict", True) if return_dict is None else bool(return_dict)


def output_hidden_states_of(config, output_hidden_states) -> bool:
    """The call's `output_hidden_states`, else the config's (`from_pretrained(..., output_hidden_states=True)`)."""
    return bool(getattr(config, "output_hidden_states", False) if output_hidden_states is None else output_hidden_states)


def head_output(config, base, loss, logits, return_dict):
    """A head's output: its task loss plus the base model's router and gate losses."""
    if loss is not None and base.routing_loss is not None:
        loss = loss + base.routing_loss
    out = CondCompOutput(
        loss=loss,
        logits=logits,
        **cache_field(output_cache(base)),
        hidden_states=base.hidden_states,
        attentions=base.attentions,
        router_logits=base.router_logits,
        aux_loss=base.aux_loss,
        z_loss=base.z_loss,
        compute_loss=base.compute_loss,
        compute_fraction=base.compute_fraction,
        layer_compute_fractions=base.layer_compute_fractions,
    )
    return out if use_return_dict(config, return_dict) else out.to_tuple()


def _refuse_reentrant(kwargs):
    if (kwargs or {}).get("use_reentrant"):
        raise ValueError(
            "`use_reentrant=True` gradient checkpointing is not supported: the router and gate losses are "
            "collected from inside the layers, and the reentrant variant runs them without autograd, so those "
            "losses would train nothing. Use the default `use_reentrant=False`."
        )


class CondCompInitMixin:
    """Initialisation of the modules this package adds (experts, routers, gates), and an
    `auto_map` that lists every head of the family, so a saved base model also loads with
    `AutoModelForSequenceClassification` (and so on) through `trust_remote_code`."""

    _auto_heads: dict = {}
    supports_gradient_checkpointing = True
    # `forward` takes **kwargs but does not normalise its loss by Trainer's `num_items_in_batch`:
    # without this, Trainer would skip its own division by the accumulation steps.
    accepts_loss_kwargs = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        # transformers >= 5.24 routes `activation_checkpointing_enable` through an overridden
        # `gradient_checkpointing_enable`, so this one check covers both names.
        _refuse_reentrant(gradient_checkpointing_kwargs)
        return super().gradient_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        module = type(self).__module__.rsplit(".", 1)[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoConfig"] = f"configuration_condcomp.{type(self.config).__name__}"
        auto_map.update({auto: f"{module}.{name}" for auto, name in self._auto_heads.items()})
        self.config.auto_map = auto_map
        return super().save_pretrained(*args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Experts):
            for name, param in module.named_parameters(recurse=False):
                if name.endswith("_bias"):
                    init.zeros_(param)
                else:
                    init.normal_(param, mean=0.0, std=std)
        init_hook = getattr(module, "_condcomp_init", None)
        if init_hook is not None:
            init_hook(std)
