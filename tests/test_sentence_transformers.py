"""A model upcycled from a sentence-transformers checkpoint keeps that checkpoint's modules and settings
(`modules.json`, pooling, `Normalize`, `max_seq_length`, the similarity function): saved by
`hf-condcomp upcycle`, by `save_pretrained`, from a Hub snapshot and by the classification recipe, it
loads with `SentenceTransformer(folder, trust_remote_code=True)` and, copy-upcycled, gives its dense
parent's embeddings. A plain transformers source gets no sentence-transformers files."""

import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import load_recipe, run_clean_python, tiny_source

ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome.",
    "Upcycling turns a dense checkpoint into a mixture of experts.",
    "x",
    "Where is my card? I ordered it two weeks ago and it still has not arrived.",
]


def st_report(folder, reference, sentences):
    """How the sentence-transformers model in `folder` compares with the one in `reference`."""
    import torch
    from sentence_transformers import SentenceTransformer

    ours = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    ref = SentenceTransformer(str(reference), device="cpu")
    a = ours.encode(sentences, convert_to_tensor=True)
    b = ref.encode(sentences, convert_to_tensor=True)
    return {
        "cosine": torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist(),
        "norms": [a.norm(dim=-1).tolist(), b.norm(dim=-1).tolist()],
        "max_seq_length": [ours.max_seq_length, ref.max_seq_length],
        "similarity_fn_name": [ours.similarity_fn_name, ref.similarity_fn_name],
        "modules": [[type(m).__name__ for m in ours], [type(m).__name__ for m in ref]],
        "transformer": type(ours[0].model).__name__,
    }


def check_report(report, modules):
    assert min(report["cosine"]) >= 0.9999, report["cosine"]
    for ours, ref in zip(*report["norms"]):
        assert ours == pytest.approx(ref, abs=1e-4), report["norms"]
    assert report["max_seq_length"][0] == report["max_seq_length"][1], report["max_seq_length"]
    assert report["similarity_fn_name"][0] == report["similarity_fn_name"][1], report["similarity_fn_name"]
    assert report["modules"][0] == report["modules"][1] == modules, report["modules"]
    assert report["transformer"].startswith("CondComp"), report["transformer"]


def check_files(folder, source, module_dirs):
    for name in ST_FILES:
        assert (folder / name).read_bytes() == (source / name).read_bytes(), name
    for path in module_dirs:
        for file in (source / path).rglob("*"):
            if file.is_file():
                assert (folder / file.relative_to(source)).read_bytes() == file.read_bytes(), file


def cli(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "hf_condcomp.cli", "upcycle", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_upcycled_minilm_loads_in_sentence_transformers_as_its_dense_parent(tmp_path, minilm_path):
    from hf_condcomp.cli import main as cli_main

    out = tmp_path / "moe"
    argv = ["upcycle", str(minilm_path), str(out), "--num-experts", "4", "--top-k", "2", "--init", "copy"]
    assert cli_main(argv) == 0
    check_files(out, minilm_path, ["1_Pooling"])
    readme = (out / "README.md").read_text()  # the upcycle's own card, not the source's
    assert "- hf_condcomp" in readme and "library_name: sentence-transformers" not in readme
    # A clean interpreter: the folder's own code, through trust_remote_code, without hf_condcomp.
    code = (inspect.getsource(st_report)
            + f"import json\nprint('REPORT', json.dumps(st_report({str(out)!r}, {str(minilm_path)!r}, {SENTENCES!r})))")
    stdout = run_clean_python(code, tmp_path).stdout
    report = json.loads(stdout.split("REPORT ", 1)[1])
    check_report(report, ["Transformer", "Pooling", "Normalize"])
    assert report["max_seq_length"][0] == 256 and report["similarity_fn_name"][0] == "cosine"


def test_save_pretrained_of_the_upcycled_model_and_of_its_reload_keep_the_files(tmp_path, minilm_path):
    from transformers import AutoModel, AutoTokenizer

    import hf_condcomp

    model = hf_condcomp.upcycle(minilm_path, num_experts=4, top_k=2, init="copy")
    first, second = tmp_path / "first", tmp_path / "second"
    model.save_pretrained(first)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(first)
    check_files(first, minilm_path, ["1_Pooling"])
    check_report(st_report(first, minilm_path, SENTENCES), ["Transformer", "Pooling", "Normalize"])
    # A model loaded from such a folder and saved elsewhere (fine-tuned, say) keeps them too.
    reloaded = AutoModel.from_pretrained(first, trust_remote_code=True)
    reloaded.save_pretrained(second)
    check_files(second, minilm_path, ["1_Pooling"])
    # Saving onto its own folder leaves the files as they are.
    reloaded.save_pretrained(first)
    check_files(first, minilm_path, ["1_Pooling"])


def custom_sentence_transformer(folder, minilm_path):
    """Another sentence-transformers checkpoint: CLS pooling, a Dense layer with weights, no
    Normalize, dot-product similarity, max_seq_length 128."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Pooling, Transformer

    torch.manual_seed(0)
    transformer = Transformer(str(minilm_path), max_seq_length=128)
    model = SentenceTransformer(modules=[transformer, Pooling(384, pooling_mode="cls"), Dense(384, 32)],
                                similarity_fn_name="dot", device="cpu")
    model.save(str(folder))
    return folder


def test_sentence_transformers_source_from_a_hub_snapshot(tmp_path, minilm_path):
    """A Hub id (from the local Hub cache, offline) of a sentence-transformers checkpoint that is not
    the embedded one: its own pooling, Dense weights, similarity and max_seq_length come along."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--someone--minilm-cls-dense"
    revision = "0123456789abcdef0123456789abcdef01234567"
    source = custom_sentence_transformer(repo / "snapshots" / revision, minilm_path)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    modules = [entry["path"] for entry in json.loads((source / "modules.json").read_text()) if entry["path"]]
    assert modules == ["1_Pooling", "2_Dense"]

    out = tmp_path / "moe"
    cli("someone/minilm-cls-dense", out, "--num-experts", 4, "--top-k", 2, env={"HF_HOME": str(home)})
    check_files(out, source, modules)
    report = st_report(out, source, SENTENCES)
    check_report(report, ["Transformer", "Pooling", "Dense"])
    assert report["max_seq_length"][0] == 128 and report["similarity_fn_name"][0] == "dot"


def test_local_sentence_transformers_folder_and_loaded_model_sources(tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    import hf_condcomp
    from hf_condcomp.saving import save_with_tokenizer

    source = custom_sentence_transformer(tmp_path / "src", minilm_path)
    for name, src in [("folder", str(source)), ("loaded", AutoModel.from_pretrained(source))]:
        out = tmp_path / name
        save_with_tokenizer(hf_condcomp.upcycle(src, num_experts=2, top_k=1), source, out)
        check_files(out, source, ["1_Pooling", "2_Dense"])
        assert [type(m).__name__ for m in SentenceTransformer(str(out), trust_remote_code=True)] == [
            "Transformer", "Pooling", "Dense"]


def test_plain_transformers_source_writes_no_sentence_transformers_files(tmp_path, minilm_path):
    from transformers import AutoTokenizer

    import hf_condcomp
    from hf_condcomp.saving import save_with_tokenizer

    src = tmp_path / "plain"
    tiny_source("bert").save_pretrained(src)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(src)
    for name, source in [("folder", src), ("model", tiny_source("bert"))]:
        out = tmp_path / name
        save_with_tokenizer(hf_condcomp.upcycle(source, num_experts=4, top_k=2), src, out)
        assert (out / "config.json").exists()
        assert not [p.name for p in out.iterdir() if p.name in ST_FILES or p.name[:1].isdigit()]
    # A sentence-transformers folder whose transformer sits in a subfolder (old layout) is not copied either.
    from hf_condcomp.modeling.common import copy_sentence_transformers_files

    old = tmp_path / "old"
    shutil.copytree(minilm_path, old)
    entries = json.loads((old / "modules.json").read_text())
    entries[0]["path"] = "0_Transformer"
    (old / "modules.json").write_text(json.dumps(entries))
    assert copy_sentence_transformers_files(old, tmp_path / "folder") == []
    entries[0]["path"], entries[1]["path"] = "", "../1_Pooling"
    (old / "modules.json").write_text(json.dumps(entries))
    assert copy_sentence_transformers_files(old, tmp_path / "folder") == []


def test_classification_recipe_output_keeps_the_sentence_transformers_files(tmp_path, minilm_path, recipe_env):
    from sentence_transformers import SentenceTransformer

    rows = [("I love this, it is great", "pos"), ("this is terrible and I hate it", "neg")] * 16
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"{text} {i},{label}\n" for i, (text, label) in enumerate(rows)))
    out = tmp_path / "out"
    load_recipe("classification").main([str(a) for a in (
        "--model_name_or_path", "all-MiniLM-L6-v2", "--train_file", data, "--validation_file", data,
        "--max_train_samples", 32, "--max_eval_samples", 8, "--max_train_steps", 2, "--per_device_train_batch_size", 8,
        "--max_length", 16, "--output_dir", out, "upcycling.num_experts=2", "upcycling.top_k=1",
    )])
    check_files(out, minilm_path, ["1_Pooling"])
    model = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert model.max_seq_length == 256
    embeddings = model.encode(SENTENCES[:2], convert_to_tensor=True)
    assert embeddings.shape == (2, 384)
    assert embeddings.norm(dim=-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-4)


def test_a_folder_saved_from_python_is_complete(tmp_path, minilm_path):
    """`save_pretrained` on an upcycled model writes its source's tokenizer too, from Python as from the
    command line: the folder alone builds a batch (`AutoTokenizer`) and a `SentenceTransformer` that
    gives the dense model's embeddings."""
    from transformers import AutoTokenizer

    import hf_condcomp

    model = hf_condcomp.upcycle("all-MiniLM-L6-v2", num_experts=4, top_k=2, init="copy")
    folder = tmp_path / "minilm-moe"
    model.save_pretrained(folder)
    assert (folder / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("I lost my card")["input_ids"] == AutoTokenizer.from_pretrained(minilm_path)("I lost my card")[
        "input_ids"]
    check_files(folder, minilm_path, ["1_Pooling"])
    check_report(st_report(folder, minilm_path, SENTENCES), ["Transformer", "Pooling", "Normalize"])
