"""Routers for Mixture-of-Experts layers and their auxiliary losses.

A router turns logits of shape (N, E) for N tokens into a `Dispatch`: the (token, expert)
assignments sorted by expert, so that experts can run as one grouped matrix multiply over
contiguous rows, with no capacity padding.

- Token choice (Switch: Fedus et al. 2021; GShard: Lepikhin et al. 2020; Mixtral): each token
  takes its top-k experts. Dropless by default; with a capacity factor each expert keeps at most
  ceil(N * k * factor / E) assignments, first choices before second choices, earlier tokens first
  (GShard's priority), and the overflow is dropped (the token passes through the residual).
- Expert choice (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", eq. 1-2):
  scores S = softmax(X W) over experts, and each expert takes the top C = ceil(N * factor / E)
  tokens of its column of S. Every expert gets exactly C tokens by construction.

Each method is a `RoutingMethod` registered by name with `@register_routing(name)` in
`ROUTING_METHODS`; a MoE block looks its method up by `config.moe_routing` with
`get_routing_method`, so a new method is one registered class, with no change to the block.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Dispatch:
    """Assignments of tokens to experts, sorted by expert.

    token_index: (S,) row of the routed token for each assignment.
    weights: (S,) combine weight of each assignment.
    counts: (E,) assignments per expert; they partition the S rows in expert order.
    dropped: (scalar tensor) assignments dropped by the capacity limit.
    inverse: (N, k) sorted row of token n's c-th choice, set only when every token has exactly k
        rows (dropless token choice); it lets the combine be a gather and a sum instead of a scatter.
    """

    token_index: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor
    inverse: torch.Tensor | None = None


def _unit_weights(probs: torch.Tensor) -> torch.Tensor:
    """Weights of value exactly 1 whose gradient is d(log p): p / stopgrad(p).

    Used where the combine weights must not rescale the experts (top-1 with normalisation, split
    upcycling), yet the router must still learn from the task loss.
    """
    return probs / probs.detach()


def token_choice_topk(logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True, unit_weights: bool = False):
    """Each token's top-k experts of logits (N, E): (weights (N, k) float32, expert ids (N, k) long),
    as transformers' experts modules take them (`experts(hidden_states, top_k_index, top_k_weights)`)."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
    top_w, top_i = probs.topk(top_k, dim=-1)  # (N, k)
    if unit_weights or (norm_topk_prob and top_k == 1):
        top_w = _unit_weights(top_w)
    elif norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w, top_i


def token_choice(
    logits: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool = True,
    capacity_factor: float | None = None,
    unit_weights: bool = False,
) -> Dispatch:
    """Top-k token-choice routing of logits (N, E)."""
    num_tokens, num_experts = logits.shape
    top_w, top_i = token_choice_topk(logits, top_k, norm_topk_prob, unit_weights)

    # Assignments in priority order: all first choices, then all second choices, ... (assignment
    # c * N + n is token n's c-th choice)
    expert_ids = top_i.t().reshape(-1)  # (k * N,)
    weights = top_w.t().reshape(-1)  # (k * N,)

    dropped = torch.zeros((), dtype=torch.long, device=logits.device)
    token_ids = None  # dropless: the token of assignment j is j mod N
    if capacity_factor is not None:
        capacity = math.ceil(num_tokens * top_k * capacity_factor / num_experts)
        one_hot = F.one_hot(expert_ids, num_experts)  # (k * N, E)
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # rank within its expert
        keep = position < capacity
        dropped = (~keep).sum()
        token_ids = torch.arange(num_tokens, device=logits.device).repeat(top_k)[keep]
        expert_ids, weights = expert_ids[keep], weights[keep]

    order = torch.argsort(expert_ids, stable=True)
    # (E,) whatever the ids: bincount's length depends on the largest id, which a traced graph can't know
    counts = torch.zeros(num_experts, dtype=torch.long, device=logits.device)
    counts = counts.index_add_(0, expert_ids, torch.ones_like(expert_ids))
    inverse = None
    if token_ids is None:  # assignment c * N + n sits at sorted row inverse[n, c]
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        inverse = inverse.view(top_k, num_tokens).t()  # (N, k)
        token_index = order % num_tokens
    else:
        token_index = token_ids[order]
    return Dispatch(token_index, weights[order], counts, dropped, inverse)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes: ceil(N * factor / E), at least 1 and at most N."""
    return max(1, min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts)))


def expert_choice(
    logits: torch.Tensor,
    capacity_factor: float,
    norm_topk_prob: bool = True,
    unit_weights: bool = False,
) -> Dispatch:
    """Expert-choice routing of logits (N, E): each expert takes its top-C tokens.

    With `norm_topk_prob`, a token's weights are divided by their (detached) sum over the experts
    that chose it, so a copy-upcycled model gives every chosen token exactly the dense FFN output;
    tokens that no expert chose pass through the residual.
    """
    num_tokens, num_experts = logits.shape
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
    capacity = expert_choice_capacity(num_tokens, num_experts, capacity_factor)
    gates, token_ids = probs.t().topk(capacity, dim=-1)  # (E, C) each
    token_ids, gates = token_ids.reshape(-1), gates.reshape(-1)  # already in expert order
    if unit_weights:
        gates = _unit_weights(gates)
    elif norm_topk_prob:
        total = torch.zeros(num_tokens, device=logits.device, dtype=gates.dtype)
        total = total.index_add(0, token_ids, gates.detach())
        gates = gates / total[token_ids]
    counts = torch.full((num_experts,), capacity, dtype=torch.long, device=logits.device)
    return Dispatch(token_ids, gates, counts, torch.zeros((), dtype=torch.long, device=logits.device))


class RoutingMethod:
    """A way for a MoE block to turn its router's logits into a `Dispatch`, registered by name.

    `route(block, logits)` reads the block's settings (`num_experts`, `top_k`, `capacity_factor`,
    `norm_topk_prob`, `unit_weights`, `causal`, `training`). Besides, a method says:
    - `routes_each_token_alone(block)`: no token's experts depend on the other tokens of the batch
      (so a compiled graph may route padding rows too, and a decoder's output at position t never
      depends on later tokens);
    - `balance_loss`: whether the Switch load-balancing loss applies (it does not to a method that
      balances experts by construction);
    - `exports_natively`: whether native transformers MoE architectures (Mixtral, Qwen-MoE) route so.
    """

    name: str = ""
    balance_loss: bool = True
    exports_natively: bool = False

    def route(self, block, logits: torch.Tensor) -> Dispatch:
        raise NotImplementedError

    def route_topk(self, block, logits: torch.Tensor):
        """(top_k_weights (N, k), top_k_index (N, k)) where every token takes exactly k experts
        whatever the other tokens do, for the experts-interface call; None otherwise (`route`)."""
        return None

    def routes_each_token_alone(self, block) -> bool:
        return False

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


ROUTING_METHODS: dict[str, RoutingMethod] = {}


def register_routing(name: str):
    """Class decorator: register a `RoutingMethod` subclass under `name` (the `moe_routing` value)."""

    def register(cls):
        known = ROUTING_METHODS.get(name)
        # The same class again (its module re-executed, as a reloaded remote-code copy is) replaces itself.
        if known is not None and (type(known).__module__, type(known).__qualname__) != (cls.__module__,
                                                                                      cls.__qualname__):
            raise ValueError(f"routing method {name!r} is already registered ({known!r}).")
        cls.name = name
        ROUTING_METHODS[name] = cls()
        return cls

    return register


def get_routing_method(name: str) -> RoutingMethod:
    try:
        return ROUTING_METHODS[name]
    except KeyError:
        raise ValueError(f"`moe_routing` must be one of {tuple(ROUTING_METHODS)}, got {name!r}.") from None


@register_routing("token_choice")
class TokenChoice(RoutingMethod):
    """Each token takes its top-k experts; dropless, or capped by `capacity_factor`."""

    exports_natively = True

    def route(self, block, logits):
        return token_choice(logits, block.top_k, block.norm_topk_prob, block.capacity_factor, block.unit_weights)

    def route_topk(self, block, logits):
        if block.capacity_factor is not None:
            return None
        return token_choice_topk(logits, block.top_k, block.norm_topk_prob, block.unit_weights)

    def routes_each_token_alone(self, block):
        return block.capacity_factor is None  # a capacity ranks tokens against each other


@register_routing("expert_choice")
class ExpertChoice(RoutingMethod):
    """Each expert takes its top-C tokens, C from `capacity_factor` (default: top_k).

    It picks tokens across the whole batch, which looks at future tokens; in a causal block it is
    therefore used in training only, and in evaluation and generation each token takes its own
    top-round(factor) experts by the same router scores (dropless token choice).
    """

    balance_loss = False  # every expert gets exactly C tokens

    def route(self, block, logits):
        factor = block.capacity_factor if block.capacity_factor is not None else float(block.top_k)
        if block.causal and not block.training:
            k = min(block.num_experts, max(1, round(factor)))
            return token_choice(logits, k, block.norm_topk_prob, None, block.unit_weights)
        return expert_choice(logits, factor, block.norm_topk_prob, block.unit_weights)

    def route_topk(self, block, logits):
        if block.causal and not block.training:
            factor = block.capacity_factor if block.capacity_factor is not None else float(block.top_k)
            k = min(block.num_experts, max(1, round(factor)))
            return token_choice_topk(logits, k, block.norm_topk_prob, block.unit_weights)
        return None

    def routes_each_token_alone(self, block):
        return block.causal and not block.training  # `route` then takes token choice, dropless


def _flat_mask(attention_mask, device):
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6), padding-aware.

    loss = E * sum_e f_e * P_e, with f_e the share of top-k assignments that go to expert e and
    P_e the mean router probability of expert e, both over the (unmasked) tokens of all layers.
    router_logits: tuple of (batch * seq, E) tensors, one per MoE layer; attention_mask (batch, seq).
    Equal to `transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func`.
    """
    device = router_logits[0].device
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    mask = None if attention_mask is None else _flat_mask(attention_mask, device)
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)  # (N, E)
        selected = probs.topk(top_k, dim=-1).indices.reshape(-1)  # (N * k,)
        if mask is None:
            counts = torch.ones_like(selected, dtype=torch.float32)
            total = total + probs.shape[0]
            prob_per_expert = prob_per_expert + probs.sum(dim=0)
        else:
            counts = mask.repeat_interleave(top_k)
            total = total + mask.sum()
            prob_per_expert = prob_per_expert + (probs * mask[:, None]).sum(dim=0)
        tokens_per_expert = tokens_per_expert.scatter_add(0, selected, counts)
    return num_experts * torch.sum((tokens_per_expert / total) * (prob_per_expert / total))


def router_z_loss(router_logits, attention_mask=None) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
    device = router_logits[0].device
    mask = None if attention_mask is None else _flat_mask(attention_mask, device)
    losses = []
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1) ** 2  # (N,)
        losses.append(z.mean() if mask is None else (z * mask).sum() / mask.sum().clamp(min=1))
    return torch.stack(losses).mean()
