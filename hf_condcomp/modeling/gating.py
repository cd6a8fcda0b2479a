"""Running the layer stack, and the gated-layer variants that wrap single layers."""

import torch


def wrap_gated_layers(layers, config, causal):
    """Wrap the layers listed in `mod_layers` / `gate_layers` (see issue: gated variants)."""
    if config.mod_layers or config.gate_layers:
        raise NotImplementedError("gated layers (`mod_layers`, `gate_layers`) are not implemented yet")


def run_layers(layers, x: torch.Tensor, ctx, output_hidden_states=False):
    """Apply every layer; returns (hidden states, tuple of per-layer hidden states or None)."""
    all_hidden = (x,) if output_hidden_states else None
    for layer in layers:
        x = layer(x, ctx)
        if output_hidden_states:
            all_hidden = all_hidden + (x,)
    return x, all_hidden
