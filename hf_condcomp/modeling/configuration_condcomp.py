"""Configurations of the conditional-computation models.

A `CondCompConfig` holds the source's own Transformers config (`text_config`) and the
conditional-computation fields below. Field names follow the ones users know from Mixtral,
Switch and Qwen-MoE (`num_local_experts`, `num_experts_per_tok`, `router_aux_loss_coef`, ...).

The config is flat to readers: `get_text_config()` is the config itself, and the source's fields
(`num_attention_heads`, `hidden_act`, `intermediate_size`, ...) read through to `text_config`. A
config whose text config is another object is a multimodal one to vLLM and to transformers'
generation utilities; this one is a text model with Mixtral's MoE fields
(`num_local_experts`, `num_experts_per_tok`, `moe_intermediate_size`).

This file travels to the Hub with every saved model: only sibling relative imports.
"""

from dataclasses import dataclass, field, make_dataclass

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, GPT2Config, PreTrainedConfig

from .architectures import decoder_depth

# The built-in gated variants register themselves, with their config fields, when imported: before
# `CondCompFields` below declares those fields.
from .compute_gates import ComputeGates  # noqa: F401
from .experts import EXPERTS_FUNCTIONS as _EXPERTS
from .mixture_of_depths import RoutedBlocks  # noqa: F401
from .routing import ROUTING_METHODS
from .variants import GATED_VARIANTS, variant_fields

# The built-in routing methods; a method registered later (routing.register_routing) is accepted too.
ROUTING_TYPES = tuple(ROUTING_METHODS)
# Ours, then transformers' (`grouped_mm`, `batched_mm`, ... on the installed release): experts.py's registry.
MOE_IMPLEMENTATIONS = tuple(_EXPERTS.valid_keys())
# The defaults every surface shows (the config, `UpcycleSpec`, the CLI's `demo`): Mixtral's.
DEFAULT_NUM_EXPERTS = 8
DEFAULT_TOP_K = 2


@dataclass
class _SharedFields:
    """Fields shared by every conditional-computation config, but those of the gated variants.

    Mixture-of-Experts (FFN layers listed in `moe_layers`):
        num_local_experts: experts per MoE layer (E).
        num_experts_per_tok: experts each token picks under token-choice routing (k).
        norm_topk_prob: renormalise the top-k router probabilities to sum to one, so that a
            copy-upcycled model starts exactly at its dense parent.
        router_unit_weights: weight every selected expert by exactly 1 in value (p / stopgrad(p),
            so the router still learns), summing the experts as MoEfication does; split upcycling
            sets it, so that top-k = E reproduces the dense FFN.
        router_aux_loss_coef: weight of the Switch load-balancing loss (Fedus et al. 2021, eq. 4).
        router_z_loss_coef: weight of the ST-MoE router z-loss (Zoph et al. 2022, eq. 5).
        router_jitter_noise: multiplicative jitter on router inputs during training (Switch).
        output_router_logits: return per-layer router logits in the outputs (the base model's too)
            and add the weighted router losses to the loss, as Mixtral does; `upcycle` sets it, so
            that fine-tuning an upcycled model balances its experts.
        moe_layers: indices of the layers whose FFN is a Mixture-of-Experts (of an encoder-decoder
            source: of its encoder).
        decoder_moe_layers: of an encoder-decoder source, indices of its decoder's layers whose FFN
            is a Mixture-of-Experts.
        moe_routing: `token_choice` (each token picks k experts) or `expert_choice`
            (each expert picks its top tokens; Zhou et al. 2022).
        moe_capacity_factor: `None` for dropless token choice. Otherwise each expert takes at
            most ceil(tokens * k * factor / E) tokens and the overflow passes through the residual.
            For expert choice each expert takes tokens * factor / E tokens (default factor = k).
        moe_expert_intermediate_size: FFN width of one expert (`None`: the dense FFN width).
        moe_implementation: experts' compute: `grouped` (default, CPU and GPU), `eager`
            (per-expert loop, the reference), `megablocks` (CUDA, optional package), or one of
            transformers' experts implementations (`grouped_mm`, `batched_mm`, ...). An
            `experts_implementation` given to `from_pretrained` (transformers' own argument) wins.
        upcycling: provenance written by `hf_condcomp.upcycle` (source, init, ...).

    Gated layers (every variant's own fields are declared in its module, `GatedVariant.fields`:
    mixture_of_depths.py, compute_gates.py; `CondCompFields` below adds them):
        keep_pooled_token: the token a pooling head reads (the [CLS] of a BERT model with its
            pooler, as sequence classification uses) runs through every routed and gated layer:
            it takes one of a routed block's ceil(capacity * n) places, and gates never skip it.
            A router gets no gradient from the tokens it skips, so a [CLS] skipped early in
            fine-tuning tends to stay skipped and the classifier reads a stale representation.
        skipped_tokens_as_keys: (encoders only) tokens a routed or gated layer skips still serve
            as its attention keys and values, from their unchanged hidden states; only their
            query, attention output and FFN are skipped. Raposo et al.'s MoD hides them (False).
            Their key/value projections count in the executed compute.
    """

    num_local_experts: int = DEFAULT_NUM_EXPERTS
    num_experts_per_tok: int = DEFAULT_TOP_K
    norm_topk_prob: bool = True
    router_unit_weights: bool = False
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    output_router_logits: bool = False
    moe_layers: list[int] | None = None
    decoder_moe_layers: list[int] | None = None
    moe_routing: str = "token_choice"
    moe_capacity_factor: float | None = None
    moe_expert_intermediate_size: int | None = None
    moe_implementation: str = "grouped"
    upcycling: dict | None = None
    keep_pooled_token: bool = True
    skipped_tokens_as_keys: bool = False


def _declared(f):
    """A `VariantField` as a dataclass field (a mutable default made per config)."""
    if isinstance(f.default, (list, dict, set)):
        return f.name, f.type, field(default_factory=f.fresh_default)
    return f.name, f.type, field(default=f.default)


# Every conditional-computation config's fields: the shared ones and those of the registered gated variants
# (`mod_layers`, `mod_capacity`, ..., `gate_layers`, ...), with their defaults.
CondCompFields = make_dataclass(
    "CondCompFields", [_declared(f) for f in variant_fields()], bases=(_SharedFields,), namespace={
        "__doc__": _SharedFields.__doc__.rstrip() + "".join(f"\n        {f.name}: {f.help}." for f in variant_fields()),
        "__module__": __name__})


def _check_layers(name, layers, num_layers):
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) for i in layers):
        raise ValueError(f"`{name}` must be a list of layer indices, got {layers!r}.")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"`{name}` has layer index {bad[0]} out of range: the model has {num_layers} layers, "
            f"so indices must be in [0, {num_layers - 1}]."
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"`{name}` lists a layer twice: {list(layers)}.")


def validate_condcomp_config(config) -> None:
    """Raise a `ValueError` naming the field, the value and what is allowed."""
    E, k = config.num_local_experts, config.num_experts_per_tok
    if not isinstance(E, int) or E < 1:
        raise ValueError(f"`num_local_experts` must be a positive integer, got {E!r}.")
    if not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(
            f"`num_experts_per_tok` (top-k) must be between 1 and `num_local_experts`={E}, got {k!r}: "
            "lower top-k or add experts."
        )
    if config.moe_routing not in ROUTING_METHODS:
        raise ValueError(f"`moe_routing` must be one of {tuple(ROUTING_METHODS)}, got {config.moe_routing!r}.")
    cf = config.moe_capacity_factor
    if cf is not None and not cf > 0:
        raise ValueError(
            f"`moe_capacity_factor` must be > 0 (or None for dropless routing), got {cf!r}."
        )
    # Imported here, not read as this module's global: a config class sent to another process by value
    # (vLLM pickles remote-code configs with cloudpickle) would carry the registry's kernels with it.
    from .experts import EXPERTS_FUNCTIONS

    if config.moe_implementation not in EXPERTS_FUNCTIONS:
        raise ValueError(
            f"`moe_implementation` must be one of {EXPERTS_FUNCTIONS.valid_keys()}, "
            f"got {config.moe_implementation!r}."
        )
    size = config.moe_expert_intermediate_size
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"`moe_expert_intermediate_size` must be a positive integer or None, got {size!r}.")
    n = config.num_hidden_layers
    _check_layers("moe_layers", config.moe_layers, n)
    seq2seq = getattr(config, "decoder_ffn_layout", None) is not None
    if config.decoder_moe_layers and not seq2seq:
        raise ValueError(
            f"`decoder_moe_layers`={config.decoder_moe_layers} names layers of a decoder stack, which only "
            "encoder-decoder sources have: list the layers in `moe_layers`."
        )
    if seq2seq:
        _check_layers("decoder_moe_layers", config.decoder_moe_layers, config.num_decoder_layers)
    _check_gated_layers(config, n, seq2seq)
    if config.skipped_tokens_as_keys and (getattr(config, "ffn_layout", None) or {}).get("causal", True):
        raise ValueError(
            "`skipped_tokens_as_keys`=True is supported for encoders only, got model type "
            f"{getattr(getattr(config, 'text_config', None), 'model_type', config.model_type)!r}: decoders keep "
            "skipped tokens out of attention and the KV cache; leave it False."
        )
    for f in variant_fields():  # each variant's own checks (`VariantField.check`)
        f.validate(getattr(config, f.name))


def _check_gated_layers(config, num_layers, seq2seq):
    """The registered gated variants' layers: in range, none on an encoder-decoder, one variant a layer."""
    if seq2seq:
        gated = [v.layers_field for v in GATED_VARIANTS.values() if getattr(config, v.layers_field, None)]
        if gated:
            raise ValueError(f"`{gated[0]}` is not supported on encoder-decoder models (model type "
                             f"{config.text_config.model_type!r}): {SEQ2SEQ_GATED_REFUSAL}")
    owner = {}  # layer -> the gated variant's field that lists it
    for variant in GATED_VARIANTS.values():
        name = variant.layers_field
        layers = getattr(config, name) or []
        _check_layers(name, layers, num_layers)
        for i in layers:
            if i in owner:
                raise ValueError(
                    f"layer {i} is in both `{owner[i]}` and `{name}`: a block has one gated variant (routed, "
                    "gated, ...), not two."
                )
            owner[i] = name


SEQ2SEQ_GATED_REFUSAL = (
    "routed and gated layers run a subset of a stack's tokens, and the decoder's cross-attention and "
    "its cache over the encoder's states have no subset form; use variant 'moe'."
)


def _post_init(config):
    for f in variant_fields():
        if f.name not in config.__dict__:  # a field of a variant registered after this class was made
            setattr(config, f.name, f.fresh_default())
        elif f.type is float and type(config.__dict__[f.name]) is int:  # `2` from YAML or JSON for 2.0
            setattr(config, f.name, float(config.__dict__[f.name]))
    for name in ("moe_layers", "decoder_moe_layers", *(v.layers_field for v in GATED_VARIANTS.values())):
        value = getattr(config, name)
        setattr(config, name, [] if value is None else [int(i) for i in value])
    validate_condcomp_config(config)


# Fields of every config that the source's own model reads off `text_config`: the head's labels and loss
# (`problem_type`, `num_labels` through `id2label`), FFN chunking, tied embeddings. Set on a
# `CondCompConfig` (as transformers' tests, `from_pretrained(..., num_labels=5)` and training code do,
# also after the model is built), they are set on its `text_config` too.
_SHARED_WITH_TEXT_CONFIG = ("id2label", "label2id", "problem_type", "chunk_size_feed_forward", "tie_word_embeddings")


def _text_config_field(name):
    """A field of the source read and written on `text_config`, where `generate()` and the source's
    model find it: a `CondCompConfig` has the same `bos_token_id`, `vocab_size`, ... as its dense
    parent, and resizing the embeddings (`get_text_config().vocab_size = n`) resizes the source's."""

    def get(self):
        return getattr(self.text_config, name, None) if self.text_config is not None else None

    def set_(self, value):
        if self.text_config is None:
            if value is None:
                return
            raise ValueError(f"`{name}` is read from `text_config`, which this config does not have.")
        setattr(self.text_config, name, value)

    return property(get, set_, doc=f"`text_config.{name}`.")


# Set in a config's `__dict__` while transformers sets it up or checks its own fields: the source's
# fields do not read through.
_SETTING_UP = "_condcomp_setting_up"


class _OwnFieldsOnly:
    """`with _OwnFieldsOnly(config):` transformers' code sees the config's own fields only."""

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        self.config.__dict__[_SETTING_UP] = True

    def __exit__(self, *exc):
        del self.config.__dict__[_SETTING_UP]


@strict
class CondCompConfig(PreTrainedConfig, CondCompFields):
    """A native conditional-computation model (modeling_condcomp.py): the source's own
    transformers config as `text_config`, which the installed transformers builds its model from,
    and where that model's FFNs are (`ffn_layout`, architectures.py).

    Routed blocks and gates (`mod_layers`, `gate_layers`) are the source's own layers made
    conditional (depth.py).
    """

    model_type = "condcomp"
    sub_configs = {"text_config": AutoConfig}
    # transformers' MoE configs' other name for the experts per layer (Qwen-MoE's; TRL reads it)
    attribute_map = {"num_experts": "num_local_experts"}

    ffn_layout: dict | None = None
    # an encoder-decoder source's decoder FFN (`ffn_layout` is then its encoder's); None otherwise
    decoder_ffn_layout: dict | None = None
    ffn_activation: str | None = None
    tie_word_embeddings: bool = False
    # The last field: the dataclass `__init__` assigns the others first, so that `__setattr__`, which
    # mirrors the shared fields onto `text_config`, leaves it alone until `__post_init__` decides.
    text_config: dict | PreTrainedConfig | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):
            values = dict(self.text_config)
            self.text_config = AutoConfig.for_model(values.pop("model_type"), **values)
        text = self.text_config
        # What the source's config says, unless this config was given its own value (`num_labels=5`).
        given = {name for name in _SHARED_WITH_TEXT_CONFIG if getattr(self, name) not in (None, 0)}
        given |= {"id2label", "label2id"} if kwargs.get("num_labels") is not None else set()
        given.discard("tie_word_embeddings")  # always the source's: its head is tied or not
        kept = {} if text is None else {name: getattr(text, name, None) for name in _SHARED_WITH_TEXT_CONFIG}
        # transformers' own set-up (`hasattr(self, "rope_parameters")`, ...) sees this config's fields only
        with _OwnFieldsOnly(self):
            super().__post_init__(**kwargs)
        if text is None:  # `CondCompConfig()`, as transformers builds for defaults; no model from it
            return
        for name in _SHARED_WITH_TEXT_CONFIG:
            value = getattr(self, name) if name in given else kept[name]
            if name == "tie_word_embeddings":
                value = bool(value)
            elif name == "chunk_size_feed_forward":
                value = value or 0
            setattr(self, name, value)  # and on `text_config` (`__setattr__`)
        _post_init(self)

    def __setattr__(self, name, value):
        if self._source_field(name):  # `hidden_dropout_prob`, ...: set where the source's model reads it
            setattr(self.__dict__["text_config"], name, value)
            return
        super().__setattr__(name, value)
        if name in _SHARED_WITH_TEXT_CONFIG:
            text = self.__dict__.get("text_config")
            if isinstance(text, PreTrainedConfig) and getattr(text, name, None) != value:
                setattr(text, name, value)

    bos_token_id = _text_config_field("bos_token_id")
    eos_token_id = _text_config_field("eos_token_id")
    pad_token_id = _text_config_field("pad_token_id")
    num_hidden_layers = _text_config_field("num_hidden_layers")
    hidden_size = _text_config_field("hidden_size")
    vocab_size = _text_config_field("vocab_size")

    @property
    def num_decoder_layers(self) -> int | None:
        """The decoder's depth of an encoder-decoder source, None for other sources."""
        return decoder_depth(self.text_config)

    @property
    def initializer_range(self) -> float:
        return getattr(self.text_config, "initializer_range", 0.02)

    @property
    def moe_intermediate_size(self) -> int | None:
        """FFN width of one expert (Qwen-MoE's and vLLM's name): `moe_expert_intermediate_size`, else
        the dense FFN width."""
        return None if self.text_config is None else expert_intermediate_size(self)

    def _get_generation_parameters(self):
        """Generation parameters set on this config itself: a source's own (a translation model's
        `num_beams`, `forced_eos_token_id`, ...) stay in `text_config`, which declares them."""
        with _OwnFieldsOnly(self):
            return super()._get_generation_parameters()

    def get_text_config(self, decoder=None, encoder=None) -> "CondCompConfig":
        """The config itself: a flat text config, whose source fields read through to `text_config`."""
        return self

    def __getattr__(self, name):
        """A field this config does not have is the source's (`num_attention_heads`, `rope_parameters`, ...).
        Private and special names are not read through."""
        text = self.__dict__.get("text_config")
        if name.startswith("_") or _SETTING_UP in self.__dict__ or not isinstance(text, PreTrainedConfig):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            return getattr(text, name)
        except RuntimeError as err:
            # A per-layer field of a heterogeneous source (Gemma 4's `head_dim`) has no one value: transformers
            # raises a RuntimeError there, which `hasattr` (its own config validation) does not catch.
            raise AttributeError(f"{name!r} is set per layer in the source config: {err}") from err

    def _source_field(self, name) -> bool:
        """Whether `name` is a field of the source's config that this config does not have itself."""
        text = self.__dict__.get("text_config")
        return (isinstance(text, PreTrainedConfig) and name in text.__dict__ and name not in self.__dict__
                and not hasattr(type(self), name) and _SETTING_UP not in self.__dict__)


def intermediate_size_of(config) -> int:
    """Width of the dense FFN of the source architecture."""
    if isinstance(config, GPT2Config):
        return config.n_inner if config.n_inner is not None else 4 * config.n_embd
    return config.intermediate_size


def expert_intermediate_size(config) -> int:
    """FFN width of one expert: `moe_expert_intermediate_size`, else the source's dense FFN width."""
    return config.moe_expert_intermediate_size or intermediate_size_of(getattr(config, "text_config", None) or config)


def is_condcomp_config(config) -> bool:
    """Whether `config` (a config, or config.json read as a dict) is that of a model of this package:
    a `CondCompConfig` (also as the remote-code copy that travels with a saved model), a config
    carrying the `upcycling` record that `hf_condcomp.upcycle` writes, or one saved under our model
    types (`condcomp`, and `condcomp_<source>` of earlier releases: legacy.py)."""
    if isinstance(config, CondCompFields) or type(config).__module__.rpartition(".")[2] == __name__.rpartition(".")[2]:
        return True
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    model_type = str(get("model_type") or "")
    own = CondCompConfig.model_type
    return isinstance(get("upcycling"), dict) or model_type == own or model_type.startswith(own + "_")
