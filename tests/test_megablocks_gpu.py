"""MegaBlocks' grouped GEMM against the default `grouped` path, on a GPU, in bf16.

Skipped where CUDA or megablocks is missing (every CPU-only machine).
"""

import pytest
import torch

from hf_condcomp.modeling import experts as experts_mod
from hf_condcomp.modeling.experts import Experts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(experts_mod._megablocks_gg is None,
                       reason="needs megablocks (see the GPU section of docs/speed.md)"),
]


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True)])
def test_megablocks_matches_grouped_in_bf16(gated, bias):
    torch.manual_seed(0)
    experts = Experts(8, 256, 512, "silu" if gated else "gelu", gated=gated, bias=bias, implementation="grouped")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    experts = experts.to("cuda", torch.bfloat16)
    counts = torch.tensor([300, 0, 17, 128, 64, 1, 250, 40], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
    results = {}
    for impl in ("grouped", "megablocks"):
        experts.implementation = impl
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = experts.forward_sorted(xi, counts)
        (y.float() * target.float()).sum().backward()
        results[impl] = (y.float(), xi.grad.float(), [p.grad.float() for p in experts.parameters()])
    (y0, gx0, gp0), (y1, gx1, gp1) = results["grouped"], results["megablocks"]
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(gx1, gx0, **tol)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, atol=5e-2 * b.abs().max().item() + 1e-2, rtol=2e-2)
