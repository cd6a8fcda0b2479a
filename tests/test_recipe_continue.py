"""A recipe given a model that is already upcycled (and perhaps fine-tuned and shared) continues
from it, encoder or decoder. The weights the recipe starts from are the saved ones, not a second
upcycling of them, and what it writes is still such a model."""

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

import hf_condcomp
from hf_condcomp.modeling.configuration_condcomp import is_condcomp_config

from conftest import run_recipe

# A WordPiece vocabulary of characters and `##` continuations, within the tiny models' 99 ids.
WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz") + [
    "##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
SENTENCES = ["a dog runs in the park", "two men play football", "a woman reads a book", "the cat sleeps"]


pytestmark = pytest.mark.usefixtures("recipe_env")
run = run_recipe


@pytest.fixture
def loaded(monkeypatch):
    """The weights of the model the recipe loads, as it returns from `load_model` (before training);
    upcycling is refused outright, so that a model reaching training was loaded."""
    from hf_condcomp import training

    upcycle_module = importlib.import_module("hf_condcomp.upcycle")
    original, states = training.load_model, []

    def recording(*args, **kwargs):
        model = original(*args, **kwargs)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    def no_upcycling(*args, **kwargs):
        raise AssertionError("the recipe upcycled an upcycled model again")

    monkeypatch.setattr(training, "load_model", recording)
    monkeypatch.setattr(upcycle_module, "upcycle", no_upcycling)
    return states


def wordpiece_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={token: i for i, token in enumerate(WORDPIECE)})


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES * 4 + ["Translate en to de.\nen:\nde:"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def dense_source(kind, vocab_size):
    import transformers

    torch.manual_seed(0)
    small = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=40)
    if kind == "deberta_v2":
        return transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
            **small, num_labels=2, relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"]))
    if kind == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(**small, num_labels=2))
    if kind == "bart":
        return transformers.BartForConditionalGeneration(transformers.BartConfig(
            vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0, forced_eos_token_id=0))
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **small, num_key_value_heads=2, head_dim=8, sliding_window=4, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def save_upcycled(folder, kind):
    """An upcycled model saved with its tokenizer, as someone shares a fine-tuned one."""
    tokenizer = bpe_tokenizer() if kind in ("gemma2", "bart") else wordpiece_tokenizer()
    model = hf_condcomp.upcycle(dense_source(kind, len(tokenizer)), num_experts=4, layers="all")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.config.model_type


def assert_started_from(folder, state):
    saved = load_file(folder / "model.safetensors")
    assert set(saved) <= set(state), sorted(set(saved) - set(state))[:5]
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    routers = [key for key in saved if key.endswith(".gate.weight") and ".experts" not in key]
    assert routers, "the saved model has MoE routers"
    return saved, routers


@pytest.mark.parametrize("kind,text_type", [("deberta_v2", "deberta-v2"), ("bert", "bert")])
def test_classification_continues_from_an_upcycled_model(tmp_path, loaded, kind, text_type):
    source, saved_type = save_upcycled(tmp_path / "shared", kind)
    assert saved_type == "condcomp"
    rows = ["text,label"] + [f"{'good fine nice' if i % 2 else 'bad poor awful'} {i},{'pos' if i % 2 else 'neg'}"
                             for i in range(32)]
    data = tmp_path / "data.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    results = run("classification", "--model_name_or_path", source, "--train_file", data, "--max_train_steps", 2,
                  "--per_device_train_batch_size", 4, "--learning_rate", "1e-2", "--output_dir", out)

    assert results["train_steps"] == 2 and results["train_loss"] == results["train_loss"]  # trained, finite loss
    saved, routers = assert_started_from(source, loaded[0])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "condcomp" and is_condcomp_config(config)
    assert config["upcycling"]["num_experts"] == 4 and config["id2label"] == {"0": "neg", "1": "pos"}
    assert config["text_config"]["model_type"] == text_type
    assert config["text_config"]["id2label"] == {"0": "neg", "1": "pos"}
    trained = load_file(out / "model.safetensors")
    assert set(trained) == set(saved)
    assert any(not torch.equal(trained[key], saved[key]) for key in routers), "the routers did not train"


@pytest.mark.parametrize("kind", ["deberta_v2", "bert"])
def test_a_new_label_set_gets_a_fresh_head_and_keeps_the_rest(tmp_path, loaded, kind):
    """Saved with 2 labels, trained on 3: the head is rebuilt (for a native model, from the source's
    `text_config`, which holds the labels), every other weight is the saved one."""
    source, _ = save_upcycled(tmp_path / "shared", kind)
    rows = ["text,label"] + [f"word {i},{'abc'[i % 3]}" for i in range(30)]
    data = tmp_path / "data.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    results = run("classification", "--model_name_or_path", source, "--train_file", data, "--max_train_steps", 1,
                  "--output_dir", out)

    assert results["num_labels"] == 3
    saved, state = load_file(source / "model.safetensors"), loaded[0]
    head = [key for key in saved if tuple(state[key].shape) != tuple(saved[key].shape)]
    assert head and all(state[key].shape[0] == 3 for key in head), head
    assert all(torch.equal(state[key], tensor) for key, tensor in saved.items() if key not in head)
    config = json.loads((out / "config.json").read_text())
    for labels in (config, config.get("text_config") or config):
        assert labels["id2label"] == {"0": "a", "1": "b", "2": "c"}


@pytest.mark.parametrize("kind", ["gemma2", "bart"])
def test_translation_continues_from_an_upcycled_model(tmp_path, loaded, kind):
    """Gemma 2 (sliding windows), or BART as an encoder-decoder (read off the saved config), upcycled,
    saved, and trained on. The BART tokenizer adds no end token: the recipe appends one to sources
    and targets."""
    source, saved_type = save_upcycled(tmp_path / "shared", kind)
    assert saved_type == "condcomp"
    pairs = [{"translation": {"en": s, "de": s[::-1]}} for s in SENTENCES * 4]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    out = tmp_path / "out"
    results = run("translation", "--model_name_or_path", source, "--train_file", data, "--max_train_steps", 2,
                  "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 4, "--max_length", 48,
                  "--max_target_length", 4, "--learning_rate", "1e-2", "--output_dir", out)

    assert results["train_steps"] == 2 and results["encoder_decoder"] == (kind == "bart")
    saved, routers = assert_started_from(source, loaded[0])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "condcomp" and config["text_config"]["model_type"] == kind
    if kind == "bart":
        assert config["decoder_moe_layers"] == [0, 1]
        assert set(results["routing"]["moe_layers"]) == {"encoder.0", "encoder.1", "decoder.0", "decoder.1"}
    trained = load_file(out / "model.safetensors")
    assert any(not torch.equal(trained[key], saved[key]) for key in routers), "the routers did not train"


def test_upcycling_an_upcycled_model_is_refused_by_name(tmp_path):
    source, _ = save_upcycled(tmp_path / "shared", "deberta_v2")
    with pytest.raises(ValueError, match=r"is already an upcycled model \(model type 'condcomp', upcycled from "
                                         r"'deberta-v2'\): upcycle its dense parent"):
        hf_condcomp.upcycle(str(source))
    model = hf_condcomp.upcycle(dense_source("bert", len(WORDPIECE)), num_experts=4)
    with pytest.raises(ValueError, match=r"model type 'condcomp'"):
        hf_condcomp.upcycle(model)


@pytest.mark.parametrize("config,expected", [
    ({"model_type": "condcomp", "text_config": {"model_type": "gemma2"}}, True),
    ({"model_type": "condcomp_bert"}, True),  # saved by an earlier release
    ({"model_type": "condcomp_t5"}, True),
    ({"model_type": "t5", "upcycling": {"source": "t5-small"}}, True),
    ({"model_type": "bert"}, False),
    ({"model_type": "condition"}, False),
])
def test_is_condcomp_config(config, expected):
    from transformers import BertConfig

    assert is_condcomp_config(config) is expected
    config = hf_condcomp.CondCompConfig(text_config=BertConfig(vocab_size=99))
    assert is_condcomp_config(config) and not is_condcomp_config(BertConfig())
