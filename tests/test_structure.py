"""The package's shape: no import cycle between its modules, and routing methods chosen by name
from one registry (a new method plugs in without editing the MoE block)."""

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_condcomp.modeling.configuration_condcomp import ROUTING_TYPES
from hf_condcomp.modeling.moe import MoEFeedForward
from hf_condcomp.modeling.routing import (
    ROUTING_METHODS,
    Dispatch,
    RoutingMethod,
    get_routing_method,
    register_routing,
)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hf_condcomp"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _from_module(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module that `from <...> import` in module `name` names, relative levels resolved."""
    if not node.level:
        return node.module or ""
    parts = name.split(".")
    parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: modules of the package it imports}, read from every `import` statement in its
    source, at module level or inside functions and classes. `from . import x` counts as an import
    of the submodule `x` when there is one, else of the package itself."""
    files = {_module_name(p, package.parent): p for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    graph = {name: set() for name in files}

    def known(name):
        while name and name not in files:  # `a.b.Class` -> `a.b`
            name = name.rpartition(".")[0]
        return name or None

    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _from_module(name, is_package, node)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                           for alias in node.names]
            for target in targets:
                target = known(target)
                if target is not None and target != name:
                    graph[name].add(target)
    return graph


def unresolved_relative_imports(package: Path = PACKAGE) -> list[str]:
    """Relative imports, at any level, naming a module that is not there or a name that a package's
    `__init__` does not define: what a module moved into a subpackage keeps by mistake."""
    files = {_module_name(p, package.parent): p for p in package.rglob("*.py") if "__pycache__" not in p.parts}

    def top_level_names(path):
        names = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        return names

    bad = []
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = _from_module(name, is_package, node)
            if base not in files:
                bad.append(f"{name}:{node.lineno} imports missing module {base}")
                continue
            if files[base].name != "__init__.py":
                continue
            defined = top_level_names(files[base])
            for alias in node.names:
                if f"{base}.{alias.name}" not in files and alias.name not in defined:
                    bad.append(f"{name}:{node.lineno} imports {alias.name!r}, which {base} does not define")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert "hf_condcomp.cli" in graph and "hf_condcomp.export" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_relative_imports_name_modules_that_exist():
    assert unresolved_relative_imports() == []


def test_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert find_cycle(graph) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])


@pytest.mark.parametrize("order", [("hf_condcomp.export", "hf_condcomp.cli"),
                                   ("hf_condcomp.cli", "hf_condcomp.export")])
def test_export_and_cli_import_in_either_order(order):
    code = "; ".join(f"import {m}" for m in order) + "; import hf_condcomp.export as e; print(e.export_native.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Routing methods: one registry, looked up by name.
# ---------------------------------------------------------------------------------------------


def _moe_block(routing, top_k=2, capacity_factor=None, causal=False):
    config = SimpleNamespace(num_local_experts=4, num_experts_per_tok=top_k, moe_routing=routing,
                             moe_capacity_factor=capacity_factor, norm_topk_prob=True, router_unit_weights=False,
                             router_jitter_noise=0.0, moe_implementation="eager", moe_expert_intermediate_size=8)
    torch.manual_seed(0)
    block = MoEFeedForward(config, 16, gated=False, bias=False, hidden_act="gelu", causal=causal)
    for p in block.parameters():  # the experts' weights start uninitialised
        torch.nn.init.normal_(p, std=0.2)
    return block


def test_the_configs_routing_names_are_registered_methods():
    assert set(ROUTING_TYPES) <= set(ROUTING_METHODS)
    assert get_routing_method("token_choice").exports_natively and get_routing_method("token_choice").balance_loss
    assert not get_routing_method("expert_choice").exports_natively
    assert not get_routing_method("expert_choice").balance_loss


def test_unknown_routing_name_raises_listing_the_valid_ones():
    with pytest.raises(ValueError, match="`moe_routing` must be one of .*'token_choice'.*'expert_choice'.*'nope'"):
        get_routing_method("nope")
    with pytest.raises(ValueError, match="must be one of .*'token_choice'.*'expert_choice'"):
        _moe_block("nope")


@pytest.mark.parametrize("routing, capacity_factor, causal, training, alone", [
    ("token_choice", None, False, True, True),
    ("token_choice", 1.5, False, False, False),
    ("expert_choice", None, False, False, False),
    ("expert_choice", None, True, True, False),
    ("expert_choice", None, True, False, True),
])
def test_block_asks_its_routing_method(routing, capacity_factor, causal, training, alone):
    block = _moe_block(routing, capacity_factor=capacity_factor, causal=causal).train(training)
    assert block.routing_method is ROUTING_METHODS[routing]
    assert block.routes_each_token_alone() is alone


@pytest.fixture
def first_k():
    """A trivial routing method registered for one test: every token goes to experts 0..k-1, equal weights."""

    @register_routing("first_k")
    class FirstK(RoutingMethod):
        def route(self, block, logits):
            num_tokens = logits.shape[0]
            k = block.top_k
            token_index = torch.arange(num_tokens, device=logits.device).repeat(k)  # expert-major
            counts = torch.zeros(block.num_experts, dtype=torch.long, device=logits.device)
            counts[:k] = num_tokens
            weights = torch.full((k * num_tokens,), 1.0 / k, device=logits.device)
            return Dispatch(token_index, weights, counts, torch.zeros((), dtype=torch.long))

        def routes_each_token_alone(self, block):
            return True

    yield FirstK
    ROUTING_METHODS.pop("first_k")


def test_a_registered_routing_method_runs_in_the_moe_block(first_k):
    block = _moe_block("first_k", top_k=2)
    assert isinstance(block.routing_method, first_k) and "first_k" in ROUTING_METHODS
    block.record_routing = True
    hidden = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out, logits = block(hidden, mask)
    assert block.last_routing["counts"].tolist() == [8, 8, 0, 0]  # 8 real tokens, each to experts 0 and 1
    x = hidden.reshape(-1, 16)
    run = block.experts.forward_sorted
    expected = torch.stack([run(x, torch.tensor([len(x), 0, 0, 0])),
                            run(x, torch.tensor([0, len(x), 0, 0]))]).mean(0)  # experts 0 and 1
    expected = expected * mask.reshape(-1, 1)
    torch.testing.assert_close(out.reshape(-1, 16), expected)
    with pytest.raises(ValueError, match="already registered"):
        register_routing("first_k")(type("Other", (RoutingMethod,), {}))
