"""A gated variant is one module registered by name: `register_gated_variant` is the only hook.

A variant written here (every even position runs the layer, the others pass along the residual)
is registered, then upcycled, run, inspected, trained and refused by export with no other change
to the package: against the dense parent's layer, the update reaches even positions only.

A variant with a config field of its own (all tokens run, each update scaled by `all_tokens_scale`)
gets its `hf-condcomp upcycle` flag and its config.json field, starts at its dense parent, and
reloads through the package. Its module is not part of the saved folder's code: the package, with
the module imported, loads it; the folder's own code refuses it by name (docs/architecture.md).
"""

import json
import os
import tempfile

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))

import hf_condcomp  # noqa: E402
from hf_condcomp.export import ExportError, choose_format  # noqa: E402
from hf_condcomp.modeling.variants import (  # noqa: E402
    GATED_VARIANTS,
    GatedVariant,
    VariantField,
    register_gated_variant,
)
from hf_condcomp.training.models import routing_parameter_names  # noqa: E402


class EvenScale(nn.Module):
    """One scale for the even positions' update, starting at 1."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(1))

    def _condcomp_init(self, std):
        nn.init.ones_(self.weight)

    def _condcomp_fresh(self, name, config, generator):
        return torch.ones(1)


class EvenPositions(GatedVariant):
    name = "even_positions"
    layers_field = "even_positions_layers"
    modules = {"even_scale": EvenScale}
    description = "even-position layers"

    def decide(self, layer, x, rec, named):
        B, T, _ = x.shape
        keep = (torch.arange(T, device=x.device) % 2 == 0).expand(B, T)
        keep = keep if rec.token_mask is None else keep & rec.token_mask
        return keep, layer.even_scale.weight.expand(B, T)


@pytest.fixture
def registered():
    register_gated_variant(EvenPositions)
    yield GATED_VARIANTS[EvenPositions.name]
    GATED_VARIANTS.pop(EvenPositions.name)


def dense_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config).eval()


def layer_io(model, index, input_ids):
    """(input, output) hidden states of layer `index` in one forward."""
    seen = {}
    layer = model.model.layers[index]
    hook = layer.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(x=kwargs.get("hidden_states", args[0] if args else None),
                                                 y=out[0] if isinstance(out, tuple) else out),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        hook.remove()
    return seen["x"], seen["y"]


def test_a_registered_variant_is_upcycled_and_runs_on_its_tokens_only(registered):
    dense = dense_llama()
    model = hf_condcomp.upcycle(dense, variant="even_positions", layers=[1])
    assert model.config.even_positions_layers == [1]
    assert model.config.upcycling["variant"] == "even_positions"
    ids = torch.randint(1, 64, (2, 7))
    x, y = layer_io(model, 1, ids)
    # Odd positions pass along the residual untouched.
    torch.testing.assert_close(y[:, 1::2], x[:, 1::2], atol=0, rtol=0)
    # Even positions get the dense layer's update computed over the even positions only (causal).
    sub = x[:, 0::2]
    positions = torch.arange(0, 7, 2).expand(2, -1)
    causal = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    with torch.no_grad():
        expected = dense.model.layers[1](sub, attention_mask=causal, position_ids=positions,
                                         position_embeddings=dense.model.rotary_emb(sub, positions))
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(y[:, 0::2], expected, atol=1e-5, rtol=1e-5)
    # Its module's parameters are routing parameters (router learning rate, kept trainable under LoRA).
    assert routing_parameter_names(model) == {"model.layers.1.even_scale.weight"}


def test_a_registered_variant_is_refused_by_export_naming_it(registered):
    model = hf_condcomp.upcycle(dense_llama(), variant="even_positions", layers=[1])
    with pytest.raises(ExportError, match="`even_positions_layers`=\\[1\\]: even-position layers"):
        choose_format(model.config)


def test_unregistered_variant_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"`variant` must be one of \('moe', .*'mod'.*\), got 'even_positions'"):
        hf_condcomp.upcycle(dense_llama(), variant="even_positions")


def test_two_variants_cannot_claim_one_layer(registered):
    with pytest.raises(ValueError, match="layer 1 is in both"):
        hf_condcomp.upcycle(dense_llama(), variant="mod", layers=[1], even_positions_layers=[1])


# --- a variant from outside the package, end to end ---------------------------------------------


class AllTokensGate(nn.Module):
    """No parameters: the gate runs every token, each update weighted by `all_tokens_scale`."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def _condcomp_init(self, std):
        pass


class AllTokens(GatedVariant):
    name = "all_tokens"
    layers_field = "all_tokens_layers"
    fields = (VariantField("all_tokens_scale", 1.0, float, "weight of each token's update",
                           check=lambda s: s > 0, requirement="must be > 0", fix="pass e.g. 1.0",
                           setting="all_tokens_scale"),)
    modules = {"all_tokens_gate": AllTokensGate}
    description = "all-token gates"

    def decide(self, layer, x, rec, named):
        scale = layer.all_tokens_gate.config.all_tokens_scale
        return None, torch.full(x.shape[:2], scale, device=x.device)


@pytest.fixture
def all_tokens():
    register_gated_variant(AllTokens)
    yield GATED_VARIANTS[AllTokens.name]
    GATED_VARIANTS.pop(AllTokens.name)


def test_an_outside_variant_gets_its_flag_config_field_and_reloads(all_tokens, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from hf_condcomp.cli import main

    with pytest.raises(SystemExit):
        main(["upcycle", "--help"])
    assert "--all-tokens-scale" in capsys.readouterr().out
    dense = dense_llama()
    dense.save_pretrained(tmp_path / "dense")
    folder = tmp_path / "gated"
    assert main(["upcycle", str(tmp_path / "dense"), str(folder), "--variant", "all_tokens", "--layers", "1",
                 "--all-tokens-scale", "1"]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["all_tokens_scale"] == 1.0 and config["all_tokens_layers"] == [1]
    ids = torch.randint(1, 64, (2, 7))
    with torch.no_grad():
        reference = dense(ids).logits
    # Reloaded through the package, whose Auto classes see the registry (with trust_remote_code too: the
    # package's registered classes win): the dense parent's function at step 0.
    for trust in (False, True):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust).eval()
        assert type(model.model.layers[1].all_tokens_gate) is AllTokensGate
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=0)
    # The folder's own code (what a process without hf_condcomp runs) knows the built-in variants only: it
    # refuses, naming the variant and the fix, rather than load the model without its gates.
    remote = get_class_from_dynamic_module("modeling_condcomp.CondCompForCausalLM", str(folder))
    assert remote.__module__.startswith("transformers_modules")
    with pytest.raises(ValueError, match="`upcycling.variant`='all_tokens' is not a registered gated variant"):
        remote.from_pretrained(folder)
    # The variant's check names its field, as the built-in ones do.
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "bad"), "--variant", "all_tokens",
                 "--all-tokens-scale", "0"]) == 2
    assert "`all_tokens_scale` must be > 0, got 0.0: pass e.g. 1.0." in capsys.readouterr().err


def test_the_cli_imports_variants_named_by_entry_points(tmp_path, monkeypatch):
    import importlib.metadata

    from hf_condcomp import cli

    (tmp_path / "plugin_variant.py").write_text(
        "from hf_condcomp.modeling.variants import GatedVariant, VariantField, register_gated_variant\n\n\n"
        "@register_gated_variant\nclass Plugin(GatedVariant):\n    name = 'plugin'\n"
        "    layers_field = 'plugin_layers'\n"
        "    fields = (VariantField('plugin_weight', 1.0, float, 'a weight', setting='plugin_weight'),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = importlib.metadata.EntryPoint("plugin", "plugin_variant", cli.VARIANT_ENTRY_POINTS)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [entry] if group == entry.group else [])
    try:
        sub = next(a for a in cli.build_parser()._actions if hasattr(a, "choices") and a.choices)
        assert "--plugin-weight" in sub.choices["upcycle"].format_help()
    finally:
        GATED_VARIANTS.pop("plugin", None)
