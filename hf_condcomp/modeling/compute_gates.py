"""Compute-allocation gates (adaptive computation with a ponder cost, Graves 2016; one gate per
layer): the gated variant "gate".

    a_i = sigmoid(v . x_i + b) (`compute_gate`), x_i' = x_i + a_i * (f(x)_i - x_i). Training runs
    every token and adds `gate_compute_penalty * mean(a)` (mean over real tokens and gated layers)
    to the loss (`gate_straight_through`: with the inference decision in the forward, as below, and
    the soft gate's gradient); in eval mode tokens with a_i < `gate_threshold` skip the layer.
    v starts at 0 and b at `gate_init_bias`: every token starts at a = sigmoid(b) (b = 4: 0.982;
    b >= 17 rounds to 1 in fp32, and the model equals its dense parent).

Config fields (declared below, `ComputeGates`): `gate_layers`, `gate_compute_penalty`, `gate_threshold`,
`gate_init_bias`, `gate_straight_through`. The layer mechanism is depth.py's, the registry variants.py's.
This file travels to the Hub with every saved model: only sibling relative imports.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as init

from .variants import STRAIGHT_THROUGH, GatedVariant, VariantField, all_real, masked_mean, register_gated_variant


class ComputeGate(nn.Module):
    """Compute-allocation gate a = sigmoid(v . x + b), v = 0 and b = `gate_init_bias` at init."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # read at call time: `gate_threshold` can be swept after loading
        self.weight = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.bias = nn.Parameter(torch.full((1,), float(config.gate_init_bias)))
        self.record_routing = False
        self.routing_log = []

    def forward(self, x):
        return torch.sigmoid(F.linear(x, self.weight, self.bias).squeeze(-1).float())  # (B, T)

    def _condcomp_init(self, std):
        init.zeros_(self.weight)
        init.constant_(self.bias, float(self.config.gate_init_bias))

    def _condcomp_fresh(self, name, config, generator):
        if name == "bias":
            return torch.full((1,), float(config.gate_init_bias))
        return torch.zeros(tuple(self.weight.shape))


@register_gated_variant
class ComputeGates(GatedVariant):
    name = "gate"
    layers_field = "gate_layers"
    fields = (
        VariantField("gate_compute_penalty", 0.01, float, "lambda in loss = task loss + lambda * mean allocation",
                     check=lambda p: p >= 0, requirement="must be >= 0",  # also rejects NaN
                     fix="pass the weight of the mean allocation in the loss, e.g. 0.01 (0 = no pressure to skip)",
                     setting="compute_penalty"),
        VariantField("gate_threshold", 0.5, float, "tokens whose allocation is below it skip the layer at inference",
                     check=lambda t: 0 <= t <= 1, requirement="must be in [0, 1]",
                     fix="allocations are sigmoids in [0, 1]; pass e.g. 0.5 (0 = never skip)", setting="threshold"),
        VariantField("gate_init_bias", 4.0, float, "initial bias; sigmoid(bias) is the first allocation",
                     setting="gate_init_bias"),
        VariantField("gate_straight_through", True, bool,
                     "train with the inference decision, gradients as through the soft gate (False: soft gates only)",
                     setting="gate_straight_through"),
    )
    modules = {"compute_gate": ComputeGate}
    description = "compute-allocation gates"

    def decide(self, layer, x, rec, named):
        gate = layer.compute_gate
        config = gate.config
        a = gate(x)  # (B, T) allocations in [0, 1]
        real = rec.token_mask
        decided = a >= config.gate_threshold
        decided = decided if rec.pinned is None else decided | rec.pinned
        decided = decided if real is None else decided & real  # the inference decision
        if layer.training:
            rec.extra_losses.append(config.gate_compute_penalty * masked_mean(a, real) / len(config.gate_layers))
            if config.gate_straight_through:
                rec.decided[layer._condcomp_index] = decided
                return STRAIGHT_THROUGH, a
            keep = None  # soft gates: every token runs, so `a` gets its gradient
        else:
            keep = decided
        if gate.record_routing:
            gate.routing_log.append((keep if keep is not None else all_real(x, real)).detach())
        return keep, a
