"""Encoder-decoder sources: transformers' own seq2seq model (T5, mT5, BART, mBART, Marian, M2M100)
with MoE blocks in the chosen layers of its encoder and decoder.

For every architecture: a tiny random dense model, copy-upcycled, gives the dense model's logits
(real tokens of a padded batch, fp32 <= 1e-4) and its greedy and beam-search tokens; saved, it loads
in a clean process without hf_condcomp and gives them again. Then per-stack layer choice, expert
choice (causal in the decoder at inference), a training step, the other inits and the refusals.
"""

import json
import re

import pytest
import torch
import transformers as T

from hf_condcomp import CondCompForConditionalGeneration, CondCompModel, upcycle
from hf_condcomp.modeling.modeling_condcomp import NativeMoEFeedForward
from hf_condcomp.upcycling.layers import parse_stack_layers

from conftest import run_clean_python, save_with_reference

V, H, I, NH = 99, 32, 64, 4
_T5 = dict(vocab_size=V, d_model=H, d_kv=8, d_ff=I, num_layers=2, num_decoder_layers=2, num_heads=NH,
           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
_BART = dict(vocab_size=V, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=NH,
             decoder_attention_heads=NH, encoder_ffn_dim=I, decoder_ffn_dim=I, max_position_embeddings=64,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)

ARCHS = {
    "t5": lambda: T.T5Config(**_T5, feed_forward_proj="relu"),
    "t5-gated": lambda: T.T5Config(**_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),  # v1.1, Flan
    "mt5": lambda: T.MT5Config(**_T5),
    "bart": lambda: T.BartConfig(**_BART),
    "mbart": lambda: T.MBartConfig(**_BART),
    "marian": lambda: T.MarianConfig(**{**_BART, "decoder_start_token_id": 1}),
    "m2m_100": lambda: T.M2M100Config(**_BART),  # NLLB's dense checkpoints are M2M100 models
}


def dense_model(name, seed=0):
    torch.manual_seed(seed)
    return T.AutoModelForSeq2SeqLM.from_config(ARCHS[name]()).eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding in the encoder
    decoder_ids = torch.randint(3, V, (2, 6), generator=g)
    return ids, mask, decoder_ids


def logits_of(model, ids, mask, decoder_ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits


def decode(model, ids, mask):
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
    return greedy, beams


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every architecture, copy-upcycled (4 experts, top-2, every layer of both stacks) and saved with
    its dense parent's reference outputs."""
    root = tmp_path_factory.mktemp("seq2seq")
    ids, mask, decoder_ids = batch()
    out = {}
    for name in ARCHS:
        dense = dense_model(name)
        model = upcycle(dense, num_experts=4, top_k=2, layers="all")
        greedy, beams = decode(dense, ids, mask)
        ref = {"ids": ids, "mask": mask, "decoder_ids": decoder_ids, "logits": logits_of(dense, ids, mask, decoder_ids),
               "greedy": greedy, "beams": beams}
        out[name] = save_with_reference(model, ref, root / name)
    return out


@pytest.mark.parametrize("name", list(ARCHS))
def test_copy_upcycle_is_the_dense_model(saved, name):
    model, ref, _ = saved[name]
    assert isinstance(model, CondCompForConditionalGeneration)
    assert model.config.moe_layers == model.config.decoder_moe_layers == [0, 1]
    assert sum(isinstance(m, NativeMoEFeedForward) for m in model.modules()) == 4
    torch.testing.assert_close(logits_of(model, ref["ids"], ref["mask"], ref["decoder_ids"]), ref["logits"],
                               atol=1e-4, rtol=0)
    greedy, beams = decode(model, ref["ids"], ref["mask"])
    assert torch.equal(greedy, ref["greedy"]) and torch.equal(beams, ref["beams"])


def test_saved_models_load_without_hf_condcomp(saved, tmp_path):
    """One clean interpreter loads every saved model through `trust_remote_code` and checks it against
    the dense parent's logits, greedy and beam-search tokens."""
    folders = {name: str(path) for name, (_, _, path) in saved.items()}
    code = f"""
import json, torch, transformers as T
folders = json.loads({json.dumps(json.dumps(folders))})
for name, path in folders.items():
    model = T.AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    ref = torch.load(path + "/reference.pt")
    with torch.no_grad():
        logits = model(input_ids=ref["ids"], attention_mask=ref["mask"], decoder_input_ids=ref["decoder_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0, msg=name)
    greedy = model.generate(ref["ids"], attention_mask=ref["mask"], max_new_tokens=5, do_sample=False)
    beams = model.generate(ref["ids"], attention_mask=ref["mask"], max_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(greedy, ref["greedy"]) and torch.equal(beams, ref["beams"]), name
print("ok", len(folders))
"""
    assert f"ok {len(ARCHS)}" in run_clean_python(code, cwd=tmp_path).stdout


def test_sampling_draws_what_the_dense_model_draws(saved):
    model, ref, _ = saved["bart"]
    dense = dense_model("bart")
    draws = []
    for m in (dense, model):
        torch.manual_seed(3)
        draws.append(m.generate(ref["ids"], attention_mask=ref["mask"], max_new_tokens=5, do_sample=True, top_k=20))
    assert torch.equal(*draws)


def test_a_saved_model_loads_as_the_base_model(saved):
    model, ref, path = saved["bart"]
    base = T.AutoModel.from_pretrained(path).eval()
    assert isinstance(base, CondCompModel) and sum(isinstance(m, NativeMoEFeedForward) for m in base.modules()) == 4
    kwargs = dict(input_ids=ref["ids"], attention_mask=ref["mask"], decoder_input_ids=ref["decoder_ids"])
    with torch.no_grad():
        torch.testing.assert_close(base(**kwargs).last_hidden_state, model.model(**kwargs).last_hidden_state,
                                   atol=0, rtol=0)


# --- layers per stack -----------------------------------------------------------------------

def test_layers_are_chosen_per_stack():
    assert parse_stack_layers("every_other", 4, 6) == ([1, 3], [1, 3, 5])
    assert parse_stack_layers("encoder:every_other,decoder:all", 4, 2) == ([1, 3], [0, 1])
    assert parse_stack_layers("encoder:0,2,decoder:1", 4, 2) == ([0, 2], [1])
    assert parse_stack_layers("decoder:0", 4, 2) == ([], [0])
    assert parse_stack_layers({"encoder": "all"}, 2, 2) == ([0, 1], [])
    for bad in ("encoder:0,encoder:1", "middle:0", "0,decoder:1", "decoder:5"):
        with pytest.raises(ValueError, match="layers"):
            parse_stack_layers(bad, 4, 2)
    model = upcycle(dense_model("t5"), num_experts=4, top_k=2, layers="encoder:every_other,decoder:all")
    assert (model.config.moe_layers, model.config.decoder_moe_layers) == ([1], [0, 1])
    assert model.config.upcycling["layers"] == {"encoder": [1], "decoder": [0, 1]}
    assert not model.config.ffn_layout["causal"] and model.config.decoder_ffn_layout["causal"]
    # T5's FFN follows the decoder's cross-attention: a layout of its own per stack
    assert (model.config.ffn_layout["module"], model.config.decoder_ffn_layout["module"]) == (
        "layer.1.DenseReluDense", "layer.2.DenseReluDense")


# --- routing and training -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["t5-gated", "bart"])
def test_expert_choice_is_causal_in_the_decoder_at_inference(name):
    model = upcycle(dense_model(name), num_experts=4, top_k=2, layers="all", routing="expert_choice")
    ids, mask, decoder_ids = batch()
    later = decoder_ids.clone()
    later[:, 4:] = (later[:, 4:] + 7) % V
    a, b = logits_of(model, ids, mask, decoder_ids), logits_of(model, ids, mask, later)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-5, rtol=0)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3
    greedy, beams = decode(model, ids, mask)
    assert greedy.shape[0] == beams.shape[0] == 2


@pytest.mark.parametrize("name,routing", [("t5-gated", "token_choice"), ("m2m_100", "expert_choice")])
def test_a_training_step_reaches_experts_and_routers_of_both_stacks(name, routing):
    model = upcycle(dense_model(name), num_experts=4, top_k=2, layers="all", routing=routing).train()
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    assert torch.isfinite(out.loss) and out.z_loss > 0
    assert (out.aux_loss is not None) == (routing == "token_choice")  # expert choice is balanced by construction
    assert len(out.router_logits) == 4 and out.router_logits[0].shape == (ids.numel(), 4)
    out.loss.backward()
    for stack in ("encoder", "decoder"):
        grads = {n: p.grad for n, p in model.named_parameters()
                 if f"{stack}." in n and (n.endswith(".gate.weight") or "experts" in n)}
        assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_router_losses_leave_each_stacks_padding_out():
    from hf_condcomp.modeling.routing import load_balancing_loss

    model = upcycle(dense_model("bart"), num_experts=4, top_k=2, layers="all")
    ids, mask, decoder_ids = batch()
    decoder_mask = torch.ones_like(decoder_ids)
    decoder_mask[0, -1] = 0
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask,
                output_router_logits=True)
    masks = [mask.reshape(-1).bool()] * 2 + [decoder_mask.reshape(-1).bool()] * 2
    real = tuple(logits[m] for logits, m in zip(out.router_logits, masks))
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(real, 4, 2))


@pytest.mark.parametrize("init", ["noise", "drop", "split-random", "split-kmeans"])
def test_every_init(init):
    """Split inits with every expert selected reproduce the dense FFN; noise and drop move away from it."""
    for name in ("t5-gated", "marian"):
        dense = dense_model(name)
        split = init.startswith("split")
        model = upcycle(dense, num_experts=4, top_k=4 if split else 2, layers="all", init=init)
        ids, mask, decoder_ids = batch()
        diff = (logits_of(model, ids, mask, decoder_ids) - logits_of(dense, ids, mask, decoder_ids)).abs().max()
        assert diff < 1e-4 if split else diff > 0


# --- refusals -------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [dict(variant="mod"), dict(variant="gate"), dict(mod_layers="all")])
def test_gated_variants_are_refused_naming_the_model_type(settings):
    with pytest.raises(ValueError, match=r"not supported on encoder-decoder models \(model type 't5'\)"):
        upcycle(dense_model("t5"), **settings)


def test_unsupported_encoder_decoder_architectures_are_refused_naming_the_type():
    config = T.PegasusConfig(**_BART)
    with pytest.raises(ValueError, match=r"unsupported encoder-decoder source `model_type`='pegasus'"):
        upcycle(T.PegasusForConditionalGeneration(config).eval())


def test_a_base_model_loads_as_the_seq2seq_model(tmp_path):
    """T5 keeps its base model's modules at the root of its task model (BART under `model.`): a base
    model's folder loads as the seq2seq model with every weight in place (T5's head is tied)."""
    dense = dense_model("t5")
    base = T.AutoModel.from_config(dense.config)
    base.load_state_dict({k: v for k, v in dense.state_dict().items() if not k.startswith("lm_head")})
    upcycle(base.eval(), num_experts=4, top_k=2, layers="all").save_pretrained(tmp_path)
    model = T.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    ids, mask, decoder_ids = batch()
    torch.testing.assert_close(logits_of(model, ids, mask, decoder_ids), logits_of(dense, ids, mask, decoder_ids),
                               atol=1e-4, rtol=0)


# --- native export --------------------------------------------------------------------------

def check_in_clean_process(model, tmp_path, folder, architecture):
    """The export in `tmp_path / folder` loads as `architecture` without hf_condcomp and gives `model`'s
    logits (<= 1e-4) and greedy tokens on a padded batch."""
    ids, mask, decoder_ids = batch()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.save({"ids": ids, "mask": mask, "decoder_ids": decoder_ids, "greedy": greedy,
                "logits": logits_of(model, ids, mask, decoder_ids)}, tmp_path / "ref.pt")
    run_clean_python(f"""
import torch, transformers
ref = torch.load({str(tmp_path / 'ref.pt')!r})
model = transformers.AutoModelForSeq2SeqLM.from_pretrained({str(tmp_path / folder)!r}).eval()  # no remote code
assert type(model).__name__ == "{architecture}", type(model)
with torch.no_grad():
    logits = model(input_ids=ref["ids"], attention_mask=ref["mask"], decoder_input_ids=ref["decoder_ids"]).logits
torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)
greedy = model.generate(ref["ids"], attention_mask=ref["mask"], max_new_tokens=5, do_sample=False)
assert torch.equal(greedy, ref["greedy"]), (greedy, ref["greedy"])
""", cwd=tmp_path)


def test_a_t5_moe_weighted_by_the_router_probability_exports_as_switch_transformers(tmp_path):
    from hf_condcomp.export import export_native

    model = upcycle(dense_model("t5"), num_experts=4, top_k=1, norm_topk_prob=False, init="noise",
                    layers="encoder:every_other,decoder:all")
    model.save_pretrained(tmp_path / "ours")
    result = export_native(tmp_path / "ours", tmp_path / "switch")
    assert result["architecture"] == "SwitchTransformersForConditionalGeneration" and result["max_abs_diff"] <= 1e-4
    assert not list((tmp_path / "switch").glob("*.py")), "a native export carries no code"
    check_in_clean_process(model, tmp_path, "switch", "SwitchTransformersForConditionalGeneration")


def test_what_switch_transformers_does_not_compute_is_refused_and_nothing_written(tmp_path):
    import subprocess
    import sys

    from hf_condcomp.export import ExportError, choose_format

    copy_top1 = upcycle(dense_model("t5"), num_experts=4, top_k=1, layers="all")  # expert weighted by 1
    copy_top1.save_pretrained(tmp_path / "ours")
    proc = subprocess.run([sys.executable, "-m", "hf_condcomp.cli", "export", str(tmp_path / "ours"),
                           str(tmp_path / "switch")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "weights it by the router probability" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "switch").exists()
    for name, settings, feature in [
        ("t5-gated", dict(top_k=1, norm_topk_prob=False), "gated FFN"),
        ("t5", dict(top_k=2), "top-2 routing"),
        ("t5", dict(top_k=1, norm_topk_prob=False, layers="encoder:0"), "encoder MoE layers [0]"),
        ("bart", dict(top_k=2), "upcycled from 'bart'"),
    ]:
        config = upcycle(dense_model(name), num_experts=4, **{"layers": "all", **settings}).config
        with pytest.raises(ExportError, match=re.escape(feature)):
            choose_format(config)


def test_an_m2m100_top2_moe_exports_as_nllb_moe(tmp_path):
    from hf_condcomp.export import export_native

    model = upcycle(dense_model("m2m_100"), num_experts=4, top_k=2, layers="encoder:every_other,decoder:all")
    model.save_pretrained(tmp_path / "ours")
    result = export_native(tmp_path / "ours", tmp_path / "nllb")
    assert result["architecture"] == "NllbMoeForConditionalGeneration" and result["max_abs_diff"] <= 1e-4
    config = json.loads((tmp_path / "nllb" / "config.json").read_text())
    assert (config["encoder_sparse_step"], config["decoder_sparse_step"]) == (2, 1)
    check_in_clean_process(model, tmp_path, "nllb", "NllbMoeForConditionalGeneration")


def test_nllb_moe_computes_distinct_experts_only_where_it_dispatches_by_expert_id(tmp_path, monkeypatch):
    """transformers' NllbMoeExperts sends each token's weights to expert_1 and expert_0 whatever its router
    picked: a noise-upcycled model is refused naming that; under an exact dispatch it exports within 1e-4."""
    import subprocess
    import sys

    from transformers.models.nllb_moe import modeling_nllb_moe as nllb

    from hf_condcomp.export import export_native
    from hf_condcomp.exporters.nllb_moe import nllb_moe_dispatches_by_expert

    model = upcycle(dense_model("m2m_100"), num_experts=4, top_k=2, layers="encoder:every_other,decoder:all",
                    init="noise")
    model.save_pretrained(tmp_path / "ours")
    if not nllb_moe_dispatches_by_expert():
        proc = subprocess.run([sys.executable, "-m", "hf_condcomp.cli", "export", str(tmp_path / "ours"),
                               str(tmp_path / "nllb")], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and "not by expert id" in proc.stderr, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]  # after a progress bar of the weights
        assert len(errors) == 1 and not (tmp_path / "nllb").exists()

    def exact(self, hidden_states, router_mask, router_probs):  # each token to the experts of its weights
        out = torch.zeros_like(hidden_states)
        for j in range(self.num_experts):
            rows = router_probs[:, j].nonzero().squeeze(-1)
            out.index_add_(0, rows, self[f"expert_{j}"](hidden_states[rows]) * router_probs[rows, j, None])
        return out

    monkeypatch.setattr(nllb.NllbMoeExperts, "forward", exact)
    assert nllb_moe_dispatches_by_expert()
    result = export_native(tmp_path / "ours", tmp_path / "exact")
    assert result["format"] == "nllb_moe" and result["max_abs_diff"] <= 1e-4


def test_what_nllb_moe_does_not_compute_is_refused_and_nothing_written(tmp_path):
    import subprocess
    import sys

    from hf_condcomp.export import ExportError, choose_format

    upcycle(dense_model("m2m_100"), num_experts=4, top_k=1, layers="all").save_pretrained(tmp_path / "ours")
    proc = subprocess.run([sys.executable, "-m", "hf_condcomp.cli", "export", str(tmp_path / "ours"),
                           str(tmp_path / "nllb")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "top-1 routing: NLLB-MoE routes top-2" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "nllb").exists()
    for settings, feature in [
        (dict(layers="encoder:0"), "encoder MoE layers [0] of 2"),
        (dict(norm_topk_prob=False), "renormalised over the two"),
        (dict(routing="expert_choice"), "`moe_routing`='expert_choice'"),
        (dict(capacity_factor=1.0), "`moe_capacity_factor`=1.0"),
        (dict(top_k=3), "top-3 routing"),
    ]:
        config = upcycle(dense_model("m2m_100"), num_experts=4, **{"layers": "all", "top_k": 2, **settings}).config
        with pytest.raises(ExportError, match=re.escape(feature)):
            choose_format(config)
    config = upcycle(dense_model("m2m_100"), num_experts=4, top_k=2, layers="all").config
    assert choose_format(config) == "nllb_moe"
    with pytest.raises(ExportError, match="not the architecture of a model upcycled from 'm2m_100'"):
        choose_format(config, "switch_transformers")
