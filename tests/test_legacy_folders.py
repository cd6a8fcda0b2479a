"""Folders saved by earlier releases keep loading, with the outputs those releases computed.

tests/data/legacy_ab4d721 holds one tiny model per hand-written family (BERT, GPT-2, Llama) and
variant (MoE, MoD, gates, MoE + MoD), saved by that release with its remote code, and the
outputs it computed on saved inputs (make_fixtures.py there wrote them). tests/data/legacy_fc1a7ee
holds the same for the last release that kept the source's model under `backbone.` (BERT, GPT-2,
Llama and Marian sources). Whatever becomes of the
hand-written families, such folders are on the Hub and on disks, so they must load

- through their own remote code (`trust_remote_code=True`) in a process where hf_condcomp cannot
  be imported, as anyone who downloads them loads them, and
- with hf_condcomp imported and no remote code, through the package's Auto registrations,

and give the saved outputs (logits, last hidden state; greedy tokens of the decoders).
"""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import DATA, run_clean_python

LEGACY = DATA / "legacy_ab4d721"
VARIANTS = ("moe", "mod", "gate", "moe_mod")
FIXTURES = [f"{family}_{variant}" for family in ("bert", "gpt2", "llama") for variant in VARIANTS]
FIXTURES.insert(4, "bert_base_moe_mod")
BACKBONE = DATA / "legacy_fc1a7ee"
BACKBONE_FIXTURES = ["bert_moe", "bert_base_mod", "gpt2_gate", "llama_moe", "llama_moe_mod", "marian_moe"]
# every fixture folder: "<release>/<name>"
ALL = [f"{LEGACY.name}/{name}" for name in FIXTURES] + [f"{BACKBONE.name}/{name}" for name in BACKBONE_FIXTURES]


def expected(name):
    """(saved tensors, metadata): input_ids, attention_mask, output, last_hidden_state
    (classifiers), generated (generative models)."""
    with safe_open(str(DATA / name / "expected.safetensors"), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, json.loads(f.metadata()["expected"])


def real_positions(output, attention_mask):
    """Token-level outputs at the real (unpadded) positions; sequence-level outputs whole."""
    return output[attention_mask.bool()] if output.dim() == 3 else output


CONFIG_CLASS = {"condcomp_bert": "CondCompBertConfig", "condcomp_gpt2": "CondCompGPT2Config",
                "condcomp_llama": "CondCompLlamaConfig"}


def test_the_fixtures_are_all_there_and_carry_their_remote_code():
    folders = sorted(p.name for p in LEGACY.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders == sorted(FIXTURES)
    for name in FIXTURES:
        config = json.loads((LEGACY / name / "config.json").read_text())
        assert config["model_type"] == f"condcomp_{name.split('_')[0]}"
        assert config["upcycling"]["family"] == name.split("_")[0]
        auto_map = config["auto_map"]
        assert auto_map["AutoConfig"] == f"configuration_condcomp.{CONFIG_CLASS[config['model_type']]}"
        for reference in auto_map.values():
            assert (LEGACY / name / (reference.split(".")[0] + ".py")).is_file(), (name, reference)


def test_the_backbone_release_fixtures_are_all_there_with_its_layout():
    folders = sorted(p.name for p in BACKBONE.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders == sorted(BACKBONE_FIXTURES)
    for name in BACKBONE_FIXTURES:
        config = json.loads((BACKBONE / name / "config.json").read_text())
        assert config["model_type"] == "condcomp" and "text_config" in config
        with safe_open(str(BACKBONE / name / "model.safetensors"), "pt") as f:
            assert all(key.startswith("backbone.") for key in f.keys()), name
        for reference in config["auto_map"].values():
            assert (BACKBONE / name / (reference.split(".")[0] + ".py")).is_file(), (name, reference)


# Runs in a fresh interpreter where `import hf_condcomp` fails (conftest.run_clean_python), with
# the fixture folders and the results file filled in below; one process loads every folder.
REMOTE_CODE = """
import importlib.util, json, traceback
import torch, transformers
from safetensors import safe_open

assert importlib.util.find_spec("hf_condcomp") is None
try:
    import hf_condcomp  # noqa: F401
    raise AssertionError("hf_condcomp is importable")
except ImportError:
    pass

results = {}
for name, folder in FOLDERS.items():
    try:
        with safe_open(folder + "/expected.safetensors", "pt") as f:
            saved, meta = {key: f.get_tensor(key) for key in f.keys()}, json.loads(f.metadata()["expected"])
        model = getattr(transformers, meta["auto_class"]).from_pretrained(folder, trust_remote_code=True).eval()
        module = type(model).__module__
        assert module.startswith("transformers_modules."), module
        mask = saved["attention_mask"]
        extra = {"decoder_input_ids": saved["input_ids"]} if meta["auto_class"] == "AutoModelForSeq2SeqLM" else {}
        with torch.no_grad():
            outputs = model(input_ids=saved["input_ids"], attention_mask=mask, output_hidden_states=True, **extra)
        out = getattr(outputs, meta["output"])
        real = (lambda t: t[mask.bool()]) if out.dim() == 3 else (lambda t: t)
        torch.testing.assert_close(real(out), real(saved["output"]), atol=1e-5, rtol=0)
        if "last_hidden_state" in saved:
            hidden = outputs.hidden_states[-1][mask.bool()]
            torch.testing.assert_close(hidden, saved["last_hidden_state"][mask.bool()], atol=1e-5, rtol=0)
        if "generated" in saved:
            with torch.no_grad():
                tokens = model.generate(saved["input_ids"][:1], attention_mask=mask[:1], max_new_tokens=4,
                                        do_sample=False)
            assert tokens.tolist() == saved["generated"].tolist(), (tokens.tolist(), saved["generated"].tolist())
        results[name] = {"ok": True, "class": module + "." + type(model).__name__}
    except Exception:
        results[name] = {"ok": False, "error": traceback.format_exc()}
with open(RESULTS, "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def remote_code_results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("legacy_remote_code")
    results = workdir / "results.json"
    folders = {name: str(DATA / name) for name in ALL}
    run_clean_python(f"FOLDERS = {folders!r}\nRESULTS = {str(results)!r}\n" + REMOTE_CODE, workdir)
    return json.loads(results.read_text())


@pytest.mark.parametrize("name", ALL)
def test_loads_through_its_remote_code_without_the_package(name, remote_code_results):
    result = remote_code_results[name]
    assert result["ok"], result["error"]


AUTO = {"AutoModel", "AutoModelForSequenceClassification", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM"}


@pytest.mark.parametrize("name", ALL)
def test_loads_through_the_package_without_remote_code(name):
    import transformers

    import hf_condcomp  # noqa: F401  registers the Auto classes

    saved, meta = expected(name)
    assert meta["auto_class"] in AUTO
    model = getattr(transformers, meta["auto_class"]).from_pretrained(DATA / name).eval()
    assert type(model).__module__.startswith("hf_condcomp."), type(model)
    mask = saved["attention_mask"]
    extra = {"decoder_input_ids": saved["input_ids"]} if meta["auto_class"] == "AutoModelForSeq2SeqLM" else {}
    with torch.no_grad():
        outputs = model(input_ids=saved["input_ids"], attention_mask=mask, output_hidden_states=True, **extra)
    out = getattr(outputs, meta["output"])
    torch.testing.assert_close(real_positions(out, mask), real_positions(saved["output"], mask), atol=1e-4, rtol=0)
    if "last_hidden_state" in saved:  # classifiers: every token's state, not only what [CLS] passes on
        torch.testing.assert_close(real_positions(outputs.hidden_states[-1], mask),
                                   real_positions(saved["last_hidden_state"], mask), atol=1e-4, rtol=0)
    if "generated" in saved:
        with torch.no_grad():
            tokens = model.generate(saved["input_ids"][:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False)
        assert tokens.tolist() == saved["generated"].tolist(), (tokens.tolist(), saved["generated"].tolist())
