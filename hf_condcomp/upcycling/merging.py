"""Several dense sources of one architecture as the experts of each MoE layer (what mergekit-moe
does): each source gives `num_experts / len(sources)` experts, made from its own FFN, and the
shared (non-FFN) weights come from a named base model or from the sources' average
(Branch-Train-MiX, Sukhbaatar et al. 2024).

Sources are loaded once each (a source named twice gives experts twice), then checked against
the first (the base when one is named): the same model type, weight names and shapes, vocabulary
size and, where both have one, the same tokenizer vocabulary. A difference is a ValueError naming
the source and what differs."""

import copy
import dataclasses
import os

from transformers import PreTrainedModel

from ..modeling.configuration_condcomp import DEFAULT_NUM_EXPERTS
from .router_init import expert_prompt_sets, prompt_router_rows
from .sources import load_source


def source_name(source) -> str:
    if isinstance(source, PreTrainedModel):
        return getattr(source.config, "_name_or_path", "") or type(source).__name__
    return str(source)


def _key(source):
    return id(source) if isinstance(source, PreTrainedModel) else str(source)


def load_tokenizer(source):
    """The tokenizer saved with `source` (a folder, Hub id or embedded name), or None."""
    if isinstance(source, PreTrainedModel) or not isinstance(source, (str, os.PathLike)):
        return None
    from transformers import AutoTokenizer

    from .. import assets

    try:
        return AutoTokenizer.from_pretrained(assets.resolve(str(source)))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def load_sources(sources, base, task, num_labels):
    """Returns (models, one per entry of `sources`; base model or None; task). Model types,
    vocabulary sizes and tokenizers are compared before any weight is read, weights after."""
    named = [(source_name(s), s) for s in ([base] if base is not None else []) + list(sources)]
    _check_before_loading(named)
    loaded = {}
    for _, source in named:
        if _key(source) not in loaded:
            loaded[_key(source)], task, _ = load_source(source, task, num_labels)
    _check_weights([(name, loaded[_key(source)]) for name, source in named])
    return [loaded[_key(s)] for s in sources], None if base is None else loaded[_key(base)], task


def _differs(name, ref_name, what):
    return ValueError(f"source {name!r} differs from {ref_name!r}: {what}. Every source (and the base) must be a "
                      "fine-tune of one model, of one architecture and tokenizer.")


def _config_of(source):
    if isinstance(source, PreTrainedModel):
        return source.config
    from .. import assets

    try:
        return assets.load_config(assets.resolve(str(source)), "`source`")
    except (OSError, ValueError):
        return None  # unreadable: `load_source` says why


def _check_before_loading(named):
    """Model type, vocabulary size and tokenizer vocabulary of each source against the first's."""
    ref_name, ref_source = named[0]
    ref_config, ref_tok = _config_of(ref_source), load_tokenizer(ref_source)
    for name, source in named[1:]:
        config = _config_of(source)
        if config is None or ref_config is None:
            continue
        if config.model_type != ref_config.model_type:
            raise _differs(name, ref_name, f"model type {config.model_type!r}, not {ref_config.model_type!r}")
        vocab, ref_vocab = getattr(config, "vocab_size", None), getattr(ref_config, "vocab_size", None)
        if vocab != ref_vocab:
            raise _differs(name, ref_name, f"vocabulary of {vocab} tokens, not {ref_vocab}")
        tok = load_tokenizer(source) if ref_tok is not None else None
        if tok is not None and tok.get_vocab() != ref_tok.get_vocab():
            changed = sorted(set(tok.get_vocab().items()) ^ set(ref_tok.get_vocab().items()))[:3]
            raise _differs(name, ref_name, f"tokenizer vocabulary (e.g. {changed})")


def _check_weights(named_models):
    """The loaded models' classes, weight names and shapes against the first's."""
    ref_name, ref = named_models[0]
    ref_state = ref.state_dict()
    for name, model in named_models[1:]:
        if type(model) is not type(ref):
            raise _differs(name, ref_name, f"class {type(model).__name__}, not {type(ref).__name__}")
        state = model.state_dict()
        for key in sorted(set(state) | set(ref_state)):
            if key not in state or key not in ref_state:
                raise _differs(name, ref_name, f"weight {key!r} only in {ref_name if key in ref_state else name!r}")
            if tuple(state[key].shape) != tuple(ref_state[key].shape):
                raise _differs(name, ref_name,
                               f"weight {key!r} has shape {tuple(state[key].shape)}, not {tuple(ref_state[key].shape)}")


def average_model(models):
    """A copy of the first model whose floating-point weights are the mean of all models' (BTX)."""
    distinct = list({id(m): m for m in models}.values())
    merged = copy.deepcopy(distinct[0])
    if len(distinct) > 1:
        states = [m.state_dict() for m in distinct]
        averaged = {}
        for key, tensor in states[0].items():
            if tensor.is_floating_point():
                averaged[key] = (sum(s[key].float() for s in states) / len(states)).to(tensor.dtype)
        merged.load_state_dict(averaged, strict=False)
    return merged


def resolve_num_experts(spec, num_sources):
    """`num_experts` unset: `DEFAULT_NUM_EXPERTS` (8) from one source, one expert per source from several.
    Set: a multiple of the number of sources, each source giving as many experts."""
    if num_sources == 0:
        raise ValueError("`source` is an empty list: give one source, or several to merge as experts.")
    if spec.num_experts is None:
        return dataclasses.replace(spec, num_experts=DEFAULT_NUM_EXPERTS if num_sources == 1 else num_sources)
    if spec.num_experts % num_sources:
        raise ValueError(f"`num_experts`={spec.num_experts} is not a multiple of the {num_sources} sources: each "
                         "source gives the same number of experts (leave it unset for one expert per source).")
    return spec


def load_dense(sources, spec):
    """(dense model with the shared weights, one dense model per expert source or None, task, names, source):
    one source, or several with their base (`shared_and_expert_sources`). `names` lists the source's name, or
    the expert sources' names; `source` names the model the shared weights come from (None: an average)."""
    if len(sources) > 1 or spec.base is not None:
        dense, expert_sources, task, names = shared_and_expert_sources(sources, spec, spec.task, spec.num_labels)
        return dense, expert_sources, task, names, None if spec.base is None else source_name(spec.base)
    dense, task, name = load_source(sources[0], spec.task, spec.num_labels)
    return dense, None, task, [name], name


def shared_and_expert_sources(sources, spec, task, num_labels):
    """(model holding the shared weights, one dense model per source, task, source names)."""
    if spec.variant != "moe":
        raise ValueError(f"several sources (or a `base`) make the experts of MoE layers; `variant`={spec.variant!r} "
                         "has no experts: use variant moe.")
    if spec.init.startswith("split"):
        raise ValueError(f"`init`={spec.init!r} splits one FFN into experts; from several sources use copy, noise or "
                         "drop.")
    expert_sources, base_model, task = load_sources(sources, spec.base, task, num_labels)
    names = [source_name(s) for s in sources]
    shared = base_model if base_model is not None else average_model(expert_sources)
    return shared, expert_sources, task, names


def prompt_routers(spec, dense, names, sources, num_experts, layers):
    """{layer: (E, H)} router starts from each expert's prompts (router_init.py)."""
    tokenizer = spec.tokenizer
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        origin = tokenizer or (spec.base if spec.base is not None else sources[0])
        loaded = load_tokenizer(origin)
        if loaded is None:
            raise ValueError(f"`router_init`={spec.router_init!r} tokenizes each expert's prompts, and "
                             f"{source_name(origin)!r} has no tokenizer: pass `tokenizer` (a folder or a "
                             "tokenizer).")
        tokenizer = loaded
    sets = expert_prompt_sets(spec.expert_prompts, names, num_experts)
    return prompt_router_rows(dense, copy.deepcopy(tokenizer), sets, layers, spec.router_init)
