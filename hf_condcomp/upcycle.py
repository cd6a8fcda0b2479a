"""Upcycling: a dense pretrained checkpoint becomes a conditional-computation model.

Every weight of the source is copied key for key into the target (same names, asserted shapes),
except the FFNs of the chosen layers, which become E experts and a router:

- `copy`: every expert is the dense FFN (sparse upcycling, Komatsuzaki et al. 2022). With
  normalised top-k weights the experts' outputs sum to the dense output whatever the router
  says, so the model starts exactly at its dense parent. The router is N(0, initializer_range).
- `noise`: copy, plus Gaussian noise of `noise_std` times each matrix's standard deviation.
- `drop`: Drop-Upcycling (Nakamura et al. 2025): in each expert a random `drop_ratio` of the
  intermediate neurons is re-initialised from N(mean, std) of the dense matrix, so experts
  diverge from the start.
- `split-random` / `split-kmeans`: the FFN's neurons are partitioned into E groups of I/E
  (MoEfication, Zhang et al. 2022), at random or by balanced k-means on the neurons' input
  weights. Selected experts are summed with unit weights and each expert carries 1/k of the
  output bias, so top-k = E reproduces the dense FFN exactly; the router starts at the groups'
  mean input weights (a token is sent to the groups it pre-activates most).

The target is transformers' own model of the source (`hf_condcomp.modeling.modeling_condcomp`),
with MoE blocks in the chosen layers' FFN places, and routed blocks or gates on the chosen layers.
The steps live in `hf_condcomp.upcycling`, one module per concern: `sources` (resolving and
loading the source), `targets` (target classes and task), `layers` (layer selection),
`expert_init` (the FFN readers and the inits above), `merging` (several sources as the experts,
shared weights from a base or their average), `router_init` (routers from prompts),
`convert_native` (target config and state dict) and `copy_weights` (every other weight). This
module composes them into `upcycle()`.
"""

import copy
import inspect

from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from .modeling.architectures import decoder_depth
from .modeling.common import SENTENCE_TRANSFORMERS_SOURCE
from .modeling.configuration_condcomp import SEQ2SEQ_GATED_REFUSAL
from .modeling.depth import GATED_VARIANTS
from .spec import SPEC_FIELDS, UpcycleSpec, split_kwargs
from .upcycling.convert_native import convert_native_state_dict, native_config, native_stacks
from .upcycling.expert_init import balanced_kmeans
from .upcycling.layers import parse_layers, parse_stack_layers
from .upcycling.merging import prompt_routers, resolve_num_experts, shared_and_expert_sources
from .upcycling.merging import source_name as source_name_of
from .upcycling.sources import load_source, sentence_transformers_folder
from .upcycling.targets import TARGETS, check_overrides, check_task

__all__ = [
    "upcycle", "parse_layers", "balanced_kmeans", "convert_native_state_dict", "sentence_transformers_folder",
    "TARGETS",
]


def upcycle(source, **settings):
    """Upcycle a dense checkpoint into a conditional-computation model (see module docstring).

    Args:
        source: Hub id, local folder, embedded name (`all-MiniLM-L6-v2`, `SmolLM2-135M-Instruct`)
            or a loaded `PreTrainedModel` of any supported architecture (README: "Models and
            architectures"); or a list of them, dense fine-tunes of one model, which become the
            experts of each MoE layer, one expert per source, or `num_experts / len(sources)` each
            (a source may be named twice); the shared weights are then `base`'s, or the sources'
            average (upcycling/merging.py).
        **settings: the fields of `hf_condcomp.spec.UpcycleSpec`, with its defaults and help
            (`variant`, `num_experts`, `top_k`, `routing`, `capacity_factor`, `init`, `layers`,
            `task`, `num_labels`, `capacity`, `compute_penalty`, `threshold`, `mod_layers`,
            `noise_std`, `drop_ratio`, `seed`, `moe_implementation`, and the config fields
            `router_aux_loss_coef`, ...), plus any other field of the target config.
    Returns:
        The upcycled model (in eval mode), whose `config.upcycling` records how it was made.
    """
    spec_settings, config_overrides = split_kwargs(settings)
    spec = UpcycleSpec(**spec_settings)  # checks every setting, naming it
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    spec = resolve_num_experts(spec, len(sources))
    config_overrides = {**spec.config_overrides(), **config_overrides}
    (variant, num_experts, top_k, routing, capacity_factor, init, layers, task, num_labels, mod_layers, noise_std,
     drop_ratio, seed, moe_implementation) = (getattr(spec, name) for name in (
        "variant", "num_experts", "top_k", "routing", "capacity_factor", "init", "layers", "task", "num_labels",
        "mod_layers", "noise_std", "drop_ratio", "seed", "moe_implementation"))

    merged = len(sources) > 1 or spec.base is not None
    if merged:
        dense, expert_sources, task, names = shared_and_expert_sources(sources, spec, task, num_labels)
        source_name = source_name_of(spec.base) if spec.base is not None else None
    else:
        dense, task, source_name = load_source(sources[0], task, num_labels)
        expert_sources, names = None, [source_name]
    check_task(task)
    src_config = dense.config
    num_layers = src_config.num_hidden_layers
    stacks = native_stacks(dense, task)
    seq2seq = len(stacks) > 1
    if seq2seq:
        if variant != "moe" or mod_layers is not None:
            raise ValueError(f"`variant`={variant!r}{' with `mod_layers`' if mod_layers is not None else ''} is not "
                             f"supported on encoder-decoder models (model type {src_config.model_type!r}): "
                             f"{SEQ2SEQ_GATED_REFUSAL}")
        if spec.router_init != "random":
            raise ValueError(f"`router_init`={spec.router_init!r} is not supported on encoder-decoder models (model "
                             f"type {src_config.model_type!r}): prompts start the routers of one stack's layers. "
                             "Use router_init='random'.")
        chosen, decoder_chosen = parse_stack_layers(layers, num_layers, decoder_depth(src_config))
        if not chosen and not decoder_chosen:
            raise ValueError(f"`layers`={layers!r} names no layer of either stack.")
    else:
        chosen = parse_layers(layers, num_layers)
    fields = dict(moe_implementation=moe_implementation)
    if variant == "moe":
        split = init.startswith("split")
        inter = stacks[0][2]  # `native_stacks` checked that an encoder-decoder's stacks have one width
        fields.update(
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_routing=routing,
            moe_capacity_factor=capacity_factor,
            moe_layers=chosen,
            router_unit_weights=split,
            **({"decoder_moe_layers": decoder_chosen} if seq2seq else {}),
            moe_expert_intermediate_size=inter // num_experts if split else inter,
        )
    gated = GATED_VARIANTS.get(variant)
    if gated is None and mod_layers is not None:  # MoE + Mixture-of-Depths
        gated, chosen_gated = GATED_VARIANTS["mod"], parse_layers(mod_layers, num_layers, "mod_layers")
    else:
        chosen_gated = chosen
    if gated is not None:
        fields[gated.layers_field] = chosen_gated
        fields.update({field: getattr(spec, name) for name, field in gated.spec_fields.items()})
    if task in ("sequence-classification", "token-classification"):
        fields["num_labels"] = src_config.num_labels
        fields["id2label"] = src_config.id2label
        fields["label2id"] = src_config.label2id
    fields["upcycling"] = {
        "source": source_name,
        "source_model_type": src_config.model_type,
        "task": task,
        "variant": variant,
        "layers": {"encoder": chosen, "decoder": decoder_chosen} if seq2seq else chosen,
        "init": init if variant == "moe" else None,
        "num_experts": num_experts if variant == "moe" else None,
        "top_k": top_k if variant == "moe" else None,
        "routing": routing if variant == "moe" else None,
        "capacity_factor": capacity_factor,
        **{name: getattr(spec, name) if v.name == variant else None
           for v in GATED_VARIANTS.values() for name in v.spec_fields},
        "expert_sources": names if merged else None,
        "shared_weights": ("base" if spec.base is not None else "average") if merged else None,
        "router_init": spec.router_init if variant == "moe" else None,
        "noise_std": noise_std if init == "noise" else None,
        "drop_ratio": drop_ratio if init == "drop" else None,
        "seed": seed,
    }
    target_class = TARGETS[task]
    check_overrides(config_overrides, src_config)
    config = native_config(src_config, stacks, fields, config_overrides)

    with no_init_weights():  # every weight is overwritten below: skip the random init
        target = target_class(config)
    routers = None
    if variant == "moe" and spec.router_init != "random":
        routers = prompt_routers(spec, dense, names, sources, num_experts, chosen)
    state = convert_native_state_dict(dense, target, config, stacks, init, seed, noise_std, drop_ratio,
                                      expert_sources, routers)
    target.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        # The model was built without `post_init`'s weight init, which is also where transformers
        # ties the head to the embeddings: tie here, or fine-tuning trains two copies of a matrix
        # that `save_pretrained` writes once.
        target.tie_weights()
    target.to(dense.dtype)
    if seq2seq and getattr(dense, "generation_config", None) is not None:  # decoder start, forced BOS / EOS tokens, ...
        target.generation_config = copy.deepcopy(dense.generation_config)
    # `save_pretrained` copies the source's pooling, `Normalize`, ... next to the upcycled model.
    first = spec.base if spec.base is not None else sources[0]
    st_name = first if not isinstance(first, PreTrainedModel) else getattr(first, "name_or_path", "")
    st_folder = sentence_transformers_folder(st_name)
    if st_folder is not None:
        setattr(target, SENTENCE_TRANSFORMERS_SOURCE, st_folder)
    return target.eval()


# `help(upcycle)` and `inspect.signature(upcycle)` show the spec's fields with its defaults.
upcycle.__signature__ = inspect.Signature(
    [inspect.Parameter("source", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
       for name, f in SPEC_FIELDS.items()]
    + [inspect.Parameter("config_overrides", inspect.Parameter.VAR_KEYWORD)]
)
