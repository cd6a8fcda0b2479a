"""Conditional layers on transformers' own layers: the mechanism every gated variant shares.

A layer listed in a gated variant's config field (`mod_layers`, `gate_layers`) stays the source's
layer module (its class, weights, attention dispatch and cache handling are transformers'); it gains
the variant's small modules (`mod_router` (+ `mod_predictor` in decoders), `compute_gate`) and its
class becomes a subclass of the source's layer class whose `forward` asks the variant which tokens
run and with what weight, then runs the layer on those tokens only:
    x_i' = x_i + s_i * (f(x)_i - x_i)   for kept tokens,   x_i' = x_i otherwise.
The weights keep the dense checkpoint's names (`model.layers.3.self_attn.q_proj.weight`), the
variant's are `model.layers.3.mod_router.weight`.

A gated variant is a `GatedVariant` registered by name with `@register_gated_variant` (variants.py),
in a module of its own: Mixture-of-Depths routed blocks ("mod", mixture_of_depths.py) and compute-allocation
gates ("gate", compute_gates.py), which configuration_condcomp.py imports. A variant says which config
field lists its layers, which config fields and upcycling settings it owns, which modules it adds to a
layer and how it decides (`decide`); this module owns everything else (sub-batches, positions, masks,
the KV cache) and imports no variant.

Skipped tokens are never computed: the kept tokens are gathered into (B, C, H) and the layer runs on
them, with their own positions (`position_ids`, RoPE `position_embeddings` gathered) and an
attention mask this module builds for them (causal order, padding, sliding windows), in the format
of the model's attention implementation (`sdpa`: boolean, `eager`: additive). Flash and flex
attention take no arbitrary mask: a layer that must run a subset refuses them.

The token a pooling head reads (an encoder's first token; a decoder classifier's last real token) is
pinned (`keep_pooled_token`): routed blocks take it first within their places, and gates never skip
it. Encoders can keep skipped tokens as keys (`skipped_tokens_as_keys`, BERT-type layers): keys
and values then come from every real token's unchanged hidden state and only the skipped tokens'
queries, attention outputs and FFN are skipped.

KV cache: a routed or gated layer keeps its cache rectangular. Skipped tokens get zero placeholder
keys/values and a per-layer validity mask, kept on the cache object, hides them from later queries.
The cache's class gains the validity (`ValidityCache`): `reorder_cache` (beam search),
`batch_repeat_interleave`, `batch_select_indices` and `reset` apply to it as to the keys.

This file travels to the Hub with every saved model: only sibling relative imports.
"""

import contextlib
import importlib
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import Cache

from .disentangled import disentangled_attention, per_row_positions, subset_relative_positions
from .variants import GATED_VARIANTS, STRAIGHT_THROUGH, all_real, layer_variant

KV_VALID_ATTR = "condcomp_kv_valid"
SUBSET_ATTENTION = ("sdpa", "eager")


# --- the per-forward state -------------------------------------------------------------------


class Recorder:
    """What the conditional layers of one forward share.

    token_mask: (B, T) bool real (non-padding) new tokens, or None when all are real.
    key_mask: (B, past + T) bool padding mask over every key (the 2-D mask as passed), or None.
    pinned: (B, T) bool tokens every routed or gated layer computes (`keep_pooled_token`), or None.
    router_logits: the MoE blocks' logits, in layer order; `prefiltered` indexes those whose rows
        are already restricted to real tokens (MoE blocks inside a routed layer, unpadded inputs).
    extra_losses: the gated layers' weighted losses; layer_fractions: {layer: executed share}.
    The variants' `decide` read it (token_mask, pinned) and add to it (extra_losses, decided).
    """

    def __init__(self, token_mask=None, key_mask=None, pinned=None):
        self.token_mask = token_mask
        self.key_mask = key_mask
        self.pinned = pinned
        self.router_logits = []
        self.prefiltered = set()
        self.extra_losses = []
        self.layer_fractions = {}
        self.row_mask = None  # (B, C) rows of a routed layer's sub-batch that are real tokens
        self.decided = {}  # {layer: (B, T) bool} a straight-through decision, from `decide` to the forward


# --- the cache's per-layer validity ----------------------------------------------------------


class ValidityCache:
    """Mixed into a cache's class when a routed or gated layer first stores its validity mask: the
    transformers operations that reorder or select the cache's batch rows apply to the masks too."""

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        _map_validity(self, lambda v: v.index_select(0, beam_idx.to(v.device)))

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        _map_validity(self, lambda v: v.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        _map_validity(self, lambda v: v[indices])

    def reset(self):
        super().reset()
        self.__dict__.get(KV_VALID_ATTR, {}).clear()


def _map_validity(cache, fn):
    store = cache.__dict__.get(KV_VALID_ATTR, {})
    for key, value in store.items():
        store[key] = fn(value)


_VALIDITY_CLASSES = {}


def _with_validity(cache):
    cls = type(cache)
    if not issubclass(cls, ValidityCache):
        sub = _VALIDITY_CLASSES.get(cls)
        if sub is None:
            sub = type(cls.__name__, (ValidityCache, cls), {"__module__": cls.__module__})
            _VALIDITY_CLASSES[cls] = sub
        cache.__class__ = sub
    return cache.__dict__.setdefault(KV_VALID_ATTR, {})


def _cache_layer_lengths(cache, layer_idx):
    """(tokens seen before this step, keys stored before it) of one layer of a dynamic cache."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return 0, 0
    layer = layers[layer_idx]
    keys = getattr(layer, "keys", None)
    stored = keys.shape[-2] if getattr(layer, "is_initialized", keys is not None) and keys is not None else 0
    seen = getattr(layer, "cumulative_length", None)
    return (int(seen) if seen is not None else stored), stored


class _ScatteredCache:
    """The KV cache as a layer running C of T new tokens sees it: `update` places the C tokens'
    keys/values at their positions among the T (zeros elsewhere) before appending, so the cache stays
    rectangular, and returns what the cache returns."""

    def __init__(self, cache, index, valid, num_new):
        self.cache, self.index, self.valid, self.num_new = cache, index, valid, num_new

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        B, h, C, d = key_states.shape
        index = self.index[:, None, :, None].expand(B, h, C, d)
        valid = self.valid[:, None, :, None]
        placed = [t.new_zeros(B, h, self.num_new, d).scatter(2, index, torch.where(valid, t, 0.0))
                  for t in (key_states, value_states)]
        return self.cache.update(placed[0], placed[1], layer_idx, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


# --- the layer classes -----------------------------------------------------------------------


class ConditionalLayerMixin:
    """Mixed into a source layer class (see `conditional_layer_class`): the layer runs the tokens its
    gated variant (`_condcomp_variant`, a name in `GATED_VARIANTS`) keeps."""

    _condcomp_recorder = None

    def forward(self, *args, **kwargs):
        named = _bind(type(self), args, kwargs)
        hidden_name = next(iter(_signature(type(self)).parameters))
        x = named.pop(hidden_name)
        recorder = self.__dict__.get("_condcomp_recorder") or Recorder()
        keep, scale = layer_variant(self).decide(self, x, recorder, named)
        if keep is STRAIGHT_THROUGH:
            out = self._straight_through(x, named, hidden_name, recorder, scale)
        else:
            out = self._run_subset(x, named, hidden_name, recorder, keep, scale)
        # Layers that return (hidden states, attention weights) (GPT-Neo) keep that shape; the
        # weights of a subset have no full-sequence shape (output_attentions is refused).
        return (out, None) if _returns_tuple(type(self)) else out

    # execution

    def _straight_through(self, x, named, hidden_name, rec, a):
        """Training forward equal to the inference one: tokens outside the inference decision get no
        update and are hidden as keys (unless `skipped_tokens_as_keys`), the rest get a times their
        update; every token is computed so each allocation gets the soft gate's gradient."""
        keep = rec.decided.pop(self._condcomp_index)
        hard = keep.to(a.dtype)
        scale = a * hard + (a - a.detach()) * (1 - hard)  # value: a or 0; gradient: as the soft gate's
        config = self._condcomp_config()
        idx = self._condcomp_index
        rec.layer_fractions[idx] = 1.0  # training computes every token
        if not config.skipped_tokens_as_keys:
            B, T = keep.shape
            index = torch.arange(T, device=x.device).expand(B, T)
            cache_name = _find_cache(named)
            if cache_name is None:
                key_index, key_valid = index, keep
            else:  # a training forward with a cache (transformers' models make one unless told not to)
                cache = named[cache_name]
                seen, stored = _cache_layer_lengths(cache, idx)
                past_valid = _past_valid(cache, idx, B, stored, x.device)
                key_index = (seen - stored + torch.arange(stored + T, device=x.device)).expand(B, -1)
                key_valid = torch.cat([past_valid, keep], dim=1)
                if rec.key_mask is not None:
                    key_valid = key_valid & _key_padding(rec.key_mask, seen - stored, stored + T)
                index = index + seen
                self._store_valid(cache, past_valid, keep)
            allowed = _allowed(index, key_index, key_valid, self._condcomp_causal, self._condcomp_window())
            named = dict(named, attention_mask=self._mask_format(allowed, x.dtype))
        out = _call(self, x, named, hidden_name)
        return x + scale.unsqueeze(-1).to(x.dtype) * (out - x)

    def _run_subset(self, x, named, hidden_name, rec, keep, scale):
        """x + scale * (layer(x) - x) on the tokens in `keep` (B, T) bool (None: every token); the
        other tokens are neither computed nor changed."""
        B, T, H = x.shape
        real = rec.token_mask
        cache_name, cache, seen, stored, past_valid = self._open_cache(named, B, x.device)
        runs_all = keep is None or bool((keep if real is None else keep | ~real).all())
        if runs_all and (past_valid is None or bool(past_valid.all())):
            # Every real token runs over every key: the layer as transformers calls it.
            if cache is not None:
                self._store_valid(cache, past_valid, torch.ones(B, T, dtype=torch.bool, device=x.device))
            rec.layer_fractions[self._condcomp_index] = 1.0
            out = x + scale.unsqueeze(-1).to(x.dtype) * (_call(self, x, named, hidden_name) - x)
            # Padding passes unchanged, as on the subset path below: otherwise a row's padding positions would
            # depend on whether some other row of its batch skips a token.
            return out if real is None else torch.where(real.unsqueeze(-1), out, x)
        if keep is None:
            keep = all_real(x, real)
        counts = keep.sum(-1)  # (B,)
        C = int(counts.max())
        as_keys = self._condcomp_config().skipped_tokens_as_keys and cache is None
        self._record_fraction(rec, counts, real, B * T, as_keys)
        if cache is not None:
            self._store_valid(cache, past_valid, keep)
        if C == 0:
            if cache is not None:  # placeholders keep the cache rectangular
                zeros = x.new_zeros(self._condcomp_kv_shape(B, T))
                cache.update(zeros, zeros.clone(), self._condcomp_index)
            return x

        # Kept positions first, in their original order (stable sort), so sub-sequences stay causal.
        index = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :C]  # (B, C)
        valid = torch.arange(C, device=x.device) < counts.unsqueeze(-1)  # (B, C)
        x_sub = x.gather(1, index.unsqueeze(-1).expand(B, C, H))  # (B, C, H)
        sub = _gather_positions(named, index, T)
        relative = disentangled_attention(self) if named.get("relative_pos") is not None else None
        if relative is not None:  # DeBERTa: each row's own relative positions (disentangled.py)
            if named.get("query_states") is not None:
                raise ValueError("A routed or gated DeBERTa layer cannot take `query_states` (the enhanced mask "
                                 "decoder's separate queries); call it with hidden states only.")
            sub["relative_pos"] = subset_relative_positions(named["relative_pos"], index)
        if as_keys:
            key_index, key_valid = torch.arange(T, device=x.device).expand(B, T), all_real(x, real)
            sub[cache_name or self._condcomp_cache_param] = _KeySource(self, x, keep, key_valid)
        elif cache is None:
            key_index, key_valid = index, valid if real is None else valid & real.gather(1, index)
        else:
            base = seen - stored  # position of the first stored key
            key_index = (base + torch.arange(stored + T, device=x.device)).expand(B, -1)
            key_valid = torch.cat([past_valid, keep], dim=1)  # (B, stored + T)
            if rec.key_mask is not None:
                key_valid = key_valid & _key_padding(rec.key_mask, base, stored + T)
            sub[cache_name] = _ScatteredCache(cache, index, valid, T)
            index = index + seen
        allowed = _allowed(index, key_index, key_valid, self._condcomp_causal, self._condcomp_window())
        sub["attention_mask"] = self._mask_format(allowed, x.dtype)
        out = self._call_rows(x_sub, sub, hidden_name, rec, valid, relative)  # (B, C, H)
        gather_index = (index - (seen if cache is not None else 0)).unsqueeze(-1).expand(B, C, H)
        s = scale.gather(1, gather_index[..., 0]).unsqueeze(-1).to(x.dtype)  # (B, C, 1)
        y = torch.where(valid.unsqueeze(-1), x_sub + s * (out - x_sub), x_sub)
        return x.scatter(1, gather_index, y)  # (B, T, H)

    def _open_cache(self, named, B, device):
        """(name, cache, tokens seen, tokens stored, (B, stored) validity of the stored keys) of this
        layer's cache, or (name, None, None, None, None) without one."""
        cache_name = _find_cache(named)
        cache = named.get(cache_name) if cache_name else None
        if cache is None:
            return cache_name, None, None, None, None
        if getattr(cache, "is_compileable", False):
            raise ValueError(
                f"`{type(cache).__name__}` (e.g. `cache_implementation='static'`) is not supported by models with "
                "Mixture-of-Depths or gated layers: they cache only the tokens a layer ran on, with a validity "
                "mask per layer, which a static cache has no room for. Use the default dynamic cache."
            )
        idx = self._condcomp_index
        seen, stored = _cache_layer_lengths(cache, idx)
        return cache_name, cache, seen, stored, _past_valid(cache, idx, B, stored, device)

    def _record_fraction(self, rec, counts, real, n_tokens, as_keys):
        """This layer's executed share of its real tokens' compute, with the key/value projections of
        the skipped tokens of sequences that run at all when they serve as keys."""
        n_real = n_tokens if real is None else int(real.sum())
        executed = float(counts.sum())
        if as_keys:
            per_seq = torch.full_like(counts, n_tokens // counts.numel()) if real is None else real.sum(-1)
            executed += _kv_share(self, self._condcomp_config()) * float(((per_seq - counts) * (counts > 0)).sum())
        rec.layer_fractions[self._condcomp_index] = executed / max(n_real, 1)

    def _call_rows(self, x_sub, sub, hidden_name, rec, valid, relative):
        """The layer on the gathered (B, C) rows; an MoE FFN inside it keeps its real routed rows."""
        first = len(rec.router_logits)
        rec.row_mask = valid
        try:
            with per_row_positions(relative) if relative is not None else contextlib.nullcontext():
                out = _call(self, x_sub, sub, hidden_name)  # (B, C, H)
        finally:
            rec.row_mask = None
        rows = valid.reshape(-1)
        for i in range(first, len(rec.router_logits)):
            rec.router_logits[i] = rec.router_logits[i][rows]
            rec.prefiltered.add(i)
        return out

    # helpers

    def _condcomp_config(self):
        return layer_variant(self).config(self)

    def _store_valid(self, cache, past_valid, new_valid):
        store = _with_validity(cache)
        store[self._condcomp_index] = torch.cat([past_valid, new_valid], dim=1)

    def _condcomp_window(self):
        config = self._condcomp_config()
        text = config.text_config
        types = getattr(text, "layer_types", None)
        if types:
            if types[self._condcomp_index] != "sliding_attention":
                return None
            window = getattr(text, "sliding_window", None)
        elif getattr(text, "use_sliding_window", True) is not False and getattr(text, "sliding_window", None):
            window = text.sliding_window  # every layer (Mistral, Phi-3, Starcoder2)
        else:
            window = None
        if window is None:
            return None
        return ("causal" if self._condcomp_causal else "bidirectional", int(window))

    def _condcomp_kv_shape(self, B, T):
        text = self._condcomp_config().text_config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return (B, kv_heads, T, head_dim)

    def _mask_format(self, allowed, dtype):
        """`allowed` (B, 1, Q, K) bool in the attention implementation's mask format."""
        if disentangled_attention(self) is not None:  # DeBERTa takes a may-attend mask whatever the implementation
            return allowed
        text = self._condcomp_config().text_config
        name = getattr(text, "_attn_implementation", None) or "sdpa"
        if name == "sdpa":
            return allowed
        if name == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        raise ValueError(
            f"`attn_implementation`={name!r} cannot run a routed or gated layer on a subset of its tokens: it takes "
            f"no arbitrary attention mask. Use one of {SUBSET_ATTENTION} (`model.set_attn_implementation('sdpa')`)."
        )




class _KeySource:
    """A stand-in cache for an encoder layer whose skipped tokens stay attention keys: `update`
    receives the C routed tokens' keys and values and returns those of all T tokens, computing the
    skipped ones' from their unchanged hidden states with the layer's own key / value projections."""

    def __init__(self, layer, x, keep, key_valid):
        self.layer, self.x, self.keep = layer, x, keep

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        B, h, C, d = key_states.shape
        T = self.x.shape[1]
        skipped = ~self.keep
        S = int(skipped.sum(-1).max())
        index = torch.argsort(self.keep.to(torch.int8), dim=-1, stable=True)[:, :S]  # skipped first (B, S)
        kept_index = torch.argsort((~self.keep).to(torch.int8), dim=-1, stable=True)[:, :C]
        x_skip = self.x.gather(1, index.unsqueeze(-1).expand(B, S, self.x.shape[-1]))
        attention = self.layer._condcomp_kv_modules()
        out = []
        for proj, sub in zip(attention, (key_states, value_states)):
            skip = proj(x_skip).view(B, S, h, d).transpose(1, 2)  # (B, h, S, d)
            full = sub.new_zeros(B, h, T, d)
            full = full.scatter(2, index[:, None, :, None].expand(B, h, S, d), skip)
            kept_valid = (torch.arange(C, device=sub.device) < self.keep.sum(-1, keepdim=True))[:, None, :, None]
            kept_rows = kept_index[:, None, :, None].expand(B, h, C, d)
            full = full.scatter(2, kept_rows, torch.where(kept_valid, sub, full.gather(2, kept_rows)))
            out.append(full)
        return out[0], out[1]


def _kv_share(layer, config):
    """Share of a BERT layer's per-token matrix-multiply FLOPs spent on the key and value
    projections (2 H^2 of 4 H^2 + 2 H I; an MoE FFN counts its top-k experts)."""
    text = config.text_config
    H = text.hidden_size
    inter = getattr(text, "intermediate_size", 4 * H)
    if config.moe_layers and layer._condcomp_index in config.moe_layers:
        inter = config.num_experts_per_tok * (config.moe_expert_intermediate_size or inter)
    return 2 * H * H / (4 * H * H + 2 * H * inter)


def _allowed(query_index, key_index, key_valid, causal, window):
    """(B, 1, Q, K) bool: which key each query attends to. query_index (B, Q) and key_index (B, K)
    are positions in the sequence; key_valid (B, K) bool or None. A query always sees itself (or,
    with no real key at all, its first key), so no row is empty."""
    q = query_index.unsqueeze(-1)  # (B, Q, 1)
    k = key_index.unsqueeze(-2)  # (B, 1, K)
    allowed = k <= q if causal else torch.ones_like(q == k)
    if window is not None:
        kind, size = window
        allowed = allowed & ((q - k < size) if kind == "causal" else ((q - k).abs() <= size))
    if key_valid is not None:
        allowed = allowed & key_valid.unsqueeze(-2)
    allowed = allowed | (k == q)
    return allowed.unsqueeze(1)


def _key_padding(key_mask, base, length):
    """The 2-D padding mask's columns for keys at positions base .. base + length - 1."""
    key_mask = key_mask.to(torch.bool)
    if key_mask.shape[1] >= base + length:
        return key_mask[:, base:base + length]
    return F.pad(key_mask[:, base:], (0, base + length - key_mask.shape[1]), value=True)


def _past_valid(cache, layer_idx, batch_size, stored, device):
    """(B, stored) validity of a layer's cached keys (all true when never recorded)."""
    value = cache.__dict__.get(KV_VALID_ATTR, {}).get(layer_idx)
    if value is None or value.shape[0] != batch_size:
        return torch.ones(batch_size, stored, dtype=torch.bool, device=device)
    value = value[:, -stored:] if stored else value[:, :0]  # a sliding window keeps the newest keys
    if value.shape[1] < stored:
        value = F.pad(value, (stored - value.shape[1], 0), value=True)
    return value


def _gather_positions(named, index, T):
    """The layer's keyword arguments for the gathered tokens `index` (B, C): per-token positions and
    rotary embeddings gathered; everything else as given."""
    B, C = index.shape
    sub = dict(named)
    pos = named.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.shape[-1] == T:
        sub["position_ids"] = pos.expand(B, T).gather(1, index)
    emb = named.get("position_embeddings")
    if isinstance(emb, (tuple, list)) and all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in emb):
        sub["position_embeddings"] = tuple(
            t.expand(B, *t.shape[1:]).gather(1, index.unsqueeze(-1).expand(B, C, t.shape[-1])) for t in emb
        )
    return sub


def _find_cache(named):
    return next((k for k, v in named.items() if isinstance(v, Cache)), None)


def _call(layer, x, named, hidden_name):
    out = super(ConditionalLayerMixin, layer).forward(**{hidden_name: x}, **named)
    if isinstance(out, tuple):
        _TUPLE_OUTPUT[type(layer)] = True
        return out[0]
    return out


# Source layer classes that return (hidden states, attention weights) (GPT-Neo): a call shows it.
_TUPLE_OUTPUT = {}


def _returns_tuple(cls) -> bool:
    return _TUPLE_OUTPUT.get(cls, False)


_SIGNATURES = {}


def _signature(cls):
    sig = _SIGNATURES.get(cls)
    if sig is None:
        sig = _SIGNATURES[cls] = inspect.signature(super(ConditionalLayerMixin, cls).forward.__get__(object()))
    return sig


def _bind(cls, args, kwargs):
    """The call's arguments by name (a `**kwargs` catch-all flattened in)."""
    sig = _signature(cls)
    bound = sig.bind(*args, **kwargs).arguments
    named = {}
    for name, value in bound.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


_LAYER_CLASSES = {}


def conditional_layer_class(base):
    """The subclass of a source layer class that routes or gates it; picklable by name (module
    `__getattr__` below rebuilds it from the base class's module and name)."""
    cls = _LAYER_CLASSES.get(base)
    if cls is None:
        name = "Conditional__" + base.__module__.replace(".", "_DOT_") + "__" + base.__name__
        cls = type(name, (ConditionalLayerMixin, base), {"__module__": __name__, "__qualname__": name,
                                                         "_condcomp_source_class": base})
        _LAYER_CLASSES[base] = cls
        globals()[name] = cls
    return cls


def __getattr__(name):
    if name.startswith("Conditional__"):
        module, _, cls = name[len("Conditional__"):].rpartition("__")
        base = getattr(importlib.import_module(module.replace("_DOT_", ".")), cls)
        return conditional_layer_class(base)
    raise AttributeError(name)


def unsupported_reason(layer) -> str | None:
    """Why a source layer cannot be routed or gated here, or None."""
    params = _signature(conditional_layer_class(type(layer))).parameters
    if "attention_mask" not in params:
        return f"its {type(layer).__name__} takes no `attention_mask`"
    for name, buffer in layer.named_buffers():
        if buffer.dtype == torch.bool and buffer.dim() == 4:
            return (f"its attention applies a causal mask of its own by key slot (`{name}`), which does not follow "
                    "the positions of a subset of tokens")
    for name in ("relative_pos", "query_states"):
        if name in params and disentangled_attention(layer) is None:
            return (f"its {type(layer).__name__} computes relative positions for the whole batch at once "
                    f"(`{name}`), which a per-sequence subset of tokens does not have")
    return None


def kv_modules(layer):
    """The key and value projections of a BERT-type layer's self-attention, or None."""
    attn = getattr(getattr(layer, "attention", None), "self", None)
    key, value = getattr(attn, "key", None), getattr(attn, "value", None)
    if isinstance(key, nn.Linear) and isinstance(value, nn.Linear):
        return key, value
    return None


def install_conditional_layers(layers, config, causal):
    """Make the layers of every registered gated variant (`mod_layers`, `gate_layers`, ...); returns them."""
    recorded = (getattr(config, "upcycling", None) or {}).get("variant")
    if recorded not in (None, "moe") and recorded not in GATED_VARIANTS:
        raise ValueError(
            f"`upcycling.variant`={recorded!r} is not a registered gated variant (registered: "
            f"{tuple(GATED_VARIANTS)}): a variant defined outside hf_condcomp is not part of a saved model's code. "
            "Import the module that registers it and load the model with hf_condcomp, without `trust_remote_code` "
            "(docs/architecture.md)."
        )
    installed = []
    for variant in GATED_VARIANTS.values():
        for i in getattr(config, variant.layers_field, None) or []:
            layer = layers[i]
            reason = unsupported_reason(layer)
            if reason is not None:
                raise ValueError(
                    f"`{variant.layers_field}`: model type {config.text_config.model_type!r} cannot have "
                    f"{variant.description}: {reason}. Upcycle it with `variant='moe'`."
                )
            if config.skipped_tokens_as_keys and (causal or kv_modules(layer) is None):
                raise ValueError(
                    f"`skipped_tokens_as_keys`=True needs an encoder whose layers have BERT's attention.self.key / "
                    f"value projections; model type {config.text_config.model_type!r} has not. Leave it False."
                )
            params = _signature(conditional_layer_class(type(layer))).parameters
            layer.__class__ = conditional_layer_class(type(layer))
            layer._condcomp_index = i
            layer._condcomp_causal = causal
            layer._condcomp_variant = variant.name
            layer._condcomp_cache_param = next((p for p in ("cache", "past_key_values", "layer_past") if p in params),
                                               None)
            variant.install(layer, config, causal)
            installed.append(layer)
    return sorted(installed, key=lambda layer: layer._condcomp_index)


ConditionalLayerMixin._condcomp_kv_modules = lambda self: kv_modules(self)
