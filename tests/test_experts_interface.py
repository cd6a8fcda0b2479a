"""The experts follow transformers' MoE conventions: called as `experts(hidden_states, top_k_index,
top_k_weights)`, with one registry that holds our implementations and transformers' own
(`ALL_EXPERTS_FUNCTIONS`: `grouped_mm`, `batched_mm`, ...), picked by `moe_implementation` or by
transformers' `experts_implementation`. Every implementation is checked against `eager`, at sizes
`grouped_mm` takes as they are and at the transformers testers' odd ones (intermediate 37), which
break its 16-byte stride alignment."""

import inspect
from types import SimpleNamespace
from unittest.mock import Mock, patch

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, batched_mm_experts_forward

from hf_condcomp import upcycle
from hf_condcomp.modeling.experts import EXPERTS_FUNCTIONS, Experts, get_experts_implementation
from hf_condcomp.modeling.moe import MoEFeedForward

from conftest import tiny_source

GPU_ONLY = ("megablocks", "deepgemm", "sonicmoe")  # CUDA kernels (optional packages), by name prefix
CPU_IMPLEMENTATIONS = [name for name in EXPERTS_FUNCTIONS.valid_keys() if not name.startswith(GPU_ONLY)]
OTHERS = [name for name in CPU_IMPLEMENTATIONS if name != "eager"]
# (activation, gated, bias): BERT, GPT-2, Llama experts, and the other two combinations
STYLES = {"bert": ("gelu", False, True), "gpt2": ("gelu_new", False, True), "llama": ("silu", True, False),
          "gated+bias": ("silu", True, True), "plain": ("relu", False, False)}
# (experts, hidden, intermediate): aligned for `grouped_mm`; the transformers testers' (8 experts,
# intermediate 37); an odd hidden size too (30 fp32 values: 120 bytes)
SIZES = {"aligned": (4, 16, 32), "tester": (8, 32, 37), "odd-hidden": (8, 30, 37)}
TOL = dict(rtol=1e-5, atol=1e-5)


def test_one_registry_holds_ours_and_transformers():
    names = EXPERTS_FUNCTIONS.valid_keys()
    for name in ("eager", "grouped", "megablocks", "grouped_mm", "batched_mm"):
        assert name in names
    assert set(ALL_EXPERTS_FUNCTIONS.keys()) <= set(names)
    assert {"grouped_mm", "batched_mm"} <= set(OTHERS)
    with pytest.raises(ValueError, match=r"eager.*grouped.*megablocks.*batched_mm.*grouped_mm.*'fast'"):
        get_experts_implementation("fast")


def test_experts_forward_has_the_experts_interface_signature():
    assert list(inspect.signature(Experts.forward).parameters) == [
        "self", "hidden_states", "top_k_index", "top_k_weights"]


def _experts(style, num_experts=4, hidden=16, inter=32):
    act, gated, bias = STYLES[style]
    torch.manual_seed(0)
    experts = Experts(num_experts, hidden, inter, act, gated=gated, bias=bias, implementation="eager")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return experts


def _topk(num_tokens, num_experts, top_k, empty):
    """Each token's k distinct experts, none of them `empty` (an expert with zero tokens)."""
    allowed = torch.tensor([e for e in range(num_experts) if e != empty])
    order = torch.stack([torch.randperm(len(allowed)) for _ in range(num_tokens)])[:, :top_k]
    return allowed[order]


def _run(experts, name, x, index, weights, grad_out):
    experts.implementation = name
    experts.zero_grad(set_to_none=True)
    xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = experts(xi, index, wi)
    out.backward(grad_out)
    return out.detach(), xi.grad, wi.grad, {n: p.grad.clone() for n, p in experts.named_parameters()}


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("name", OTHERS)
def test_implementation_matches_eager_in_outputs_and_every_gradient(name, style, size):
    num_experts, hidden, inter = SIZES[size]
    experts = _experts(style, num_experts, hidden, inter)
    torch.manual_seed(1)
    index = _topk(13, num_experts, 2, empty=1)
    x, weights = torch.randn(13, hidden), torch.rand(13, 2)
    grad_out = torch.randn(13, hidden)
    ref = _run(experts, "eager", x, index, weights, grad_out)
    got = _run(experts, name, x, index, weights, grad_out)
    for a, b in zip(got[:3], ref[:3]):  # output, input gradient, routing-weight gradient
        torch.testing.assert_close(a, b, **TOL)
    assert got[3].keys() == ref[3].keys()
    for key in ref[3]:
        torch.testing.assert_close(got[3][key], ref[3][key], **TOL)
        assert got[3][key][1].abs().sum() == 0  # expert 1 has no tokens: zero gradient


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("name", OTHERS)
def test_sorted_entry_point_matches_eager(name, style, size):
    """The rows of capacity limits and expert choice (`forward_sorted`), an empty expert included."""
    num_experts, hidden, inter = SIZES[size]
    experts = _experts(style, num_experts, hidden, inter)
    counts = torch.tensor([5, 0, 9, 3] + [2] * (num_experts - 4))
    torch.manual_seed(2)
    x, grad_out = torch.randn(int(counts.sum()), hidden), torch.randn(int(counts.sum()), hidden)
    results = []
    for impl in ("eager", name):
        experts.implementation = impl
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = experts.forward_sorted(xi, counts)
        out.backward(grad_out)
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in experts.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(gx1, gx0, **TOL)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, **TOL)


def _block(routing="token_choice", capacity_factor=None, unit_weights=False):
    config = SimpleNamespace(num_local_experts=4, num_experts_per_tok=2, moe_routing=routing,
                             moe_capacity_factor=capacity_factor, norm_topk_prob=True,
                             router_unit_weights=unit_weights, router_jitter_noise=0.0,
                             moe_implementation="eager", moe_expert_intermediate_size=32)
    torch.manual_seed(3)
    block = MoEFeedForward(config, 16, gated=True, bias=False, hidden_act="silu", causal=False)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


@pytest.mark.parametrize("routing,capacity_factor,unit_weights", [
    ("token_choice", None, False), ("token_choice", None, True), ("token_choice", 0.75, False),
    ("expert_choice", None, False)])
@pytest.mark.parametrize("name", OTHERS)
def test_block_matches_eager_under_every_routing(name, routing, capacity_factor, unit_weights):
    block = _block(routing, capacity_factor, unit_weights).train()
    torch.manual_seed(4)
    hidden = torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    results = []
    for impl in ("eager", name):
        block.experts.implementation = impl
        block.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_()
        out, logits = block(h, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), logits.detach(), h.grad, [p.grad.clone() for p in block.parameters()]))
    (o0, l0, g0, p0), (o1, l1, g1, p1) = results
    torch.testing.assert_close(o1, o0, **TOL)
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(g1, g0, **TOL)
    for a, b in zip(p1, p0):  # the router's gradient is the routing weights' gradient
        torch.testing.assert_close(a, b, **TOL)


def test_a_standin_experts_module_swapped_in_gives_the_same_output():
    """vLLM's Transformers backend swaps its own fused-MoE module in for `block.experts` and calls it
    as `experts(hidden_states, top_k_index, top_k_weights)`."""

    class StandIn(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.inner = experts

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return batched_mm_experts_forward(self.inner, hidden_states, top_k_index, top_k_weights)

    block = _block().eval()
    hidden = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected, _ = block(hidden)
        block.experts = StandIn(block.experts)
        got, _ = block(hidden)
    torch.testing.assert_close(got, expected, **TOL)


def _tiny(kind, num_experts=4, **overrides):
    dense = tiny_source(kind, "masked-lm" if kind == "bert" else None, **overrides)
    return upcycle(dense, num_experts=num_experts, top_k=2, layers="all", init="noise", noise_std=0.1)


# the transformers testers' sizes (8 experts, intermediate 37) for BERT, GPT-2 and Llama sources
TESTER_SIZES = {"bert": dict(intermediate_size=37), "gpt2": dict(n_inner=37), "llama": dict(intermediate_size=37)}


@pytest.mark.parametrize("kind,tester_sizes", [("llama", False), ("qwen3", False), ("bert", True), ("gpt2", True),
                                               ("llama", True)])
def test_model_output_with_each_implementation_equals_eager(kind, tester_sizes):
    """As transformers' `test_eager_matches_batched_and_grouped_inference` checks it: the output of
    each implementation equals eager's, and transformers' own function ran."""
    model = (_tiny(kind, 8, **TESTER_SIZES[kind]) if tester_sizes else _tiny(kind)).eval()
    assert type(model).__module__.endswith("modeling_condcomp")
    ids = torch.randint(1, 99, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    theirs = {name: Mock(wraps=ALL_EXPERTS_FUNCTIONS[name]) for name in ("batched_mm", "grouped_mm")}
    outputs = {}
    with patch.dict(ALL_EXPERTS_FUNCTIONS._global_mapping, theirs):
        for name in CPU_IMPLEMENTATIONS:
            model.set_experts_implementation(name)
            assert model.config._experts_implementation == name
            with torch.no_grad():
                outputs[name] = model(input_ids=ids, attention_mask=mask).logits
            for other, mock in theirs.items():
                assert mock.called == (other == name), (name, other)
                mock.reset_mock()
    for name in OTHERS:
        torch.testing.assert_close(outputs[name], outputs["eager"], **TOL)
    with pytest.raises(ValueError, match="must be one of.*grouped_mm"):
        model.set_experts_implementation("fast")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_from_pretrained_takes_transformers_experts_implementation(kind, tmp_path):
    model = _tiny(kind)
    model.save_pretrained(tmp_path)
    ids = torch.randint(1, 99, (2, 7))
    loaded = {}
    for name in (None, "grouped_mm", "batched_mm", "eager"):
        extra = {} if name is None else {"experts_implementation": name}
        m = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, **extra).eval()
        blocks = [mod for mod in m.modules() if type(mod).__name__ == "Experts"]
        assert blocks and all(b.experts_implementation == (name or "grouped") for b in blocks)
        with torch.no_grad():
            loaded[name] = m(input_ids=ids).logits
    for name in ("grouped_mm", "batched_mm", "eager"):
        torch.testing.assert_close(loaded[name], loaded[None], **TOL)
    with pytest.raises(ValueError, match="must be one of"):
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, experts_implementation="fast")


def test_config_field_names_any_registered_implementation():
    model = upcycle(tiny_source("llama"), num_experts=4, top_k=2, layers=[1], moe_implementation="batched_mm")
    assert model.config.moe_implementation == "batched_mm"
    assert model.model.layers[1].mlp.experts.experts_implementation == "batched_mm"
    with pytest.raises(ValueError, match="must be one of.*grouped_mm"):
        upcycle(tiny_source("llama"), num_experts=4, top_k=2, layers=[1], moe_implementation="fast")


def test_a_model_without_experts_offers_no_experts_implementation(tmp_path):
    """transformers' own code (its exporters, `set_experts_implementation`) asks a model
    `_can_set_experts_implementation()`: one with MoE layers says True, one with routed blocks or gates
    only says False, as transformers' dense models do, and setting a name on it (checked all the same)
    changes nothing. Its common tests ask the class, which serves both kinds of model: True."""
    moe = _tiny("llama")
    mixed = upcycle(tiny_source("llama"), num_experts=4, top_k=2, layers=[1], mod_layers=[0])
    assert moe._can_set_experts_implementation() and mixed._can_set_experts_implementation()
    assert type(moe)._can_set_experts_implementation()
    for variant in ("mod", "gate"):
        model = upcycle(tiny_source("llama"), variant=variant, layers="all")
        assert not model._can_set_experts_implementation()
        before = model.config._experts_implementation
        model.set_experts_implementation("batched_mm")
        assert model.config._experts_implementation == before
        with pytest.raises(ValueError, match="must be one of"):
            model.set_experts_implementation("fast")
    model.save_pretrained(tmp_path)  # loading one with transformers' argument is no error either
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, experts_implementation="grouped_mm")
    assert not loaded._can_set_experts_implementation()
