"""The Mixture-of-Experts feed-forward block: a router, a dispatch, experts, a combine."""

import torch
import torch.nn as nn

from .configuration_condcomp import expert_intermediate_size
from .experts import Experts
from .routing import expert_choice, token_choice


class _PermuteRows(torch.autograd.Function):
    """out = x[index] where `index` is a permutation; its backward is the inverse gather.

    Autograd's derivative of `x[index]` is a scatter-add (`index_put_` with accumulation), which on
    the CPU is much slower than a gather; a permutation needs no accumulation.
    """

    @staticmethod
    def forward(ctx, x, index):
        inverse = torch.empty_like(index).scatter_(0, index, torch.arange(index.numel(), device=index.device))
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None


class _DispatchRows(torch.autograd.Function):
    """x_sorted = x[token_index] when every token owns exactly k rows; the backward sums each
    token's k row gradients through `inverse` (a gather and a reshape-sum) instead of a scatter-add."""

    @staticmethod
    def forward(ctx, x, token_index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, token_index)  # (S, H)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        num_tokens, top_k = inverse.shape
        grad_tok = grad.index_select(0, inverse.reshape(-1)).view(num_tokens, top_k, -1)  # (N, k, H)
        return grad_tok.sum(1), None, None


def combine_dropless(y: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Sum each token's k expert outputs with its weights: gathers and one batched GEMM, no scatter.

    y (S, H) sorted by expert, weights (S,) sorted likewise, inverse (N, k) from `Dispatch`.
    """
    num_tokens, top_k = inverse.shape
    flat = inverse.reshape(-1)  # (N * k,) token-major
    y_tok = _PermuteRows.apply(y, flat) if torch.is_grad_enabled() else y.index_select(0, flat)
    y_tok = y_tok.view(num_tokens, top_k, -1)  # (N, k, H)
    w_tok = weights[flat].view(num_tokens, 1, top_k).to(y.dtype)  # (N, 1, k)
    return torch.bmm(w_tok, y_tok).squeeze(1)  # (N, H)


class MoEFeedForward(nn.Module):
    """Replaces one dense FFN by `num_local_experts` experts and a linear router.

    Padding tokens are neither routed nor computed: only rows where `token_mask` is true reach
    the experts, and their FFN output is zero.

    Expert choice picks tokens across the whole batch, which looks at future tokens. In decoders
    (`causal=True`) it is therefore used in training only; in evaluation and generation each token
    takes its own top-round(factor) experts by the same router scores (on average an expert-choice
    token is served by `factor` experts), so the output at position t depends on tokens <= t only.
    """

    def __init__(self, config, hidden_size, gated, bias, hidden_act, causal):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.routing = config.moe_routing
        self.capacity_factor = config.moe_capacity_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.unit_weights = config.router_unit_weights
        self.jitter_noise = config.router_jitter_noise
        self.causal = causal
        self.router = nn.Linear(hidden_size, self.num_experts, bias=False)
        self.experts = Experts(
            self.num_experts,
            hidden_size,
            expert_intermediate_size(config),
            hidden_act,
            gated=gated,
            bias=bias,
            implementation=config.moe_implementation,
        )
        # Filled after each forward for inspection: tokens per expert and dropped assignments.
        self.record_routing = False
        self.last_routing = None

    def routes_each_token_alone(self) -> bool:
        """Dropless token choice (as expert choice decodes in causal evaluation): no token's
        experts depend on the other tokens."""
        if self.routing == "expert_choice":
            return self.causal and not self.training  # `route` then takes token choice, dropless
        return self.capacity_factor is None

    def route(self, logits: torch.Tensor):
        if self.routing == "expert_choice":
            factor = self.capacity_factor if self.capacity_factor is not None else float(self.top_k)
            if self.causal and not self.training:
                k = min(self.num_experts, max(1, round(factor)))
                return token_choice(logits, k, self.norm_topk_prob, None, self.unit_weights)
            return expert_choice(logits, factor, self.norm_topk_prob, self.unit_weights)
        return token_choice(logits, self.top_k, self.norm_topk_prob, self.capacity_factor, self.unit_weights)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None):
        """hidden_states (B, T, H), token_mask (B, T) bool. Returns (output (B, T, H), logits (B*T, E))."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        router_in = x
        if self.training and self.jitter_noise > 0:
            router_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = self.router(router_in)  # (N, E)

        rows = keep = None
        if token_mask is not None and torch.compiler.is_compiling() and self.routes_each_token_alone():
            # A traced graph cannot pick rows by value: every row is routed, as the native family
            # always does, and the padding's output zeroed; real tokens get what they get
            # uncompiled. Capacity limits and expert choice rank tokens against each other, so
            # there the padding stays out (a graph break).
            keep = token_mask.reshape(-1, 1)
        elif token_mask is not None and not bool(token_mask.all()):
            rows = token_mask.reshape(-1).nonzero().squeeze(-1)  # (Nv,) unpadded rows
        x_routed = x if rows is None else x[rows]  # (Nv, H)
        logits_routed = logits if rows is None else logits[rows]

        dispatch = self.route(logits_routed)
        if dispatch.inverse is not None and torch.is_grad_enabled():
            x_sorted = _DispatchRows.apply(x_routed, dispatch.token_index, dispatch.inverse)  # (S, H)
        else:
            x_sorted = x_routed.index_select(0, dispatch.token_index)  # (S, H)
        y = self.experts(x_sorted, dispatch.counts)  # (S, H)
        if dispatch.inverse is not None:
            out = combine_dropless(y, dispatch.weights, dispatch.inverse)  # (Nv, H)
        else:  # tokens own 0..E rows each (capacity, expert choice): scatter-add them
            y = y * dispatch.weights.unsqueeze(-1).to(y.dtype)
            out = y.new_zeros(x_routed.shape).index_add_(0, dispatch.token_index, y)  # (Nv, H)
        if rows is not None:  # in the experts' dtype, which mixed precision may set apart from x's
            out = out.new_zeros(x.shape).index_copy_(0, rows, out)  # (N, H)
        elif keep is not None:
            out = out * keep.to(out.dtype)

        if self.record_routing:
            token_rows = dispatch.token_index if rows is None else rows[dispatch.token_index]
            self.last_routing = {
                "token_rows": token_rows.detach(),
                "experts": torch.repeat_interleave(
                    torch.arange(self.num_experts, device=x.device), dispatch.counts
                ).detach(),
                "counts": dispatch.counts.detach(),
                "dropped": dispatch.dropped.detach(),
                "num_tokens": x_routed.shape[0],
            }
        return out.view(shape), logits
