"""Shared models keep working across transformers and torch releases.

- The compatibility matrix (`benchmarks/compat.py`): saved models of every family and variant, in
  hermetic venvs with the oldest and the newest supported transformers, each locked.
- Both cache keyword conventions through the forward and the outputs.
- The experts fall back to the loop where `grouped_mm` is missing or refuses the tensors.
- `pip install .` keeps a torch that satisfies the package's range.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers.utils import ModelOutput

import hf_condcomp
from hf_condcomp.modeling import compat
from hf_condcomp.modeling import experts as experts_module
from hf_condcomp.modeling.compat import TESTED_TRANSFORMERS
from hf_condcomp.modeling.experts import Experts, eager_experts_forward, grouped_experts_forward

from conftest import ROOT, VOCAB, tiny_source

sys.path.insert(0, str(ROOT / "benchmarks"))
import compat as compat_matrix  # noqa: E402  (benchmarks/compat.py)


def test_compatibility_matrix_oldest_and_newest_supported(tmp_path):
    out = tmp_path / "compat.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compat.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert list(report["results"]) == list(TESTED_TRANSFORMERS)
    expected = ({f"{f}_{v}" for f in compat_matrix.SOURCES for v in compat_matrix.VARIANTS}
                | set(compat_matrix.EXTRA_CASES))
    for version, result in report["results"].items():
        assert result["transformers"] == version
        assert result["locked"], f"no compat_locks/transformers-{version}.txt: run `make lock`"
        assert set(result["cases"]) == expected
        for name, case in result["cases"].items():
            assert case["ok"], (version, name, case)
            assert case["module"].startswith("transformers_modules"), case
            if not name.startswith(compat_matrix.ENCODERS):
                assert case["greedy_with_cache_equal"] and case["greedy_without_cache_equal"], case


def test_cache_field_name_is_read_off_the_release_output_class():
    @dataclass
    class Old(ModelOutput):
        logits: torch.Tensor | None = None
        past_key_values: object | None = None

    @dataclass
    class New(ModelOutput):
        logits: torch.Tensor | None = None
        cache: object | None = None

    assert compat.cache_key_of(Old) == "past_key_values"
    assert compat.cache_key_of(New) == "cache"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("setup", ["moe", "mod"])
def test_forward_takes_the_cache_under_either_keyword(family, setup):
    kwargs = dict(variant="mod", capacity=1.0, layers="all") if setup == "mod" else dict(num_experts=4, init="noise")
    model = hf_condcomp.upcycle(tiny_source(family), **kwargs).eval()
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        steps = {}
        for keyword in ("past_key_values", "cache"):
            prompt_out = model(ids[:, :-1], use_cache=True)
            cache = getattr(prompt_out, compat.CACHE_KEY)
            # The installed release's ModelOutput answers to both names (5.24 maps the old one).
            assert prompt_out[compat.CACHE_KEY] is cache and prompt_out.past_key_values is cache
            assert cache.get_seq_length() == 5
            steps[keyword] = model(ids[:, -1:], use_cache=True, **{keyword: cache}).logits[:, -1]
            assert cache.get_seq_length() == 6  # the step went through the cache it was handed
    torch.testing.assert_close(steps["past_key_values"], full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps["cache"], full, atol=1e-5, rtol=1e-5)


def test_passing_two_different_caches_is_refused():
    from transformers import DynamicCache

    model = hf_condcomp.upcycle(tiny_source("llama"), num_experts=4)
    with pytest.raises(ValueError, match="`past_key_values` and `cache`"):
        model(torch.tensor([[1, 2]]), past_key_values=DynamicCache(), cache=DynamicCache())


def _experts(bias):
    torch.manual_seed(0)
    e = Experts(4, 32, 48, "gelu", gated=not bias, bias=bias, implementation="grouped")
    for p in e.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return e


@pytest.mark.parametrize("failure", ["missing", "refuses"])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_experts_fall_back_to_the_loop_without_grouped_mm(monkeypatch, failure, bias):
    experts = _experts(bias)
    x = torch.randn(20, 32, requires_grad=True)
    counts = torch.tensor([7, 0, 5, 8])
    reference = eager_experts_forward(experts, x, counts)
    (grad_ref,) = torch.autograd.grad(reference.square().sum(), x)

    compat.grouped_mm_available.cache_clear()
    if failure == "missing":
        monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    else:
        def refuse(*args, **kwargs):
            raise RuntimeError("grouped_mm: CPU tensors are not supported by this build")

        monkeypatch.setattr(torch.nn.functional, "grouped_mm", refuse)
    loop_calls = []
    real_eager = experts_module.eager_experts_forward
    monkeypatch.setattr(experts_module, "eager_experts_forward",
                        lambda *a: loop_calls.append(1) or real_eager(*a))
    try:
        assert not compat.grouped_mm_available(x.device, x.dtype)
        out = grouped_experts_forward(experts, x, counts)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
    finally:
        monkeypatch.undo()
        compat.grouped_mm_available.cache_clear()
    assert loop_calls, "the fallback did not run the loop"
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grad, grad_ref)
    assert compat.grouped_mm_available(x.device, x.dtype)  # this torch has it: the probe says so again


def _pip_resolution_with_torch(tmp_path, torch_version):
    """What `pip install .` would install into an environment whose torch is `torch_version`.

    The environment sees this interpreter's packages through a path file, and a metadata-only
    `torch` distribution of its own shadows the real one, so pip believes that torch is installed.
    """
    venv = tmp_path / f"venv-torch-{torch_version}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_base.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    info = site / f"torch-{torch_version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
    (info / "RECORD").write_text("")
    seen = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert seen == torch_version
    report = tmp_path / f"report-{torch_version}.json"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
                           "--report", str(report), str(ROOT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


def test_pip_install_keeps_a_torch_in_range_and_replaces_one_below(tmp_path):
    kept = _pip_resolution_with_torch(tmp_path, "2.11.0")  # e.g. a user's CUDA build
    assert "hf-condcomp" in kept or "hf_condcomp" in kept
    assert "torch" not in kept, kept
    assert "transformers" not in kept, kept  # the one already installed satisfies the range
    # The control: a torch below the declared floor is what pip would replace.
    replaced = _pip_resolution_with_torch(tmp_path, "2.5.0")
    assert "torch" in replaced, replaced
