"""The decoders people upcycle today, each built from its own transformers config class with the
settings that set it apart (Llama 3's rope scaling, Phi-4-mini's partial rotary LongRoPE, Gemma 3's
sliding and global layers, Gemma 4's per-layer head size, SmolLM3's layers without RoPE, Granite's
multipliers, GLM-4's fused FFN, Arcee's ungated FFN). Most are not named in `architectures.LAYOUTS`: their FFN and its
activation are recognised from the layer's modules and the config (`detect_layout`).

Reference: the dense parent. Copy-upcycled MoE, MoD at capacity 1 and open gates give its logits on
the real tokens of a left-padded batch (fp32, <= 1e-4) and its greedy tokens, and so does every
saved folder in one clean interpreter without hf_condcomp.
"""

import pytest
import torch
import transformers as T
from test_native import batch, greedy, real_logits

from hf_condcomp import upcycle
from hf_condcomp.modeling import architectures

from conftest import run_clean_python, save_with_reference

_LM = dict(vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name: (config, what sets the source apart, read back from the dense model's config so that the
# test does not silently run on defaults)
SOURCES = {
    "gemma3_text": (lambda: T.Gemma3TextConfig(
        **_LM, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}),
        lambda c: c.hidden_activation == "gelu_pytorch_tanh" and c.rope_parameters["full_attention"]["factor"] == 8),
    # Gemma 4 sets `head_dim` per layer (`global_head_dim` on full-attention layers): the config reads no one value
    "gemma4_text": (lambda: T.Gemma4TextConfig(
        **_LM, head_dim=8, global_head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        vocab_size_per_layer_input=99, hidden_size_per_layer_input=8),
        lambda c: c.to_dict()["per_layer_config"] == {"1": {"head_dim": 16}}),
    "llama3": (lambda: T.LlamaConfig(
        **_LM, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        lambda c: c.rope_parameters["rope_type"] == "llama3"),
    "qwen2.5": (lambda: T.Qwen2Config(**_LM, tie_word_embeddings=True), lambda c: c.model_type == "qwen2"),
    "qwen3": (lambda: T.Qwen3Config(**_LM, head_dim=8, tie_word_embeddings=True), lambda c: c.head_dim == 8),
    "phi4-mini": (lambda: T.Phi3Config(
        **_LM, tie_word_embeddings=True, max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0, 1.5, 2.0], "long_factor": [2.0, 4.0, 8.0],
                         "original_max_position_embeddings": 16}),
        lambda c: c.rope_parameters["partial_rotary_factor"] == 0.75),
    "smollm3": (lambda: T.SmolLM3Config(**_LM, no_rope_layer_interval=2), lambda c: c.no_rope_layers == [1, 0]),
    # Granite 3's multipliers shrink the logits (x 1/8) and every layer's output (x 0.22): at the default init,
    # experts with 1% noise move the logits by 1e-6, under the tolerance; at 0.3 by 5e-3, as for the others
    "granite": (lambda: T.GraniteConfig(**_LM, embedding_multiplier=12.0, residual_multiplier=0.22,
                                        attention_multiplier=0.0156, logits_scaling=8.0, initializer_range=0.3),
                lambda c: c.residual_multiplier == 0.22),
    "olmo2": (lambda: T.Olmo2Config(**_LM), lambda c: c.model_type == "olmo2"),
    "glm4": (lambda: T.Glm4Config(**_LM, head_dim=8), lambda c: c.model_type == "glm4"),
    "arcee": (lambda: T.ArceeConfig(**_LM), lambda c: c.hidden_act == "relu2"),
}
# settings at which the upcycled model is its dense parent
VARIANTS = {"moe": dict(num_experts=4, top_k=2, init="copy"), "mod": dict(capacity=1.0),
            "gate": dict(gate_init_bias=20.0)}


def dense_source(name):
    config, sets_apart = SOURCES[name]
    torch.manual_seed(0)
    dense = T.AutoModelForCausalLM.from_config(config()).eval()
    assert sets_apart(dense.config), name
    return dense


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(source, variant): (model, dense reference, folder)}, every layer made conditional."""
    root = tmp_path_factory.mktemp("today")
    ids, mask = batch("causal-lm")
    out = {}
    for name in SOURCES:
        dense = dense_source(name)
        ref = {"ids": ids, "mask": mask, "logits": real_logits(dense, ids, mask, "causal-lm"),
               "greedy": greedy(dense, ids)}
        for variant, settings in VARIANTS.items():
            model = upcycle(dense, variant=variant, layers="all", **settings)
            out[name, variant] = save_with_reference(model, ref, root / f"{name}-{variant}")
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(SOURCES))
def test_upcycled_source_is_its_dense_parent(saved, name, variant):
    model, ref, _ = saved[name, variant]
    torch.testing.assert_close(real_logits(model, ref["ids"], ref["mask"], "causal-lm"), ref["logits"],
                               atol=1e-4, rtol=0)
    assert torch.equal(greedy(model, ref["ids"]), ref["greedy"])


def test_unlisted_sources_are_recognised_from_their_modules(saved):
    """Gemma 3 and 4, SmolLM3, Granite, OLMo 2, GLM-4 and Arcee are not in the layout table: their FFN is
    found from the layer's modules, and its activation under whichever name their config uses."""
    layouts = {model.config.text_config.model_type: model.config.ffn_layout
               for (_, variant), (model, _, _) in saved.items() if variant == "moe"}
    unlisted = {name: layout for name, layout in layouts.items() if name not in architectures.LAYOUTS}
    assert set(unlisted) == {"gemma3_text", "gemma4_text", "smollm3", "granite", "olmo2", "glm4", "arcee"}
    assert all(tuple(layout["act"]) == architectures.FFN_ACTIVATIONS for layout in unlisted.values())
    assert unlisted["glm4"]["fused"] and not unlisted["arcee"]["gated"]


def test_saved_folders_load_without_hf_condcomp(saved, tmp_path):
    """One clean interpreter loads every folder through its remote code."""
    folders = {f"{name}-{variant}": str(folder) for (name, variant), (_, _, folder) in saved.items()}
    code = f"""
import torch, transformers as T
torch.set_num_threads(1)  # models this small only lose time to threads waiting on each other
for key, folder in {folders!r}.items():
    model = T.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), key
    ref = torch.load(folder + "/reference.pt")
    with torch.no_grad():
        logits = model(input_ids=ref["ids"], attention_mask=ref["mask"]).logits[ref["mask"].bool()]
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0, msg=key)
    out = model.generate(ref["ids"][:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref["greedy"]), key
print("ok", {len(folders)})
"""
    assert f"ok {len(folders)}" in run_clean_python(code, cwd=tmp_path).stdout


def test_an_activation_with_learned_parameters_is_refused_for_experts():
    """Apertus' xIELU learns its parameters per layer; experts build their activation from its name."""
    torch.manual_seed(0)
    dense = T.AutoModelForCausalLM.from_config(T.ApertusConfig(**_LM)).eval()
    with pytest.raises(ValueError, match=r"model type 'apertus': its FFN's activation 'xielu' has learned parameters"):
        upcycle(dense, variant="moe", num_experts=4, top_k=2, layers="all")
    ids, mask = batch("causal-lm")
    gated = upcycle(dense, variant="gate", layers="all", gate_init_bias=20.0)
    torch.testing.assert_close(real_logits(gated, ids, mask, "causal-lm"), real_logits(dense, ids, mask, "causal-lm"),
                               atol=1e-4, rtol=0)
