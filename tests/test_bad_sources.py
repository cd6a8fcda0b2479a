"""A checkpoint that cannot be read (truncated weights, a config.json that is no JSON or holds a value
of the wrong type, no tokenizer where one is needed) is one line on stderr naming the file, exit
status 2 and nothing written, in `hf-condcomp upcycle`, the classification recipe and `hf-condcomp
export`; `hf_condcomp.upcycle` raises a ValueError with the same line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_condcomp
from hf_condcomp.assets import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
# Characters and `##` continuations: a real WordPiece vocabulary within the tiny models' 99 ids.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz") + [
    "##" + c for c in "abcdefghijklmnopqrstuvwxyz"]


def tiny_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)})


def save_tiny_bert(folder):
    """A dense BERT classifier (vocab 99, hidden 32, 2 layers) with its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def save_tiny_upcycled_bert(folder):
    """The tiny BERT upcycled, with its tokenizer, as `hf-condcomp inspect` reads it."""
    from transformers import BertForSequenceClassification

    dense = BertForSequenceClassification.from_pretrained(save_tiny_bert(folder.with_name("dense")))
    hf_condcomp.upcycle(dense, num_experts=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def save_tiny_upcycled_llama(folder):
    """An upcycled Llama MoE (vocab 99, hidden 32, 2 layers), which `hf-condcomp export` accepts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=40, bos_token_id=0,
                                         eos_token_id=0, pad_token_id=0))
    hf_condcomp.upcycle(dense, num_experts=4, layers="all").save_pretrained(folder)
    return folder


def truncate_weights(folder):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return weights


def wrong_type(folder):
    config = folder / "config.json"
    values = json.loads(config.read_text())
    (values.get("text_config") or values)["hidden_size"] = "abc"  # an upcycled model: the source's field
    config.write_text(json.dumps(values))
    return config


def invalid_json(folder):
    config = folder / "config.json"
    config.write_text(config.read_text()[:40])  # cut inside the object
    return config


def no_tokenizer(folder):
    for file in folder.iterdir():
        if file.name.startswith(("tokenizer", "vocab", "special_tokens")):
            file.unlink()
    return folder


CORRUPT = {"truncated_weights": truncate_weights, "wrong_type": wrong_type, "invalid_json": invalid_json,
           "no_tokenizer": no_tokenizer}
WHAT = {"upcycle": "`source`", "recipe": "`--model_name_or_path`", "export": "MODEL_DIR", "inspect": "MODEL"}
SAVE = {"upcycle": save_tiny_bert, "recipe": save_tiny_bert, "export": save_tiny_upcycled_llama,
        "inspect": save_tiny_upcycled_bert}


def command(tool, source, out, tmp_path):
    if tool == "upcycle":
        return [sys.executable, "-m", "hf_condcomp.cli", "upcycle", source, out, "--num-experts", "4"]
    if tool == "export":
        return [sys.executable, "-m", "hf_condcomp.cli", "export", source, out]
    if tool == "inspect":
        texts = tmp_path / "texts.txt"
        texts.write_text("a dog runs\nthe cat sleeps\n")
        return [sys.executable, "-m", "hf_condcomp.cli", "inspect", source, "--text-file", texts,
                "--json", out / "routing.json"]
    rows = ["text,label"] + [f"{'good fine nice' if i % 2 else 'bad poor awful'} {i},{i % 2}" for i in range(32)]
    data = tmp_path / "data.csv"
    data.write_text("\n".join(rows) + "\n")
    return [sys.executable, ROOT / "recipes" / "classification.py", "--model_name_or_path", source,
            "--train_file", data, "--max_train_steps", 2, "--per_device_train_batch_size", 4, "--output_dir", out,
            "upcycling.num_experts=4"]


@pytest.mark.parametrize("tool,case", [
    ("upcycle", "truncated_weights"), ("upcycle", "wrong_type"), ("upcycle", "invalid_json"),
    ("recipe", "truncated_weights"), ("recipe", "wrong_type"), ("recipe", "invalid_json"), ("recipe", "no_tokenizer"),
    ("export", "truncated_weights"), ("export", "wrong_type"), ("export", "invalid_json"),
    ("inspect", "truncated_weights"), ("inspect", "no_tokenizer"),
])
def test_unreadable_source_is_one_line_exit_2_and_nothing_written(tmp_path, tool, case):
    source = tmp_path / "source"
    SAVE[tool](source)
    bad = CORRUPT[case](source)
    out = tmp_path / "out"
    argv = [str(a) for a in command(tool, source, out, tmp_path)]
    before = sorted(p.name for p in tmp_path.iterdir())
    # Progress bars of the steps before the read (the recipe's data loading) are no part of the report.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{WHAT[tool]} {bad}" in lines[0], lines[0]
    if case == "no_tokenizer":
        fix = "`--tokenizer_name`" if tool == "recipe" else "tokenizer.save_pretrained"
        assert "has no tokenizer" in lines[0] and fix in lines[0], lines[0]
    else:
        problem = {"truncated_weights": "truncated or not safetensors", "wrong_type": "'hidden_size' expected int",
                   "invalid_json": "not valid JSON"}[case]
        assert f"{bad} cannot be read:" in lines[0] and problem in lines[0], lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folder left either


@pytest.mark.parametrize("case", ["truncated_weights", "wrong_type", "invalid_json"])
def test_upcycle_raises_the_same_line_in_python(tmp_path, case):
    source = save_tiny_bert(tmp_path / "source")
    bad = CORRUPT[case](source)
    with pytest.raises(CheckpointError, match=r"^`source` ") as caught:
        hf_condcomp.upcycle(str(source), num_experts=4)
    assert isinstance(caught.value, ValueError) and caught.value.detail.startswith(f"{bad} cannot be read: ")
    assert "\n" not in str(caught.value)


def test_a_tokenizer_without_vocabulary_is_refused(tmp_path):
    """With tokenizer_config.json but no vocabulary, transformers builds a BERT tokenizer of its
    special tokens only: training on it would see nothing but [UNK]."""
    from hf_condcomp.assets import load_tokenizer

    source = save_tiny_bert(tmp_path / "source")
    assert len(load_tokenizer(str(source))) == len(VOCAB)
    (source / "tokenizer.json").unlink()
    assert sorted(p.name for p in source.iterdir() if p.name.startswith("tokenizer")) == ["tokenizer_config.json"]
    with pytest.raises(CheckpointError, match=r"^`source` .*source has no tokenizer \(no tokenizer.json"):
        load_tokenizer(str(source))


def test_a_missing_local_folder_is_named_as_one(tmp_path):
    """`./no-such-model` is a path, not a Hub id: the user hears that the folder is not there, not the
    Hub's rules for repository names; exit 2 and nothing written."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hf_condcomp.cli", "upcycle", "./no-such-model", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "`source`='./no-such-model': no such folder" in lines[0] and "Repo id" not in lines[0]
    assert not out.exists()


def test_the_first_conversion_of_the_embedded_smollm2_says_what_it_does(tmp_path, monkeypatch, capsys):
    """The GGUF's first conversion takes about 20 s: a line says so before it starts (the conversion
    itself is stopped here, so that the test costs nothing)."""
    from transformers import AutoModelForCausalLM

    from hf_condcomp import assets

    monkeypatch.setenv("HF_CONDCOMP_CACHE", str(tmp_path))

    def stop(*args, **kwargs):
        raise RuntimeError("the conversion starts here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", stop)
    with pytest.raises(RuntimeError, match="the conversion starts here"):
        assets.smollm2_path()
    assert "SmolLM2-135M-Instruct: converting its GGUF into a plain checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("model_type,extra", [
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8)),
    ("deepseek_v3", dict(first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)),
])
def test_a_mixture_of_experts_source_is_refused_by_name(tmp_path, model_type, extra):
    """An MoE checkpoint (here DeepSeek-V3's layout, whose first layer is dense) is not a dense source:
    one line naming it and its expert count, before any weight is read, not a missing-key error."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=37, **extra)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "source")
    with pytest.raises(ValueError, match=rf"is already a Mixture-of-Experts \(model type '{model_type}', "
                                         r"`num_(local_)?experts`=4\): upcycling starts from a dense checkpoint"):
        hf_condcomp.upcycle(str(tmp_path / "source"), num_experts=4)
