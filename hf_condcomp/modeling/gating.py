"""Running the layer stack, and the gated-layer variants that make single layers conditional.

Both variants attach small modules to the existing layer modules (`encoder.layer.3.mod_router`,
`layers.3.compute_gate`, ...) instead of wrapping them, so every parameter of the dense
checkpoint keeps its name and upcycling maps keys one to one. `run_layers` does the gating.

Mixture-of-Depths routed blocks (Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating
compute in transformer-based language models", eq. 1):
    r_i = w . x_i (`mod_router`); per sequence the top C = ceil(capacity * real tokens) tokens go
    through the whole block f (attention and MLP), the others pass along the residual unchanged:
        x_i' = x_i + 2 sigmoid(r_i) * (f(x)_i - x_i)   for routed tokens,   x_i' = x_i otherwise.
    The factor 2 sigmoid(r) with a zero-initialised w is exactly 1 at init, so at capacity 1 an
    upcycled model equals its dense parent, while d(scale)/dr = 1/2 != 0 lets the router learn from
    the task loss (the paper multiplies by r itself, which would start the block at zero).
    Top-k over a sequence looks at future tokens, so decoders get the paper's auxiliary predictor
    (section 3.5): `mod_predictor`, a small MLP on the stop-gradient block input, trained with a
    binary cross-entropy against top-k membership (weight `mod_aux_loss_coef`). In training the
    decoder routes by top-k; in eval mode and generation it routes token t into the block iff the
    predictor says p > 0.5, which depends on tokens <= t only, so a teacher-forced eval forward and
    `generate()` (with or without the KV cache) make the same decisions. The predictor must be
    trained (the aux loss) before eval-mode routing at capacity < 1 follows the top-k.

Compute-allocation gates (adaptive computation with a ponder cost, Graves 2016, eq. 8-14; here
one gate per layer rather than a halting sum):
    a_i = sigmoid(v . x_i + b) (`compute_gate`), x_i' = x_i + a_i * (f(x)_i - x_i).
    Training runs every token and adds `gate_compute_penalty * mean(a)` (mean over real tokens and
    gated layers) to the loss; in eval mode tokens with a_i < `gate_threshold` skip the layer.
    v starts at 0 and b at `gate_init_bias`, so every token starts at a = sigmoid(b): with the
    default b = 4, a = 0.982 and each gated layer's update is scaled by that (tested); with b >= 17,
    sigmoid(b) rounds to 1 in fp32 and the model equals its dense parent.

The token a pooling head reads (BERT's [CLS] under its pooler, as sequence classification uses) is
pinned (`ctx.pinned`, config `keep_pooled_token`): routed blocks take it first within their
ceil(c * n) places and gates never skip it. A router gets no gradient from a token it skips, so
without the pin a [CLS] dropped early in fine-tuning tends to stay dropped (measured on Banking77:
RESULTS.md, "Compute trade-off").

Encoders can keep skipped tokens as keys (`skipped_tokens_as_keys`): a routed or gated BERT layer
then takes keys and values from every real token's unchanged hidden state and skips only the
skipped tokens' queries, attention outputs and FFN, so a routed token's update is exactly the dense
layer's for that token. The key/value projections of the skipped tokens count in the executed
compute (`_kv_share`: 1/6 of a MiniLM layer).

Skipped tokens are never computed: the kept tokens are gathered into (B, C, H), the layer runs on
them under a sub-context (their original positions as `query_index`, so causal order, padding
and RoPE stay right), and the results are scattered back. With a KV cache a gated layer keeps its
cache rectangular: skipped tokens get zero placeholder keys/values, and a per-layer validity mask
(B, L) stored on the cache object (`cache.condcomp_kv_valid[layer_idx]`) hides them from later
queries. Greedy search and sampling are supported; beam search would reorder the cache but not
that mask, so `generate()` refuses it over the cache (decoder.py); without the cache it is exact.
"""

import dataclasses

import torch
import torch.nn.functional as F

from .common import ForwardContext, build_attention_mask
from .depth import KV_VALID_ATTR, ComputeGate, MoDPredictor, MoDRouter, masked_mean, top_capacity


def _kv_shape(config):
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def wrap_gated_layers(layers, config, causal):
    """Attach a router (+ causal predictor) to the `mod_layers` and a gate to the `gate_layers`."""
    for i in config.mod_layers:
        layers[i].mod_router = MoDRouter(config)
        if causal:
            layers[i].mod_predictor = MoDPredictor(config)
    for i in config.gate_layers:
        layers[i].compute_gate = ComputeGate(config)


def run_layers(layers, x: torch.Tensor, ctx, output_hidden_states=False):
    """Apply every layer; returns (hidden states, tuple of per-layer hidden states or None)."""
    all_hidden = (x,) if output_hidden_states else None
    for layer in layers:
        if getattr(layer, "mod_router", None) is not None:
            x = _routed_layer(layer, x, ctx)
        elif getattr(layer, "compute_gate", None) is not None:
            x = _gated_layer(layer, x, ctx)
        else:
            x = layer(x, ctx)
        if output_hidden_states:
            all_hidden = all_hidden + (x,)
    return x, all_hidden


def _routed_layer(layer, x, ctx):
    router = layer.mod_router
    predictor = getattr(layer, "mod_predictor", None)
    config = router.config
    capacity = config.mod_capacity
    scores = router(x)  # (B, T)
    real = ctx.token_mask
    if capacity >= 1.0:
        keep = None
    elif predictor is not None and not layer.training:
        keep = predictor(x) > 0  # p > 0.5: causal decision for eval and generation
        keep = keep if ctx.pinned is None else keep | ctx.pinned
        keep = keep if real is None else keep & real
    else:
        keep = top_capacity(scores, real, capacity, ctx.pinned)
        if predictor is not None and config.mod_aux_loss_coef > 0:
            bce = F.binary_cross_entropy_with_logits(predictor(x), keep.float(), reduction="none")  # (B, T)
            ctx.extra_losses.append(config.mod_aux_loss_coef * masked_mean(bce, real))
    if router.record_routing:
        router.routing_log.append((keep if keep is not None else _all_real(x, real)).detach())
    return _run_subset(layer, x, ctx, keep, 2.0 * torch.sigmoid(scores), config)


def _gated_layer(layer, x, ctx):
    gate = layer.compute_gate
    config = gate.config
    a = gate(x)  # (B, T) allocations in [0, 1]
    real = ctx.token_mask
    decided = a >= config.gate_threshold
    decided = decided if ctx.pinned is None else decided | ctx.pinned
    decided = decided if real is None else decided & real  # (B, T): the inference decision
    if layer.training:
        penalty = config.gate_compute_penalty * masked_mean(a, real) / len(config.gate_layers)
        ctx.extra_losses.append(penalty)
        if getattr(config, "gate_straight_through", False) and ctx.cache is None:
            return _straight_through_layer(layer, x, ctx, a, decided)
        keep = None  # soft gates: every token runs, so a gets its gradient
    else:
        keep = decided
    if gate.record_routing:
        gate.routing_log.append((keep if keep is not None else _all_real(x, real)).detach())
    return _run_subset(layer, x, ctx, keep, a, config)


def _straight_through_layer(layer, x, ctx, a, keep):
    """Training forward that equals the inference one: tokens outside `keep` (B, T), the inference
    decision, get no update and are hidden as keys from the other tokens, as when inference skips
    them; the rest get a times their update. Every token is still computed so that each allocation
    gets the soft gate's gradient (straight-through: the forward uses a * keep, the backward d/da = 1)."""
    hard = keep.to(a.dtype)
    scale = a * hard + (a - a.detach()) * (1 - hard)  # value: a or 0; gradient: as the soft gate's
    if layer.compute_gate.config.skipped_tokens_as_keys:
        sub = ctx  # skipped tokens stay visible as keys, as at inference
    else:
        attn_mask, is_causal = build_attention_mask(keep, ctx.query_index, x.shape[1], ctx.causal)
        sub = dataclasses.replace(ctx, attn_mask=attn_mask, is_causal=is_causal, kv_valid=keep)
    ctx.layer_fractions[layer.layer_idx] = 1.0  # training computes every token
    out = layer(x, sub)  # (B, T, H)
    return x + scale.unsqueeze(-1).to(x.dtype) * (out - x)


def _all_real(x, real):
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if real is None else real


def _run_subset(layer, x, ctx, keep, scale, config):
    """x + scale * (layer(x) - x) on the tokens in `keep` (B, T) bool (None: every token);
    the other tokens are neither computed nor changed."""
    B, T, H = x.shape
    real = ctx.token_mask
    n_real = B * T if real is None else int(real.sum())
    cache = ctx.cache
    past_valid = None
    if cache is not None:
        past = int(ctx.query_index.reshape(-1)[0])
        past_valid = _past_kv_valid(cache, layer.layer_idx, B, past, x.device)  # (B, P)
    runs_all = keep is None or bool((keep if real is None else keep | ~real).all())
    if runs_all and (past_valid is None or bool(past_valid.all())):
        # Every real token runs: the plain layer, no gather (exactly the dense computation).
        if cache is not None:
            _store_kv_valid(cache, layer.layer_idx, past_valid, torch.ones(B, T, dtype=torch.bool, device=x.device))
        ctx.layer_fractions[layer.layer_idx] = 1.0
        out = layer(x, ctx)  # (B, T, H)
        return x + scale.unsqueeze(-1).to(x.dtype) * (out - x)
    if keep is None:
        keep = _all_real(x, real)

    counts = keep.sum(-1)  # (B,)
    C = int(counts.max())
    executed = float(counts.sum())
    as_keys = config.skipped_tokens_as_keys and cache is None
    if as_keys:  # the key/value projections of the skipped tokens of sequences that run at all
        per_seq = torch.full_like(counts, T) if real is None else real.sum(-1)
        executed += _kv_share(layer, config) * float(((per_seq - counts) * (counts > 0)).sum())
    ctx.layer_fractions[layer.layer_idx] = executed / max(n_real, 1)
    if cache is not None:
        _store_kv_valid(cache, layer.layer_idx, past_valid, keep)
    if C == 0:
        if cache is not None:  # keep the cache rectangular: placeholders for the T skipped tokens
            kv_heads, head_dim = _kv_shape(config)
            zeros = x.new_zeros(B, kv_heads, T, head_dim)
            cache.update(zeros, zeros.clone(), layer.layer_idx)
        return x

    # Kept positions first, in their original order (stable sort), so sub-sequences stay causal.
    index = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :C]  # (B, C)
    valid = torch.arange(C, device=x.device) < counts.unsqueeze(-1)  # (B, C)
    gather_index = index.unsqueeze(-1).expand(B, C, H)
    x_sub = x.gather(1, gather_index)  # (B, C, H)
    sub = _sub_context(ctx, index, valid, keep, past_valid, T, kv_states=x if as_keys else None)
    out = layer(x_sub, sub)  # (B, C, H)
    s = scale.gather(1, index).unsqueeze(-1).to(x.dtype)  # (B, C, 1)
    y = torch.where(valid.unsqueeze(-1), x_sub + s * (out - x_sub), x_sub)
    if sub.router_logits:  # MoE FFN inside the block: keep only its real routed rows
        rows = valid.reshape(-1)
        for logits in sub.router_logits:
            ctx.prefiltered_logits.add(len(ctx.router_logits))
            ctx.router_logits.append(logits[rows])
    return x.scatter(1, gather_index, y)  # (B, T, H)


def _kv_share(layer, config):
    """Share of a BERT layer's per-token matrix-multiply FLOPs spent on the key and value
    projections (2 H^2 of 4 H^2 + 2 H I; an MoE FFN counts its top-k experts). Attention scores,
    norms and biases are left out: what `skipped_tokens_as_keys` adds per skipped token."""
    H = config.hidden_size
    inter = config.intermediate_size
    if getattr(layer, "is_moe", False):
        inter = config.num_experts_per_tok * (config.moe_expert_intermediate_size or inter)
    return 2 * H * H / (4 * H * H + 2 * H * inter)


def _sub_context(ctx, index, valid, keep, past_valid, num_new, kv_states=None):
    """Context of the C gathered tokens `index` (B, C) of a forward over `num_new` tokens;
    `kv_states` (B, T, H): keys and values come from all T tokens (`skipped_tokens_as_keys`)."""
    B, C = index.shape
    token_mask = None if bool(valid.all()) else valid
    pos = ctx.position_embeddings
    if pos is not None:  # RoPE (cos, sin) of the gathered tokens
        pos = tuple(
            t.expand(B, *t.shape[1:]).gather(1, index.unsqueeze(-1).expand(B, C, t.shape[-1])) for t in pos
        )
    if kv_states is not None:  # encoders only (validated): every real token is a key
        kv_valid, query_index, num_keys, cache = ctx.kv_valid, index, num_new, None
    elif ctx.cache is None:
        # Keys are the gathered tokens themselves; they keep their order, so local indices are causal.
        kv_valid, query_index, num_keys, cache = token_mask, torch.arange(C, device=index.device), C, None
    else:
        # Keys are the whole rectangular cache (past + new); skipped and padding keys are masked.
        past = past_valid.shape[1]
        kv_valid = torch.cat([past_valid, keep], dim=1)  # (B, P + T)
        if ctx.kv_valid is not None:
            kv_valid = kv_valid & ctx.kv_valid
        query_index, num_keys = index + past, past + num_new  # (B, C)
        cache = _ScatteredCache(ctx.cache, index, valid, num_new)
    attn_mask, is_causal = build_attention_mask(kv_valid, query_index, num_keys, ctx.causal)
    return ForwardContext(
        token_mask=token_mask,
        attn_mask=attn_mask,
        is_causal=is_causal,
        causal=ctx.causal,
        query_index=query_index,
        kv_valid=kv_valid,
        position_embeddings=pos,
        cache=cache,
        kv_states=kv_states,
        extra_losses=ctx.extra_losses,
        layer_fractions=ctx.layer_fractions,
    )


class _ScatteredCache:
    """The KV cache as a routed layer's attention sees it: `update` places the C routed tokens'
    keys/values at their positions among the T new tokens (zeros elsewhere) before appending, so
    the cache stays rectangular, (B, h, P + T, d), and returns the whole of it."""

    def __init__(self, cache, index, valid, num_new):
        self.cache, self.index, self.valid, self.num_new = cache, index, valid, num_new

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        B, h, C, d = key_states.shape
        index = self.index[:, None, :, None].expand(B, h, C, d)
        valid = self.valid[:, None, :, None]
        full = []
        for t in (key_states, value_states):
            placed = t.new_zeros(B, h, self.num_new, d).scatter(2, index, torch.where(valid, t, 0.0))
            full.append(placed)  # (B, h, T, d)
        return self.cache.update(full[0], full[1], layer_idx, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def _past_kv_valid(cache, layer_idx, batch_size, past, device):
    """(B, past) validity of the cached keys of a gated layer (all true when never recorded)."""
    stored = getattr(cache, KV_VALID_ATTR, {}).get(layer_idx)
    if stored is None or stored.shape[0] != batch_size:
        return torch.ones(batch_size, past, dtype=torch.bool, device=device)
    stored = stored[:, :past]  # a cropped cache (assisted decoding) drops the tail
    if stored.shape[1] < past:
        stored = F.pad(stored, (0, past - stored.shape[1]), value=True)
    return stored


def _store_kv_valid(cache, layer_idx, past_valid, new_valid):
    store = getattr(cache, KV_VALID_ATTR, None)
    if store is None:
        store = {}
        setattr(cache, KV_VALID_ATTR, store)
    store[layer_idx] = torch.cat([past_valid, new_valid], dim=1)  # (B, P + T)
