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
import os

from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from . import assets
from .cards import UpcycleCard
from .modeling.common import MODEL_CARD, SENTENCE_TRANSFORMERS_SOURCE, TOKENIZER_SOURCE
from .spec import SPEC_FIELDS, spec_class, split_kwargs
from .upcycling.convert_native import convert_native_state_dict, native_stacks, upcycled_config
from .upcycling.expert_init import balanced_kmeans
from .upcycling.layers import choose_layers, parse_layers
from .upcycling.merging import load_dense, prompt_routers, resolve_num_experts
from .upcycling.sources import sentence_transformers_folder
from .upcycling.targets import TARGETS, check_upcycle

__all__ = [
    "upcycle", "parse_layers", "balanced_kmeans", "convert_native_state_dict", "sentence_transformers_folder",
    "TARGETS",
]


def upcycle(source, **settings):
    """Upcycle a dense checkpoint into a conditional-computation model (see module docstring), in
    these steps:

    1. the settings become an `UpcycleSpec`, each checked and named where wrong;
    2. the source is loaded (or the sources and their base: upcycling/merging.py), and each stack's
       FFN found and checked against its layout;
    3. the settings are checked against the source, in one place (`check_upcycle`), and the layers
       chosen;
    4. the spec gives the config fields and the provenance record of the target config, around a
       copy of the source's config;
    5. the target, transformers' own model of the source with the chosen layers conditional, is
       built without random init and given the converted weights (experts, routers, the rest
       copied key for key: upcycling/convert_native.py);
    6. what the source has beside its weights comes along: the tied head, the dtype, the generation
       config, the sentence-transformers modules that `save_pretrained` copies.

    Args:
        source: Hub id, local folder, embedded name (`all-MiniLM-L6-v2`, `SmolLM2-135M-Instruct`)
            or a loaded `PreTrainedModel` of any supported architecture; or a list of them, dense
            fine-tunes of one model, which become the experts of each MoE layer, one expert per
            source, or `num_experts / len(sources)` each; the shared weights are then `base`'s, or
            the sources' average.
        **settings: the fields of `hf_condcomp.spec.UpcycleSpec`, with its defaults and help
            (`variant`, `num_experts`, `top_k`, `routing`, `capacity_factor`, `init`, `layers`, `task`,
            ...), plus any other field of the target config (`router_aux_loss_coef`, ...).
    Returns:
        The upcycled model (in eval mode), whose `config.upcycling` records how it was made.
    """
    spec_settings, overrides = split_kwargs(settings)
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    spec = resolve_num_experts(spec_class()(**spec_settings), len(sources))
    dense, expert_sources, task, names, source_name = load_dense(sources, spec)
    stacks = native_stacks(dense, task)
    overrides = {**spec.config_overrides(), **overrides}
    check_upcycle(spec, dense.config, task, stacks, overrides)
    layers = choose_layers(spec, dense.config, stacks)
    fields = spec.config_fields(layers, dense.config, task, expert_width=stacks[0][2])
    fields["upcycling"] = spec.provenance(layers, dense.config, task, source_name,
                                          names if expert_sources is not None else None)
    config = upcycled_config(dense.config, stacks, fields, overrides)

    with no_init_weights():  # every weight is overwritten below: skip the random init
        target = TARGETS[task](config)
    routers = None
    if spec.variant == "moe" and spec.router_init != "random":
        routers = prompt_routers(spec, dense, names, sources, spec.num_experts, layers.stack)
    state = convert_native_state_dict(dense, target, config, stacks, spec.init, spec.seed, spec.noise_std,
                                      spec.drop_ratio, expert_sources, routers)
    target.load_state_dict(state, strict=True)
    _carry_over(target, dense, spec.base if spec.base is not None else sources[0], spec.tokenizer)
    prompts = [(spec.expert_prompts, "expert prompts")] if isinstance(spec.expert_prompts, (str, os.PathLike)) else []
    setattr(target, MODEL_CARD, UpcycleCard(sources, spec.base, prompts))  # `save_pretrained` writes README.md
    return target.eval()


def _carry_over(target, dense, first, tokenizer=None):
    """What the source has beside its weights: the tied head, the dtype, an encoder-decoder's
    generation config, and the folders `save_pretrained` copies the tokenizer (`tokenizer`, else
    `first`'s: the base, else the first source) and the sentence-transformers modules from."""
    if getattr(target.config, "tie_word_embeddings", False):
        # The model was built without `post_init`'s weight init, which is also where transformers
        # ties the head to the embeddings: tie here, or fine-tuning trains two copies of a matrix
        # that `save_pretrained` writes once.
        target.tie_weights()
    target.to(dense.dtype)
    if target.config.decoder_ffn_layout is not None and getattr(dense, "generation_config", None) is not None:
        target.generation_config = copy.deepcopy(dense.generation_config)  # decoder start, forced BOS / EOS, ...
    st_name = first if not isinstance(first, PreTrainedModel) else getattr(first, "name_or_path", "")
    st_folder = sentence_transformers_folder(st_name)
    if st_folder is not None:  # `save_pretrained` copies its pooling, `Normalize`, ... next to the model
        setattr(target, SENTENCE_TRANSFORMERS_SOURCE, st_folder)
    origin = tokenizer if tokenizer is not None else first
    if isinstance(origin, (str, os.PathLike)):
        folder = assets.resolve(str(origin))
        if os.path.isdir(folder):  # a Hub id's tokenizer is the user's to save
            setattr(target, TOKENIZER_SOURCE, folder)


# `help(upcycle)` and `inspect.signature(upcycle)` show the spec's fields with its defaults.
upcycle.__signature__ = inspect.Signature(
    [inspect.Parameter("source", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
       for name, f in SPEC_FIELDS.items()]
    + [inspect.Parameter("config_overrides", inspect.Parameter.VAR_KEYWORD)]
)
