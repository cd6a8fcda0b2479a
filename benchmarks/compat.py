"""Compatibility matrix: saved models of many architectures and every variant, loaded on several
transformers releases.

A model saved by this package carries its code, which then runs on whatever transformers the
person who downloads it has. This script saves one tiny model per source (BERT, GPT-2, Llama) and
variant (MoE token choice, MoE expert choice, Mixture-of-Depths, compute gates, MoE + MoD), plus
MoE models of 13 more architectures and routed or gated models of seven (`EXTRA_CASES`), with the
outputs they give here, builds one virtual environment per transformers release with only that release (torch is
shared with the running interpreter through a path file, hf_condcomp is not installed), and runs
`compat_check.py` there: logits and the training loss within 1e-4, identical greedy tokens with
and without the KV cache (and with a static cache for MoE-only decoders), and a cache accepted as
`cache=` and as `past_key_values=`. It prints a table of versions x models and exits 1 if any
cell failed.

    python benchmarks/compat.py                         # the oldest supported release and 5.24.0
    python benchmarks/compat.py --versions 5.17.0 5.20.0 5.24.0 latest
    python benchmarks/compat.py --out benchmarks/results/compat.json

`latest` is the newest release on the package index today (`pip index versions transformers`).
Environments are kept in `--venvs` (default `.compat/`) and reused by later runs.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from hf_condcomp.modeling.compat import TESTED_TRANSFORMERS  # noqa: E402

from common import machine_info  # noqa: E402

# The oldest supported release and the newest tested, which the tests' matrix runs.
OLDEST_SUPPORTED = TESTED_TRANSFORMERS[0]
DEFAULT_VERSIONS = TESTED_TRANSFORMERS
VARIANTS = {
    "moe_tc": dict(variant="moe", num_experts=4, top_k=2, init="noise", noise_std=0.3, layers="all"),
    "moe_ec": dict(variant="moe", num_experts=4, top_k=2, routing="expert_choice", init="noise", noise_std=0.3,
                   layers="all"),
    "mod": dict(variant="mod", capacity=0.5, layers="all"),
    "gate": dict(variant="gate", layers="all", threshold=0.5),
    "moe_mod": dict(variant="moe", num_experts=4, top_k=2, init="noise", noise_std=0.3, layers="every_other",
                    mod_layers="every_other", capacity=0.5),
}
SOURCES = ("bert", "gpt2", "llama")
# Beyond source x variant: RoBERTa (its positions and head) and Qwen3 (per-head q/k norms), MoE
# models of five encoders and eight decoders (Mistral and Gemma 2 with sliding windows; OLMo
# recognised from its layers, not named in the table), and routed or gated layers of seven more.
EXTRA_CASES = {
    "roberta_moe_tc": ("roberta", VARIANTS["moe_tc"]),
    "roberta_mod": ("roberta", VARIANTS["mod"]),
    "qwen3_mod": ("qwen3", VARIANTS["mod"]),
    "qwen3_moe_ec": ("qwen3", VARIANTS["moe_ec"]),
    "mistral_sliding_moe_tc": ("mistral_sliding", VARIANTS["moe_tc"]),
    **{f"{arch}_moe_tc": (arch, VARIANTS["moe_tc"]) for arch in (
        "gpt_neox", "distilbert", "deberta_v2", "modernbert", "gpt_neo", "opt", "gemma2", "phi3", "olmo")},
    **{f"{arch}_{variant}": (arch, VARIANTS[variant]) for arch, variant in (
        ("modernbert", "mod"), ("gpt_neox", "gate"), ("phi3", "mod"), ("olmo", "moe_mod"),
        ("mistral_sliding", "mod"), ("qwen3", "gate"), ("deberta_v2", "mod"))},
}
ENCODERS = ("bert", "roberta", "distilbert", "deberta_v2", "modernbert")
VOCAB = 99


def tiny_dense(family: str, seed: int = 0):  # family: a source architecture
    """A small random dense transformers model, dropout off so that the training forward repeats."""
    import transformers
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)
    decoder = dict(num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "roberta":
        return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            **small, num_labels=3, pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if family == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**small, **decoder, head_dim=16))
    if family == "mistral_sliding":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**small, **decoder, sliding_window=4))
    if family == "gpt_neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            **small, bos_token_id=0, eos_token_id=0, pad_token_id=0, hidden_dropout=0.0, attention_dropout=0.0))
    if family == "distilbert":
        return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=40, num_labels=3, dropout=0.0,
            attention_dropout=0.0, seq_classif_dropout=0.0))
    if family == "deberta_v2":
        return transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
            **small, num_labels=3, relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if family == "modernbert":
        return transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(
            **small, num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
            global_attn_every_n_layers=2, local_attention=4))
    if family == "gpt_neo":
        return transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
            vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=40,
            attention_types=[[["global", "local"], 1]], window_size=4, bos_token_id=0, eos_token_id=0,
            resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0))
    if family == "opt":
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=40, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, pad_token_id=0, bos_token_id=0, eos_token_id=0, dropout=0.0,
            attention_dropout=0.0))
    if family == "gemma2":
        return transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(**small, **decoder, head_dim=8, sliding_window=4))
    if family == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**small, **decoder))
    if family == "olmo":
        return transformers.OlmoForCausalLM(transformers.OlmoConfig(**small, **decoder))
    if family == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=40, num_labels=3, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config)
    if family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=40, bos_token_id=0,
                            eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=40, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


def randomize_decisions(model, std: float = 0.5, seed: int = 0):
    """Routed-block routers, predictors and gates start neutral (all tokens alike, gates open);
    random weights make their decisions mixed, so the matrix checks real skipping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("mod_router", "mod_predictor", "compute_gate")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def save_cases(models_dir: Path) -> list[str]:
    """Save every source x variant, and the extra cases, with the reference outputs it gives here."""
    import hf_condcomp

    names = []
    cases = {f"{family}_{variant}": (family, kwargs) for family in SOURCES for variant, kwargs in VARIANTS.items()}
    for name, (family, kwargs) in {**cases, **EXTRA_CASES}.items():
        dense = tiny_dense(family)
        model = hf_condcomp.upcycle(dense, **kwargs)
        randomize_decisions(model)
        model.eval()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, VOCAB, (2, 7), generator=g)
        mask = torch.ones_like(ids)
        if family in ENCODERS:
            mask[1, 5:] = 0  # right padding
            labels = torch.tensor([0, 2])
        else:
            mask[1, :2] = 0  # left padding, as generation batches are
            labels = ids.masked_fill(mask == 0, -100)
        ref = {"input_ids": ids, "attention_mask": mask, "labels": labels,
               "auto": "AutoModelForSequenceClassification" if family in ENCODERS else "AutoModelForCausalLM"}
        with torch.no_grad():
            ref["logits"] = model(input_ids=ids, attention_mask=mask).logits
        model.train()
        ref["train_loss"] = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss.detach())
        model.eval()
        if family not in ENCODERS:
            ref["prompt"], ref["prompt_mask"] = ids[:, :5], mask[:, :5]
            ref["greedy"] = model.generate(ids[:, :5], attention_mask=mask[:, :5], max_new_tokens=6,
                                           do_sample=False, pad_token_id=0)
        if model.config.model_type == "condcomp":
            # A native model runs the user's release's model of its source: where that release
            # computes the dense source differently, so does the upcycled model. The dense parent
            # travels along, so the check can tell such a change from a fault of ours.
            dense.eval()
            with torch.no_grad():
                ref["dense_logits"] = dense(input_ids=ids, attention_mask=mask).logits
            dense.save_pretrained(models_dir / name / "dense")
        model.save_pretrained(models_dir / name)
        torch.save(ref, models_dir / name / "reference.pt")
        names.append(name)
    return names


def latest_release() -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True,
                         text=True, check=True).stdout
    return re.search(r"transformers \(([^)]+)\)", out).group(1)


LOCKS = HERE / "compat_locks"


def torch_only_site(venvs: Path, torch_version: str | None) -> Path:
    """A folder that holds torch and nothing else (links to its installed files), for the venvs'
    path file: the running interpreter's torch, or with `torch_version` that release installed
    once into a venv of its own under `venvs`."""
    if torch_version is None:
        source = Path(torch.__file__).resolve().parents[1]
        tag = torch.__version__
    else:
        base = venvs / f"torch-{torch_version}"
        python = base / "bin" / "python"
        if not (base / ".ready").exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(base)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            f"torch=={torch_version}"], check=True)
            (base / ".ready").touch()
        source = Path(subprocess.run([str(python), "-c", "import torch, pathlib; "
                                      "print(pathlib.Path(torch.__file__).resolve().parents[1])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
        tag = torch_version
    site = venvs / f"torch-only-{tag}"
    if not site.is_dir():
        site.mkdir(parents=True)
        for entry in source.iterdir():  # torch's own top-level folders and its metadata, nothing else
            if entry.name in ("torch", "torchgen", "functorch") or (
                    entry.name.startswith("torch-") and entry.name.endswith(".dist-info")):
                (site / entry.name).symlink_to(entry)
    return site


def torch_requirements(site: Path) -> list[str]:
    """What the linked torch itself needs (its Requires-Dist without extras), to install beside it."""
    from importlib.metadata import PathDistribution

    from packaging.requirements import Requirement

    info = next(site.glob("torch-*.dist-info"))
    needs = []
    for line in PathDistribution(info).requires or []:
        req = Requirement(line)
        # A CUDA build's own libraries (nvidia-*, cuda-*, triton) stay beside that torch, where
        # its libraries find them; the venvs get only the Python packages torch imports.
        if req.name.startswith(("nvidia-", "cuda-", "triton")):
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            needs.append(str(req))
    return needs


def ensure_venv(venvs: Path, version: str, torch_version: str | None = None) -> Path:
    """A hermetic venv for one transformers release: it shares nothing with the project's venv but
    torch (linked through a path file, see `torch_only_site`); transformers and every package it
    and torch need are installed into it, at the versions of `compat_locks/transformers-VERSION.txt`
    where that lock exists, so that the matrix gives the same answer next month."""
    site_torch = torch_only_site(venvs, torch_version)
    venv = venvs / f"transformers-{version}-torch-{site_torch.name.removeprefix('torch-only-')}"
    python = venv / "bin" / "python"
    marker = venv / ".ready"
    if marker.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_compat_torch.pth").write_text(f"{site_torch.resolve()}\n")
    lock = LOCKS / f"transformers-{version}.txt"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    constraints = ["-c", str(lock)] if lock.exists() else []
    subprocess.run([*pip, *constraints, f"transformers=={version}", *torch_requirements(site_torch)], check=True)
    marker.touch()
    return python


def write_locks(venvs: Path, versions: list[str]) -> None:
    """Lock each release's venv at what the index gives today (the venvs are rebuilt unconstrained)."""
    LOCKS.mkdir(exist_ok=True)
    for version in versions:
        (LOCKS / f"transformers-{version}.txt").unlink(missing_ok=True)
        python = venvs / f"transformers-{version}-torch-{torch.__version__}" / "bin" / "python"
        (python.parent.parent / ".ready").unlink(missing_ok=True)
        python = ensure_venv(venvs, version)
        frozen = subprocess.run([str(python), "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                                capture_output=True, text=True, check=True).stdout.splitlines()
        (LOCKS / f"transformers-{version}.txt").write_text(
            f"# The compatibility venv for transformers {version}: everything but torch, written by make lock.\n"
            + "".join(f"{line}\n" for line in frozen if not line.lower().startswith("torch==")))


def check_in_venv(python: Path, models_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=tempfile.mkdtemp(prefix="compat_hf_home_"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(python), "-I", str(HERE / "compat_check.py"), str(models_dir)], capture_output=True,
                          text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"compat_check.py failed under {python}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict, names: list[str]) -> str:
    versions = list(results)
    width = max(len(n) for n in names)
    lines = [" " * width + " | " + " | ".join(f"{v:>8}" for v in versions)]
    lines.append("-" * len(lines[0]))
    for name in names:
        cells = []
        for v in versions:
            case = results[v]["cases"].get(name, {"ok": False})
            cells.append(f"{'ok' if case['ok'] else 'FAIL':>8}")
        lines.append(f"{name:<{width}} | " + " | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS),
                   help="transformers releases to test, 'latest' for the newest on the index "
                        f"(default: {DEFAULT_VERSIONS})")
    p.add_argument("--torch", default=None, metavar="VERSION",
                   help="load the models with this torch release, installed once into a venv of its own under "
                        "--venvs (default: the running interpreter's torch)")
    p.add_argument("--venvs", type=Path, default=HERE.parent / ".compat", help="where the environments are kept")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--lock", action="store_true",
                   help=f"rewrite compat_locks/ for the default releases {DEFAULT_VERSIONS} "
                        "from today's index, then exit")
    args = p.parse_args(argv)

    if args.lock:
        write_locks(args.venvs, list(DEFAULT_VERSIONS))
        return 0
    versions = list(dict.fromkeys(latest_release() if v == "latest" else v for v in args.versions))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="compat_models_") as tmp:
        models_dir = Path(tmp)
        names = save_cases(models_dir)
        results = {}
        for version in versions:
            results[version] = check_in_venv(ensure_venv(args.venvs, version, args.torch), models_dir)
            results[version]["locked"] = (LOCKS / f"transformers-{version}.txt").exists()
            got = results[version]["transformers"]
            if got != version:
                raise RuntimeError(f"the venv for transformers {version} imported transformers {got}")
    import transformers

    report = {"saved_with": {"transformers": transformers.__version__, "torch": torch.__version__},
              "machine": machine_info(), "seconds": round(time.time() - started, 1), "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    failures = [(v, n, c.get("error", c)) for v, r in results.items() for n, c in r["cases"].items() if not c["ok"]]
    for version, name, detail in failures:
        print(f"FAIL transformers {version} {name}: {detail}")
    loaded_with = {r.get("torch") for r in results.values()}
    print(f"saved with transformers {transformers.__version__}, torch {torch.__version__}; loaded with torch "
          f"{', '.join(sorted(map(str, loaded_with)))}; checked in {report['seconds']} s")
    print(table(results, names))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
