"""Mixture-of-Depths routed blocks (Raposo et al. 2024, eq. 1): the gated variant "mod".

    r_i = w . x_i (`mod_router`); per sequence the top C = ceil(capacity * real tokens) tokens run
    the whole layer f, the others pass along the residual unchanged:
        x_i' = x_i + 2 sigmoid(r_i) * (f(x)_i - x_i)   for routed tokens,   x_i' = x_i otherwise.
    2 sigmoid(r) with a zero-initialised w is exactly 1 at init, so at capacity 1 an upcycled model
    equals its dense parent, and d(scale)/dr = 1/2 lets the router learn from the task loss.
    Top-k over a sequence looks at future tokens, so decoders get the paper's causal predictor
    (section 3.5): `mod_predictor`, a small MLP on the stop-gradient layer input, trained with a
    binary cross-entropy against top-k membership (weight `mod_aux_loss_coef`). Decoders route by
    top-k in training; in eval mode and generation token t runs iff the predictor says p > 0.5,
    which depends on tokens <= t only, so a teacher-forced eval forward and `generate()` (with or
    without the KV cache) make the same decisions.

Config fields (declared below, `RoutedBlocks`): `mod_layers`, `mod_capacity`, `mod_aux_loss_coef`. The
layer mechanism is depth.py's, the registry variants.py's.
This file travels to the Hub with every saved model: only sibling relative imports.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as init

from .variants import GatedVariant, VariantField, all_real, masked_mean, register_gated_variant

PREDICTOR_WIDTH_DIVISOR = 8  # predictor hidden width = max(8, H / 8): ~2% of a block's FLOPs
_CEIL_SLACK = 1e-6  # ceil(0.7 * 10) must be 7, not 8 from 7.000000000000001


def routed_token_count(num_tokens: int, capacity: float) -> int:
    """Tokens a routed block processes in a sequence of `num_tokens` real tokens: ceil(c * n)."""
    if num_tokens <= 0:
        return 0
    return max(1, math.ceil(capacity * num_tokens - _CEIL_SLACK))


def top_capacity(scores, token_mask, capacity, pinned=None):
    """(B, T) bool: per sequence the ceil(capacity * real tokens) real tokens of highest score;
    `pinned` (B, T) bool tokens are taken first, within that count."""
    B, T = scores.shape
    if pinned is not None:
        scores = scores.masked_fill(pinned, float("inf"))
    if token_mask is None:
        k = routed_token_count(T, capacity)
        index = scores.topk(k, dim=-1).indices  # (B, k)
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, True)
    n_real = token_mask.sum(-1)  # (B,)
    k = torch.ceil(capacity * n_real.double() - _CEIL_SLACK).long().clamp(min=1)
    k = torch.where(n_real > 0, k, torch.zeros_like(k))  # (B,)
    k_max = int(k.max())
    if k_max == 0:
        return torch.zeros_like(token_mask)
    index = scores.masked_fill(~token_mask, float("-inf")).topk(k_max, dim=-1).indices  # (B, k_max)
    keep = torch.arange(k_max, device=scores.device) < k.unsqueeze(-1)  # (B, k_max)
    return torch.zeros_like(token_mask).scatter_(1, index, keep)


class MoDRouter(nn.Module):
    """Scalar router of a Mixture-of-Depths block: r = w . x, w zero-initialised (see module doc)."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # read at call time: `mod_capacity` can be changed after loading
        self.weight = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.record_routing = False
        self.routing_log = []  # (B, T) bool selections, one per forward, when `record_routing`

    def forward(self, x):
        return F.linear(x, self.weight).squeeze(-1).float()  # (B, T)

    def _condcomp_init(self, std):
        init.zeros_(self.weight)

    def _condcomp_fresh(self, name, config, generator):
        return torch.zeros(tuple(self.weight.shape))


class MoDPredictor(nn.Module):
    """Causal routing predictor of a decoder's routed block (Raposo et al. 2024, section 3.5):
    logit of "this token is in the top-k", from the stop-gradient block input of that token only."""

    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        width = max(8, hidden // PREDICTOR_WIDTH_DIVISOR)
        self.w_in = nn.Parameter(torch.empty(width, hidden))
        self.b_in = nn.Parameter(torch.zeros(width))
        self.w_out = nn.Parameter(torch.empty(1, width))
        self.b_out = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        h = F.gelu(F.linear(x.detach(), self.w_in, self.b_in))  # (B, T, width)
        return F.linear(h, self.w_out, self.b_out).squeeze(-1).float()  # (B, T)

    def _condcomp_init(self, std):
        init.normal_(self.w_in, mean=0.0, std=std)
        init.normal_(self.w_out, mean=0.0, std=std)
        init.zeros_(self.b_in)
        init.zeros_(self.b_out)

    def _condcomp_fresh(self, name, config, generator):
        shape = tuple(getattr(self, name).shape)
        if name.startswith("b_"):
            return torch.zeros(shape)
        return torch.randn(shape, generator=generator) * config.initializer_range


@register_gated_variant
class RoutedBlocks(GatedVariant):
    name = "mod"
    layers_field = "mod_layers"
    layers_setting = "with variant moe: also make these blocks Mixture-of-Depths routed blocks at `capacity`"
    fields = (
        VariantField("mod_capacity", 0.5, float, "fraction of each sequence's tokens a routed block processes",
                     check=lambda c: 0 < c <= 1, requirement="must be in (0, 1]",
                     fix="pass the fraction of each sequence's tokens a routed block processes, e.g. 0.5 (1.0 = dense)",
                     setting="capacity"),
        VariantField("mod_aux_loss_coef", 0.01, float, "weight of the causal predictor's loss (decoders)"),
    )
    modules = {"mod_router": MoDRouter, "mod_predictor": MoDPredictor}
    description = "Mixture-of-Depths routed blocks"

    def install(self, layer, config, causal):
        layer.mod_router = MoDRouter(config)
        if causal:  # top-k over a sequence sees the future: decoders decide by the causal predictor
            layer.mod_predictor = MoDPredictor(config)

    def decide(self, layer, x, rec, named):
        router = layer.mod_router
        predictor = layer._modules.get("mod_predictor")
        config = router.config
        scores = router(x)  # (B, T)
        real = rec.token_mask
        if config.mod_capacity >= 1.0:
            keep = None
        elif predictor is not None and not layer.training:
            keep = predictor(x) > 0  # p > 0.5: the causal decision of eval and generation
            keep = keep if rec.pinned is None else keep | rec.pinned
            keep = keep if real is None else keep & real
        else:
            keep = top_capacity(scores, real, config.mod_capacity, rec.pinned)
            if predictor is not None and config.mod_aux_loss_coef > 0:
                bce = F.binary_cross_entropy_with_logits(predictor(x), keep.float(), reduction="none")
                rec.extra_losses.append(config.mod_aux_loss_coef * masked_mean(bce, real))
        if router.record_routing:
            router.routing_log.append((keep if keep is not None else all_real(x, real)).detach())
        return keep, 2.0 * torch.sigmoid(scores)
