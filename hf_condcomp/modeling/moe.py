"""The Mixture-of-Experts feed-forward block: a router, a dispatch, experts, a combine."""

import torch
import torch.nn as nn

from .configuration_condcomp import expert_intermediate_size
from .experts import Experts
from .routing import expert_choice, token_choice


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

        rows = None
        if token_mask is not None and not bool(token_mask.all()):
            rows = token_mask.reshape(-1).nonzero().squeeze(-1)  # (Nv,) unpadded rows
        x_routed = x if rows is None else x[rows]  # (Nv, H)
        logits_routed = logits if rows is None else logits[rows]

        dispatch = self.route(logits_routed)
        y = self.experts(x_routed[dispatch.token_index], dispatch.counts)  # (S, H)
        y = y * dispatch.weights.unsqueeze(-1).to(y.dtype)
        out = x.new_zeros(x_routed.shape).index_add_(0, dispatch.token_index, y)  # (Nv, H)
        if rows is not None:
            out = x.new_zeros(x.shape).index_copy_(0, rows, out)  # (N, H)

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
