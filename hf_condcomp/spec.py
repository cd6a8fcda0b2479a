"""The upcycling settings, defined once (as PEFT defines a method's config): `UpcycleSpec`.

Every surface reads this one dataclass: `hf_condcomp.upcycle(...)` takes its fields as keyword
arguments with its defaults (and checks them in `__post_init__`), `hf-condcomp upcycle` builds
one flag per field with the help text below, and the recipes accept exactly these names under
`upcycling:`. The fields marked `config_field` are config fields of the upcycled model whose
defaults come from the config itself (`CondCompFields`), so those defaults live in one place too.

The settings of the gated variants (`capacity`, `threshold`, `mod_layers`, ...) are not written
here: each variant declares them with its config fields (`VariantField.setting`,
`GatedVariant.layers_setting`: hf_condcomp/modeling/variants.py), and `spec_class()` adds them to
the settings below. A variant registered later (from outside the package) gets a class of its
own with its settings too; `UpcycleSpec` and `SPEC_FIELDS` are those of the built-in variants.
"""

import dataclasses
from dataclasses import dataclass, field

from .modeling.configuration_condcomp import (
    DEFAULT_NUM_EXPERTS,
    DEFAULT_TOP_K,
    MOE_IMPLEMENTATIONS,
    ROUTING_TYPES,
    CondCompFields,
)
from .modeling.modeling_condcomp import TASK_CLASSES
from .modeling.routing import ROUTING_METHODS
from .modeling.variants import GATED_VARIANTS

INITS = ("copy", "noise", "drop", "split-random", "split-kmeans")
# How the routers start (upcycling/router_init.py): random, or from prompts per expert.
ROUTER_INITS = ("random", "hidden", "hidden_last", "cheap_embed")
TASKS = tuple(TASK_CLASSES)
# "moe", then every gated variant registered at import (modeling/variants.py: `register_gated_variant`).
VARIANTS = ("moe", *GATED_VARIANTS)

_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CondCompFields)}


def _knob(help, choices=None, recipe=True, **extra):
    return {"help": help, "choices": choices, "recipe": recipe, **extra}


def _config_field(name, help):
    """A field of the upcycled model's config, with the config's own default."""
    return field(default=_CONFIG_DEFAULTS[name], metadata=_knob(help, config_field=True))


def _error(argument, value, allowed):
    return ValueError(f"`{argument}` must be {allowed}, got {value!r}.")


@dataclass
class UpcycleSettings:
    """How a dense checkpoint becomes a conditional-computation model (see `hf_condcomp.upcycle`): the
    settings but the gated variants' own, which `spec_class()` adds."""

    variant: str = field(default="moe", metadata=_knob("moe: FFNs become experts", VARIANTS))
    num_experts: int | None = field(default=None, metadata=_knob(
        f"experts per MoE layer (E); default {DEFAULT_NUM_EXPERTS} from one source, one per source from several (a "
        "multiple of the number of sources gives each source that many experts)"))
    top_k: int = field(default=DEFAULT_TOP_K, metadata=_knob("experts each token picks under token choice (k)"))
    routing: str = field(default=_CONFIG_DEFAULTS["moe_routing"], metadata=_knob(
        "token_choice (each token picks k experts) or expert_choice (each expert picks its tokens)", ROUTING_TYPES))
    capacity_factor: float | None = field(default=None, metadata=_knob(
        "expert capacity factor; None: dropless token choice (expert choice: tokens * factor / E each)"))
    init: str = field(default="copy", metadata=_knob(
        "experts from the dense FFN: copy, noise, drop (Drop-Upcycling), split-random or split-kmeans (MoEfication)",
        INITS))
    layers: str | list | None = field(default="every_other", metadata=_knob(
        "which layers get the variant: every_other, all, or indices like 0,2,4; encoder-decoder sources: "
        "the same for both stacks, or per stack as encoder:every_other,decoder:all"))
    task: str | None = field(default=None, metadata=_knob(
        "head of the upcycled model; default: the source architecture's own", TASKS, recipe=False))
    num_labels: int | None = field(default=None, metadata=_knob(
        "size of a new classification head", recipe=False))
    base: str | None = field(default=None, metadata=_knob(
        "several sources: the model whose non-FFN (shared) weights the MoE takes; default: the sources' average "
        "(Branch-Train-MiX)"))
    router_init: str = field(default="random", metadata=_knob(
        "routers: random, hidden (each expert's row is the normalised mean hidden state of its prompts at the "
        "layer's input), hidden_last (of the prompts' last tokens), cheap_embed (mean token embedding)",
        ROUTER_INITS))
    expert_prompts: str | list | dict | None = field(default=None, metadata=_knob(
        "prompts of each expert (per source or per expert) for router_init hidden / hidden_last / cheap_embed: "
        "a list of prompt lists or {positive_prompts, negative_prompts}, a dict by source, or a YAML / text file"))
    tokenizer: str | None = field(default=None, metadata=_knob(
        "tokenizer of the prompts; default: the base's, else the first source's"))
    noise_std: float = field(default=0.01, metadata=_knob("init noise: noise std relative to each matrix's std"))
    drop_ratio: float = field(default=0.5, metadata=_knob("init drop: share of neurons re-initialised per expert"))
    seed: int = field(default=0, metadata=_knob("seeds the router, noise, drop and split initialisation"))
    moe_implementation: str = field(default=_CONFIG_DEFAULTS["moe_implementation"], metadata=_knob(
        "experts' compute: grouped (default, CPU and CUDA), eager (reference loop), megablocks (CUDA), or "
        "transformers' grouped_mm / batched_mm / ...",
        MOE_IMPLEMENTATIONS))
    router_aux_loss_coef: float = _config_field("router_aux_loss_coef", "weight of the Switch load-balancing loss")
    router_z_loss_coef: float = _config_field("router_z_loss_coef", "weight of the ST-MoE router z-loss")
    router_jitter_noise: float = _config_field("router_jitter_noise",
                                               "multiplicative jitter on router inputs (training)")
    keep_pooled_token: bool = _config_field(
        "keep_pooled_token", "routed and gated layers always compute the token a pooling head reads ([CLS])")
    skipped_tokens_as_keys: bool = _config_field(
        "skipped_tokens_as_keys", "encoders: skipped tokens still serve as attention keys and values")

    def __post_init__(self):
        variants = ("moe", *GATED_VARIANTS)  # a variant registered after import is accepted too
        if self.variant not in variants:
            raise _error("variant", self.variant, f"one of {variants}")
        if self.num_experts is not None and (not isinstance(self.num_experts, int) or self.num_experts < 1):
            raise _error("num_experts", self.num_experts, "a positive integer")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= (self.num_experts or self.top_k):
            experts = (f"`num_experts`={self.num_experts}" if self.num_experts is not None else
                       f"`num_experts` (unset: {DEFAULT_NUM_EXPERTS} from one source, one per source from several)")
            raise ValueError(
                f"`top_k` (num_experts_per_tok) must be between 1 and {experts}, got {self.top_k!r}: lower top_k or "
                "raise num_experts."
            )
        if self.routing not in ROUTING_METHODS:
            raise _error("routing", self.routing, f"one of {tuple(ROUTING_METHODS)}")
        if self.init not in INITS:
            raise _error("init", self.init, f"one of {INITS}")
        if self.router_init not in ROUTER_INITS:
            raise _error("router_init", self.router_init, f"one of {ROUTER_INITS}")
        if self.router_init != "random" and self.init.startswith("split"):
            raise ValueError(f"`router_init`={self.router_init!r} with `init`={self.init!r}: split experts start "
                             "with routers of their own (the groups' mean input weights); use router_init random.")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise _error("capacity_factor", self.capacity_factor, "> 0, or None for dropless routing")
        if self.task is not None and self.task not in TASKS:
            raise _error("task", self.task, f"one of {TASKS}")
        if not 0 <= self.drop_ratio <= 1:
            raise _error("drop_ratio", self.drop_ratio, "in [0, 1]")
        if self.noise_std < 0:
            raise _error("noise_std", self.noise_std, ">= 0")

    def config_fields(self, layers, src_config, task, expert_width) -> dict:
        """The upcycled model's config fields this spec sets, for `layers` (`ChosenLayers`) of a source whose
        dense FFN is `expert_width` wide."""
        fields = dict(moe_implementation=self.moe_implementation)
        if self.variant == "moe":
            split = self.init.startswith("split")
            fields.update(num_local_experts=self.num_experts, num_experts_per_tok=self.top_k, moe_routing=self.routing,
                          moe_capacity_factor=self.capacity_factor, moe_layers=layers.stack,
                          router_unit_weights=split, output_router_logits=True,
                          moe_expert_intermediate_size=expert_width // self.num_experts if split else expert_width)
            if layers.decoder is not None:
                fields["decoder_moe_layers"] = layers.decoder
        if layers.gated_variant is not None:
            fields[layers.gated_variant.layers_field] = layers.gated
            fields.update({f.name: self.setting(f) for f in _chosen_settings(layers.gated_variant)})
        if task in ("sequence-classification", "token-classification"):
            fields.update(num_labels=src_config.num_labels, id2label=src_config.id2label,
                          label2id=src_config.label2id)
        return fields

    def provenance(self, layers, src_config, task, source, expert_sources) -> dict:
        """`config.upcycling`: how the model was made. `source`: the name of the model the shared weights
        come from (None: the sources' average); `expert_sources`: the names of the sources merged as
        experts (None: one source)."""
        moe = self.variant == "moe"
        merged = expert_sources is not None
        return {
            "source": source,
            "source_model_type": src_config.model_type,
            "task": task,
            "variant": self.variant,
            "layers": layers.record(),
            "init": self.init if moe else None,
            "num_experts": self.num_experts if moe else None,
            "top_k": self.top_k if moe else None,
            "routing": self.routing if moe else None,
            "capacity_factor": self.capacity_factor,
            **{f.setting: self.setting(f) if v.name == self.variant else None
               for v in GATED_VARIANTS.values() for f in _chosen_settings(v)},
            "expert_sources": expert_sources,
            "shared_weights": ("base" if self.base is not None else "average") if merged else None,
            "router_init": self.router_init if moe else None,
            "noise_std": self.noise_std if self.init == "noise" else None,
            "drop_ratio": self.drop_ratio if self.init == "drop" else None,
            "seed": self.seed,
        }

    def setting(self, variant_field):
        """The value of a gated variant's setting (`VariantField.setting`); its default where this spec's class
        was made before the variant was registered."""
        return getattr(self, variant_field.setting, variant_field.default)

    def config_overrides(self) -> dict:
        """The fields that are config fields of the upcycled model, as `upcycle` passes them on."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("config_field")}


def _chosen_settings(variant) -> list:
    """The fields of `variant` set by an upcycling setting of another name (`capacity` -> `mod_capacity`):
    copied into the config, and recorded, when the variant is chosen."""
    return [f for f in variant.fields if f.setting not in (None, f.name)]


def _variant_settings() -> list:
    """(name, type, field) of the registered gated variants' settings, for `make_dataclass`: `variant`
    with their names, each variant's layers setting, and its fields' settings (`VariantField.setting`)."""
    names = "; ".join(f"{v.name}: {v.description}" for v in GATED_VARIANTS.values())
    settings = [("variant", str, field(default="moe", metadata=_knob(
        f"moe: FFNs become experts; {names}", ("moe", *GATED_VARIANTS))))]
    for v in GATED_VARIANTS.values():
        if v.layers_setting:
            settings.append((v.layers_field, str | list | None, field(default=None, metadata=_knob(v.layers_setting))))
        for f in v.fields:
            if f.setting is not None:  # the variant's name first, as the flags' help reads it
                own = f.setting == f.name
                settings.append((f.setting, f.type, field(default=f.default, metadata=_knob(
                    f"{v.name}: {f.help}", config_field=own))))
    return settings


_SPEC_CLASSES = {}


def spec_class() -> type:
    """`UpcycleSpec` with the settings of every gated variant registered now (one class per set of
    variants): the class `upcycle`, the CLI and the recipes read."""
    key = tuple((name, type(v)) for name, v in GATED_VARIANTS.items())
    cls = _SPEC_CLASSES.get(key)
    if cls is None:
        settings = _variant_settings()
        general = {f.name for f in dataclasses.fields(UpcycleSettings)} - {"variant"}
        names = [name for name, _, _ in settings]
        clash = sorted({n for n in names if n in general or names.count(n) > 1})
        if clash:
            raise ValueError(f"gated variant setting(s) {clash} clash with another upcycling setting: name the "
                             "`VariantField.setting` of each differently.")
        cls = _SPEC_CLASSES[key] = dataclasses.make_dataclass(
            "UpcycleSpec", settings, bases=(UpcycleSettings,),
            namespace={"__doc__": UpcycleSettings.__doc__.split(":")[0] + ".", "__module__": __name__})
    return cls


def spec_fields() -> dict:
    """{name: dataclass field} of every upcycling setting, the registered variants' included."""
    return {f.name: f for f in dataclasses.fields(spec_class())}


def recipe_keys() -> tuple:
    """The keys a recipe's `upcycling:` section accepts (task and num_labels come from the recipe)."""
    return tuple(name for name, f in spec_fields().items() if f.metadata["recipe"])


UpcycleSpec = spec_class()  # the built-in variants' settings
SPEC_FIELDS = spec_fields()
RECIPE_KEYS = recipe_keys()


def split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(spec fields, other config overrides) of `upcycle`'s keyword arguments."""
    known = spec_fields()
    spec = {k: v for k, v in kwargs.items() if k in known}
    return spec, {k: v for k, v in kwargs.items() if k not in known}
