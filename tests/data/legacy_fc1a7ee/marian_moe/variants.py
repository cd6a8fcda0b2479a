"""The registry of gated variants: how a conditional layer decides which of its tokens run.

depth.py runs a layer on the tokens its variant keeps; each variant lives in a module of its own
(mixture_of_depths.py, compute_gates.py) and registers itself here by name. This module imports
neither, so variants and the mechanism depend on it and not on each other.

This file travels to the Hub with every saved model: only sibling relative imports.
"""

import torch

STRAIGHT_THROUGH = object()  # `decide`: run every token, the decision applied in the forward


class GatedVariant:
    """A per-token decision of whether a source layer runs. Subclass it in a module of its own, set the
    class attributes and register it with `@register_gated_variant`; the built-in ones are imported by depth.py (a
    sibling relative import, so that they travel to the Hub with saved models).

    name: the `variant` users pass to `upcycle` ("mod").
    layers_field: the config field listing its layers ("mod_layers").
    modules: {attribute: module class} it adds to a layer; their parameters are routing parameters
        (`--router_learning_rate`, kept trainable under LoRA) and are initialised by
        `_condcomp_init(std)` / drawn by `_condcomp_fresh(name, config, generator)`.
    spec_fields: {upcycling setting: config field} copied into the config when this variant is chosen.
    config_fields: config fields of its own that `CondCompConfig` does not declare (a variant defined
        outside the package); `upcycle` accepts them, with its `layers_field`, as keyword arguments.
    description: what a refusal calls it ("Mixture-of-Depths routed blocks").
    """

    name: str = None
    layers_field: str = None
    modules: dict = {}
    spec_fields: dict = {}
    config_fields: tuple = ()
    description: str = None

    def install(self, layer, config, causal):
        """Add this variant's modules to `layer` (every one in `modules`, unless overridden)."""
        for attribute, cls in self.modules.items():
            setattr(layer, attribute, cls(config))

    def config(self, layer):
        """The model config the layer's variant modules read at call time."""
        return next(layer._modules[a] for a in self.modules if a in layer._modules).config

    def decide(self, layer, x, rec, named):
        """(keep, scale) for the layer input x (B, T, H): keep (B, T) bool tokens that run, or None for
        every token, or `STRAIGHT_THROUGH` to run every token with the decision applied in the
        forward; scale (B, T) the weight of each token's update. Losses go to `rec.extra_losses`."""
        raise NotImplementedError


GATED_VARIANTS: dict[str, GatedVariant] = {}


def register_gated_variant(cls):
    """Class decorator: register a `GatedVariant` subclass under its `name`."""
    known = GATED_VARIANTS.get(cls.name)
    if known is not None and type(known) is not cls:
        raise ValueError(f"gated variant {cls.name!r} is already registered by {type(known).__name__}.")
    GATED_VARIANTS[cls.name] = cls()
    return cls


def layer_variant(layer) -> GatedVariant:
    """The gated variant of an installed conditional layer."""
    return GATED_VARIANTS[layer._condcomp_variant]


def variant_config_fields() -> set[str]:
    """The config fields the registered variants name (their layers and any field of their own)."""
    return {name for v in GATED_VARIANTS.values() for name in (v.layers_field, *v.config_fields)}


def conditional_layer_indices(config) -> list[int]:
    """Every layer of `config` that some gated variant routes or gates."""
    return sorted({i for v in GATED_VARIANTS.values() for i in (getattr(config, v.layers_field, None) or [])})


def masked_mean(values, mask):
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def all_real(x, real):
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if real is None else real
