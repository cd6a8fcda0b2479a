"""A non-editable `pip install .` is a complete package: a recipe run from outside the checkout
writes its model card from the template that ships inside the package."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SST2 = Path(__file__).resolve().parent / "data" / "sst2"


def test_non_editable_install_writes_a_model_card(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from hf_condcomp.assets import minilm_path

    # A venv that sees this interpreter's dependencies through a path line (which does not run the
    # editable install's .pth hook), with hf_condcomp installed into it from a built wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_base.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    source = tmp_path / "src"  # a copy, so that the build cannot pick up files git ignores
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".compat", ".git", "outputs", "*.egg-info",
                                                                "build", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                           "--no-build-isolation", str(source)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = subprocess.run([str(python), "-c", "import hf_condcomp; print(hf_condcomp.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, check=True).stdout.strip()
    assert where.startswith(str(site)), where  # the installed copy, not the checkout

    folder = tmp_path / "tiny_bert"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = tmp_path / "user" / "classification.py"  # the recipe copied out, as a user would
    recipe.parent.mkdir()
    shutil.copy(ROOT / "recipes" / "classification.py", recipe)
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(python), str(recipe), "--model_name_or_path", str(folder), "--train_file", str(SST2 / "train.tsv"),
         "--validation_file", str(SST2 / "test.tsv"), "--text_column", "sentence", "--label_column", "label",
         "--max_train_samples", "32", "--max_eval_samples", "16", "--max_train_steps", "2", "--max_length", "16",
         "--output_dir", str(out), "upcycling.num_experts=2", "with_tracking=false"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path / "user",
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "| num_experts | 2 |" in card
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 2
