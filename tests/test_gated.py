"""Gated-layer variants: Mixture-of-Depths routed blocks and compute-allocation gates.

Checked against references: the dense parent (capacity 1, gates open), the exact per-token count
ceil(c * n) of tokens reaching a routed block (forward hooks), teacher-forced eval forwards vs
`generate()` with and without the KV cache, and a clean process loading through remote code.
"""

import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))

import hf_condcomp  # noqa: E402
from hf_condcomp.modeling.architectures import find_layers  # noqa: E402
from hf_condcomp.modeling.mixture_of_depths import routed_token_count, top_capacity  # noqa: E402

VOCAB, HIDDEN, INTER, LAYERS, HEADS = 99, 32, 40, 3, 4
FAMILIES = ("bert", "gpt2", "llama")
ENCODERS = ("bert", "roberta")


def dense_source(family, seed=0):
    """A tiny random dense transformers model (vocab 99, hidden 32, 3 layers)."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=INTER)
        return BertModel(config).eval()
    if family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return GPT2LMHeadModel(config).eval()
    if family == "roberta":  # RoBERTa's position ids (from the padding index on)
        from transformers import RobertaConfig, RobertaModel

        config = RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, intermediate_size=INTER, pad_token_id=1)
        return RobertaModel(config).eval()
    if family == "qwen3":  # per-head query/key norms
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             num_key_value_heads=2, intermediate_size=INTER, head_dim=16, bos_token_id=0,
                             eos_token_id=0, pad_token_id=0)
        model = Qwen3ForCausalLM(config).eval()
        for layer in model.model.layers:  # norms away from 1, so that a dropped norm shows
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.data.uniform_(0.5, 1.5)
        return model
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=2, intermediate_size=INTER, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def batch(family, B=3, T=9, seed=1):
    """Token ids and a padding mask: right padding for BERT, left padding for the decoders."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if family in ENCODERS:
        mask[1, 6:] = 0
    else:
        mask[1, :3] = 0
    return ids, mask


def dense_output(family, dense, ids, mask, **kwargs):
    """The dense parent's output on the same call (positions 0..T-1 in both, as transformers' decoders
    count them unless `position_ids` are passed)."""
    out = dense(ids, attention_mask=mask, **kwargs)
    return out if kwargs.get("output_hidden_states") else main_output(family, out)


def pooled_tokens(family, mask):
    """(B, T) bool: the tokens a pooling head reads, which gated layers always compute
    (`keep_pooled_token`): [CLS] of the BERT models here (they keep BertModel's pooler)."""
    pinned = torch.zeros(mask.shape, dtype=torch.bool)
    if family in ENCODERS:
        pinned[:, 0] = True
    return pinned


def main_output(family, out):
    return out.last_hidden_state if family in ENCODERS else out.logits


def layers_of(model):
    return find_layers(model, model.config.num_hidden_layers)[1]


def randomize_decisions(model, std=0.5, seed=0):
    """Give routers, predictors and gates random weights so that decisions are mixed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("mod_router", "mod_predictor", "compute_gate.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def calibrate_predictors(model, ids, mask):
    """Centre each causal predictor on the batch (bias = -median logit), layer after layer, so that
    eval-mode routing keeps about half the tokens, as a trained predictor at capacity 0.5 would."""
    real = mask.bool()
    for i, layer in enumerate(layers_of(model)):
        if getattr(layer, "mod_predictor", None) is None:
            continue
        with torch.no_grad():
            hidden = model(ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[i]
            layer.mod_predictor.b_out -= layer.mod_predictor(hidden)[real].median()


# --- At capacity 1 and with open gates the model is its dense parent -------------------------------


@pytest.mark.parametrize("family", FAMILIES + ("roberta", "qwen3"))
@pytest.mark.parametrize("setup", ["mod", "gate", "moe+mod"])
def test_capacity_one_and_open_gates_equal_dense_parent(family, setup):
    dense = dense_source(family)
    if setup == "mod":
        model = hf_condcomp.upcycle(dense, variant="mod", capacity=1.0, layers="all")
    elif setup == "gate":  # sigmoid(20) rounds to 1 in fp32: fully open
        model = hf_condcomp.upcycle(dense, variant="gate", layers="all", threshold=0.5, gate_init_bias=20.0)
    else:  # copy-upcycled MoE FFNs (odd layers) with routed depth everywhere
        model = hf_condcomp.upcycle(dense, variant="moe", num_experts=4, top_k=2, mod_layers="all", capacity=1.0)
    ids, mask = batch(family)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        got, ref = main_output(family, out), dense_output(family, dense, ids, mask)
    real = mask.bool()
    assert (got - ref)[real].abs().max().item() <= 1e-4
    assert out.compute_fraction == 1.0
    assert set(out.layer_compute_fractions) == set(range(LAYERS))


@pytest.mark.parametrize("family", FAMILIES)
def test_default_gate_init_scales_each_update_by_sigmoid_bias(family):
    """With `gate_init_bias`=b (default 4) every token starts at a = sigmoid(b) = 0.982: a gated
    layer outputs x + a * (f(x) - x) exactly, which is the stated tolerance to the dense parent."""
    dense = dense_source(family)
    model = hf_condcomp.upcycle(dense, variant="gate", layers=[0], threshold=0.5)
    assert model.config.gate_init_bias == 4.0
    ids, mask = batch(family)
    with torch.no_grad():
        ref = dense_output(family, dense, ids, mask, output_hidden_states=True).hidden_states
        got = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    a = torch.sigmoid(torch.tensor(4.0))
    expected = ref[0] + a * (ref[1] - ref[0])
    torch.testing.assert_close(got[1][mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


def test_minilm_routed_at_capacity_one_equals_parent(minilm):
    from transformers import AutoModel, AutoTokenizer

    path = hf_condcomp.assets.minilm_path()
    dense = AutoModel.from_pretrained(path).eval()
    model = hf_condcomp.upcycle("all-MiniLM-L6-v2", variant="mod", capacity=1.0, layers="all")
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["Routed depth spends compute where it is needed.", "A short one."], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model(**enc).last_hidden_state
        ref = dense(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    assert (got - ref)[real].abs().max().item() <= 1e-4
    assert model.config.mod_layers == list(range(6))


@pytest.fixture(scope="module")
def minilm():
    return hf_condcomp.assets.minilm_path()


# --- Routed blocks run on exactly ceil(c * n) tokens per sequence -----------------------------------


def count_tokens_reaching(layers):
    """Per routed or gated layer and call: the real tokens per sequence it ran on (its router's or
    gate's record) and the width of the sub-batch its first projection saw (the attention's query
    or fused q/k/v)."""
    from transformers.pytorch_utils import Conv1D

    seen, widths, handles = {}, {}, []
    for i, layer in enumerate(layers):
        part = layer._modules.get("mod_router") or layer._modules.get("compute_gate")
        if part is None:
            continue
        part.record_routing = True
        part.routing_log = []
        seen[i] = part.routing_log
        first = next(m for m in layer.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
        handles.append(first.register_forward_pre_hook(
            lambda m, args, i=i: widths.setdefault(i, []).append(args[0].shape[1])))
    return seen, widths, handles


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("capacity", [0.25, 0.5])
def test_routed_block_runs_on_exactly_ceil_capacity_tokens(family, capacity):
    # MoE FFNs in odd layers inside routed blocks: they must see only the routed tokens too.
    model = hf_condcomp.upcycle(dense_source(family), variant="moe", num_experts=4, top_k=2, layers="every_other",
                                mod_layers="all", capacity=capacity)
    randomize_decisions(model)
    ids, mask = batch(family)
    real_per_seq = mask.sum(-1).tolist()  # [9, 6, 9]
    expected = [math.ceil(capacity * n) for n in real_per_seq]
    assert expected == [routed_token_count(n, capacity) for n in real_per_seq]
    # Top-k decides in training for every family and in eval for the (non-causal) encoder.
    modes = (True, False) if family == "bert" else (True,)
    for train in modes:
        model.train(train)
        for m in model.modules():
            if hasattr(m, "record_routing") and hasattr(m, "experts"):
                m.record_routing = True
        seen, widths, handles = count_tokens_reaching(layers_of(model))
        out = model(ids, attention_mask=mask, output_router_logits=True)
        for h in handles:
            h.remove()
        assert sorted(seen) == list(range(LAYERS))
        for i, calls in seen.items():
            assert [c.sum(-1).tolist() for c in calls] == [expected], (i, calls)
            assert widths[i] == [max(expected)], (i, widths[i])  # only the routed tokens were computed
            assert out.layer_compute_fractions[i] == pytest.approx(sum(expected) / sum(real_per_seq))
            moe = next((m for m in layers_of(model)[i].modules() if hasattr(m, "last_routing")), None)
            if hasattr(moe, "experts"):
                assert moe.last_routing["num_tokens"] == sum(expected)
        assert out.compute_fraction == pytest.approx(sum(expected) / sum(real_per_seq))
        assert torch.isfinite(out.aux_loss) and torch.isfinite(out.z_loss)
        assert sum(r.shape[0] for r in out.router_logits) == sum(expected) * len(model.config.moe_layers)
        if train:
            main_output(family, out).float().pow(2).mean().backward()
            for i in model.config.mod_layers:  # the router scales the update, so it learns
                assert layers_of(model)[i].mod_router.weight.grad.abs().sum() > 0
            model.zero_grad()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_predictor_is_trained_on_stop_gradient_and_decides_in_eval(family):
    model = hf_condcomp.upcycle(dense_source(family), variant="mod", capacity=0.5, layers="all", mod_aux_loss_coef=0.1)
    randomize_decisions(model)
    ids, mask = batch(family)
    model.train()
    out = model(ids, attention_mask=mask)
    assert out.compute_loss is not None and out.compute_loss > 0
    out.compute_loss.backward()
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad == ("mod_predictor" in name), name  # the aux loss reaches only the predictors
    model.zero_grad()
    model.eval()
    calibrate_predictors(model, ids, mask)
    seen, _, handles = count_tokens_reaching(layers_of(model))
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    kept = 0
    for i, layer in enumerate(layers_of(model)):
        with torch.no_grad():
            decided = (layer.mod_predictor(hidden[i]) > 0) & mask.bool()  # p > 0.5, not the top-k
        assert [c.sum(-1).tolist() for c in seen[i]] == [decided.sum(-1).tolist()]
        kept += decided.sum().item()
    assert 0 < kept < LAYERS * mask.sum().item()


# --- Compute-allocation gates -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_penalise_allocation_in_training_and_skip_below_threshold(family):
    model = hf_condcomp.upcycle(dense_source(family), variant="gate", layers="all", compute_penalty=0.3, threshold=0.5,
                                gate_init_bias=0.0)
    randomize_decisions(model, std=0.5)
    ids, mask = batch(family)
    real = mask.bool()
    layers = layers_of(model)

    model.train()
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        allocations = [layers[i].compute_gate(out.hidden_states[i])[real] for i in range(LAYERS)]
    expected_penalty = 0.3 * torch.stack([a.mean() for a in allocations]).mean()
    torch.testing.assert_close(out.compute_loss.detach(), expected_penalty)
    assert out.compute_fraction == 1.0

    model.eval()
    seen, _, handles = count_tokens_reaching(layers)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    for h in handles:
        h.remove()
    total = 0
    for i in range(LAYERS):
        x, y = out.hidden_states[i], out.hidden_states[i + 1]
        keep = ((layers[i].compute_gate(x) >= 0.5) | pooled_tokens(family, mask)) & real
        assert [c.sum(-1).tolist() for c in seen[i]] == [keep.sum(-1).tolist()]
        skipped = real & ~keep
        if family == "bert" or i < LAYERS - 1:  # (decoders' last entry is after the final norm)
            assert torch.equal(y[skipped], x[skipped])  # skipped tokens pass unchanged
        assert out.layer_compute_fractions[i] == pytest.approx(keep.sum().item() / real.sum().item())
        total += keep.sum().item()
    assert 0 < total < LAYERS * real.sum().item()  # the check saw both decisions
    assert out.compute_fraction == pytest.approx(total / (LAYERS * real.sum().item()))


def without_dropout(dense):
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "attention_dropout"):
        if hasattr(dense.config, name):
            setattr(dense.config, name, 0.0)
    return dense


@pytest.mark.parametrize("family", FAMILIES)
def test_straight_through_gates_train_on_the_inference_forward(family):
    """Default gate training applies the inference decision (skipped tokens: no update, hidden from
    the others' attention), so a trained gate does not meet a different network at inference."""
    model = hf_condcomp.upcycle(without_dropout(dense_source(family)), variant="gate", layers="all", threshold=0.5,
                                compute_penalty=0.0, gate_init_bias=0.0)
    assert model.config.gate_straight_through is True
    randomize_decisions(model, std=0.5)
    ids, mask = batch(family)
    real = mask.bool()
    model.eval()
    with torch.no_grad():
        inference = model(ids, attention_mask=mask)
    assert 0 < inference.compute_fraction < 1  # mixed decisions
    model.train()
    training = model(ids, attention_mask=mask)
    torch.testing.assert_close(main_output(family, training)[real], main_output(family, inference)[real])

    # Soft training (the opt-out) runs another network: every token updated, scaled by a.
    model.config.gate_straight_through = False
    with torch.no_grad():
        soft = model(ids, attention_mask=mask)
    assert not torch.allclose(main_output(family, soft)[real], main_output(family, inference)[real])


@pytest.mark.parametrize("family", FAMILIES)
def test_straight_through_gives_skipped_tokens_a_gradient(family):
    """A layer whose gate skips every token still gets the soft gate's gradient, so it can reopen."""
    model = hf_condcomp.upcycle(without_dropout(dense_source(family)), variant="gate", layers=[1], threshold=0.5,
                                compute_penalty=0.0, gate_init_bias=-3.0)  # a = 0.047 < 0.5 everywhere
    ids, mask = batch(family)
    model.eval()
    with torch.no_grad():
        fraction = model(ids, attention_mask=mask).layer_compute_fractions[1]
    assert fraction == pooled_tokens(family, mask)[mask.bool()].float().mean().item()  # 0, or [CLS] only
    model.train()
    out = model(ids, attention_mask=mask)
    main_output(family, out)[mask.bool()].square().mean().backward()
    gate = layers_of(model)[1].compute_gate
    assert gate.bias.grad is not None and gate.bias.grad.abs().item() > 0
    assert gate.weight.grad.abs().sum().item() > 0


# --- The token a pooling head reads runs through every gated layer -----------------------------------


def cls_routing(model, ids, mask):
    """Per gated layer, the (B, T) bool tokens it computed in one forward (recorded routing)."""
    modules = [getattr(layer, "mod_router", None) or layer.compute_gate for layer in layers_of(model)]
    for m in modules:
        m.record_routing, m.routing_log = True, []
    with torch.no_grad():
        model(ids, attention_mask=mask)
    return [m.routing_log[-1] for m in modules]


@pytest.mark.parametrize("variant", ["mod", "gate"])
def test_pooled_cls_token_runs_through_every_gated_layer(variant):
    """BERT's pooler reads [CLS]: a routed block gives it one of its ceil(c * n) places and a gate
    never skips it (`keep_pooled_token`, default); without it the router can drop [CLS], and skipped
    tokens give the router no gradient to learn it back."""
    ids, mask = batch("bert", B=4, T=12, seed=3)
    real = mask.bool()
    if variant == "mod":
        kwargs = dict(variant="mod", capacity=0.25, layers="all")
    else:  # bias -3 and random weights: the gates open for some tokens only
        kwargs = dict(variant="gate", layers="all", threshold=0.5, gate_init_bias=-3.0)
    model = hf_condcomp.upcycle(dense_source("bert"), **kwargs).eval()
    randomize_decisions(model, std=0.5, seed=1)
    assert model.config.keep_pooled_token is True

    pinned = cls_routing(model, ids, mask)
    model.config.keep_pooled_token = False
    free = cls_routing(model, ids, mask)
    assert all(bool(keep[:, 0].all()) for keep in pinned)
    assert not all(bool(keep[:, 0].all()) for keep in free)  # the check is not vacuous: [CLS] was dropped
    for with_cls, without in zip(pinned, free):
        if variant == "mod":  # the same budget: [CLS] takes a place, it does not add one
            expected = [routed_token_count(int(n), 0.25) for n in real.sum(-1)]
            assert with_cls.sum(-1).tolist() == expected == without.sum(-1).tolist()
        else:  # the gate's own decisions stand for the other tokens
            assert torch.equal(with_cls[:, 1:], without[:, 1:])


def test_heads_reading_every_token_pin_none():
    """A masked-LM head reads every position, so no token is pinned: a closed gate skips them all."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    dense = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                       num_attention_heads=HEADS, intermediate_size=INTER)).eval()
    model = hf_condcomp.upcycle(dense, variant="gate", layers=[1], threshold=0.5, gate_init_bias=-3.0).eval()
    ids, mask = batch("bert")
    with torch.no_grad():
        assert model(ids, attention_mask=mask).layer_compute_fractions[1] == 0.0


# --- Encoders: skipped tokens can stay visible as keys ------------------------------------------------


@pytest.mark.parametrize("variant", ["mod", "gate"])
def test_skipped_tokens_as_keys_give_routed_tokens_the_dense_update(variant):
    """With `skipped_tokens_as_keys` a routed token attends to every real token, so its update is
    exactly the full layer's for that token; skipped tokens pass unchanged and their key/value
    projections are counted in the executed compute."""
    ids, mask = batch("bert", B=3, T=10, seed=4)
    real = mask.bool()
    kwargs = (dict(variant="mod", capacity=0.5) if variant == "mod"
              else dict(variant="gate", threshold=0.5, gate_init_bias=0.0))
    dense = without_dropout(dense_source("bert"))
    model = hf_condcomp.upcycle(dense, layers=[1], skipped_tokens_as_keys=True, **kwargs)
    model.eval()
    randomize_decisions(model, std=0.5, seed=2)
    layer = layers_of(model)[1]
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        x, y = out.hidden_states[1], out.hidden_states[2]
        padding = torch.where(real[:, None, None, :], 0.0, torch.finfo(x.dtype).min)
        full = dense.encoder.layer[1](x, attention_mask=padding)  # the dense layer over every real token
        if variant == "mod":
            scale = 2 * torch.sigmoid(layer.mod_router(x))
            keep = top_capacity(layer.mod_router(x), real, 0.5, pooled_tokens("bert", mask))
        else:
            scale = layer.compute_gate(x)
            keep = ((scale >= 0.5) | pooled_tokens("bert", mask)) & real
    skipped = real & ~keep
    assert keep.any() and skipped.any()
    expected = x + scale.unsqueeze(-1) * (full - x)
    torch.testing.assert_close(y[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(y[skipped], x[skipped])
    H = HIDDEN
    share = 2 * H * H / (4 * H * H + 2 * H * INTER)
    n = real.sum(-1)
    expected_fraction = (keep.sum() + share * ((n - keep.sum(-1)) * (keep.sum(-1) > 0)).sum()) / real.sum()
    assert out.layer_compute_fractions[1] == pytest.approx(expected_fraction.item())

    # Hidden skipped tokens (the default, as in Raposo et al.) give the routed tokens other updates.
    model.config.skipped_tokens_as_keys = False
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    assert not torch.allclose(hidden[keep], y[keep], atol=1e-4)

    if variant == "gate":  # straight-through training runs the same network as inference
        model.config.skipped_tokens_as_keys = True
        model.train()
        training = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(training[real], y[real])


def test_skipped_tokens_as_keys_is_refused_for_decoders():
    with pytest.raises(ValueError, match=r"`skipped_tokens_as_keys`=True is supported for encoders only, got model "
                                         r"type 'gpt2'.*leave it False"):
        hf_condcomp.upcycle(dense_source("gpt2"), variant="mod", skipped_tokens_as_keys=True)


# --- Decoders: causal decisions, generate() with and without the cache ----------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", ["mod", "gate", "moe+mod"])
def test_generate_is_causal_and_cache_consistent(family, variant):
    dense = dense_source(family)
    if variant == "mod":
        model = hf_condcomp.upcycle(dense, variant="mod", capacity=0.5, layers="all")
    elif variant == "gate":
        model = hf_condcomp.upcycle(dense, variant="gate", layers="all", threshold=0.5, gate_init_bias=0.0)
    else:
        model = hf_condcomp.upcycle(dense, variant="moe", num_experts=4, top_k=2, mod_layers="0,2", capacity=0.5)
    randomize_decisions(model, std=0.5)
    model.eval()
    ids, mask = batch(family, B=2, T=6)
    calibrate_predictors(model, *batch(family, B=4, T=16, seed=2))
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    routers = [getattr(layer, "mod_router", None) or layer.compute_gate for layer in layers_of(model)
               if hasattr(layer, "mod_router") or hasattr(layer, "compute_gate")]
    for r in routers:
        r.record_routing = True
    cached = model.generate(ids, attention_mask=mask, use_cache=True, **gen)
    step_routing = [torch.cat(r.routing_log, dim=1) for r in routers]  # (B, prompt + new - 1) per layer
    for r in routers:
        r.routing_log.clear()
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **gen)
    for r in routers:
        r.routing_log.clear()
    assert torch.equal(cached.sequences, uncached.sequences)

    # A teacher-forced eval forward over the generated text makes the same decisions and logits.
    seq = cached.sequences
    full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    # Positions over the real tokens, as generate() derives them from the attention mask.
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(seq, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    forced_routing = [r.routing_log.pop() for r in routers]
    P = ids.shape[1]
    for step, step_logits in enumerate(cached.logits):
        torch.testing.assert_close(step_logits, logits[:, P - 1 + step], atol=1e-4, rtol=1e-4)
    decided = torch.stack([r.float().mean() for r in step_routing])
    assert 0 < decided.mean() < 1  # mixed decisions, not all-or-nothing
    for during, forced in zip(step_routing, forced_routing):
        assert torch.equal(during, forced[:, :-1])

    # Changing future tokens changes nothing at earlier positions: outputs and routing.
    cut = P + 3
    changed = seq.clone()
    changed[:, cut:] = (changed[:, cut:] + 7) % (VOCAB - 1) + 1
    with torch.no_grad():
        changed_logits = model(changed, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    changed_routing = [r.routing_log.pop() for r in routers]
    torch.testing.assert_close(changed_logits[:, :cut], logits[:, :cut], atol=1e-5, rtol=1e-5)
    for a, b in zip(changed_routing, forced_routing):
        assert torch.equal(a[:, :cut], b[:, :cut])


# --- Save and reload through remote code ------------------------------------------------------------------


def test_gated_models_reload_through_remote_code_with_identical_outputs(tmp_path):
    models = {
        "bert_mod": hf_condcomp.upcycle(dense_source("bert"), variant="mod", capacity=0.5, layers="all"),
        "gpt2_moe_mod": hf_condcomp.upcycle(dense_source("gpt2"), variant="moe", num_experts=4, top_k=2,
                                            mod_layers="all", capacity=0.5),
        "llama_gate": hf_condcomp.upcycle(dense_source("llama"), variant="gate", layers="every_other",
                                          threshold=0.5, gate_init_bias=0.0),
    }
    script = ["import sys; sys.modules['hf_condcomp'] = None  # importing it raises ImportError",
              "import torch, transformers"]
    for name, model in models.items():
        randomize_decisions(model)
        model.save_pretrained(tmp_path / name)
        family = name.split("_")[0]
        ids, mask = batch(family)
        with torch.no_grad():
            expected = main_output(family, model(ids, attention_mask=mask))
        torch.save({"ids": ids, "mask": mask, "expected": expected}, tmp_path / f"{name}.pt")
        auto = "AutoModel" if family == "bert" else "AutoModelForCausalLM"
        key = "last_hidden_state" if family == "bert" else "logits"
        script += [
            f"m = transformers.{auto}.from_pretrained({str(tmp_path / name)!r}, trust_remote_code=True).eval()",
            "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__",
            f"d = torch.load({str(tmp_path / (name + '.pt'))!r})",
            "with torch.no_grad():",
            f"    got = m(d['ids'], attention_mask=d['mask']).{key}",
            "torch.testing.assert_close(got, d['expected'], atol=1e-6, rtol=1e-6)",
        ]
        if family != "bert":
            prompt = torch.tensor([[5, 6, 7, 8]])
            tokens = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0).tolist()
            script.append(
                "assert m.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, do_sample=False, "
                f"pad_token_id=0).tolist() == {tokens!r}"
            )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


# --- Bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field,value,allowed", [
    (dict(variant="mod", capacity=0.0), "capacity", "0.0", "(0, 1]"),
    (dict(variant="mod", capacity=1.5), "capacity", "1.5", "(0, 1]"),
    (dict(variant="gate", compute_penalty=-0.1), "compute_penalty", "-0.1", ">= 0"),
    (dict(variant="gate", threshold=1.2), "threshold", "1.2", "[0, 1]"),
    (dict(variant="gate", threshold=-0.5), "threshold", "-0.5", "[0, 1]"),
])
def test_bad_gating_arguments_raise_value_errors_naming_them(kwargs, field, value, allowed):
    with pytest.raises(ValueError) as err:
        hf_condcomp.upcycle(dense_source("bert"), layers="all", **kwargs)
    message = str(err.value)
    assert f"({field})" in message and value in message and allowed in message
    config_field = {"capacity": "mod_capacity", "compute_penalty": "gate_compute_penalty",
                    "threshold": "gate_threshold"}[field]
    from transformers import GPT2Config

    with pytest.raises(ValueError, match=f"`{config_field}`") as err:
        hf_condcomp.CondCompConfig(text_config=GPT2Config(n_layer=2), **{config_field: float(value)})
    assert value in str(err.value) and allowed in str(err.value)


# --- Beam search ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", ["mod", "gate"])
def test_beam_search_over_the_cache_equals_beam_search_without_it(family, variant):
    """The cache's per-layer validity reorders with the beams, so beam search over the cache gives
    the tokens of beam search without it (which recomputes the prefix at every step); at capacity 1
    / open gates it is the dense parent's beam search."""
    dense = dense_source(family)
    kwargs = dict(variant="mod", capacity=0.5) if variant == "mod" else dict(variant="gate", gate_init_bias=0.0)
    model = hf_condcomp.upcycle(dense, layers="all", **kwargs).eval()
    randomize_decisions(model)
    ids, mask = batch(family, B=2, T=6)
    beams = dict(attention_mask=mask, num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **beams), model.generate(ids, use_cache=False, **beams))
    open_kwargs = dict(variant="mod", capacity=1.0) if variant == "mod" else dict(variant="gate", gate_init_bias=20.0)
    model = hf_condcomp.upcycle(dense, layers="all", **open_kwargs).eval()
    beams = dict(num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ids = ids[:, 3:]  # no padding: the dense parent counts positions over padding
    assert torch.equal(model.generate(ids, **beams), dense.generate(ids, **beams))
