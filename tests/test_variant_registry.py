"""A gated variant is one module registered by name: `register_gated_variant` is the only hook.

A variant written here (every even position runs the layer, the others pass along the residual)
is registered, then upcycled, run, inspected, trained and refused by export with no other change
to the package: against the dense parent's layer, the update reaches even positions only.
"""

import os
import tempfile

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))

import hf_condcomp  # noqa: E402
from hf_condcomp.export import ExportError, choose_format  # noqa: E402
from hf_condcomp.modeling.variants import GATED_VARIANTS, GatedVariant, register_gated_variant  # noqa: E402
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
