"""The Mixture-of-Experts feed-forward block: a linear router, a routing method, and experts
called as transformers' experts modules are: `experts(hidden_states, top_k_index, top_k_weights)`.

This file travels to the Hub with every saved model: only sibling relative imports.
"""

import torch
import torch.nn as nn

from .configuration_condcomp import expert_intermediate_size
from .experts import Experts, _DispatchRows, combine_dropless, sort_by_expert
from .routing import get_routing_method

__all__ = ["MoEFeedForward", "combine_dropless"]


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
        get_routing_method(self.routing)  # an unknown name: ValueError naming the registered ones
        self.capacity_factor = config.moe_capacity_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.unit_weights = config.router_unit_weights
        self.jitter_noise = config.router_jitter_noise
        self.causal = causal
        self.gate = nn.Linear(hidden_size, self.num_experts, bias=False)  # the router (transformers' MoE name)
        self.experts = Experts(
            self.num_experts,
            hidden_size,
            expert_intermediate_size(config),
            hidden_act,
            gated=gated,
            bias=bias,
            implementation=config.moe_implementation,
            config=config,
        )
        # Filled after each forward for inspection: tokens per expert and dropped assignments.
        self.record_routing = False
        self.last_routing = None

    @property
    def routing_method(self):
        """The registered `RoutingMethod` named by `self.routing` (routing.py's `ROUTING_METHODS`)."""
        return get_routing_method(self.routing)

    def routes_each_token_alone(self) -> bool:
        """No token's experts depend on the other tokens (dropless token choice, or expert choice
        as it decodes in causal evaluation): see `RoutingMethod.routes_each_token_alone`."""
        return self.routing_method.routes_each_token_alone(self)

    def route(self, logits: torch.Tensor):
        """The `Dispatch` of router logits (N, E) by this block's routing method (`config.moe_routing`)."""
        return self.routing_method.route(self, logits)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None):
        """hidden_states (B, T, H), token_mask (B, T) bool. Returns (output (B, T, H), logits (B*T, E))."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        router_in = x
        if self.training and self.jitter_noise > 0:
            router_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = self.gate(router_in)  # (N, E)

        rows = keep = None
        if token_mask is not None and torch.compiler.is_compiling() and self.routes_each_token_alone():
            # A traced graph cannot pick rows by value: every row is routed, as a dense FFN
            # computes every row, and the padding's output zeroed; real tokens get what they get
            # uncompiled. Capacity limits and expert choice rank tokens against each other, so
            # there the padding stays out (a graph break).
            keep = token_mask.reshape(-1, 1)
        elif token_mask is not None and not bool(token_mask.all()):
            rows = token_mask.reshape(-1).nonzero().squeeze(-1)  # (Nv,) unpadded rows
        x_routed = x if rows is None else x[rows]  # (Nv, H)
        logits_routed = logits if rows is None else logits[rows]

        topk = self.routing_method.route_topk(self, logits_routed)
        dispatch = None
        if topk is not None:  # every token takes exactly k experts: the experts-interface call
            top_w, top_i = topk  # (Nv, k) each
            out = self.experts(x_routed, top_i, top_w)  # (Nv, H)
        else:
            # Capacity limits and expert choice give each token 0..E rows, which a dense (N, k)
            # top-k call cannot express: they stay on the rows sorted by expert
            # (`Experts.forward_sorted`, the implementation's sorted entry point).
            dispatch = self.route(logits_routed)
            if dispatch.inverse is not None and torch.is_grad_enabled():
                x_sorted = _DispatchRows.apply(x_routed, dispatch.token_index, dispatch.inverse)  # (S, H)
            else:
                x_sorted = x_routed.index_select(0, dispatch.token_index)  # (S, H)
            y = self.experts.forward_sorted(x_sorted, dispatch.counts)  # (S, H)
            if dispatch.inverse is not None:
                out = combine_dropless(y, dispatch.weights, dispatch.inverse)  # (Nv, H)
            else:  # tokens own 0..E rows each: scatter-add them
                y = y * dispatch.weights.unsqueeze(-1).to(y.dtype)
                out = y.new_zeros(x_routed.shape).index_add_(0, dispatch.token_index, y)  # (Nv, H)
        if rows is not None:  # in the experts' dtype, which mixed precision may set apart from x's
            out = out.new_zeros(x.shape).index_copy_(0, rows, out)  # (N, H)
        elif keep is not None:
            out = out * keep.to(out.dtype)

        if self.record_routing:
            if dispatch is None:
                token_index, counts, _ = sort_by_expert(top_i, self.num_experts)
                dropped = torch.zeros((), dtype=torch.long, device=x.device)
            else:
                token_index, counts, dropped = dispatch.token_index, dispatch.counts, dispatch.dropped
            token_rows = token_index if rows is None else rows[token_index]
            self.last_routing = {
                "token_rows": token_rows.detach(),
                "experts": torch.repeat_interleave(torch.arange(self.num_experts, device=x.device), counts).detach(),
                "counts": counts.detach(),
                "dropped": dropped.detach(),
                "num_tokens": x_routed.shape[0],
            }
        return out.view(shape), logits
