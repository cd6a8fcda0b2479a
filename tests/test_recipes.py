"""End-to-end runs of the recipes on real data (Banking77, Multi30k, chitchat) with small step
budgets: metrics in all_results.json, exact resume, a 2-process CPU DDP run, the saved folder
loading without hf_condcomp, the model card, the Hub upload (intercepted) and bad inputs.

Runs in process (`recipe.main(argv)`) except where a clean interpreter or two processes are the
point. Tiny random GPT-2 models with a small BPE tokenizer keep the decoder runs fast. The data
are the committed samples in tests/data.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_condcomp
from hf_condcomp.modeling.compat import TESTED_TORCH, TESTED_TRANSFORMERS

from conftest import DATA, ROOT, free_port, run_recipe, sample_bpe_tokenizer

BANKING77 = DATA / "banking77"
MULTI30K = DATA / "multi30k"

# Measured on a 2-core CPU: 100 steps reach 0.30-0.41 accuracy (chance 1/77 = 0.013; a model whose
# head or experts do not learn stays near chance).
BANKING77_ACCURACY_FLOOR = 0.15


pytestmark = pytest.mark.usefixtures("recipe_env")
run = run_recipe


def make_tiny_gpt2(folder, dropout):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = sample_bpe_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=len(tokenizer),
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), dropout=0.1)


@pytest.fixture(scope="session")
def tiny_gpt2_nodrop(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2_nodrop"), dropout=0.0)


def translation_args(model, out, *extra):
    return (
        "--model_name_or_path", model, "--train_file", MULTI30K / "train", "--validation_file", MULTI30K / "val",
        "--source_lang", "en", "--target_lang", "de", "--max_train_samples", 40, "--max_eval_samples", 8,
        "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 8, "--learning_rate", "2e-3",
        "--max_length", 64, "--max_target_length", 8, "--output_dir", out,
        "upcycling.num_experts=4", "upcycling.layers=all", *extra,
    )


# --- classification -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def banking77_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("banking77")
    env_home = tmp_path_factory.getbasetemp() / "hf_home"
    os.environ.update(HF_HOME=str(env_home), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    results = run(
        "classification", "--model_name_or_path", "all-MiniLM-L6-v2",
        "--train_file", BANKING77 / "train.csv", "--validation_file", BANKING77 / "test.csv",
        "--text_column", "text", "--label_column", "category", "--max_train_samples", 1600,
        "--max_eval_samples", 400, "--max_train_steps", 100, "--per_device_train_batch_size", 16,
        "--learning_rate", "3e-4", "--num_warmup_steps", 10, "--max_length", 32, "--output_dir", out,
        "--with_tracking", "upcycling.num_experts=4",
    )
    return out, results


def test_classification_banking77_reaches_floor(banking77_run):
    out, _ = banking77_run
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_accuracy"] >= BANKING77_ACCURACY_FLOOR, results["eval_accuracy"]
    assert 0 < results["eval_macro_f1"] <= 1
    assert results["num_labels"] == 77 and results["train_steps"] == 100
    history = results["log_history"]
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert all(h["train/aux_loss"] > 0 for h in history)  # router losses are part of training
    layers = results["routing"]["moe_layers"]
    assert sorted(layers, key=int) == ["1", "3", "5"]
    assert all(sum(s["tokens_per_expert"]) > 0 for s in layers.values())
    assert results["eval_compute_fraction"] == pytest.approx(1.0)
    assert list((out / "runs").rglob("events.out.tfevents*")), "TensorBoard logs"


def test_classification_metrics_equal_scikit_learn_on_the_same_predictions(banking77_run):
    from sklearn.metrics import accuracy_score, f1_score

    out, _ = banking77_run
    results = json.loads((out / "all_results.json").read_text())
    rows = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == results["eval_samples"] == 400
    labels, predictions = [r["label"] for r in rows], [r["prediction"] for r in rows]
    assert results["eval_accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    assert results["eval_macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"), abs=1e-12)


def test_saved_classifier_loads_without_hf_condcomp(banking77_run):
    out, results = banking77_run
    code = f"""
import sys, json
sys.modules["hf_condcomp"] = None  # the saved folder must not need this package
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
batch = tok(["I lost my card", "How do I top up?"], return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**batch).logits
print("RESULT " + json.dumps({{"shape": list(logits.shape), "module": type(model).__module__,
                              "label": model.config.id2label[0]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert info["shape"] == [2, 77]
    assert not info["module"].startswith("hf_condcomp")

    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["accuracy"] == pytest.approx(results["eval_accuracy"])
    assert metrics["f1"] == pytest.approx(results["eval_macro_f1"])
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"  # the embedded copy's Hub id
    assert "trust_remote_code=True" in card.text and "| num_experts | 4 |" in card.text
    assert "| 1 | [" in card.text  # routing statistics table
    oldest, newest = TESTED_TRANSFORMERS
    assert f"tested with transformers {oldest} to {newest}\nand torch {' and '.join(TESTED_TORCH)}" in card.text


# --- translation: metrics, LoRA, push --------------------------------------------------------------

def test_translation_reports_bleu_chrf_and_pushes(tiny_gpt2, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        calls["upload"] = (repo_id, sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns)))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    results = run("translation", *translation_args(
        tiny_gpt2, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--lora_r", 4, "--lora_targets", "experts",
        "--push_to_hub", "--hub_model_id", "someone/tiny-moe-multi30k",
    ))
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["eval_bleu"] >= 0 and saved["eval_chrf"] > 0 and saved["eval_samples"] == 8
    # The metrics (evaluate, through the packaged module) equal sacrebleu's on the same translations.
    import sacrebleu

    rows = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    hyps, refs = [r["translation"] for r in rows], [r["reference"] for r in rows]
    assert len(rows) == 8
    assert saved["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-12)
    assert saved["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-12)
    assert results["routing"]["moe_layers"]
    # LoRA merged on save: a plain upcycled checkpoint with no adapter keys.
    keys = load_file(out / "model.safetensors").keys()
    assert not [k for k in keys if "lora" in k] and any("experts.up_proj" in k for k in keys)
    assert calls["create_repo"] == "someone/tiny-moe-multi30k"
    repo_id, files = calls["upload"]
    assert repo_id == "someone/tiny-moe-multi30k"
    for needed in ("README.md", "config.json", "model.safetensors", "tokenizer.json", "all_results.json",
                   "configuration_condcomp.py", "modeling_condcomp.py", "depth.py"):
        assert needed in files
    assert not [f for f in files if f.startswith("checkpoints/")]


def test_resume_equals_uninterrupted(tiny_gpt2, tmp_path):
    # 40 pairs / batch 8 = 5 batches per epoch: step 3 is mid-epoch, step 7 is in the second epoch.
    full = tmp_path / "full"
    run("translation", *translation_args(tiny_gpt2, full, "--max_train_steps", 7, "--checkpointing_steps", 3,
                                         "--num_generation_samples", 2))
    assert (full / "checkpoints" / "step_3").is_dir()
    # "Kill" after the step-3 checkpoint: a fresh run resumes from it (the checkpoint is the same
    # whether or not the first run went on) and must end at the same weights.
    resumed = tmp_path / "resumed"
    results = run("translation", *translation_args(
        tiny_gpt2, resumed, "--max_train_steps", 7, "--resume_from_checkpoint", full / "checkpoints" / "step_3",
        "--num_generation_samples", 2))
    assert results["train_steps"] == 7
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_two_process_ddp_matches_single_process(tiny_gpt2_nodrop, tmp_path):
    common = ("--max_train_steps", 4, "--num_generation_samples", 4, "--max_train_samples", 32)
    single = run("translation", *translation_args(tiny_gpt2_nodrop, tmp_path / "single", *common))
    out = tmp_path / "ddp"
    args = [str(a) for a in translation_args(tiny_gpt2_nodrop, out, *common)]
    args[args.index("--per_device_train_batch_size") + 1] = "4"  # 2 x 4 = the single run's 8
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "recipes" / "translation.py"), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "all_results.json").read_text())
    assert ddp["num_processes"] == 2
    assert ddp["train_examples_per_process"] == [16, 16]  # both processes trained on their half
    assert single["train_examples_per_process"] == [32]
    assert ddp["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-3)
    # Per-batch means over half batches (token counts differ) and the batch-level aux loss: close, not equal.
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-2)


# --- dialogue -------------------------------------------------------------------------------------

def test_dialogue_chitchat_perplexity_drops(tiny_gpt2, tmp_path):
    out = tmp_path / "out"
    results = run(
        "dialogue", "--model_name_or_path", tiny_gpt2, "--dataset_name", "chitchat", "--max_train_samples", 24,
        "--max_eval_samples", 8, "--max_train_steps", 6, "--per_device_train_batch_size", 4,
        "--learning_rate", "3e-3", "--max_length", 64, "--max_new_tokens", 8, "--num_sample_replies", 2,
        "--output_dir", out, "upcycling.num_experts=4",
    )
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["perplexity"] < saved["perplexity_before"]
    assert len(saved["sample_replies"]) == 2 and all("reply" in r for r in saved["sample_replies"])
    assert results["routing"]["moe_layers"]


# --- bad inputs stop before training --------------------------------------------------------------

def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["missing_column", "empty_file", "one_class", "language_key", "checkpoint"])
def test_bad_input_stops_before_training(case, tmp_path, monkeypatch):
    from hf_condcomp import training

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded: the error must come before")

    monkeypatch.setattr(training, "load_model", no_model)
    out = tmp_path / "out"
    good_csv = _write(tmp_path / "good.csv", "text,label\nhello,a\nbye,b\n")
    cls = ("--model_name_or_path", "all-MiniLM-L6-v2", "--output_dir", out)
    if case == "missing_column":
        recipe, args = "classification", (*cls, "--train_file", good_csv, "--text_column", "sentence")
        match = r"sentence.*--text_column"
    elif case == "empty_file":
        recipe, args = "classification", (*cls, "--train_file", _write(tmp_path / "empty.csv", ""))
        match = r"empty\.csv.*empty"
    elif case == "one_class":
        one = _write(tmp_path / "one.csv", "text,label\nhello,a\nbye,a\n")
        recipe, args, match = "classification", (*cls, "--train_file", one), r"one\.csv.*one class"
    elif case == "language_key":
        pairs = _write(tmp_path / "pairs.jsonl", json.dumps({"translation": {"en": "a dog", "de": "ein Hund"}}) + "\n")
        recipe, args, match = "translation", ("--model_name_or_path", "x", "--output_dir", out, "--train_file", pairs,
                                              "--target_lang", "fr"), r"--target_lang.*pairs\.jsonl.*\['de', 'en'\]"
    else:
        bad = tmp_path / "step_5"
        bad.mkdir()
        _write(bad / "training_state.json", "{not json")
        recipe, args = "classification", (*cls, "--train_file", good_csv, "--resume_from_checkpoint", bad)
        match = r"--resume_from_checkpoint.*step_5"
    with pytest.raises(training.RecipeError, match=match):
        run(recipe, *args)
    assert not (out / "model.safetensors").exists()


def test_generate_folds_lora_in_while_decoding_and_restores_the_adapters():
    """The recipes' `generate` merges LoRA for decoding speed: same tokens as the unmerged model,
    and afterwards the adapters are unmerged with every weight back to its value."""
    import types

    from accelerate import Accelerator

    import hf_condcomp
    from hf_condcomp import training

    from conftest import tiny_source

    model = hf_condcomp.upcycle(tiny_source("llama"), num_experts=4, top_k=2, layers="all")
    args = types.SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets="attention,experts",
                                 lora_trainable="")
    model = training.apply_lora(model, args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # zero at init: make the adapters change the tokens
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=None,
                                      batch_decode=lambda ids, skip_special_tokens: [
                                          " ".join(map(str, r.tolist())) for r in ids])
    prompts = [[5, 7, 9, 11], [3, 4]]
    model.eval()
    with torch.no_grad():  # reference: the unmerged model, prompt by prompt
        expected = []
        for p in prompts:
            tokens = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                    max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(p):]
            expected.append(" ".join(map(str, tokens.tolist())))
    with torch.no_grad():
        model.base_model.disable_adapter_layers()
        plain = model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        model.base_model.enable_adapter_layers()
    assert " ".join(map(str, plain[0, 4:].tolist())) != expected[0], "LoRA must change the tokens for this check"

    texts = training.generate(Accelerator(cpu=True), model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert texts == expected
    assert not any(getattr(m, "merged", False) for m in model.modules())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), before[name], rtol=0, atol=1e-5, msg=name)


# --- native export from a recipe ------------------------------------------------------------------

def make_tiny_decoder(folder, architecture, **extra):
    """A tiny random decoder of a transformers architecture with the samples' BPE tokenizer."""
    import transformers

    tokenizer = sample_bpe_tokenizer()
    torch.manual_seed(0)
    config = getattr(transformers, f"{architecture}Config")(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    getattr(transformers, f"{architecture}ForCausalLM")(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny_llama"), "Llama")


def test_translation_exports_natively_and_pushes_the_native_folder(tiny_llama, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        calls["upload"] = (Path(folder_path), sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns)))

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    run("translation", *translation_args(tiny_llama, out, "--max_train_steps", 2, "--lora_r", 4, "--export_format",
                                         "native", "--push_to_hub", "--hub_model_id", "someone/tiny-mixtral"))
    native = out / "native"
    folder, files = calls["upload"]
    assert folder == native
    assert "config.json" in files and "model.safetensors" in files and "tokenizer.json" in files
    assert "README.md" in files and not [f for f in files if f.endswith(".py")]
    assert json.loads((native / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    card = (native / "README.md").read_text()
    assert "native `MixtralForCausalLM`" in card and "trust_remote_code" not in card
    assert "trust_remote_code=True" in (out / "README.md").read_text()  # the remote-code folder keeps its card

    from transformers import AutoModelForCausalLM

    from hf_condcomp import CondCompForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        ours = CondCompForCausalLM.from_pretrained(out).eval()(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(native).eval()(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_native_export_of_an_inexpressible_model_is_refused_before_training(tiny_gpt2, tmp_path, capsys):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "translation.py"),
                           *map(str, translation_args(tiny_gpt2, out, "--max_train_steps", 2,
                                                      "--export_format", "native"))],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "`--export_format native`" in error[0] and "upcycled from 'gpt2'" in error[0]
    assert not (out / "model.safetensors").exists()


# --- native models through the recipes --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny_qwen3"), "Qwen3", head_dim=16)


def test_translation_trains_a_native_model_with_lora_and_it_loads_without_hf_condcomp(tiny_qwen3, tmp_path):
    """Transformers' own Qwen3 with MoE blocks, LoRA on attention and
    experts, trained, evaluated, saved with its code and loaded in a clean interpreter."""
    out = tmp_path / "out"
    results = run("translation", *translation_args(tiny_qwen3, out, "--max_train_steps", 3, "--lora_r", 4))
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["eval_chrf"] > 0 and results["routing"]["moe_layers"]
    history = saved["log_history"]
    assert all(h["train/aux_loss"] > 0 for h in history)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "condcomp" and config["text_config"]["model_type"] == "qwen3"
    keys = load_file(out / "model.safetensors").keys()
    assert not [k for k in keys if "lora" in k] and any(k.endswith("mlp.experts.gate_up_proj") for k in keys)
    code = f"""
import sys
sys.modules["hf_condcomp"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained({str(out)!r})
ids = tok("A man is riding a bike.", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
assert out.shape[1] == ids.shape[1] + 4 and type(model).__module__.startswith("transformers_modules")
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


# --- translation with encoder-decoder sources ---------------------------------------------------------

def seq2seq_tokenizer():
    """A Marian-like tokenizer: subword BPE with `<pad>` (0), `</s>` (1) and `<unk>` (2), which ends
    every text with `</s>`, trained on the Multi30k samples of both languages."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
    tokenizer.train(sorted(str(p) for p in MULTI30K.glob("train.*")), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_seq2seq_config(config_class, vocab_size, dropout=0.1, **ids):
    return config_class(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=128,
                        dropout=dropout, attention_dropout=dropout, activation_dropout=dropout, **ids)


@pytest.fixture(scope="session")
def tiny_marian(tmp_path_factory):
    """A random 2+2-layer Marian translation model (Marian's token layout: the decoder starts at `<pad>`)."""
    from transformers import MarianConfig, MarianMTModel

    folder = tmp_path_factory.mktemp("tiny_marian")
    tokenizer = seq2seq_tokenizer()
    torch.manual_seed(0)
    MarianMTModel(tiny_seq2seq_config(MarianConfig, len(tokenizer), pad_token_id=0, eos_token_id=1,
                                      decoder_start_token_id=0, forced_eos_token_id=1)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SEQ2SEQ_LAYERS = "upcycling.layers=encoder:every_other,decoder:all"


def test_seq2seq_translation_reports_bleu_chrf_card_and_pushes(tiny_marian, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *, repo_id, folder_path, **kw: calls.update(
        upload=(repo_id, sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).iterdir()))))
    out = tmp_path / "out"
    results = run("translation", *translation_args(tiny_marian, out, "--max_train_steps", 4, SEQ2SEQ_LAYERS,
                                                   "--push_to_hub", "--hub_model_id", "someone/tiny-marian-moe"))
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["encoder_decoder"] and saved["train_steps"] == 4 and saved["eval_samples"] == 8
    assert saved["eval_chrf"] > 0 and saved["eval_loss"] == saved["eval_loss"]
    import sacrebleu

    rows = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    hyps, refs = [r["translation"] for r in rows], [r["reference"] for r in rows]
    assert all(hyps) and not any("</s>" in h or "<pad>" in h for h in hyps)
    assert saved["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-12)
    assert saved["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-12)
    # Routing per stack, over real tokens: top-2 gives two assignments per token.
    layers = results["routing"]["moe_layers"]
    assert list(layers) == ["encoder.1", "decoder.0", "decoder.1"]
    assert all(sum(s["tokens_per_expert"]) == 2 * s["num_tokens"] > 0 for s in layers.values())
    assert all(h["train/aux_loss"] > 0 for h in saved["log_history"])
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "marian"
    assert config["upcycling"]["layers"] == {"encoder": [1], "decoder": [0, 1]}
    card = ModelCard.load(out / "README.md")
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["bleu"] == pytest.approx(saved["eval_bleu"]) and metrics["chrf"] == pytest.approx(saved["eval_chrf"])
    assert "AutoModelForSeq2SeqLM.from_pretrained" in card.text and "| decoder.1 | [" in card.text
    assert "MoE layers: encoder [1], decoder [0, 1]." in card.text and "decoder's labels" in card.text
    repo_id, files = calls["upload"]
    assert repo_id == "someone/tiny-marian-moe" and {"README.md", "model.safetensors", "all_results.json"} <= set(files)
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    batch = AutoTokenizer.from_pretrained(out)(["A dog runs."], return_tensors="pt")
    assert model.generate(**batch, max_new_tokens=4, do_sample=False).shape[0] == 1


def test_seq2seq_resume_equals_uninterrupted(tiny_marian, tmp_path):
    # As for decoders: 5 batches per epoch, a checkpoint mid-epoch, the end in the second epoch, dropout on.
    common = ("--max_train_steps", 7, "--num_generation_samples", 2, SEQ2SEQ_LAYERS)
    full = tmp_path / "full"
    run("translation", *translation_args(tiny_marian, full, *common, "--checkpointing_steps", 3))
    resumed = tmp_path / "resumed"
    results = run("translation", *translation_args(tiny_marian, resumed, *common, "--resume_from_checkpoint",
                                                   full / "checkpoints" / "step_3"))
    assert results["train_steps"] == 7
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and any("experts" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_seq2seq_lora_on_attention_and_experts_of_both_stacks(tiny_marian, tmp_path, monkeypatch):
    from hf_condcomp.training import models

    picked = {}
    original = models.lora_targets

    def recording(model, targets):
        picked["modules"], picked["parameters"] = original(model, targets)
        return picked["modules"], picked["parameters"]

    monkeypatch.setattr(models, "lora_targets", recording)
    out = tmp_path / "out"
    results = run("translation", *translation_args(tiny_marian, out, "--max_train_steps", 2, "--lora_r", 4,
                                                   "--num_generation_samples", 4, SEQ2SEQ_LAYERS))
    # Self- and cross-attention of both stacks, and every MoE block's experts.
    assert picked["modules"] == [f"{attn}.{p}" for attn in ("encoder_attn", "self_attn")
                                 for p in ("k_proj", "out_proj", "q_proj", "v_proj")]
    assert picked["parameters"] == ["fc1.experts.down_proj", "fc1.experts.up_proj"]
    assert results["eval_chrf"] > 0 and results["routing"]["moe_layers"]
    before = load_file(tiny_marian / "model.safetensors")
    keys = load_file(out / "model.safetensors")
    assert not [k for k in keys if "lora" in k]
    q = "model.decoder.layers.0.encoder_attn.q_proj.weight"
    assert not torch.equal(keys[q], before["model.decoder.layers.0.encoder_attn.q_proj.weight"]), "LoRA merged"


def test_nllb_language_codes_set_the_tokenizer_and_force_the_target_code(tmp_path):
    """NLLB (an M2M100 model): `--source_lang_code` / `--target_lang_code` go to the tokenizer, and the
    target code, which NLLB's tokenizer puts first in targets, is forced as the first generated token."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in "▁" + "".join(sorted(set((MULTI30K / "train.en").read_text() + (MULTI30K / "train.de").read_text()))):
        vocab.setdefault(char, len(vocab))
    tokenizer = NllbTokenizer(vocab=vocab, merges=[], additional_special_tokens=["eng_Latn", "deu_Latn"])
    torch.manual_seed(0)
    M2M100ForConditionalGeneration(tiny_seq2seq_config(
        M2M100Config, len(tokenizer), pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)).save_pretrained(tmp_path / "nllb")
    tokenizer.save_pretrained(tmp_path / "nllb")
    out = tmp_path / "out"
    run("translation", *translation_args(tmp_path / "nllb", out, "--max_train_steps", 1, "--num_generation_samples", 2,
                                         "--source_lang_code", "eng_Latn", "--target_lang_code", "deu_Latn",
                                         "--max_target_length", 4))
    deu = tokenizer.convert_tokens_to_ids("deu_Latn")
    assert json.loads((out / "generation_config.json").read_text())["forced_bos_token_id"] == deu
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    ids = torch.tensor([tokenizer("A dog.")["input_ids"]])
    assert ids[0, 0] == tokenizer.convert_tokens_to_ids("eng_Latn")
    assert model.generate(ids, max_new_tokens=3, do_sample=False)[0, 1] == deu
    from hf_condcomp.training import RecipeError

    with pytest.raises(RecipeError, match=r"--target_lang_code.*'fra_Latn' is not a language code"):
        run("translation", *translation_args(tmp_path / "nllb", tmp_path / "bad", "--target_lang_code", "fra_Latn"))


# --- a model merged from several fine-tunes, fine-tuned by a recipe -------------------------------------

def test_dialogue_fine_tunes_a_merged_model_with_lora_and_router_learning_rate(tiny_llama, tmp_path):
    """Two fine-tunes of one base merged into one MoE (one expert each, the base's shared weights) is
    a saved model like any other: the recipe trains it with LoRA, a router learning rate and the
    load-balancing loss, without upcycling it again, and its card names the sources and the base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sources = []
    for seed in (1, 2):  # the base with its FFNs moved differently: two "fine-tunes"
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".mlp." in name:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.02)
        folder = tmp_path / f"ft{seed}"
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
        sources.append(str(folder))
    merged = tmp_path / "merged"
    moe = hf_condcomp.upcycle(sources, base=str(tiny_llama), top_k=1, layers="all")
    moe.save_pretrained(merged)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(merged)
    before = load_file(merged / "model.safetensors")

    out = tmp_path / "out"
    results = run(
        "dialogue", "--model_name_or_path", merged, "--dataset_name", "chitchat", "--max_train_samples", 16,
        "--max_eval_samples", 8, "--max_train_steps", 3, "--per_device_train_batch_size", 4,
        "--learning_rate", "3e-3", "--router_learning_rate", "1e-2", "--lora_r", 4, "--max_length", 64,
        "--max_new_tokens", 4, "--num_sample_replies", 1, "--output_dir", out,
    )
    saved = json.loads((out / "all_results.json").read_text())
    assert results["routing"]["moe_layers"] and all(h["train/aux_loss"] > 0 for h in saved["log_history"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 2 and config["upcycling"]["expert_sources"] == sources
    after = load_file(out / "model.safetensors")
    assert set(after) == set(before)  # trained as it was saved, not upcycled again
    router = next(k for k in after if k.endswith("mlp.gate.weight"))
    assert not torch.equal(after[router], before[router])  # the routers trained
    card = (out / "README.md").read_text()
    assert all(source in card for source in sources) and str(tiny_llama) in card
