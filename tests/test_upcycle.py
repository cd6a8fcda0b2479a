"""Upcycled models against their dense parents, on tiny random sources and the real checkpoints."""

import json
import subprocess
import sys

import pytest
import torch

import hf_condcomp
from hf_condcomp.cli import main as cli_main

from conftest import LAYERS, VOCAB, tiny_source

TOL = 1e-4


def _ids(batch=3, seq=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, -3:] = 0  # right padding in one row
    return ids, mask


def _outputs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize(
    "family,task",
    [
        ("bert", "base"),
        ("bert", "sequence-classification"),
        ("bert", "token-classification"),
        ("bert", "masked-lm"),
        ("gpt2", None),
        ("llama", None),
        ("mistral", None),
        ("qwen2", None),
        ("qwen3", None),
    ],
)
@pytest.mark.parametrize("layers", ["every_other", "all"])
def test_copy_upcycled_model_reproduces_its_dense_parent(family, task, layers):
    dense = tiny_source(family, task)
    moe = hf_condcomp.upcycle(dense, num_experts=8, top_k=2, layers=layers)
    expected_layers = list(range(LAYERS)) if layers == "all" else [1, 3]
    assert moe.config.moe_layers == expected_layers
    ids, mask = _ids()
    ref, out = _outputs(dense, ids, mask), _outputs(moe, ids, mask)
    keep = mask.bool() if ref.dim() == 3 and ref.shape[1] == ids.shape[1] else slice(None)
    assert (ref - out)[keep].abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_copy_upcycled_decoder_generates_the_same_tokens(family):
    dense = tiny_source(family)
    moe = hf_condcomp.upcycle(dense, num_experts=8, top_k=2)
    prompt = _ids(batch=1, seq=6)[0]
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(dense.generate(prompt, **kwargs), moe.generate(prompt, **kwargs))


@pytest.mark.parametrize("routing,top_k", [("token_choice", 1), ("token_choice", 2), ("expert_choice", 2)])
def test_upcycled_decoder_with_and_without_kv_cache_agree(routing, top_k):
    torch.manual_seed(0)
    moe = hf_condcomp.upcycle(tiny_source("llama"), top_k=top_k, routing=routing, init="noise", noise_std=0.5)
    prompt = _ids(batch=2, seq=5)[0]
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(moe.generate(prompt, use_cache=True, **kwargs), moe.generate(prompt, use_cache=False, **kwargs))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_expert_choice_decoder_does_not_leak_future_tokens_at_inference(family):
    moe = hf_condcomp.upcycle(tiny_source(family), routing="expert_choice", capacity_factor=2.0, init="noise",
                              noise_std=0.5)
    ids = _ids(batch=2, seq=10)[0]
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % VOCAB
    with torch.no_grad():
        a = moe(ids, output_router_logits=True)
        b = moe(changed, output_router_logits=True)
    torch.testing.assert_close(a.logits[:, :6], b.logits[:, :6])
    for la, lb in zip(a.router_logits, b.router_logits):
        torch.testing.assert_close(la.view(2, 10, -1)[:, :6], lb.view(2, 10, -1)[:, :6])
    # generation: the continuation of a prefix does not depend on what follows in other rows
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    full = moe.generate(ids[:, :6], **kwargs)
    single = moe.generate(ids[:1, :6], **kwargs)
    assert torch.equal(full[:1], single)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("init", ["split-random", "split-kmeans"])
def test_split_upcycling_with_top_k_equal_to_experts_reproduces_the_parent(family, init):
    dense = tiny_source(family)
    moe = hf_condcomp.upcycle(dense, num_experts=8, top_k=8, init=init)
    assert moe.config.moe_expert_intermediate_size == 40 // 8
    ids, mask = _ids()
    assert (_outputs(dense, ids, mask) - _outputs(moe, ids, mask))[mask.bool()].abs().max().item() <= TOL


def test_kmeans_split_groups_are_a_partition_and_beat_random_before_training():
    from hf_condcomp.upcycle import balanced_kmeans

    torch.manual_seed(0)
    points = torch.cat([torch.randn(10, 16) + 5 * torch.eye(16)[i] for i in range(4)])  # 4 clear clusters
    groups = balanced_kmeans(points, 4, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(groups).tolist()) == list(range(40))
    assert sorted(sorted(g.tolist()) for g in groups) == [list(range(i * 10, i * 10 + 10)) for i in range(4)]


def test_noise_and_drop_make_experts_differ():
    dense = tiny_source("bert")
    for init in ("noise", "drop"):
        moe = hf_condcomp.upcycle(dense, init=init)
        w = moe.encoder.layer[1].intermediate.experts.up_proj
        assert not torch.allclose(w[0], w[1])
    drop = hf_condcomp.upcycle(dense, init="drop", drop_ratio=0.5)
    w = drop.encoder.layer[1].intermediate.experts.up_proj
    ref = dense.encoder.layer[1].intermediate.dense.weight
    same_rows = (w[0] == ref).all(dim=-1).float().mean().item()
    assert same_rows == pytest.approx(0.5, abs=0.05)  # half of the neurons re-initialised


def test_upcycled_model_keeps_every_source_weight():
    dense = tiny_source("llama")
    moe = hf_condcomp.upcycle(dense, layers="1")
    ours = moe.state_dict()
    for key, value in dense.state_dict().items():
        if ".layers.1.mlp." in key:
            continue
        assert torch.equal(ours[key], value), key  # the source's own names
    w = ours["model.layers.1.mlp.experts.gate_up_proj"]
    ref = torch.cat([dense.model.layers[1].mlp.gate_proj.weight, dense.model.layers[1].mlp.up_proj.weight])
    for e in range(8):
        assert torch.equal(w[e], ref)
    assert moe.config.upcycling["init"] == "copy" and moe.config.upcycling["layers"] == [1]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_stay_tied_through_upcycling_and_reload(family, tied, tmp_path):
    """A tied parent gives a tied MoE: one matrix, trained once, saved once; an untied parent keeps
    its separate head. Tied but untied in memory, fine-tuning would train two copies and saving
    (which writes the tied matrix once) would silently drop one of them."""
    dense = tiny_source(family, tie_word_embeddings=tied)
    moe = hf_condcomp.upcycle(dense, num_experts=2, top_k=1, layers="all")
    assert moe.config.tie_word_embeddings is tied
    assert (moe.get_output_embeddings().weight is moe.get_input_embeddings().weight) is tied
    with torch.no_grad():  # a change to the embeddings must reach the head (tied) or not (untied)
        moe.get_input_embeddings().weight[3].add_(1.0)
    head, embed = moe.get_output_embeddings().weight, moe.get_input_embeddings().weight
    assert torch.equal(head[3], embed[3]) is tied
    moe.save_pretrained(tmp_path)
    reloaded = type(moe).from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.get_output_embeddings().weight, head, rtol=0, atol=0)
    torch.testing.assert_close(reloaded.get_input_embeddings().weight, embed, rtol=0, atol=0)
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) is tied


def test_aux_and_z_losses_are_added_to_the_classification_loss():
    dense = tiny_source("bert", "sequence-classification")
    moe = hf_condcomp.upcycle(dense, router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    ids, mask = _ids()
    labels = torch.tensor([0, 1, 2])
    moe.train()
    torch.manual_seed(0)
    out = moe(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    moe.eval()
    with torch.no_grad():
        task = torch.nn.functional.cross_entropy(moe(input_ids=ids, attention_mask=mask).logits, labels)
    assert len(out.router_logits) == len(moe.config.moe_layers)
    assert out.router_logits[0].shape == (3 * 9, 8)
    assert out.aux_loss is not None and out.z_loss is not None
    # dropout differs between train and eval, so compare with the train-mode task loss rebuilt
    rebuilt = torch.nn.functional.cross_entropy(out.logits, labels) + 0.5 * out.aux_loss + 0.1 * out.z_loss
    torch.testing.assert_close(out.loss, rebuilt)
    assert task.item() > 0


def test_real_minilm_copy_upcycle_reproduces_the_dense_model(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    dense = AutoModel.from_pretrained(minilm_path).eval()
    batch = tok(["A short sentence.", "A somewhat longer sentence that needs no padding at all here."], padding=True,
                return_tensors="pt")
    mask = batch["attention_mask"].bool()
    for kwargs in (dict(), dict(init="split-kmeans", top_k=8)):
        moe = hf_condcomp.upcycle("all-MiniLM-L6-v2", **kwargs)
        with torch.no_grad():
            diff = (dense(**batch).last_hidden_state - moe(**batch).last_hidden_state)[mask].abs().max().item()
        assert diff <= TOL, kwargs


def test_real_smollm2_copy_upcycle_reproduces_logits_and_greedy_generation(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    dense = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    moe = hf_condcomp.upcycle(dense, num_experts=8, top_k=2)
    assert type(moe._condcomp_source).__name__ == "LlamaForCausalLM" and len(moe.config.moe_layers) == 15
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (dense(ids).logits - moe(ids).logits).abs().max().item() <= TOL
    kwargs = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(dense.generate(ids, **kwargs), moe.generate(ids, **kwargs))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(top_k=9), r"`top_k`.*between 1 and `num_experts`=8, got 9"),
        (dict(num_experts=0), r"`num_experts`.*positive integer, got 0"),
        (dict(routing="random"), r"`routing`.*token_choice.*expert_choice.*'random'"),
        (dict(init="zeros"), r"`init`.*copy.*split-kmeans.*'zeros'"),
        (dict(layers=[0, 4]), r"`layers`.*index 4 out of range.*4 layers.*\[0, 3\]"),
        (dict(layers="odd"), r"`layers`.*every_other.*'odd'"),
        (dict(capacity_factor=0), r"`capacity_factor`.*> 0.*got 0"),
        (dict(capacity_factor=-1.5), r"`capacity_factor`.*> 0.*got -1.5"),
        (dict(task="causal-lm"), r"`task`='causal-lm' differs from the loaded model's own task 'base'"),
        (dict(init="split-random", num_experts=7), r"`init`='split-random'.*40 neurons.*`num_experts`=7"),
        # A misspelt override would otherwise become an unused config attribute.
        (dict(router_aux_los_coef=0.1), r"`router_aux_los_coef`=0.1 is not.*Did you mean `router_aux_loss_coef`"),
    ],
)
def test_bad_upcycling_arguments_raise_clear_value_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        hf_condcomp.upcycle(tiny_source("bert"), **kwargs)


def test_whole_numbers_are_accepted_for_float_settings():
    # YAML and command lines write `capacity_factor=2` and `router_aux_loss_coef=0` as ints.
    moe = hf_condcomp.upcycle(tiny_source("bert"), routing="expert_choice", capacity_factor=2, router_aux_loss_coef=0)
    assert moe.config.moe_capacity_factor == 2.0 and isinstance(moe.config.moe_capacity_factor, float)
    assert moe.config.router_aux_loss_coef == 0.0


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"`num_experts_per_tok`.*`num_local_experts`=4, got 5"):
        hf_condcomp.CondCompConfig(text_config=tiny_source("bert").config, num_local_experts=4, num_experts_per_tok=5)
    with pytest.raises(ValueError, match=r"`moe_capacity_factor` must be > 0"):
        hf_condcomp.CondCompConfig(text_config=tiny_source("llama").config, moe_capacity_factor=0.0)


def test_unsupported_source_architecture(tmp_path):
    from transformers import BloomConfig, PegasusConfig

    BloomConfig(vocab_size=99, hidden_size=32, n_layer=1, n_head=2).save_pretrained(tmp_path / "bloom")
    with pytest.raises(ValueError, match=r"unsupported source architecture `model_type`='bloom'.*supported are"):
        hf_condcomp.upcycle(str(tmp_path / "bloom"))
    PegasusConfig(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=40).save_pretrained(tmp_path / "pg")
    with pytest.raises(ValueError, match=r"unsupported encoder-decoder source `model_type`='pegasus'.*bart"):
        hf_condcomp.upcycle(str(tmp_path / "pg"))


def test_unreadable_source_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"`source`=.*nothing-here': no such folder"):  # a path: said as one
        hf_condcomp.upcycle(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match=r"`source`='no-such-org/no-such-model' could not be read"):  # a Hub id
        hf_condcomp.upcycle("no-such-org/no-such-model")


def test_cli_upcycle_writes_a_loadable_folder(tmp_path):
    src = tmp_path / "dense"
    tiny_source("gpt2").save_pretrained(src)
    out = tmp_path / "moe"
    assert cli_main(["upcycle", str(src), str(out), "--num-experts", "4", "--top-k", "1", "--layers", "0,2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["moe_layers"] == [0, 2]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_condcomp.CondCompForCausalLM"
    assert config["text_config"]["model_type"] == "gpt2"
    assert (out / "model.safetensors").exists() and (out / "modeling_condcomp.py").exists()


def test_cli_upcycle_sets_other_config_fields(tmp_path):
    src = tmp_path / "dense"
    tiny_source("bert").save_pretrained(src)
    out = tmp_path / "mod"
    argv = ["upcycle", str(src), str(out), "--variant", "mod", "--layers", "all", "--skipped-tokens-as-keys", "true",
            "--keep-pooled-token", "false", "--router-z-loss-coef", "0.01", "--set", "mod_aux_loss_coef=0.1"]
    assert cli_main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["skipped_tokens_as_keys"] is True and config["keep_pooled_token"] is False
    assert config["router_z_loss_coef"] == 0.01 and config["mod_aux_loss_coef"] == 0.1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--top-k", "9"], "`top_k`"),
        (["--routing", "random"], "`routing`"),
        (["--init", "zeros"], "`init`"),
        (["--layers", "0,7"], "`layers`"),
        (["--capacity-factor", "0"], "`capacity_factor`"),
        (["--set", "keep_pooled_tokn=false"], "`keep_pooled_tokn`=False is not"),
        (["--set", "no-equals-sign"], "`--set` takes FIELD=VALUE"),
        (["--set", "top_k=1"], "`top_k` has its own flag, use --top-k"),
        (["--set", "skipped_tokens_as_keys=true"], "use --skipped-tokens-as-keys"),
        (["--variant", "moed"], "`variant` must be one of"),
    ],
)
def test_failed_cli_upcycle_leaves_nothing_in_output_dir(tmp_path, args, message):
    src = tmp_path / "dense"
    tiny_source("bert").save_pretrained(src)
    out = tmp_path / "moe"
    result = subprocess.run(
        [sys.executable, "-m", "hf_condcomp.cli", "upcycle", str(src), str(out), *args], capture_output=True, text=True
    )
    assert result.returncode == 2 and message in result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # no temporary folder left either


def test_cli_refuses_a_non_empty_output_dir(tmp_path, capsys):
    src, out = tmp_path / "dense", tmp_path / "moe"
    tiny_source("bert").save_pretrained(src)
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert cli_main(["upcycle", str(src), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "user data"
