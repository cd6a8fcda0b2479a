"""What a model computes that dropless top-k token choice with every token through every layer cannot.

vLLM's fused MoE (`vllm_refusal` in modeling_condcomp.py) and every native transformers MoE
architecture (hf_condcomp/exporters/) compute exactly that, so both read this one list and say
in their own words why each setting found here is refused:

- `gated`: a gated variant's layers (Mixture-of-Depths, compute gates) run a subset of each
  sequence's tokens;
- `routing`: a routing method other than token choice (expert choice picks tokens per expert);
- `capacity`: a capacity factor drops the tokens above an expert's capacity.

This file travels to the Hub with every saved model: only sibling relative imports.
"""

from dataclasses import dataclass

from .common import has_moe_layers
from .routing import get_routing_method
from .variants import GATED_VARIANTS


@dataclass(frozen=True)
class Blocker:
    """A config setting that dropless token choice cannot compute: `kind` is `gated`, `routing` or
    `capacity`; `description` what a gated variant's layers are ("Mixture-of-Depths routed blocks")."""

    kind: str
    field: str
    value: object
    description: str = ""

    def __str__(self) -> str:
        return f"`{self.field}`={self.value!r}"


def token_choice_blockers(config) -> list[Blocker]:
    """Every setting of `config` by which its model skips tokens: gated layers, then, where the model
    has MoE layers, a routing method that is not token choice and a capacity limit."""
    blockers = [Blocker("gated", v.layers_field, layers, v.description)
                for v in GATED_VARIANTS.values() if (layers := getattr(config, v.layers_field, None))]
    if has_moe_layers(config):
        if not get_routing_method(config.moe_routing).exports_natively:
            blockers.append(Blocker("routing", "moe_routing", config.moe_routing))
        if config.moe_capacity_factor is not None:
            blockers.append(Blocker("capacity", "moe_capacity_factor", config.moe_capacity_factor))
    return blockers
