"""Upcycled models under transformers' own model contracts, the ones its common
model tests (`ModelTesterMixin`, `GenerationTesterMixin`) check, for a BERT-type encoder with a
classification head and two decoders (Llama, GPT-2). MoE models are checked for all of them; models
with routed blocks and with gates for initialisation, round trips, generation, padding and batching,
eager = SDPA and `return_dict=False` (the MoE-specific ones, missing expert weights and the
tensor-parallel plan, do not concern them; `output_attentions` is refused for them):

- every weight is drawn by `_init_weights` or loaded, whatever builds the model (its class, an auto
  class from a config, `from_pretrained` with a missing key, a meta-device load);
- save / load and pickling give the same outputs, tied heads share storage after a load;
- the config's `problem_type` and `num_labels` reach the source's head (also set after construction);
- `resize_token_embeddings` (tied and untied heads), a tensor-parallel plan naming only real modules;
- `generate()` without inputs and from `inputs_embeds`, left padding, batching with padding;
- eager and SDPA attention agree; `return_dict=False`, hidden states and attentions;
- feed-forward chunking leaves the outputs unchanged.
"""

import copy
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_condcomp
from hf_condcomp.modeling.experts import Experts

from conftest import HEADS, LAYERS, VOCAB, tiny_source

FAMILIES = ["bert", "llama", "gpt2"]
DECODERS = ["llama", "gpt2"]
_AUTO = {"bert": AutoModelForSequenceClassification, "llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM}


def dense(family, **overrides):
    if family == "bert":
        return tiny_source("bert", "sequence-classification", hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, **overrides)
    if family == "gpt2":
        return tiny_source("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    return tiny_source(family, **overrides)


VARIANTS = {
    "moe": dict(num_experts=4, top_k=2, init="noise", noise_std=0.3),  # experts apart, so routing matters
    "mod": dict(variant="mod", capacity=0.5),
    "gate": dict(variant="gate", gate_init_bias=0.0),
}
CASES = [(f, v) for f in FAMILIES for v in VARIANTS]
DECODER_CASES = [(f, v) for f in DECODERS for v in VARIANTS]


def build(family, variant="moe", **overrides):
    """An upcycled model with layers 1 and 3 conditional (MoE, routed or gated) and layers 0 and 2
    dense; routers and gates get random weights, so that tokens really are skipped."""
    model = hf_condcomp.upcycle(dense(family, **overrides), layers=[1, 3], **VARIANTS[variant])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("mod_router", "mod_predictor.w_out", "compute_gate.weight")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def models():
    return {(family, variant): build(family, variant) for family, variant in CASES}


def batch(seed=1, rows=3, length=8):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, mask


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


@torch.no_grad()
def assert_sane(model, drawn=True):
    """No NaN / inf, every weight's spread that of an init; with `drawn`, experts and routers drawn at
    the init's std (loaded ones keep the spread upcycling gave them)."""
    std = model.config.text_config.initializer_range
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert p.abs().max() < 10 and (p.numel() == 1 or p.std() < 1), (name, float(p.abs().max()))
        if drawn and "mod_router" in name:  # zero: 2 sigmoid(0) = 1, the routed block starts as the dense one
            assert not p.any(), name
        elif drawn and "compute_gate" in name:  # zero weights, the bias at `gate_init_bias`
            assert torch.equal(p, torch.full_like(p, model.config.gate_init_bias if name.endswith("bias") else 0.0))
        elif drawn and ("experts" in name or ".gate." in name):
            if name.endswith("_bias"):
                assert not p.any(), name
            else:
                assert 0.5 * std < p.std() < 2 * std, (name, float(p.std()))


# -- initialisation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant", CASES)
def test_a_model_built_from_its_config_has_every_weight_initialised(models, family, variant, tmp_path):
    models[family, variant].save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    for seed in (0, 1):  # whatever the allocator hands out
        torch.manual_seed(seed)
        built = _AUTO[family].from_config(config, trust_remote_code=True).eval()
        assert_sane(built)
        ids, mask = batch()
        assert torch.isfinite(logits(built, input_ids=ids, attention_mask=mask)).all()
    direct = type(models[family, variant])(copy.deepcopy(models[family, variant].config))
    assert_sane(direct)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_initialises_missing_keys_and_keeps_the_loaded_ones(models, family, tmp_path):
    model = models[family, "moe"]
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    experts = sorted(k for k in state if ".experts." in k and not k.endswith("_bias"))
    routers = sorted(k for k in state if k.endswith(".gate.weight"))
    missing = [experts[0], routers[-1]]
    save_file({k: v for k, v in state.items() if k not in missing}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = _AUTO[family].from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert_sane(loaded, drawn=False)
    params = dict(loaded.named_parameters())
    std = model.config.text_config.initializer_range
    for key in missing:
        assert 0.5 * std < params[key].std() < 2 * std, key
    for key, value in state.items():
        if key not in missing and key in params:
            assert torch.equal(params[key], value), key
    # transformers' meta-device path: an empty model, materialised, then initialised
    with torch.device("meta"):
        meta = type(model)(copy.deepcopy(model.config))
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert_sane(meta)


# -- save, load, pickle, tied weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant", CASES)
def test_save_load_and_pickle_round_trips_give_identical_outputs(models, family, variant, tmp_path):
    model = models[family, variant]
    ids, mask = batch()
    expected = logits(model, input_ids=ids, attention_mask=mask)
    model.save_pretrained(tmp_path / "saved")
    for again in (_AUTO[family].from_pretrained(tmp_path / "saved", trust_remote_code=True),
                  type(model).from_pretrained(tmp_path / "saved")):
        torch.testing.assert_close(logits(again.eval(), input_ids=ids, attention_mask=mask), expected, atol=0, rtol=0)
    torch.save(model, tmp_path / "model.pt")
    unpickled = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(logits(unpickled, input_ids=ids, attention_mask=mask), expected, atol=0, rtol=0)
    copied = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(logits(copied, input_ids=ids, attention_mask=mask), expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", DECODERS)
def test_a_tied_head_is_tied_after_building_and_after_loading(family, tmp_path):
    model = build(family, tie_word_embeddings=True)
    assert model.config.tie_word_embeddings
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embeddings.weight
    # the source's tied keys, under the same names, as the class attributes transformers reads
    tied = dict(model._condcomp_source._tied_weights_keys)
    assert model._tied_weights_keys == tied
    assert set(tied.items()) <= set(model.all_tied_weights_keys.items())
    assert model._keys_to_ignore_on_save is not None
    model.save_pretrained(tmp_path)
    assert not set(tied) & set(load_file(tmp_path / "model.safetensors"))  # written once
    for again in (AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True),
                  AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path, trust_remote_code=True),
                                                   trust_remote_code=True)):
        out, emb = again.get_output_embeddings().weight, again.get_input_embeddings().weight
        assert out.data_ptr() == emb.data_ptr()
    ids, mask = batch()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(loaded, input_ids=ids, attention_mask=mask),
                               logits(model, input_ids=ids, attention_mask=mask), atol=0, rtol=0)


def test_an_untied_head_stays_untied():
    model = build("llama", tie_word_embeddings=False)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not model.all_tied_weights_keys


@pytest.mark.parametrize("family,tied", [("bert", True), ("gpt2", True), ("llama", True), ("llama", False)])
def test_resize_token_embeddings_resizes_the_embeddings_and_the_head(family, tied, tmp_path):
    model = build(family, tie_word_embeddings=tied)
    ids, mask = batch()
    kept = ids.clamp(max=VOCAB - 5)  # tokens every size below keeps
    before = logits(model, input_ids=kept, attention_mask=mask)
    for size in (VOCAB + 5, VOCAB - 4):
        model.resize_token_embeddings(size)
        assert model.get_input_embeddings().weight.shape[0] == size
        assert model.config.vocab_size == model.config.text_config.vocab_size == size
        head = model.get_output_embeddings()
        if head is not None:
            assert head.weight.shape[0] == size
            assert (head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied
            assert logits(model, input_ids=kept).shape[-1] == size
    after = logits(model, input_ids=kept, attention_mask=mask)
    # the kept rows (and, for a head, its kept columns) are the old ones
    torch.testing.assert_close(after, before if family == "bert" else before[..., :VOCAB - 4], atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert again.get_input_embeddings().weight.shape[0] == VOCAB - 4
    torch.testing.assert_close(logits(again, input_ids=kept, attention_mask=mask), after, atol=0, rtol=0)


# -- config fields the source's head reads -----------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before", "after"])
def test_problem_types_reach_the_head(models, when):
    ids, mask = batch()
    cases = {
        "single_label_classification": (3, torch.tensor([0, 2, 1])),
        "multi_label_classification": (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])),
        "regression": (1, torch.tensor([0.5, -1.0, 2.0])),
    }
    for problem_type, (num_labels, labels) in cases.items():
        if when == "before":  # as transformers' tests set them: on the config, then build
            config = copy.deepcopy(models["bert", "moe"].config)
            config.problem_type, config.num_labels = problem_type, num_labels
            model = type(models["bert", "moe"])(config).eval()
        else:
            if num_labels != 3:
                continue  # the head's width is fixed once built, as in the dense model
            model = copy.deepcopy(models["bert", "moe"])
            model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))  # sets single_label
            model.config.problem_type = problem_type
        assert model.config.text_config.problem_type == problem_type
        assert model.config.text_config.num_labels == num_labels
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        assert out.logits.shape == (3, num_labels)
        if problem_type == "single_label_classification":
            task = F.cross_entropy(out.logits, labels)
        elif problem_type == "multi_label_classification":
            task = F.binary_cross_entropy_with_logits(out.logits, labels)
        else:
            task = F.mse_loss(out.logits.squeeze(-1), labels)
        torch.testing.assert_close(out.loss, task + out.routing_loss)


def test_num_labels_and_problem_type_survive_save_and_load(models, tmp_path):
    model = copy.deepcopy(models["bert", "moe"])
    model.config.problem_type = "multi_label_classification"
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert config.problem_type == config.text_config.problem_type == "multi_label_classification"
    assert config.num_labels == config.text_config.num_labels == 3
    five = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True, num_labels=5)
    assert five.num_labels == five.text_config.num_labels == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tensor_parallel_plan_names_attention_everywhere_and_ffns_only_in_dense_layers(models, family):
    model = models[family, "moe"]
    names = [name for name, _ in [*model.named_modules(), *model.named_parameters()]]
    for pattern in model.pp_plan or {}:
        assert _resolves(model, pattern.split(".")), pattern
    for pattern in model.tp_plan or {}:
        matches = re.compile(re.escape(pattern).replace(r"\*", r"\d+")).fullmatch
        layers = {int(m.group(1)) for n in names if matches(n) and (m := re.search(r"\.(\d+)\.", n))}
        assert any(matches(n) for n in names), pattern
        # attention in every layer; an FFN entry (Llama's `mlp.gate_proj`) only in the dense layers 0 and 2,
        # as Qwen3-MoE's plan names the FFNs of its dense `mlp_only_layers`
        assert layers in (set(), {0, 1, 2, 3}, {0, 2}), (pattern, layers)
        assert ("mlp." in pattern) == (layers == {0, 2}), (pattern, layers)
    if family == "llama":
        assert any("self_attn.q_proj" in k for k in model.tp_plan)
        ffn = {f"model.layers.*.mlp.{p}_proj" for p in ("gate", "up", "down")}
        assert {k for k in model.tp_plan if "mlp." in k} == ffn
    # The expert-parallel plan names the experts, which only the MoE layers (1 and 3) have: the engine
    # applies an entry to each module it matches, as for Qwen3-MoE's plan with dense `mlp_only_layers`.
    names = [name for name, _ in [*model.named_modules(), *model.named_parameters()]]
    assert model.ep_plan
    for pattern in model.ep_plan:
        matches = re.compile(re.escape(pattern).replace(r"\*", r"\d+")).fullmatch
        assert {int(re.search(r"\.(\d+)\.", n).group(1)) for n in names if matches(n)} == {1, 3}, pattern


def _resolves(module, parts):
    """Whether the dotted pattern names a module or parameter, a `*` in every child."""
    if not parts:
        return True
    head, rest = parts[0], parts[1:]
    if head == "*":
        children = list(module.children())
        return bool(children) and all(_resolves(child, rest) for child in children)
    child = getattr(module, head, None)
    if isinstance(child, torch.nn.Module):
        return _resolves(child, rest)
    return not rest and isinstance(child, torch.Tensor)


def test_feed_forward_chunking_keeps_the_outputs():
    model = build("bert")
    config = copy.deepcopy(model.config)
    config.text_config.chunk_size_feed_forward = 1
    torch.manual_seed(0)
    chunked = type(model)(config).eval()
    chunked.load_state_dict(model.state_dict())
    ids, mask = batch()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        b = chunked(input_ids=ids, attention_mask=mask, output_router_logits=True)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-6, rtol=0)
    assert len(b.router_logits) == len(a.router_logits) == 2
    torch.testing.assert_close(b.aux_loss, a.aux_loss)
    # set on the wrapper's config too, as transformers' test does
    config = copy.deepcopy(model.config)
    config.chunk_size_feed_forward = 1
    assert config.text_config.chunk_size_feed_forward == 1
    chunked = type(model)(config).eval()
    chunked.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(chunked, input_ids=ids, attention_mask=mask), a.logits, atol=1e-6, rtol=0)


# -- generation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant", DECODER_CASES)
def test_generate_without_inputs_and_from_inputs_embeds(models, family, variant):
    model = models[family, variant]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, name) == getattr(model.config.text_config, name)
    out = model.generate(max_new_tokens=3, do_sample=False)  # from the BOS token, as the dense model starts
    assert out.shape[0] == 1 and 2 <= out.shape[1] <= 4 and out[0, 0] == model.config.text_config.bos_token_id
    ids, _ = batch(rows=2, length=5)
    mask = torch.ones_like(ids)
    from_ids = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 min_new_tokens=4)
    torch.testing.assert_close(from_embeds, from_ids[:, ids.shape[1]:], atol=0, rtol=0)


@pytest.mark.parametrize("family,variant", DECODER_CASES)
def test_left_padded_generation_equals_each_row_alone(models, family, variant):
    model = models[family, variant]
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else pad
    rows = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 4, 6)]
    width = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (width - len(r), 0), value=pad) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0)) for r in rows])
    together = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                              pad_token_id=pad)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], attention_mask=torch.ones_like(row)[None], max_new_tokens=5,
                               min_new_tokens=5, do_sample=False, pad_token_id=pad)
        assert torch.equal(together[i, width:], alone[0, len(row):]), i
    # the last real token's logits of a left-padded row (positions counted from the first real token)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        for i, row in enumerate(rows):
            torch.testing.assert_close(padded[i], model(input_ids=row[None]).logits[0, -1], atol=1e-5, rtol=0)


# -- forward contracts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant", CASES)
def test_a_row_gives_the_same_logits_alone_and_in_a_padded_batch(models, family, variant):
    model = models[family, variant]
    ids, mask = batch()
    together = logits(model, input_ids=ids, attention_mask=mask)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        alone = logits(model, input_ids=ids[i:i + 1, :n])
        if family == "bert":
            torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(together[i, :n], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,variant", CASES)
def test_eager_and_sdpa_attention_agree(models, family, variant, tmp_path):
    model = models[family, variant]
    model.save_pretrained(tmp_path)
    ids, mask = batch()
    outs = {}
    for name in ("eager", "sdpa"):
        loaded = type(model).from_pretrained(tmp_path, attn_implementation=name).eval()
        assert loaded.base_model.config._attn_implementation == name
        outs[name] = logits(loaded, input_ids=ids, attention_mask=mask)
    real = mask.bool() if family != "bert" else slice(None)
    torch.testing.assert_close(outs["eager"][real], outs["sdpa"][real], atol=1e-5, rtol=0)
    switched = copy.deepcopy(model)
    switched.set_attn_implementation("eager")
    torch.testing.assert_close(logits(switched, input_ids=ids, attention_mask=mask)[real], outs["sdpa"][real],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,variant", CASES)
def test_return_dict_false_gives_the_dicts_fields_in_order(models, family, variant):
    model = models[family, variant]
    ids, mask = batch()
    labels = torch.tensor([0, 2, 1]) if family == "bert" else ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        as_dict = model(input_ids=ids, attention_mask=mask, labels=labels)
        as_tuple = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_and_attentions_from_the_call_and_from_the_config(models, family, tmp_path):
    model = models[family, "moe"]
    ids, mask = batch()
    model.save_pretrained(tmp_path)
    eager = type(model).from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        called = eager(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(called.hidden_states) == LAYERS + 1
    assert called.hidden_states[0].shape == (3, 8, model.config.hidden_size)
    assert len(called.attentions) == LAYERS and called.attentions[0].shape == (3, HEADS, 8, 8)
    configured = type(model).from_pretrained(tmp_path, attn_implementation="eager", output_hidden_states=True,
                                             output_attentions=True).eval()
    assert configured.config.output_hidden_states and configured.config.output_attentions
    with torch.no_grad():
        from_config = configured(input_ids=ids, attention_mask=mask)
    for ours, theirs in zip(from_config.hidden_states + from_config.attentions,
                            called.hidden_states + called.attentions):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    # and set on a built model's config
    built = copy.deepcopy(model)
    built.config.output_hidden_states = True
    with torch.no_grad():
        assert len(built(input_ids=ids, attention_mask=mask).hidden_states) == LAYERS + 1


def test_experts_are_initialised_by_the_models_own_init():
    """The experts' init is the class's `_init_weights`, not a side effect of upcycling."""
    model = build("llama")
    module = next(m for m in model.modules() if isinstance(m, Experts))
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    module._is_hf_initialized = False
    for p in module.parameters():
        p._is_hf_initialized = False
    model.initialize_weights()
    assert all(torch.isfinite(p).all() for p in module.parameters())
