"""Contracts that transformers' common model tests (`ModelTesterMixin`) check, for MoE, MoD and
gate models of BERT, GPT-2 and Llama sources: `return_dict=False` in transformers' tuple order (in train mode
too), hidden states from the call and from the config, gradient checkpointing equal to none, a
correct (here: no) tensor-parallel plan, `_no_split_modules` that name real layer classes.

`attn_implementation` "eager" and `output_attentions` are checked against the dense parent's eager
attention weights; MoD/gated models refuse `output_attentions` and every model refuses FlashAttention.
Static caches work for MoE models and are refused for MoD/gated ones (their per-layer caches hold
the tokens each layer ran on). tests/test_native.py adds flex attention for MoE models.
`torch.compile(fullgraph=True)` traces dropless MoE models whole (forward, backward, static-cache
decoding); MoD, gates, capacity limits and expert choice pick tokens by value, so they compile
with graph breaks."""

import inspect

import pytest
import torch

import hf_condcomp
from hf_condcomp.modeling.architectures import find_layers

from conftest import LAYERS, VOCAB, tiny_source

FAMILIES = {"bert": "sequence-classification", "gpt2": None, "llama": None}
VARIANTS = {
    "moe": dict(num_experts=4, top_k=2, init="noise", noise_std=0.3, layers="all"),
    "mod": dict(variant="mod", capacity=0.5, layers="all"),
    "gate": dict(variant="gate", layers="all", gate_init_bias=0.0),
}


def build(family, variant, **overrides):
    dense = tiny_source(family, FAMILIES[family], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) \
        if family == "bert" else tiny_source(family, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) \
        if family == "gpt2" else tiny_source(family)
    model = hf_condcomp.upcycle(dense, **VARIANTS[variant], **overrides)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # mixed routing decisions, so that skipping really happens
        for name, p in model.named_parameters():
            if any(k in name for k in ("mod_router", "mod_predictor", "compute_gate.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def batch(family):
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = torch.tensor([0, 2, 1]) if family == "bert" else ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


CASES = [(f, v) for f in FAMILIES for v in VARIANTS]


@pytest.mark.parametrize("family,variant", CASES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_return_dict_false_gives_transformers_tuple_order(family, variant, mode):
    model = build(family, variant)
    getattr(model, mode)()
    ids, mask, labels = batch(family)
    torch.manual_seed(0)
    as_dict = model(ids, attention_mask=mask, labels=labels)
    torch.manual_seed(0)
    as_tuple = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    # The source's base model inside: last_hidden_state first in every mode.
    base = model.base_model
    torch.manual_seed(0)
    base_dict = base(ids, attention_mask=mask)
    torch.manual_seed(0)
    base_tuple = base(ids, attention_mask=mask, return_dict=False)
    assert base_tuple[0].shape == (3, 8, model.config.hidden_size)
    torch.testing.assert_close(base_tuple[0], base_dict.last_hidden_state)
    if mode == "train" and (variant != "mod" or family != "bert"):  # BERT's MoD has no auxiliary loss
        assert as_dict.routing_loss is not None and as_dict.routing_loss.dim() == 0
    # config.return_dict=False works the same, and the heads still read their base model.
    model.config.return_dict = False
    assert isinstance(model(ids, attention_mask=mask), tuple)


@pytest.mark.parametrize("family,variant", CASES)
def test_hidden_states_from_the_call_and_from_the_config(family, variant, tmp_path):
    model = build(family, variant).eval()
    ids, mask, _ = batch(family)
    with torch.no_grad():
        called = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert model(ids, attention_mask=mask).hidden_states is None
    assert len(called) == LAYERS + 1
    assert all(h.shape == (3, 8, model.config.hidden_size) for h in called)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, output_hidden_states=True).eval()
    with torch.no_grad():
        from_config = reloaded(ids, attention_mask=mask).hidden_states
    assert len(from_config) == LAYERS + 1
    for a, b in zip(called, from_config):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family,variant", [("bert", "moe"), ("bert", "mod"), ("llama", "moe"), ("llama", "gate"),
                                            ("gpt2", "mod")])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, variant):
    ids, mask, labels = batch(family)
    results = []
    for checkpointing in (False, True):
        model = build(family, variant).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in _layers(model))
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    routing = [n for n in grads_a if any(k in n for k in (".gate.", "mod_router", "mod_predictor", "compute_gate"))]
    assert routing, "routing parameters get gradients in both runs"
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-5, msg=name)


def test_reentrant_checkpointing_is_refused():
    model = build("llama", "moe")
    with pytest.raises(ValueError, match="use_reentrant=True"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.24 on
        with pytest.raises(ValueError, match="use_reentrant=True"):
            model.activation_checkpointing_enable({"use_reentrant": True})
        model.activation_checkpointing_enable()
        assert all(layer.gradient_checkpointing for layer in _layers(model))


def _layers(model):
    return find_layers(model, model.config.num_hidden_layers)[1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_split_modules_and_no_wrong_tensor_parallel_plan(family):
    model = build(family, "moe")
    classes = {type(m).__name__ for m in model.modules()}
    assert model._no_split_modules and set(model._no_split_modules) <= classes
    assert type(_layers(model)[0]).__name__ in model._no_split_modules
    from accelerate.utils.dataclasses import get_module_class_from_name  # what FSDP's wrap policy reads

    assert all(get_module_class_from_name(model, n) is not None for n in model._no_split_modules)
    plan = model.config.base_model_tp_plan or {}
    names = [n for n, _ in model.base_model.named_modules()]
    import re

    for pattern in plan:  # every planned module must exist (Llama's plan named dense MLP weights)
        regex = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        assert any(regex.match(n) for n in names), pattern


def dense_parent(family):
    if family == "bert":
        return tiny_source(family, FAMILIES[family], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tiny_source(family)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eager_attention_and_output_attentions_match_the_dense_parent(family, tmp_path):
    dense = dense_parent(family)
    model = hf_condcomp.upcycle(dense, num_experts=4, top_k=2, layers="all")  # copy: the parent at step 0
    model.save_pretrained(tmp_path / "sdpa")
    ids, mask, _ = batch(family)
    sdpa = type(model).from_pretrained(tmp_path / "sdpa").eval()
    eager = type(model).from_pretrained(tmp_path / "sdpa", attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    dense.save_pretrained(tmp_path / "dense")
    dense_eager = type(dense).from_pretrained(tmp_path / "dense", attn_implementation="eager").eval()
    real = mask.bool()
    with torch.no_grad():
        a, b = sdpa(ids, attention_mask=mask), eager(ids, attention_mask=mask, output_attentions=True)
        reference = dense_eager(ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    assert len(b.attentions) == LAYERS == len(reference.attentions)
    heads = model.config.text_config.num_attention_heads
    for ours, theirs in zip(b.attentions, reference.attentions):
        assert ours.shape == (3, heads, 8, 8)
        torch.testing.assert_close(ours.sum(-1)[:, 0][real], torch.ones_like(ours.sum(-1)[:, 0][real]))
        # Rows of real query tokens: the parent's weights (padding rows are unused in both).
        torch.testing.assert_close(ours.transpose(1, 2)[real], theirs.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
    # output_attentions from the config (transformers returns weights with eager attention).
    eager.config.output_attentions = True
    with torch.no_grad():
        from_config = eager(ids, attention_mask=mask).attentions
    assert len(from_config) == LAYERS
    torch.testing.assert_close(from_config[-1], b.attentions[-1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_returns_attentions_and_scores(family):
    model = hf_condcomp.upcycle(tiny_source(family), num_experts=4, top_k=2, layers="all").eval()
    model.set_attn_implementation("eager")  # transformers returns attention weights from eager attention
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         output_scores=True, output_attentions=True)
    assert len(out.scores) == 3 and out.scores[0].shape == (2, VOCAB)
    assert len(out.attentions) == 3 and len(out.attentions[0]) == LAYERS
    assert out.attentions[0][0].shape[-2:] == (5, 5) and out.attentions[1][0].shape[-2:] == (1, 6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_output_attentions_with_gated_layers_and_flash_attention_are_refused(family, tmp_path):
    model = build(family, "mod").eval()
    ids, mask, _ = batch(family)
    with pytest.raises(ValueError, match="`output_attentions=True` is not supported by models with Mixture-of-Depths"):
        model(ids, attention_mask=mask, output_attentions=True)
    moe = build(family, "moe")
    moe.save_pretrained(tmp_path)
    with pytest.raises((ValueError, ImportError), match="lash"):  # transformers' own refusal names FlashAttention
        type(moe).from_pretrained(tmp_path, attn_implementation="flash_attention_2")

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_batch_equals_the_dense_parent_without_position_ids(family):
    # transformers' decoders count positions 0..T-1 unless `position_ids` are passed; so do ours.
    dense = tiny_source(family).eval()
    model = hf_condcomp.upcycle(dense, num_experts=4, top_k=2, layers="all").eval()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, dense(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, **greedy),
                       dense.generate(ids, attention_mask=mask, **greedy))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padding_leaves_the_last_logits_as_transformers_checks_it(family, variant):
    """transformers' `test_left_padding_compatibility`: 32 padding tokens on the left of a batch with
    the testers' random mask leave the last token's logits unchanged, given `position_ids` counted from
    the first real token wherever `forward`'s signature names them (GPT-2's positions are learned
    absolute ones, so without them the padding shifts every position). The dense parent passes too."""
    model = build(family, variant).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (13, 7), generator=g)
    mask = torch.randint(0, 2, (13, 7), generator=g)
    mask[:, -1] = 1
    pad = model.config.get_text_config(decoder=True).pad_token_id or 0
    padded_ids = torch.cat([torch.full((13, 32), pad), ids], 1)
    padded_mask = torch.cat([torch.zeros(13, 32, dtype=mask.dtype), mask], 1)
    for m in (tiny_source(family), model):
        assert "position_ids" in inspect.signature(m.forward).parameters
        torch.testing.assert_close(_last_logits(m, padded_ids, padded_mask), _last_logits(m, ids, mask), rtol=1e-5,
                                   atol=1e-5)


def _last_logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers' test counts them
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]


def test_gpt2_token_type_ids_are_embedded_as_in_the_dense_parent():
    dense = tiny_source("gpt2").eval()
    model = hf_condcomp.upcycle(dense, num_experts=4, top_k=2).eval()
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    types = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 0, 1]])
    with torch.no_grad():
        ours, theirs = model(ids, token_type_ids=types).logits, dense(ids, token_type_ids=types).logits
        plain = model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours - plain).abs().max() > 1e-3  # the types change the output: they are not dropped
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, token_type_ids=types, **greedy),
                       dense.generate(ids, token_type_ids=types, **greedy))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_static_cache_gives_the_dense_parents_tokens_for_moe_models(family):
    """MoE routing changes no token set, so a static cache works: on a left-padded batch the greedy
    tokens equal the dense parent's (which uses the static cache too) and the dynamic cache's."""
    dense = tiny_source(family).eval()
    model = hf_condcomp.upcycle(dense, num_experts=4, top_k=2, layers="all").eval()
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    greedy = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = dense.generate(ids, **greedy)
    assert torch.equal(model.generate(ids, cache_implementation="static", **greedy), expected)
    assert torch.equal(model.generate(ids, **greedy), expected)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", ["mod", "gate"])
def test_static_cache_is_refused_for_routed_and_gated_layers(family, variant):
    model = build(family, variant).eval()
    ids = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not supported by models with Mixture-of-Depths.*dynamic cache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (1, 6)


def _loss_and_grads(model, call, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = call(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_compiled_matches(model, ids, mask, labels, fullgraph):
    """`torch.compile` on `aot_eager` (dynamo's whole graph and AOT autograd's backward, which
    inductor would then lower; tests stay off the C++ compiler) equals the uncompiled model, in
    the training loss and every gradient, and in the logits of the real tokens in evaluation."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=fullgraph, backend="aot_eager")
    model.train()
    loss_a, grads_a = _loss_and_grads(model, model, ids, mask, labels)
    loss_b, grads_b = _loss_and_grads(model, compiled, ids, mask, labels)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("router" in n or "gate" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-6, msg=name)
    model.eval()
    with torch.no_grad():
        expected, got = model(ids, attention_mask=mask).logits, compiled(ids, attention_mask=mask).logits
    real = mask.bool() if expected.dim() == 3 else slice(None)
    torch.testing.assert_close(got[real], expected[real], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_compiles_as_one_graph_and_matches_uncompiled(family):
    """Dropless token choice has static shapes (N * k sorted rows, E counts); under compile a padded
    batch routes every row and zeroes the padding's output, which changes nothing for real tokens."""
    model = build(family, "moe")
    if family == "gpt2":  # transformers' GPT-2 logs (a graph break) when it knows no loss type for itself
        model._condcomp_source.loss_type = "ForCausalLM"
    assert_compiled_matches(model, *batch(family), fullgraph=True)


@pytest.mark.parametrize("family,variant,overrides", [("llama", "mod", {}), ("bert", "gate", {}),
                                                      ("gpt2", "moe", {"capacity_factor": 1.0}),
                                                      ("bert", "moe", {"routing": "expert_choice"})])
def test_routed_gated_and_capacity_layers_compile_with_graph_breaks(family, variant, overrides):
    """MoD, gates, capacity limits and expert choice rank tokens against each other, so the padding
    must stay out by value: graph breaks, and the same results as uncompiled."""
    assert_compiled_matches(build(family, variant, **overrides), *batch(family), fullgraph=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_static_cache_decoding_with_a_fullgraph_compiled_forward(family):
    model = build(family, "moe").eval()
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    greedy = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(ids, **greedy)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    assert torch.equal(model.generate(ids, **greedy), expected)
