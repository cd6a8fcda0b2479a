"""The upcycling settings, defined once (as PEFT defines a method's config): `UpcycleSpec`.

Every surface reads this one dataclass: `hf_condcomp.upcycle(...)` takes its fields as keyword
arguments with its defaults (and checks them in `__post_init__`), `hf-condcomp upcycle` builds
one flag per field with the help text below, and the recipes accept exactly these names under
`upcycling:`. The fields marked `config_field` are config fields of the upcycled model whose
defaults come from the config itself (`CondCompFields`), so those defaults live in one place too.
"""

import dataclasses
from dataclasses import dataclass, field

from .modeling.configuration_condcomp import MOE_IMPLEMENTATIONS, ROUTING_TYPES, CondCompFields
from .modeling.depth import GATED_VARIANTS
from .modeling.routing import ROUTING_METHODS

INITS = ("copy", "noise", "drop", "split-random", "split-kmeans")
# How the routers start (upcycling/router_init.py): random, or from prompts per expert.
ROUTER_INITS = ("random", "hidden", "hidden_last", "cheap_embed")
TASKS = ("base", "sequence-classification", "token-classification", "masked-lm", "causal-lm", "seq2seq-lm")
# "moe", then every registered gated variant (modeling/depth.py: `register_gated_variant`).
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
class UpcycleSpec:
    """How a dense checkpoint becomes a conditional-computation model (see `hf_condcomp.upcycle`)."""

    variant: str = field(default="moe", metadata=_knob(
        "moe: FFNs become experts; mod: Mixture-of-Depths routed blocks; gate: compute-allocation gates",
        VARIANTS))
    num_experts: int | None = field(default=None, metadata=_knob(
        "experts per MoE layer (E); default 8 from one source, one per source from several (a multiple of the "
        "number of sources gives each source that many experts)"))
    top_k: int = field(default=2, metadata=_knob("experts each token picks under token choice (k)"))
    routing: str = field(default="token_choice", metadata=_knob(
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
    capacity: float = field(default=0.5, metadata=_knob(
        "mod: fraction of each sequence's tokens a routed block processes"))
    compute_penalty: float = field(default=0.01, metadata=_knob(
        "gate: lambda in loss = task loss + lambda * mean allocation"))
    threshold: float = field(default=0.5, metadata=_knob(
        "gate: tokens whose allocation is below it skip the layer at inference"))
    mod_layers: str | list | None = field(default=None, metadata=_knob(
        "with variant moe: also make these blocks Mixture-of-Depths routed blocks at `capacity`"))
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
    moe_implementation: str = field(default="grouped", metadata=_knob(
        "experts' compute: grouped (default, CPU and CUDA), eager (reference loop), megablocks (CUDA), or "
        "transformers' grouped_mm / batched_mm / ...",
        MOE_IMPLEMENTATIONS))
    router_aux_loss_coef: float = _config_field("router_aux_loss_coef", "weight of the Switch load-balancing loss")
    router_z_loss_coef: float = _config_field("router_z_loss_coef", "weight of the ST-MoE router z-loss")
    router_jitter_noise: float = _config_field("router_jitter_noise",
                                               "multiplicative jitter on router inputs (training)")
    gate_init_bias: float = _config_field("gate_init_bias", "gate: initial bias; sigmoid(bias) is the first allocation")
    gate_straight_through: bool = _config_field(
        "gate_straight_through", "gate: train on the inference decision (False: soft gates only)")
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
            experts = (f"`num_experts`={self.num_experts}" if self.num_experts is not None
                       else "`num_experts` (unset: 8 from one source, one per source from several)")
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
            fields.update({field: getattr(self, name) for name, field in layers.gated_variant.spec_fields.items()})
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
            **{name: getattr(self, name) if v.name == self.variant else None
               for v in GATED_VARIANTS.values() for name in v.spec_fields},
            "expert_sources": expert_sources,
            "shared_weights": ("base" if self.base is not None else "average") if merged else None,
            "router_init": self.router_init if moe else None,
            "noise_std": self.noise_std if self.init == "noise" else None,
            "drop_ratio": self.drop_ratio if self.init == "drop" else None,
            "seed": self.seed,
        }

    def config_overrides(self) -> dict:
        """The fields that are config fields of the upcycled model, as `upcycle` passes them on."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("config_field")}


SPEC_FIELDS = {f.name: f for f in dataclasses.fields(UpcycleSpec)}
# The keys a recipe's `upcycling:` section accepts (task and num_labels come from the recipe).
RECIPE_KEYS = tuple(name for name, f in SPEC_FIELDS.items() if f.metadata["recipe"])


def split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(spec fields, other config overrides) of `upcycle`'s keyword arguments."""
    spec = {k: v for k, v in kwargs.items() if k in SPEC_FIELDS}
    return spec, {k: v for k, v in kwargs.items() if k not in SPEC_FIELDS}
