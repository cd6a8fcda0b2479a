"""The registry of gated variants: how a conditional layer decides which of its tokens run, and
the settings each one owns.

depth.py runs a layer on the tokens its variant keeps; each variant lives in a module of its own
(mixture_of_depths.py, compute_gates.py) and registers itself here by name, with its config fields
(`VariantField`). Every surface reads them from here: `CondCompConfig` takes each field with its
default and check (configuration_condcomp.py imports the built-in variants, so that its class
declares their fields), `UpcycleSpec`, `hf-condcomp upcycle --<setting>` and the recipes'
`upcycling:` keys take the fields a variant exposes as upcycling settings (hf_condcomp/spec.py).
This module imports no variant, so variants and the mechanism depend on it and not on each other.

This file travels to the Hub with every saved model: only sibling relative imports.
"""

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch

STRAIGHT_THROUGH = object()  # `decide`: run every token, the decision applied in the forward


@dataclass(frozen=True)
class VariantField:
    """A config field of a gated variant, declared once with its variant.

    name: the config field ("mod_capacity"), as config.json stores it.
    default, type: its default and its type (`float`, `list[int] | None`).
    help: one line, for the flag, the spec and the config's docs.
    check: `value -> bool`, whether a value is allowed; `requirement` and `fix` complete the error,
        "`mod_capacity` (capacity) must be in (0, 1], got 2.0: pass the fraction ...".
    setting: the upcycling setting that sets it (`upcycle(...)`, `hf-condcomp upcycle --...`, a
        recipe's `upcycling:` key): under the field's own name ("gate_init_bias") a config field
        set whatever the variant, with this default; under another name ("capacity") a setting
        copied into the config and recorded in `config.upcycling` when this variant is chosen;
        None: a config field only (`--set name=value`, `upcycle(name=value)`).
    """

    name: str
    default: Any
    type: Any
    help: str
    check: Callable[[Any], bool] | None = None
    requirement: str = ""
    fix: str = ""
    setting: str | None = None

    def validate(self, value) -> None:
        """A `ValueError` naming the field (and its setting), the value, what is allowed and the fix."""
        if self.check is None:
            return
        try:
            allowed = bool(self.check(value))
        except TypeError:  # a value of another type (`"half"` for a float)
            allowed = False
        if not allowed:
            alias = f" ({self.setting})" if self.setting not in (None, self.name) else ""
            raise ValueError(f"`{self.name}`{alias} {self.requirement}, got {value!r}: {self.fix}.")

    def fresh_default(self):
        """The default, copied (a list default is not shared between configs)."""
        return copy.deepcopy(self.default)


class GatedVariant:
    """A per-token decision of whether a source layer runs. Subclass it in a module of its own, set the
    class attributes and register it with `@register_gated_variant`; configuration_condcomp.py
    imports the built-in ones (a sibling relative import, so that they travel to the Hub with saved
    models); a variant defined outside the package registers itself when its module is imported.

    name: the `variant` users pass to `upcycle` ("mod").
    layers_field: the config field listing its layers ("mod_layers"), declared for it (a list of
        layer indices, default None).
    layers_setting: help of an upcycling setting named `layers_field` that, with variant "moe",
        also makes those layers this variant's (MoE + Mixture-of-Depths); None: no such setting.
    fields: its other config fields (`VariantField`): default, type, check and upcycling setting.
    modules: {attribute: module class} it adds to a layer; their parameters are routing parameters
        (`--router_learning_rate`, kept trainable under LoRA) and are initialised by
        `_condcomp_init(std)` / drawn by `_condcomp_fresh(name, config, generator)`.
    description: what a refusal calls it ("Mixture-of-Depths routed blocks").
    """

    name: str = None
    layers_field: str = None
    layers_setting: str | None = None
    fields: tuple = ()
    modules: dict = {}
    description: str = None

    def config_fields(self) -> tuple:
        """Every config field of this variant: its layers, then `fields`."""
        layers = VariantField(self.layers_field, None, list[int] | None, f"layers with {self.description}")
        return (layers, *self.fields)

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
    """Class decorator: register a `GatedVariant` subclass under its `name`. Its config fields must
    be new: two variants cannot own one field."""
    known = GATED_VARIANTS.get(cls.name)
    if known is not None and type(known) is not cls:
        raise ValueError(f"gated variant {cls.name!r} is already registered by {type(known).__name__}.")
    variant = cls()
    owners = {f.name: v.name for v in GATED_VARIANTS.values() if v.name != cls.name for f in v.config_fields()}
    for f in variant.config_fields():
        if f.name in owners:
            raise ValueError(f"gated variant {cls.name!r} declares config field `{f.name}`, which gated variant "
                             f"{owners[f.name]!r} owns: give the field another name.")
    GATED_VARIANTS[cls.name] = variant
    return cls


def layer_variant(layer) -> GatedVariant:
    """The gated variant of an installed conditional layer."""
    return GATED_VARIANTS[layer._condcomp_variant]


def variant_fields() -> list[VariantField]:
    """Every registered variant's config fields (their layers and the fields of their own)."""
    return [f for v in GATED_VARIANTS.values() for f in v.config_fields()]


def variant_config_fields() -> set[str]:
    """The names of the registered variants' config fields."""
    return {f.name for f in variant_fields()}


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
