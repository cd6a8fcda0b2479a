"""Native models: transformers' own model of each source architecture with MoE blocks in its
FFNs' places (modeling_condcomp.py, architectures.py).

For every architecture: a tiny random dense model, copy-upcycled, gives the dense model's outputs
(real tokens of a padded batch, fp32 <= 1e-4) and its greedy tokens; saved, it loads in a clean
process without hf_condcomp and gives them again. Then the contracts of transformers' common model
tests on three of them (an encoder and two decoders), the inits, and the refusals.
"""

import json

import pytest
import torch
import transformers as T

from hf_condcomp import upcycle
from hf_condcomp.modeling import architectures
from hf_condcomp.modeling.modeling_condcomp import CondCompPreTrainedModel, NativeMoEFeedForward
from hf_condcomp.modeling.routing import load_balancing_loss

from conftest import run_clean_python, save_with_reference

V, H, I, L, NH = 99, 32, 64, 2, 4
_LM = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH)
_KV = dict(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name: (config factory, task); the decoders use left padding, the encoders right padding.
ARCHS = {
    "bert": (lambda: T.BertConfig(**_LM, num_labels=3), "sequence-classification"),
    "roberta": (lambda: T.RobertaConfig(**_LM, pad_token_id=1, num_labels=3), "sequence-classification"),
    "xlm-roberta": (lambda: T.XLMRobertaConfig(**_LM, pad_token_id=1), "masked-lm"),
    "distilbert": (lambda: T.DistilBertConfig(dim=H, n_layers=L, n_heads=NH, hidden_dim=I, vocab_size=V, num_labels=3),
                   "sequence-classification"),
    "deberta-v2": (lambda: T.DebertaV2Config(**_LM, relative_attention=True, position_biased_input=False,
                                             pos_att_type=["p2c", "c2p"], num_labels=3), "sequence-classification"),
    "modernbert": (lambda: T.ModernBertConfig(**_LM, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                              sep_token_id=2, global_attn_every_n_layers=2, local_attention=4),
                   "token-classification"),
    "gpt2": (lambda: T.GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_inner=I, bos_token_id=1,
                                  eos_token_id=2), "causal-lm"),
    "gpt_neo": (lambda: T.GPTNeoConfig(vocab_size=V, hidden_size=H, num_layers=L, num_heads=NH, intermediate_size=I,
                                       attention_types=[[["global", "local"], 1]], window_size=4, bos_token_id=1,
                                       eos_token_id=2), "causal-lm"),
    "gpt_neox": (lambda: T.GPTNeoXConfig(**_LM, bos_token_id=1, eos_token_id=2), "causal-lm"),
    "opt": (lambda: T.OPTConfig(vocab_size=V, hidden_size=H, ffn_dim=I, num_hidden_layers=L, num_attention_heads=NH,
                                word_embed_proj_dim=H, pad_token_id=0, bos_token_id=1, eos_token_id=2), "causal-lm"),
    "llama": (lambda: T.LlamaConfig(**_LM, **_KV), "causal-lm"),
    "mistral": (lambda: T.MistralConfig(**_LM, **_KV, sliding_window=4), "causal-lm"),
    "qwen2": (lambda: T.Qwen2Config(**_LM, **_KV, use_sliding_window=True, sliding_window=4, max_window_layers=1),
              "causal-lm"),
    "qwen3": (lambda: T.Qwen3Config(**_LM, **_KV, head_dim=8), "causal-lm"),
    "gemma2": (lambda: T.Gemma2Config(**_LM, **_KV, head_dim=8, sliding_window=4), "causal-lm"),
    "phi3": (lambda: T.Phi3Config(**_LM, **_KV), "causal-lm"),
    # not named in architectures.LAYOUTS: recognised from their layers' modules
    "olmo": (lambda: T.OlmoConfig(**_LM, **_KV), "causal-lm"),
    "starcoder2": (lambda: T.Starcoder2Config(**_LM, **_KV), "causal-lm"),
}
_AUTO = {"sequence-classification": T.AutoModelForSequenceClassification, "masked-lm": T.AutoModelForMaskedLM,
         "token-classification": T.AutoModelForTokenClassification, "causal-lm": T.AutoModelForCausalLM}


def dense_model(name, seed=0):
    factory, task = ARCHS[name]
    torch.manual_seed(seed)
    return _AUTO[task].from_config(factory()).eval()


def batch(task, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    if task == "causal-lm":
        mask[1, :3] = 0  # left padding
        ids[1, :3] = 0
    else:
        mask[1, -3:] = 0  # right padding
    return ids, mask


def real_logits(model, ids, mask, task):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    if task == "sequence-classification":
        return logits
    return logits[mask.bool()]


def greedy(model, ids):
    return model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every architecture, copy-upcycled natively (4 experts, top-2, every layer) and saved with its
    dense parent's reference outputs."""
    root = tmp_path_factory.mktemp("native")
    out = {}
    for name, (_, task) in ARCHS.items():
        dense = dense_model(name)
        ids, mask = batch(task)
        model = upcycle(dense, num_experts=4, top_k=2, layers="all")
        ref = {"ids": ids, "mask": mask, "logits": real_logits(dense, ids, mask, task)}
        if task == "causal-lm":
            ref["greedy"] = greedy(dense, ids)
        out[name] = save_with_reference(model, ref, root / name)
    return out


@pytest.mark.parametrize("name", list(ARCHS))
def test_copy_upcycle_is_the_dense_model(saved, name):
    model, ref, _ = saved[name]
    task = ARCHS[name][1]
    assert isinstance(model, CondCompPreTrainedModel)
    assert sum(isinstance(m, NativeMoEFeedForward) for m in model.modules()) == L
    torch.testing.assert_close(real_logits(model, ref["ids"], ref["mask"], task), ref["logits"], atol=1e-4, rtol=0)
    if task == "causal-lm":
        assert torch.equal(greedy(model, ref["ids"]), ref["greedy"])


def test_saved_models_load_without_hf_condcomp(saved, tmp_path):
    """One clean interpreter loads every saved model through `trust_remote_code` and checks it
    against the dense parent's outputs."""
    folders = {name: str(path) for name, (_, _, path) in saved.items()}
    tasks = {name: task for name, (_, task) in ARCHS.items()}
    code = f"""
import json, torch, transformers as T
folders, tasks = {json.dumps(folders)}, {json.dumps(tasks)}
auto = {{"sequence-classification": T.AutoModelForSequenceClassification, "masked-lm": T.AutoModelForMaskedLM,
        "token-classification": T.AutoModelForTokenClassification, "causal-lm": T.AutoModelForCausalLM}}
for name, path in folders.items():
    model = auto[tasks[name]].from_pretrained(path, trust_remote_code=True).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    ref = torch.load(path + "/reference.pt")
    with torch.no_grad():
        logits = model(input_ids=ref["ids"], attention_mask=ref["mask"]).logits
    if tasks[name] != "sequence-classification":
        logits = logits[ref["mask"].bool()]
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0, msg=name)
    if "greedy" in ref:
        out = model.generate(ref["ids"][:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out, ref["greedy"]), name
print("ok", len(folders))
"""
    assert "ok 18" in run_clean_python(code, cwd=tmp_path).stdout


def test_unlisted_architectures_are_recognised():
    for name in ("olmo", "starcoder2"):
        assert name not in architectures.LAYOUTS
    layer = dense_model("starcoder2").model.layers[0]
    assert architectures.detect_layout("starcoder2", layer, causal=True).inputs == ("mlp.c_fc",)


# --- inits and routing ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["phi3", "opt", "gpt2", "modernbert"])
def test_split_upcycling_with_every_expert_is_the_dense_model(name):
    """Splitting the neurons into 4 groups and selecting all 4 reproduces the FFN, also where the
    input matrix is fused (Phi-3, ModernBERT), stored transposed (GPT-2) or split over the layer (OPT)."""
    task = ARCHS[name][1]
    dense = dense_model(name)
    ids, mask = batch(task)
    for init in ("split-random", "split-kmeans"):
        model = upcycle(dense, num_experts=4, top_k=4, layers="all", init=init)
        torch.testing.assert_close(real_logits(model, ids, mask, task), real_logits(dense, ids, mask, task),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("init", ["noise", "drop"])
def test_noisy_inits_move_away_from_the_dense_model(init):
    dense = dense_model("qwen3")
    ids, mask = batch("causal-lm")
    model = upcycle(dense, num_experts=4, top_k=2, layers="all", init=init)
    diff = (real_logits(model, ids, mask, "causal-lm") - real_logits(dense, ids, mask, "causal-lm")).abs().max()
    assert 0 < diff < (1.0 if init == "noise" else 50.0)


@pytest.mark.parametrize("name", ["qwen3", "roberta"])
def test_expert_choice_trains_and_decodes_causally(name):
    task = ARCHS[name][1]
    model = upcycle(dense_model(name), num_experts=4, top_k=2, layers="all", routing="expert_choice")
    ids, mask = batch(task)
    labels = ids if task == "causal-lm" else torch.tensor([0, 2])
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.aux_loss is None and out.z_loss > 0  # expert choice is balanced by construction: no aux loss
    out.loss.backward()
    router = model.get_submodule(_layers_path(model) + ".0").get_submodule(
        architectures.layout_from_dict(model.config.ffn_layout).module).gate
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    if task == "causal-lm":  # at inference a token's output does not depend on later tokens
        model.eval()
        other = ids.clone()
        other[:, -1] = (other[:, -1] + 1) % V
        with torch.no_grad():
            a, b = model(ids).logits, model(other).logits
        torch.testing.assert_close(a[:, :-1], b[:, :-1])


def _layers_path(model):
    return architectures.find_layers(model, model.config.num_hidden_layers)[0]


def test_router_losses_join_the_task_loss_and_skip_padding():
    model = upcycle(dense_model("qwen3"), num_experts=4, top_k=2, layers="all").train()
    ids, mask = batch("causal-lm")
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    dense_loss = T.AutoModelForCausalLM.from_config(model.config.text_config)
    assert out.routing_loss is not None
    expected = model.config.router_aux_loss_coef * out.aux_loss + model.config.router_z_loss_coef * out.z_loss
    torch.testing.assert_close(out.routing_loss, expected)
    assert len(out.router_logits) == L and out.router_logits[0].shape == (ids.numel(), 4)
    del dense_loss
    # every row is routed, as the dense FFN computes every row, but the padding counts in no loss
    # and not in the routing record
    block = next(m for m in model.modules() if isinstance(m, NativeMoEFeedForward))
    block.record_routing = True
    model(input_ids=ids, attention_mask=mask)
    assert block.last_routing["num_tokens"] == mask.sum() and block.last_routing["counts"].sum() == 2 * mask.sum()
    real = mask.reshape(-1).bool()
    expected_aux = load_balancing_loss(tuple(x[real] for x in out.router_logits), 4, 2, None)
    torch.testing.assert_close(out.aux_loss, expected_aux)


# --- transformers' model-test contracts -----------------------------------------------------

CONTRACT_ARCHS = ["roberta", "qwen3", "gpt_neox"]


@pytest.fixture(scope="module")
def contract_models():
    return {name: (dense_model(name), upcycle(dense_model(name), num_experts=4, top_k=2, layers="all"))
            for name in CONTRACT_ARCHS}


@pytest.mark.parametrize("name", CONTRACT_ARCHS)
def test_return_dict_false_gives_the_dense_models_tuple_order(contract_models, name):
    dense, model = contract_models[name]
    task = ARCHS[name][1]
    ids, mask = batch(task)
    labels = ids.masked_fill(mask == 0, -100) if task == "causal-lm" else torch.tensor([0, 2])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
        theirs = dense(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    # + routing_loss, aux_loss, z_loss and router_logits after them (`output_router_logits`, which upcycle sets)
    assert isinstance(ours, tuple) and len(ours) == len(theirs) + 4 and isinstance(ours[-1], tuple)
    assert ours[0].dim() == 0 and torch.allclose(ours[0], theirs[0] + ours[len(theirs)], atol=1e-5)
    torch.testing.assert_close(ours[1][mask.bool()] if ours[1].dim() == 3 else ours[1],
                               theirs[1][mask.bool()] if theirs[1].dim() == 3 else theirs[1], atol=1e-4, rtol=0)
    model.config.return_dict = False
    try:
        assert isinstance(model(input_ids=ids), tuple)
    finally:
        model.config.return_dict = True


@pytest.mark.parametrize("name", CONTRACT_ARCHS)
def test_hidden_states_and_attentions_from_the_call_and_the_config(contract_models, name, tmp_path):
    dense, model = contract_models[name]
    ids, _ = batch(ARCHS[name][1])
    model.save_pretrained(tmp_path)
    eager = type(model).from_pretrained(tmp_path, attn_implementation="eager", output_hidden_states=True,
                                        output_attentions=True).eval()
    assert eager.base_model.config._attn_implementation == "eager"
    with torch.no_grad():
        out = eager(ids)
        ref = dense(ids, output_hidden_states=True, output_attentions=True)
        called = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == len(called.hidden_states) == L + 1
    assert len(out.attentions) == L and out.attentions[0].shape == (2, NH, ids.shape[1], ids.shape[1])
    for ours, theirs in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CONTRACT_ARCHS)
def test_batching_equivalence(contract_models, name):
    _, model = contract_models[name]
    ids, _ = batch(ARCHS[name][1])
    with torch.no_grad():
        together = model(ids).logits
        alone = torch.cat([model(ids[i:i + 1]).logits for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONTRACT_ARCHS)
def test_save_load_round_trip(contract_models, name, tmp_path):
    _, model = contract_models[name]
    ids, mask = batch(ARCHS[name][1])
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "condcomp" and config["text_config"]["model_type"] == name


@pytest.mark.parametrize("name", ["qwen3", "gpt_neox"])
def test_generate_dict_outputs_static_cache_and_left_padding(contract_models, name):
    dense, model = contract_models[name]
    ids, mask = batch("causal-lm")
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = dense.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), expected)  # left-padded batch
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), expected)
    out = model.generate(ids, output_scores=True, return_dict_in_generate=True, **kwargs)
    assert len(out.scores) == 4 and out.scores[0].shape == (2, V)
    assert torch.equal(out.sequences, expected)
    model.set_attn_implementation("eager")
    try:
        out = model.generate(ids, output_attentions=True, return_dict_in_generate=True, **kwargs)
    finally:
        model.set_attn_implementation("sdpa")
    assert len(out.attentions) == 4 and len(out.attentions[0]) == L  # per step, per layer
    assert out.attentions[0][0].shape == (2, NH, ids.shape[1], ids.shape[1])
    assert out.attentions[1][0].shape == (2, NH, 1, ids.shape[1] + 1)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("name", ["roberta", "qwen3"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name):
    task = ARCHS[name][1]
    ids, mask = batch(task)
    labels = ids if task == "causal-lm" else torch.tensor([0, 2])
    results = []
    for checkpointing in (False, True):
        model = upcycle(dense_model(name), num_experts=4, top_k=2, layers="all", init="noise")
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.base_model.is_gradient_checkpointing
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=0)
    assert grads_a.keys() == grads_b.keys() and any(".gate." in n for n in grads_a)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-5, rtol=0, msg=n)


def test_flex_attention_is_transformers_own(contract_models):
    _, model = contract_models["qwen3"]
    ids, _ = batch("causal-lm")
    flex = upcycle(dense_model("qwen3"), num_experts=4, top_k=2, layers="all")
    flex.set_attn_implementation("flex_attention")
    assert flex.base_model.config._attn_implementation == "flex_attention"
    with torch.no_grad():
        torch.testing.assert_close(flex(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


# --- refusals -------------------------------------------------------------------------------

def test_a_layout_that_does_not_reproduce_the_ffn_is_refused(monkeypatch):
    wrong = architectures.FFNLayout("mlp", ("mlp.up_proj",), "mlp.down_proj", ("hidden_act",), True)
    monkeypatch.setitem(architectures.LAYOUTS, "qwen3", wrong)
    with pytest.raises(ValueError, match=r"model type 'qwen3': its FFN does not compute"):
        upcycle(dense_model("qwen3"), num_experts=4, top_k=2)


def test_unknown_ffn_shape_is_refused_naming_the_type():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"unsupported source architecture `model_type`='mamba'.*Block has mixer"):
        architectures.detect_layout("mamba", Block(), causal=True)


def test_no_split_modules_name_the_source_layer_class_for_fsdp_and_device_maps():
    from accelerate.utils.dataclasses import get_module_class_from_name

    model = upcycle(dense_model("qwen3"), num_experts=4, top_k=2, layers="all")
    assert set(model._no_split_modules) == {"Qwen3DecoderLayer"}
    assert get_module_class_from_name(model, "Qwen3DecoderLayer") is not None


@pytest.mark.parametrize("name", ["roberta", "gpt_neox", "modernbert"])
def test_lora_targets_attention_and_experts_and_keeps_routers_trainable(name):
    import types

    from hf_condcomp import training

    model = upcycle(dense_model(name), num_experts=4, top_k=2, layers="all")
    modules, parameters = training.lora_targets(model, {"attention", "experts"})
    assert modules and all(m.split(".")[0] in ("attention", "attn", "self_attn") for m in modules)
    block = model.config.ffn_layout["module"]
    assert parameters == [f"{block}.experts.down_proj",
                          f"{block}.experts.{'gate_up_proj' if name == 'modernbert' else 'up_proj'}"]
    args = types.SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets="attention,experts",
                                 lora_trainable="classifier,score")
    peft_model = training.apply_lora(model, args)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert all(n in trainable for n in training.routing_parameter_names(peft_model))
    assert any(n.endswith(".gate.weight") for n in trainable)


@pytest.mark.parametrize("name", ["qwen3", "roberta"])
def test_compiles_as_one_graph_and_matches_uncompiled(name):
    from test_model_contracts import assert_compiled_matches

    task = ARCHS[name][1]
    model = upcycle(dense_model(name), num_experts=4, top_k=2, layers="all", init="noise")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids, mask = batch(task)
    assert_compiled_matches(model, ids, mask, ids if task == "causal-lm" else torch.tensor([0, 2]), fullgraph=True)


def test_static_cache_decoding_with_a_fullgraph_compiled_forward(contract_models):
    model = contract_models["qwen3"][1]
    ids, mask = batch("causal-lm")
    greedy = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(ids, **greedy)
    torch._dynamo.reset()
    source = model._condcomp_source  # native decoders generate with the source model's own generate()
    source.forward = torch.compile(source.forward, fullgraph=True, backend="aot_eager")
    try:
        assert torch.equal(model.generate(ids, **greedy), expected)
    finally:
        del source.forward  # the module-scoped fixture's model goes on uncompiled


def test_a_task_checkpoint_loads_as_the_base_model_and_back(tmp_path):
    """As transformers' own classes do: a classifier's folder loads as `AutoModel` (same encoder,
    head left out), and a base model's folder loads as a classifier (encoder kept, head new)."""
    model = upcycle(dense_model("roberta"), num_experts=4, top_k=2, layers="all", init="noise").eval()
    model.save_pretrained(tmp_path / "classifier")
    ids, mask = batch("sequence-classification")
    with torch.no_grad():
        expected = model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    base = T.AutoModel.from_pretrained(tmp_path / "classifier").eval()
    assert type(base).__name__ == "CondCompModel"
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids, attention_mask=mask).last_hidden_state, expected, atol=0, rtol=0)
    base.save_pretrained(tmp_path / "base")
    again = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3).eval()
    with torch.no_grad():
        got = again.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    saved = json.loads((tmp_path / "classifier" / "config.json").read_text())["auto_map"]
    assert {"AutoModel", "AutoModelForSequenceClassification", "AutoModelForCausalLM"} <= set(saved)
