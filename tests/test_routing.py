"""Routers, losses and expert implementations against references."""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from hf_condcomp.modeling.experts import (
    Experts,
    eager_experts_forward,
    get_experts_implementation,
    grouped_experts_forward,
)
from hf_condcomp.modeling.routing import (
    expert_choice,
    expert_choice_capacity,
    load_balancing_loss,
    router_z_loss,
    token_choice,
)


def test_token_choice_dropless_routes_every_assignment():
    logits = torch.randn(13 * 7, 8)
    d = token_choice(logits, top_k=2)
    assert d.counts.sum().item() == 13 * 7 * 2 and d.dropped.item() == 0
    # sorted by expert, and each token appears exactly k times with weights summing to one
    expert_of_row = torch.repeat_interleave(torch.arange(8), d.counts)
    assert torch.equal(expert_of_row, logits.topk(2, dim=-1).indices.t().reshape(-1).sort(stable=True).values)
    per_token = torch.zeros(91).index_add_(0, d.token_index, d.weights)
    torch.testing.assert_close(per_token, torch.ones(91))


def test_token_choice_with_capacity_drops_exactly_the_overflow():
    torch.manual_seed(0)
    N, E, k, factor = 64, 4, 2, 1.0
    logits = torch.randn(N, E)
    logits[:, 0] += 3.0  # expert 0 is oversubscribed
    d = token_choice(logits, top_k=k, capacity_factor=factor)
    capacity = math.ceil(N * k * factor / E)
    demand = torch.bincount(logits.topk(k, dim=-1).indices.reshape(-1), minlength=E)
    assert torch.equal(d.counts, demand.clamp(max=capacity))
    assert d.dropped.item() == (demand - capacity).clamp(min=0).sum().item() > 0
    # first choices win over second choices, earlier tokens over later ones (GShard priority)
    first = logits.argmax(-1)
    kept0 = set(d.token_index[: d.counts[0]].tolist())
    first_choosers = (first == 0).nonzero().squeeze(-1).tolist()
    assert set(first_choosers[:capacity]) <= kept0


def test_expert_choice_gives_every_expert_exactly_its_capacity():
    for N, E, factor in [(91, 8, 2.0), (64, 4, 1.0), (10, 8, 0.5)]:
        d = expert_choice(torch.randn(N, E), capacity_factor=factor)
        C = expert_choice_capacity(N, E, factor)
        assert C == max(1, min(N, math.ceil(N * factor / E)))
        assert d.counts.tolist() == [C] * E
        for e in range(E):  # no expert takes a token twice
            rows = d.token_index[e * C : (e + 1) * C]
            assert rows.unique().numel() == C


def test_top1_weights_are_one_but_the_router_still_learns():
    logits = torch.randn(20, 4, requires_grad=True)
    d = token_choice(logits, top_k=1)
    torch.testing.assert_close(d.weights, torch.ones(20))
    (d.weights * torch.arange(20.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_loss_equals_transformers(top_k):
    torch.manual_seed(top_k)
    layers = tuple(torch.randn(13 * 7, 8) for _ in range(3))
    mask = (torch.rand(13, 7) > 0.3).long()
    ours = load_balancing_loss(layers, 8, top_k)
    ref = load_balancing_loss_func(layers, 8, top_k)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(load_balancing_loss(layers, 8, top_k, mask),
                               load_balancing_loss_func(layers, 8, top_k, mask))


def test_losses_ignore_masked_padding():
    torch.manual_seed(0)
    real = torch.randn(2 * 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    padded_a, padded_b = real.clone(), real.clone()
    padded_b.view(2, 5, 8)[1, 3:] = torch.randn(2, 8) * 10  # change only the padding rows
    assert torch.allclose(load_balancing_loss((padded_a,), 8, 2, mask), load_balancing_loss((padded_b,), 8, 2, mask))
    assert torch.allclose(router_z_loss((padded_a,), mask), router_z_loss((padded_b,), mask))
    assert not torch.allclose(load_balancing_loss((padded_a,), 8, 2), load_balancing_loss((padded_b,), 8, 2))


def test_z_loss_value():
    logits = torch.randn(6, 4)
    torch.testing.assert_close(router_z_loss((logits,)), (torch.logsumexp(logits, -1) ** 2).mean())


@pytest.mark.parametrize("gated,bias", [(False, True), (True, False), (True, True)])
def test_eager_and_grouped_experts_agree_in_outputs_and_gradients(gated, bias):
    torch.manual_seed(0)
    experts = Experts(8, 32, 24, "gelu" if not gated else "silu", gated=gated, bias=bias, implementation="eager")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    counts = torch.tensor([5, 0, 9, 3, 0, 0, 12, 1])
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    grad_out = torch.randn(x.shape[0], 32)
    results = []
    for fn in (eager_experts_forward, grouped_experts_forward):
        experts.zero_grad()
        x.grad = None
        out = fn(experts, x, counts)
        out.backward(grad_out)
        results.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in experts.parameters()]))
    (o1, gx1, gp1), (o2, gx2, gp2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the reduction-style backward (a stride-0 gradient) also works on the grouped path
    grouped_experts_forward(experts, x, counts).sum().backward()


def test_unknown_implementation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="moe_implementation.*eager.*grouped.*megablocks.*'fast'"):
        get_experts_implementation("fast")
