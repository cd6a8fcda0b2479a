"""Routed blocks (Mixture-of-Depths) and compute-allocation gates on transformers' own layers
(depth.py), for the encoders and decoders people fine-tune.

References: the dense parent (capacity 1 / open gates give its outputs and greedy tokens, here
and in a clean process without hf_condcomp), the model itself without the KV cache (greedy and
beam search over the cache give the same tokens), a row run alone (its routing and outputs do
not depend on the other rows or on its padding), and the uncompiled layer count (skipped tokens
never reach the layer).
"""

import pytest
import torch
import transformers as T
from test_native import ARCHS, batch, dense_model, greedy, real_logits

from hf_condcomp import upcycle
from hf_condcomp.modeling.depth import ConditionalLayerMixin

from conftest import run_clean_python

GATED_ARCHS = ["bert", "roberta", "deberta-v2", "modernbert", "distilbert", "gpt2", "gpt_neox", "opt", "llama",
               "mistral", "qwen2", "qwen3", "gemma2", "phi3", "starcoder2"]
DECODERS = [n for n in GATED_ARCHS if ARCHS[n][1] == "causal-lm"]
_AUTO = {"sequence-classification": "AutoModelForSequenceClassification", "masked-lm": "AutoModelForMaskedLM",
         "token-classification": "AutoModelForTokenClassification", "causal-lm": "AutoModelForCausalLM"}


def _open(variant):
    """Settings at which the upcycled model is its dense parent: capacity 1, gates open."""
    return dict(capacity=1.0) if variant == "mod" else dict(gate_init_bias=20.0)


def routing(model, seed=3):
    """Routers and gates away from their exact-start values, so that tokens really are skipped."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, ConditionalLayerMixin):
            for name in ("mod_router", "compute_gate"):
                if name in module._modules:
                    part = module._modules[name]
                    part.weight.data = torch.randn(part.weight.shape, generator=g)
                    if name == "compute_gate":
                        part.bias.data.zero_()
            if "mod_predictor" in module._modules:
                p = module.mod_predictor
                p.w_out.data = torch.randn(p.w_out.shape, generator=g)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("gated")
    out = {}
    for name in GATED_ARCHS:
        task = ARCHS[name][1]
        dense = dense_model(name)
        ids, mask = batch(task)
        for variant in ("mod", "gate"):
            model = upcycle(dense, variant=variant, layers="all", **_open(variant))
            ref = {"ids": ids, "mask": mask, "logits": real_logits(dense, ids, mask, task)}
            if task == "causal-lm":
                ref["greedy"] = greedy(dense, ids)
            folder = root / f"{name}-{variant}"
            model.save_pretrained(folder)
            torch.save(ref, folder / "reference.pt")
            out[name, variant] = (model, ref, folder)
    return out


@pytest.mark.parametrize("variant", ["mod", "gate"])
@pytest.mark.parametrize("name", GATED_ARCHS)
def test_open_routed_and_gated_layers_are_the_dense_model(saved, name, variant):
    model, ref, _ = saved[name, variant]
    task = ARCHS[name][1]
    assert all(isinstance(layer, ConditionalLayerMixin) for layer in model._conditional_layers)
    torch.testing.assert_close(real_logits(model, ref["ids"], ref["mask"], task), ref["logits"], atol=1e-4, rtol=0)
    if task == "causal-lm":
        assert torch.equal(greedy(model, ref["ids"]), ref["greedy"])


def test_saved_gated_models_load_without_hf_condcomp(saved, tmp_path):
    """One clean process (no hf_condcomp) loads every saved folder through its remote code."""
    folders = {f"{name}-{variant}": (str(folder), _AUTO[ARCHS[name][1]]) for (name, variant), (_, _, folder)
               in saved.items()}
    run_clean_python(f"""
import torch, transformers as T
for key, (folder, auto) in {folders!r}.items():
    model = getattr(T, auto).from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), key
    ref = torch.load(folder + "/reference.pt")
    with torch.no_grad():
        logits = model(input_ids=ref["ids"], attention_mask=ref["mask"]).logits
    if logits.dim() == 3:
        logits = logits[ref["mask"].bool()]
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0, msg=key)
    if "greedy" in ref:
        out = model.generate(ref["ids"][:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out, ref["greedy"]), key
""", cwd=tmp_path)


def _routed(name, variant, **kwargs):
    dense = dense_model(name)
    settings = dict(capacity=0.5) if variant == "mod" else {}
    model = upcycle(dense, variant=variant, layers="all", **settings, **kwargs)
    return routing(model).eval()


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2", "phi3"])
@pytest.mark.parametrize("variant", ["mod", "gate"])
def test_decoding_over_the_cache_equals_decoding_without_it(name, variant):
    """Greedy and beam search over the KV cache (whose per-layer validity reorders with the beams)
    give the tokens of decoding without the cache, for a left-padded batch."""
    model = _routed(name, variant)
    if name == "gemma2":
        model.set_attn_implementation("eager")
    ids, mask = batch("causal-lm")
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))
    assert torch.equal(model.generate(ids, num_beams=3, **kw), model.generate(ids, num_beams=3, use_cache=False, **kw))
    out = model(input_ids=ids, attention_mask=mask)
    assert out.compute_fraction < 0.95  # tokens were really skipped


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_generate_from_inputs_embeds_and_without_inputs(name):
    model = _routed(name, "mod")
    ids, _ = batch("causal-lm")
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    from_ids = model.generate(ids[:1], **kw)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids[:1]), **kw)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])
    assert model.generate(**kw).shape == (1, 6)  # from the bos token alone


@pytest.mark.parametrize("name", ["bert", "deberta-v2", "modernbert", "llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("variant", ["mod", "gate"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_rows_routing_depends_neither_on_other_rows_nor_on_its_padding(name, variant, attn):
    if name in ("gemma2", "deberta-v2") and attn == "sdpa":
        pytest.skip(f"transformers' {name} has no SDPA attention")
    task = ARCHS[name][1]
    model = _routed(name, variant)
    model.set_attn_implementation(attn)
    ids, mask = batch(task)
    real = mask[1].bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # GPT-2 takes positions as given; the others from RoPE
    extra = dict(position_ids=positions) if name == "gpt2" else {}
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask, **extra).logits[1]
        alone = model(input_ids=ids[1:, real], **({"position_ids": positions[1:, real]} if extra else {})).logits[0]
    if task != "sequence-classification":
        together = together[real]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("variant", ["mod", "gate"])
def test_a_row_alone_with_its_padding_gives_every_output_it_has_in_the_batch(name, variant):
    """transformers' `test_batching_equivalence`: each row run alone, with its own padding mask, gives
    the logits and hidden states it has in the batch at every position, its padding's included. With
    the causal-LM testers' mask (row i has i + 1 real tokens), some row alone runs every real token
    of a layer whose batch skips tokens of other rows."""
    model = _routed(name, variant)
    ids, _ = batch(ARCHS[name][1])
    ids = torch.cat([ids, ids.flip(0)])[:, :7]  # (4, 7)
    mask = torch.tril(torch.ones(7, 7, dtype=torch.long))[:4]
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        alone = [model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], output_hidden_states=True)
                 for i in range(ids.shape[0])]
    assert any(out.layer_compute_fractions[layer] == 1.0 > fraction
               for out in alone for layer, fraction in together.layer_compute_fractions.items())
    for i, out in enumerate(alone):
        for a, b in zip((together.logits, *together.hidden_states), (out.logits, *out.hidden_states)):
            torch.testing.assert_close(a[i:i + 1], b, atol=1e-5, rtol=1e-5)


def _deberta_v3(**kwargs):
    """A tiny DeBERTa-v3-style model: log-bucketed relative positions, keys shared with positions."""
    config = T.DebertaV2Config(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, relative_attention=True, position_biased_input=False,
                               position_buckets=4, max_relative_positions=16, share_att_key=True,
                               pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", num_labels=3)
    torch.manual_seed(0)
    return T.DebertaV2ForSequenceClassification(config).eval()


@pytest.mark.parametrize("variant", ["mod", "gate"])
def test_a_routed_deberta_layer_is_transformers_layer_on_each_rows_kept_tokens(variant):
    """DeBERTa's relative positions: a routed (gated) layer's update of a kept token is transformers'
    dense layer run on that row's kept tokens alone, with the relative positions of their original
    places (transformers' own bias, one row at a time); skipped tokens are left unchanged."""
    dense = _deberta_v3()
    settings = dict(capacity=0.5) if variant == "mod" else {}
    model = routing(upcycle(dense, variant=variant, layers="1", **settings)).eval()
    layer = model.deberta.encoder.layer[1]
    seen = {}
    layer.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0], y=out[0], kw=kwargs),
                                with_kwargs=True)
    ids = torch.randint(3, 99, (3, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        x, y = seen["x"], seen["y"]
        encoder = dense.deberta.encoder
        relative = encoder.get_rel_pos(x)[0]  # (T, T) bucketed i - j
        rel_embeddings = encoder.get_rel_embedding()
        changed = (y != x).any(-1)
        assert 0 < changed[mask.bool()].sum() < mask.sum()
        for b in range(3):
            kept = changed[b].nonzero()[:, 0]
            C = len(kept)
            out, _ = dense.deberta.encoder.layer[1](
                x[b:b + 1, kept], torch.ones(1, 1, C, C, dtype=torch.bool),
                relative_pos=relative[kept][:, kept].unsqueeze(0), rel_embeddings=rel_embeddings)
            if variant == "mod":
                scale = 2 * torch.sigmoid(layer.mod_router(x[b:b + 1, kept]))
            else:
                scale = layer.compute_gate(x[b:b + 1, kept])
            expected = x[b:b + 1, kept] + scale.unsqueeze(-1) * (out - x[b:b + 1, kept])
            torch.testing.assert_close(y[b:b + 1, kept], expected, atol=1e-5, rtol=0)


def test_skipped_tokens_never_reach_the_layer():
    """The attention's query projection of a routed layer sees ceil(c * n) tokens per sequence."""
    model = _routed("llama", "mod")
    seen = []
    layer = model.model.layers[1]
    layer.self_attn.q_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    ids = torch.randint(3, 99, (2, 10))
    model.train()
    model(input_ids=ids)
    assert seen == [5]  # top-k in training: ceil(0.5 * 10)


def test_skipped_tokens_as_keys_keeps_them_as_attention_keys():
    """A routed encoder layer with `skipped_tokens_as_keys`: a routed token's update is the dense
    layer's for that token (every real token is a key), a skipped token is left unchanged."""
    dense = dense_model("bert")
    model = upcycle(dense, variant="mod", capacity=0.5, layers="1", skipped_tokens_as_keys=True)
    routing(model).eval()
    ids, mask = batch("sequence-classification")
    layer = model.bert.encoder.layer[1]
    layer.mod_router.record_routing = True
    seen = {}
    layer.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0], y=out), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        x, y, keep = seen["x"], seen["y"], layer.mod_router.routing_log[-1]
        padding = torch.where(mask.bool()[:, None, None, :], 0.0, torch.finfo(x.dtype).min)
        full = dense.bert.encoder.layer[1](x, attention_mask=padding)
        expected = x + 2 * torch.sigmoid(layer.mod_router(x)).unsqueeze(-1) * (full - x)
    assert 0 < keep.sum() < mask.sum()
    torch.testing.assert_close(y[keep], expected[keep], atol=1e-5, rtol=0)
    assert torch.equal(y[~keep], x[~keep])


def test_routers_and_gates_learn_and_their_losses_join_the_task_loss():
    model = _routed("llama", "mod")
    model.train()
    ids, mask = batch("causal-lm")
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.compute_loss is not None and out.compute_loss > 0  # the causal predictor's loss
    out.loss.backward()
    layer = model.model.layers[0]
    assert layer.mod_router.weight.grad.abs().sum() > 0
    assert layer.mod_predictor.w_in.grad.abs().sum() > 0
    gated = _routed("bert", "gate").train()
    ids, mask = batch("sequence-classification")
    out = gated(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert out.compute_loss > 0
    assert gated.bert.encoder.layer[0].compute_gate.bias.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = _routed("qwen3", "mod").train()
    ids, mask = batch("causal-lm")
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_torch_save_round_trip_and_from_config_initialises_everything(tmp_path):
    import transformers as T

    model = _routed("llama", "mod")
    torch.save(model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    ids, mask = batch("causal-lm")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)
    fresh = T.AutoModelForCausalLM.from_config(model.config)
    for name, param in fresh.named_parameters():
        assert torch.isfinite(param).all() and param.abs().max() < 10, name
    layer = fresh.model.layers[0]
    assert layer.mod_router.weight.abs().sum() == 0  # zero-initialised: 2 sigmoid(0) = 1


def test_static_cache_and_unsupported_architectures_are_refused():
    model = _routed("llama", "mod")
    ids, _ = batch("causal-lm")
    with pytest.raises(ValueError, match="StaticCache.*not supported by models with Mixture-of-Depths"):
        model.generate(ids[:1], max_new_tokens=3, do_sample=False, cache_implementation="static", pad_token_id=0)
    with pytest.raises(ValueError, match=r"model type 'gpt_neo' cannot have.*causal mask of its own by key slot"):
        upcycle(dense_model("gpt_neo"), variant="mod")
    with pytest.raises(ValueError, match=r"`skipped_tokens_as_keys`=True.*'modernbert'"):
        upcycle(dense_model("modernbert"), variant="mod", skipped_tokens_as_keys=True)
    with pytest.raises(ValueError, match=r"`output_attentions=True` is not supported"):
        model(input_ids=ids, output_attentions=True)
