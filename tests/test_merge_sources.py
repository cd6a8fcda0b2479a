"""Several dense fine-tunes of one model as the experts of one MoE (upcycle with several sources,
`hf-condcomp merge` with a mergekit-moe YAML), routers from prompts, and the refusals."""

import copy
import json
import re

import pytest
import torch

import hf_condcomp
from hf_condcomp.cli import main as cli_main

from conftest import VOCAB, run_clean_python, sample_bpe_tokenizer, tiny_source

# The FFN weights of each family, which the fine-tunes below change (and nothing else).
FFN = {"llama": r"\.mlp\.", "bert": r"\.(intermediate|output)\.dense\."}
MOE_BLOCK = {"llama": "model.layers.{}.mlp", "bert": "encoder.layer.{}.intermediate"}


def _is_ffn(family, name):
    return re.search(FFN[family], name) is not None and "attention" not in name


def fine_tunes(family, n, scale=0.2, vocab_size=None, task=None):
    """A base and `n` fine-tunes of it, each with its own change to every FFN weight."""
    base = tiny_source(family, task)
    if vocab_size is not None:
        base.resize_token_embeddings(vocab_size)
    tunes = []
    for i in range(n):
        tune = tiny_source(family, task)
        if vocab_size is not None:
            tune.resize_token_embeddings(vocab_size)
        tune.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in tune.named_parameters():
                if _is_ffn(family, name):
                    p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
        tunes.append(tune.eval())
    return base.eval(), tunes


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _dense_ffn(family, model, layer, x):
    if family == "llama":
        return model.model.layers[layer].mlp(x)
    block = model.encoder.layer[layer] if hasattr(model, "encoder") else model.bert.encoder.layer[layer]
    return block.output.dense(block.intermediate(x))


@pytest.mark.parametrize("family,task", [("llama", None), ("bert", None), ("bert", "sequence-classification"),
                                         ("gpt2", None), ("mistral", None), ("qwen2", None), ("qwen3", None)])
def test_identical_sources_give_the_copy_upcycle_of_that_source(family, task):
    source = tiny_source(family, task)
    merged = hf_condcomp.upcycle([source] * 4, top_k=2, seed=3)
    copied = hf_condcomp.upcycle(source, num_experts=4, top_k=2, seed=3)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    assert (_logits(merged, ids) - _logits(copied, ids)).abs().max().item() <= 1e-5
    assert (_logits(merged, ids) - _logits(source, ids)).abs().max().item() <= 1e-4
    assert merged.config.upcycling["expert_sources"] == [merged.config.upcycling["expert_sources"][0]] * 4
    assert merged.config.upcycling["shared_weights"] == "average"


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_two_sources_with_top_k_equal_to_experts_mix_their_ffns_by_the_router(family):
    base, (a, b) = fine_tunes(family, 2)
    moe = hf_condcomp.upcycle([a, b], base=base, top_k=2, layers="all", norm_topk_prob=True)
    assert moe.config.num_local_experts == 2 and moe.config.upcycling["shared_weights"] == "base"
    x = torch.randn(2, 5, base.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for layer in range(base.config.num_hidden_layers):
        block = moe.get_submodule(MOE_BLOCK[family].format(layer))
        with torch.no_grad():
            probs = torch.softmax(x @ block.gate.weight.t(), dim=-1)  # (B, T, 2)
            expected = (probs[..., :1] * _dense_ffn(family, a, layer, x)
                        + probs[..., 1:] * _dense_ffn(family, b, layer, x))
            got = block(x)
        assert (got - expected).abs().max().item() <= 1e-5
    # the shared (non-FFN) weights are the base's
    moe_state = moe.state_dict()
    for name, tensor in base.state_dict().items():
        if not _is_ffn(family, name) and name in moe_state:
            assert torch.equal(moe_state[name], tensor), name


def test_without_a_base_the_shared_weights_are_the_sources_average():
    _, tunes = fine_tunes("llama", 2, scale=0.0)
    with torch.no_grad():
        tunes[1].model.embed_tokens.weight.add_(1.0)
    moe = hf_condcomp.upcycle(tunes, layers="all")
    expected = (tunes[0].model.embed_tokens.weight + tunes[1].model.embed_tokens.weight) / 2
    torch.testing.assert_close(moe.model.embed_tokens.weight, expected)


def test_num_experts_a_multiple_of_the_sources_gives_each_several_noisy_experts():
    base, (a, b) = fine_tunes("llama", 2)
    moe = hf_condcomp.upcycle([a, b], base=base, num_experts=4, init="noise", noise_std=0.1, layers=[1])
    up = moe.model.layers[1].mlp.experts.gate_up_proj  # (E, 2I, H)
    for expert, source in zip(range(4), (a, a, b, b)):
        mlp = source.model.layers[1].mlp
        dense = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        assert not torch.equal(up[expert], dense)
        assert (up[expert] - dense).std() < 0.2 * dense.std()  # near its own source, not the other
    with pytest.raises(ValueError, match="`num_experts`=3 is not a multiple of the 2 sources"):
        hf_condcomp.upcycle([a, b], num_experts=3)
    with pytest.raises(ValueError, match="`top_k`"):  # unset num_experts: one per source
        hf_condcomp.upcycle([a, b], top_k=3)
    with pytest.raises(ValueError, match="`top_k`"):  # unset num_experts: 8 from one source
        hf_condcomp.upcycle(a, top_k=9)


def _prompt_reference(model, tokenizer, prompts, layer, negative=()):
    def mean(texts):
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**batch, output_hidden_states=True).hidden_states[layer]
        m = batch["attention_mask"].unsqueeze(-1).float()
        return ((h * m).sum(1) / m.sum(1)).mean(0)

    row = mean(prompts) - (mean(negative) if negative else 0)
    return row / row.norm()


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_hidden_router_rows_are_the_normalised_mean_hidden_states_of_the_prompts(family):
    tokenizer = sample_bpe_tokenizer()
    base, (a, b) = fine_tunes(family, 2, vocab_size=len(tokenizer))
    prompts = [
        {"positive_prompts": ["How do I transfer money?", "My card was declined."]},
        {"positive_prompts": ["A man rides a horse.", "Two dogs play in the snow together."],
         "negative_prompts": ["Where is my refund?"]},
    ]
    moe = hf_condcomp.upcycle([a, b], base=base, layers=[0, 2], router_init="hidden", expert_prompts=prompts,
                              tokenizer=tokenizer)
    ref_tok = copy.deepcopy(tokenizer)
    ref_tok.pad_token = ref_tok.eos_token
    for layer in (0, 2):
        router = moe.get_submodule(MOE_BLOCK[family].format(layer)).gate.weight
        expected = torch.stack([
            _prompt_reference(base, ref_tok, prompts[0]["positive_prompts"], layer),
            _prompt_reference(base, ref_tok, prompts[1]["positive_prompts"], layer, prompts[1]["negative_prompts"]),
        ])
        torch.testing.assert_close(router, expected, atol=1e-5, rtol=1e-4)
    assert moe.config.upcycling["router_init"] == "hidden"


def test_hidden_last_rows_take_each_prompts_last_real_token():
    tokenizer = sample_bpe_tokenizer()
    base, (a, b) = fine_tunes("llama", 2, vocab_size=len(tokenizer))
    prompts = [["How do I transfer money to another account?", "Hi"], ["A man rides a horse."]]
    moe = hf_condcomp.upcycle([a, b], base=base, layers=[1], router_init="hidden_last", expert_prompts=prompts,
                              tokenizer=tokenizer)
    with torch.no_grad():
        rows = torch.stack([
            torch.stack([base(**tokenizer(p, return_tensors="pt"), output_hidden_states=True).hidden_states[1][0, -1]
                         for p in texts]).mean(0)
            for texts in prompts])  # one prompt at a time: no padding
    torch.testing.assert_close(moe.model.layers[1].mlp.gate.weight,
                               rows / rows.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_cheap_embed_rows_are_the_normalised_sum_of_the_prompts_embeddings(tmp_path):
    tokenizer = sample_bpe_tokenizer()
    base, (a, b) = fine_tunes("llama", 2, vocab_size=len(tokenizer))
    (tmp_path / "a.txt").write_text("How do I transfer money?\nMy card was declined.\n")
    (tmp_path / "b.yml").write_text("positive_prompts: [A man rides a horse.]\n")
    moe = hf_condcomp.upcycle([a, b], base=base, layers="all", router_init="cheap_embed",
                              expert_prompts=[str(tmp_path / "a.txt"), str(tmp_path / "b.yml")], tokenizer=tokenizer)
    ids = tokenizer(["A man rides a horse."])["input_ids"][0]
    row = base.model.embed_tokens.weight[ids].sum(0)
    for layer in range(4):
        torch.testing.assert_close(moe.model.layers[layer].mlp.gate.weight[1], row / row.norm())
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        hf_condcomp.upcycle([a, b], router_init="hidden", expert_prompts=["missing.txt", "b.yml"], tokenizer=tokenizer)


def _save(model, folder, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_mergekit_config_merges_and_exports_to_mixtral_with_the_sources_weights(tmp_path, capsys):
    tokenizer = sample_bpe_tokenizer()
    base, (a, b) = fine_tunes("llama", 2, vocab_size=len(tokenizer))
    paths = [_save(m, tmp_path / name, tokenizer) for m, name in ((base, "base"), (a, "a"), (b, "b"))]
    (tmp_path / "b.txt").write_text("A man rides a horse.\nTwo dogs play in the snow.\n")
    config = tmp_path / "moe.yml"
    config.write_text(
        f"base_model: {paths[0]}\ngate_mode: hidden\ndtype: float32\nexperts_per_token: 2\nexperts:\n"
        f"  - source_model: {paths[1]}\n    positive_prompts: ['How do I transfer money?']\n"
        f"    negative_prompts: ['A cat sits.']\n"
        f"  - source_model: {paths[2]}\n    positive_prompts: b.txt\n"
    )
    assert cli_main(["merge", str(config), str(tmp_path / "moe")]) == 0
    record = json.loads((tmp_path / "moe" / "config.json").read_text())["upcycling"]
    assert record["expert_sources"] == paths[1:] and record["source"] == paths[0]
    assert record["router_init"] == "hidden_last" and record["shared_weights"] == "base"
    assert cli_main(["export", str(tmp_path / "moe"), str(tmp_path / "native")]) == 0
    capsys.readouterr()
    run_clean_python(
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, MixtralForCausalLM\n"
        f"moe = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'native')!r})\n"
        "assert type(moe) is MixtralForCausalLM, type(moe)\n"
        f"base, a, b = (LlamaForCausalLM.from_pretrained(p) for p in {paths!r})\n"
        "for i in range(4):\n"
        "    experts = moe.model.layers[i].mlp.experts\n"
        "    for e, src in enumerate((a, b)):\n"
        "        mlp = src.model.layers[i].mlp\n"
        "        assert torch.equal(experts.gate_up_proj[e], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))\n"
        "        assert torch.equal(experts.down_proj[e], mlp.down_proj.weight)\n"
        "    gate = moe.model.layers[i].mlp.gate.weight\n"
        "    assert torch.allclose(gate.norm(dim=-1), torch.ones(2), atol=1e-5)\n"
        "own = dict(moe.named_parameters())\n"
        "for k, v in base.named_parameters():\n"
        "    if '.mlp.' not in k:\n"
        "        assert torch.equal(own[k], v), k\n"
        f"AutoTokenizer.from_pretrained({str(tmp_path / 'native')!r})\n",
        tmp_path,
    )


def test_cli_upcycle_takes_several_sources_of_an_encoder_with_prompt_routers(tmp_path, capsys):
    from transformers import AutoModel

    tokenizer = sample_bpe_tokenizer()
    base, (a, b) = fine_tunes("bert", 2, vocab_size=len(tokenizer))
    paths = [_save(m, tmp_path / name, tokenizer) for m, name in ((base, "base"), (a, "a"), (b, "b"))]
    prompts = tmp_path / "prompts.yml"
    prompts.write_text("- ['How do I transfer money?']\n- {positive_prompts: ['A man rides a horse.'], "
                       "negative_prompts: ['My card was declined.']}\n")
    out = tmp_path / "moe"
    argv = ["upcycle", paths[1], paths[2], paths[1], paths[2], str(out), "--base", paths[0], "--num-experts", "4",
            "--init", "noise", "--router-init", "hidden", "--expert-prompts", str(prompts)]
    assert cli_main(argv) == 0
    capsys.readouterr()
    moe = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert moe.config.upcycling["expert_sources"] == paths[1:] * 2 and moe.config.num_local_experts == 4
    router = moe.encoder.layer[1].intermediate.gate.weight  # (4, H): experts in the sources' order
    torch.testing.assert_close(router.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(router[0], router[2])
    assert (out / "tokenizer.json").exists()


def _refused(capsys, argv, *words):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_bad_merges_are_refused_in_one_line_and_write_nothing(tmp_path, capsys):
    tokenizer = sample_bpe_tokenizer()
    base, (a,) = fine_tunes("llama", 1, vocab_size=len(tokenizer))
    llama = _save(a, tmp_path / "llama", tokenizer)
    base_path = _save(base, tmp_path / "base", tokenizer)
    bert = tiny_source("bert")
    bert.resize_token_embeddings(len(tokenizer))
    bert_path = _save(bert, tmp_path / "bert", tokenizer)
    small = tiny_source("llama")
    small_path = _save(small, tmp_path / "small", tokenizer)  # the vocabulary of 99 tokens of tiny_source
    out = tmp_path / "out"
    capsys.readouterr()

    _refused(capsys, ["upcycle", llama, bert_path, str(out)], "bert", "model type", "llama")
    _refused(capsys, ["upcycle", llama, small_path, str(out)], str(small_path), "vocabulary", str(VOCAB))

    def merge(text, *words):
        config = tmp_path / "bad.yml"
        config.write_text(text)
        _refused(capsys, ["merge", str(config), str(out)], *words)

    experts = f"experts:\n  - source_model: {llama}\n    positive_prompts: [a]\n" \
              f"  - source_model: {llama}\n    positive_prompts: [b]\n"
    merge(f"base_model: {base_path}\ngate_mode: softmax\n{experts}", "gate_mode", "softmax")
    merge(f"base_model: {base_path}\ngate_mode: hidden\nexperts_per_token: 1\nexperts:\n  - source_model: {llama}\n"
          f"    positive_prompts: nowhere.txt\n", "nowhere.txt", "does not exist")
    merge(f"base_model: {base_path}\nshared_experts:\n  - source_model: {llama}\n{experts}", "shared_experts")
    merge(f"base_model: {base_path}\narchitecture: qwen\n{experts}", "architecture", "qwen")
    merge(f"base_model: {base_path}\nmerge_method: slerp\n{experts}", "merge_method")
    merge(f"base_model: {bert_path}\ngate_mode: random\n{experts}", "model type")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_model_card_names_the_sources_the_base_and_the_router_init(tmp_path):
    from types import SimpleNamespace

    from hf_condcomp.training import write_model_card

    base, (a, b) = fine_tunes("llama", 2)
    a.config._name_or_path, b.config._name_or_path = "org/tune-a", "org/tune-b"
    moe = hf_condcomp.upcycle([a, b], base=base, layers="all")
    moe.config.upcycling["source"] = "org/base"
    settings = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                "num_train_epochs", "lr_scheduler_type", "num_warmup_steps", "weight_decay", "max_length", "seed",
                "mixed_precision", "lora_r", "lora_alpha", "lora_targets")
    args = SimpleNamespace(hub_model_id=None, output_dir=str(tmp_path), model_name_or_path="org/base",
                           export_format="remote", validation_file=None, test_file=None, max_train_samples=None,
                           max_eval_samples=None, **dict.fromkeys(settings))
    card = write_model_card(args, moe.config, {}, task_type="text-generation", task_name="causal-lm",
                            metrics={}, data_text="text")
    assert "from [`org/base`](https://huggingface.co/org/base)" in card.text  # the Hub repo it continued from
    assert "the dense fine-tunes `org/tune-a`, `org/tune-b`" in card.text
    assert "the base model `org/base`" in card.text and "routers initialised by `random`" in card.text
    assert card.data.base_model == "org/base"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_merge_exports_and_is_checked_in_its_dtype(tmp_path, capsys, monkeypatch, dtype):
    """bfloat16 through a mergekit YAML, float16 through `upcycle --dtype`: the export is written in that
    dtype and checked in it against the model loaded as a user loads it; a failed check is one line,
    exit status 2, nothing written. The heads are scaled so the logits reach a real model's (~30)."""
    from transformers import MixtralForCausalLM

    from hf_condcomp.exporters import VERIFY_TOLERANCE

    tokenizer = sample_bpe_tokenizer()
    base, tunes = fine_tunes("llama", 2, vocab_size=len(tokenizer))
    for model in (base, *tunes):
        with torch.no_grad():
            model.lm_head.weight.mul_(300)
    paths = [_save(m, tmp_path / name, tokenizer) for m, name in zip((base, *tunes), ("base", "a", "b"))]
    if dtype == "bfloat16":
        config = tmp_path / "moe.yml"
        config.write_text(f"base_model: {paths[0]}\ngate_mode: random\ndtype: {dtype}\nexperts_per_token: 2\n"
                          f"experts:\n  - source_model: {paths[1]}\n  - source_model: {paths[2]}\n")
        assert cli_main(["merge", str(config), str(tmp_path / "moe")]) == 0
    else:
        assert cli_main(["upcycle", *paths[1:], str(tmp_path / "moe"), "--base", paths[0], "--layers", "all",
                         "--dtype", dtype]) == 0
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "moe"), str(tmp_path / "native")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == dtype and result["architecture"] == "MixtralForCausalLM"

    ours = hf_condcomp.CondCompForCausalLM.from_pretrained(tmp_path / "moe", dtype="auto").eval()
    native = MixtralForCausalLM.from_pretrained(tmp_path / "native", dtype="auto").eval()
    assert ours.dtype == native.dtype == getattr(torch, dtype)
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ours(ids).logits.float(), native(ids).logits.float()
    atol, rtol = VERIFY_TOLERANCE[ours.dtype]
    assert expected.abs().max() > 10
    assert 0 < (got - expected).abs().max() <= atol + rtol * expected.abs().max()

    monkeypatch.setitem(VERIFY_TOLERANCE, ours.dtype, (0.0, 0.0))  # the check fails: said in one line
    assert cli_main(["export", str(tmp_path / "moe"), str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err and "differs from the model by" in errors[0], err
    assert f"in {dtype}" in errors[0] and "nothing written" in errors[0]
    assert not (tmp_path / "strict").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".strict")] == []
