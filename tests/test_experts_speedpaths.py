"""The fast CPU paths of the MoE layer against the plain reference they replace.

`grouped` (hand-written grouped-GEMM backward, per-expert bias gradient) is checked against `eager`
with an expert that receives no rows; its single-token decoding path against `eager` and against
the grouped GEMMs it skips; the dropless dispatch/combine (gathers and a batched GEMM
instead of scatter-adds) is checked against the scatter-add formula with autograd's derivatives.
"""

from types import SimpleNamespace

import pytest
import torch

from hf_condcomp.modeling.experts import Experts
from hf_condcomp.modeling.moe import MoEFeedForward


@pytest.mark.parametrize("gated,bias", [(False, True), (True, False)])
def test_grouped_matches_eager_with_an_empty_expert(gated, bias):
    torch.manual_seed(0)
    experts = Experts(4, 16, 32, "silu" if gated else "gelu", gated=gated, bias=bias, implementation="eager")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    counts = torch.tensor([5, 0, 9, 3])
    x = torch.randn(int(counts.sum()), 16)
    results = {}
    for impl in ("eager", "grouped"):
        experts.implementation = impl
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        experts.forward_sorted(xi, counts).sum().backward()  # `.sum()` hands the backward a stride-0 gradient
        results[impl] = (experts.forward_sorted(x, counts), xi.grad, [p.grad.clone() for p in experts.parameters()])
    (y0, gx0, gp0), (y1, gx1, gp1) = results["eager"], results["grouped"]
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b)
    assert gp1[0][1].abs().sum() == 0  # the empty expert gets a zero weight gradient


@pytest.mark.parametrize("gated,bias", [(False, True), (True, False)])
def test_one_token_decoding_path_matches_eager_and_the_grouped_gemms(gated, bias, monkeypatch):
    """Batch-1 decoding (one token, no gradients, CPU) runs its k experts directly: the eager
    reference's output and the grouped GEMMs' (up to rounding), and no grouped GEMM is called."""
    from hf_condcomp.modeling import experts as experts_module

    torch.manual_seed(0)
    experts = Experts(8, 16, 32, "silu" if gated else "gelu", gated=gated, bias=bias, implementation="eager")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, index, weights = torch.randn(1, 16), torch.tensor([[6, 1, 3]]), torch.tensor([[0.5, 0.3, 0.2]])
    with torch.no_grad():
        reference = experts(x, index, weights)
        experts.implementation = "grouped"
        grouped_rows = experts(x.expand(2, 16), index.expand(2, 3), weights.expand(2, 3))[:1]  # two tokens: grouped
        calls = []
        monkeypatch.setattr(experts_module, "grouped_mm", lambda *a: calls.append(a))
        one = experts(x, index, weights)
    assert calls == []
    torch.testing.assert_close(one, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(one, grouped_rows, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("gated", [False, True])
def test_grouped_keeps_only_input_and_preactivation_for_backward(gated):
    """The grouped experts recompute the activation in the backward: besides the weights, the
    autograd graph holds the (S, H) input rows and the (S, I or 2I) pre-activation only, where
    autograd's own graph of the same computation (`eager`) also holds the activated rows."""
    torch.manual_seed(0)
    experts = Experts(4, 16, 32, "silu" if gated else "gelu", gated=gated, bias=True, implementation="grouped")
    counts = torch.tensor([20, 0, 30, 14])
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    params = {p.data_ptr() for p in experts.parameters()}

    def saved_bytes(impl):
        experts.implementation = impl
        seen = {}

        def pack(t):
            if t.data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the forward keeps
            y = experts.forward_sorted(x, counts)
        y.sum().backward()
        return sum(seen.values())

    up_rows = experts.up_weight.shape[1]
    kept = x.numel() * 4 + x.shape[0] * up_rows * 4  # input rows + pre-activation, fp32
    assert saved_bytes("grouped") <= kept + 1024  # + offsets and counts
    assert saved_bytes("eager") > kept + x.shape[0] * 32 * 4 - 1024  # + at least the activated rows


def _layer(impl, top_k=2):
    config = SimpleNamespace(num_local_experts=8, num_experts_per_tok=top_k, moe_routing="token_choice",
                             moe_capacity_factor=None, norm_topk_prob=True, router_unit_weights=False,
                             router_jitter_noise=0.0, moe_implementation=impl, moe_expert_intermediate_size=24)
    torch.manual_seed(1)
    layer = MoEFeedForward(config, 32, gated=False, bias=True, hidden_act="gelu", causal=False)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


def _reference_forward(layer, hidden, mask):
    """The scatter-add formulation: gather rows by index, weight them, index_add them back."""
    x = hidden.reshape(-1, hidden.shape[-1])
    logits = layer.gate(x)
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    d = layer.route(logits[rows])
    y = layer.experts.forward_sorted(x[rows][d.token_index], d.counts) * d.weights.unsqueeze(-1)
    out = torch.zeros_like(x[rows]).index_add(0, d.token_index, y)
    return torch.zeros_like(x).index_copy(0, rows, out).view(hidden.shape)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_gather_combine_matches_scatter_add(top_k):
    layer = _layer("grouped", top_k)
    hidden = torch.randn(3, 11, 32)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False  # padding rows stay out of the experts
    grads = []
    for fn in (lambda h: layer(h, mask)[0], lambda h: _reference_forward(layer, h, mask)):
        layer.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_()
        out = fn(h)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), h.grad, [p.grad.clone() for p in layer.parameters()]))
    (o0, g0, p0), (o1, g1, p1) = grads
    torch.testing.assert_close(o0, o1)
    torch.testing.assert_close(g0, g1)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b)
    assert o0[1, 7:].abs().sum() == 0
