"""What vLLM's Transformers backend needs of a saved model, checked without vLLM.

vLLM (`model_impl="transformers"` or `"auto"`) builds `AutoModel.from_config(config)` from the folder's
remote code with the attention implementation "vllm" set on the config, reads the MoE settings off
`config.get_text_config()` (a text config that is another object makes the model multimodal to it), names
the checkpoint's weights by transformers' conversion mappings of the model it built, and swaps each MoE
block's `experts` for its fused SiLU-gated MoE. `benchmarks/serve_vllm.py` serves the folders with vLLM.
"""

import re

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModel
from transformers.modeling_utils import AttentionInterface

from hf_condcomp import upcycle

from conftest import tiny_source


def _tiny_phi3(layers=2):
    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return transformers.Phi3ForCausalLM(config).eval()


@pytest.fixture
def as_vllm_builds(monkeypatch):
    """vLLM's attention implementation registered (a stand-in: no model here runs it), and transformers'
    conversion mappings restored afterwards."""
    from transformers import conversion_mapping

    def vllm_attention(module, query, key, value, attention_mask, **kwargs):
        raise AssertionError("the stand-in for vLLM's attention is not run")

    monkeypatch.setitem(AttentionInterface._global_mapping, "vllm", vllm_attention)
    conversion_mapping.get_checkpoint_conversion_mapping("legacy")  # builds the registry
    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache",
                        dict(conversion_mapping._checkpoint_conversion_mapping_cache))
    monkeypatch.setattr(conversion_mapping, "USER_REGISTERED_MAPPINGS",
                        set(conversion_mapping.USER_REGISTERED_MAPPINGS))

    def build(config):
        config._attn_implementation = "vllm"  # as vLLM's `Base._patch_config` sets it
        return AutoModel.from_config(config, trust_remote_code=True)

    return build


@pytest.fixture(scope="module")
def phi3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3_moe")
    upcycle(_tiny_phi3(4), num_experts=4, top_k=2, layers="every_other").save_pretrained(folder)
    return folder


def test_the_saved_config_is_a_flat_text_config_with_mixtrals_moe_fields(phi3_folder):
    config = AutoConfig.from_pretrained(phi3_folder, trust_remote_code=True)
    assert config.get_text_config() is config
    assert config.get_text_config(decoder=True) is config
    # what vLLM's fused MoE reads off the text config
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)
    assert config.moe_intermediate_size == 48 and config.intermediate_size == 48
    assert config.hidden_act == "silu" and config.norm_topk_prob is True
    # the source's fields read through, and writes of the source's sizes reach the source's config
    assert (config.num_attention_heads, config.num_key_value_heads, config.hidden_size) == (2, 1, 32)
    assert config.rope_parameters == config.text_config.rope_parameters
    config.vocab_size = 101
    config.num_hidden_layers = 3
    assert (config.text_config.vocab_size, config.text_config.num_hidden_layers) == (101, 3)
    config.resid_pdrop = 0.25  # a source field this config has not: set on the source's config
    assert config.text_config.resid_pdrop == 0.25 and "resid_pdrop" not in config.__dict__
    # the file keeps the source's fields in `text_config` only
    saved = (phi3_folder / "config.json").read_text()
    assert saved.count('"num_attention_heads"') == 1 and saved.count('"rope_parameters"') == 1
    with pytest.raises(AttributeError):
        config.not_a_field  # noqa: B018


def test_the_generation_config_has_the_sources_special_tokens(phi3_folder):
    model = transformers.AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(phi3_folder,
                                                                                    trust_remote_code=True),
                                                          trust_remote_code=True)
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)


def _vllm_name(key, model, renamings):
    """The name vLLM's Transformers backend (0.32) gives a checkpoint weight: transformers' renamings of the
    model it built, then its own rules for the base model prefix and the head (`Base._create_hf_to_vllm_mapper`)."""
    for renaming in renamings:
        key, _ = renaming.rename_source_key(key)
    children = "|".join(name for name, _ in model.named_children())
    rules = {rf"^{model.base_model_prefix}\.(.+)": r"model.\1", rf"^(?!model\.)(({children}).*)": r"model.\1",
             rf"^(model\.)((?!{children}).+)": r"\2", r"^model\.(.+\.)*(lm_head.+)": r"\2"}
    for pattern, new in rules.items():
        if re.search(pattern, key):
            key = re.sub(pattern, new, key)
    return key


def test_every_saved_weight_has_the_name_where_vllm_holds_it(phi3_folder, as_vllm_builds):
    """The saved names are the source's (`model.layers...`, `lm_head.weight`): vLLM's own rules for the
    base model's prefix and the head place every weight, with transformers' generic renamings only."""
    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

    config = AutoConfig.from_pretrained(phi3_folder, trust_remote_code=True)
    model = as_vllm_builds(config)
    assert type(model).__name__ == "CondCompModel"
    renamings = [m for m in get_model_conversion_mapping(model) if isinstance(m, WeightRenaming)]  # transformers' own
    with safe_open(phi3_folder / "model.safetensors", "pt") as f:
        saved = sorted(f.keys())
    # vLLM holds the built model under `model.` and its own head as `lm_head`
    held = {f"model.{name}" for name, _ in model.named_parameters()} | {"lm_head.weight"}
    names = {key: _vllm_name(key, model, renamings) for key in saved}
    assert sorted(names.values()) == sorted(held)
    experts_name = "model.layers.1.mlp.experts.gate_up_proj"
    assert names[experts_name] == experts_name
    # three-dimensional experts, as vLLM's fused MoE takes them: (E, 2I, H) and (E, H, I)
    experts = model.layers[1].mlp.experts
    assert experts.gate_up_proj.shape == (4, 96, 32) and experts.down_proj.shape == (4, 32, 48)


def test_transformers_users_load_the_saved_names(phi3_folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(phi3_folder, trust_remote_code=True)
    assert model.config._attn_implementation != "vllm"
    with safe_open(phi3_folder / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert saved <= set(model.state_dict()) and "model.layers.1.mlp.gate.weight" in saved


REFUSALS = {
    "mod": (dict(variant="mod"), r"`mod_layers`=\[1, 3\]: Mixture-of-Depths"),
    "gate": (dict(variant="gate"), r"`gate_layers`=\[1, 3\]: compute-allocation gates run a subset"),
    "expert_choice": (dict(routing="expert_choice"), r"`moe_routing`='expert_choice': vLLM's fused MoE serves "
                                                     r"token-choice routing"),
    "capacity": (dict(capacity_factor=1.25), r"`moe_capacity_factor`=1.25: capacity-limited routing"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_vllm_refuses_what_it_cannot_serve_with_one_line(name, as_vllm_builds):
    settings, message = REFUSALS[name]
    model = upcycle(tiny_source("llama"), num_experts=4, top_k=2, layers="every_other", **settings)
    with pytest.raises(ValueError, match=r"^vLLM cannot serve this model: " + message) as err:
        as_vllm_builds(model.config)
    assert "\n" not in str(err.value)


def test_vllm_refuses_experts_that_are_not_silu_gated(as_vllm_builds):
    model = upcycle(tiny_source("gpt2"), num_experts=4, top_k=2, layers="every_other")
    with pytest.raises(ValueError, match=r"`ffn_activation`='gelu_new': vLLM's fused MoE assumes SiLU-gated "
                                         r"experts, and these experts are plain 'gelu_new' ones"):
        as_vllm_builds(model.config)


def test_a_servable_model_builds_for_vllm(as_vllm_builds):
    model = upcycle(tiny_source("llama"), num_experts=4, top_k=2, layers="every_other")
    built = as_vllm_builds(model.config)
    assert built.config._attn_implementation == "vllm"
    assert built.base_model.config._attn_implementation == "vllm"  # the source's attention dispatches to vLLM
