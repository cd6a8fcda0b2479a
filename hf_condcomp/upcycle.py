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
"""

import copy
import dataclasses
import difflib
import inspect
import re
import typing
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.initialization import no_init_weights

from . import assets
from .modeling.architectures import LAYOUTS, activation_of, detect_layout, find_layers, layout_to_dict
from .modeling.common import (
    SENTENCE_TRANSFORMERS_FILES,
    SENTENCE_TRANSFORMERS_SOURCE,
    sentence_transformers_modules,
)
from .modeling.configuration_condcomp import (
    CondCompBertConfig,
    CondCompConfig,
    CondCompGPT2Config,
    CondCompLlamaConfig,
    intermediate_size_of,
    is_condcomp_config,
)
from .modeling.modeling_condcomp import (
    CondCompForCausalLM,
    CondCompForMaskedLM,
    CondCompForSequenceClassification,
    CondCompForTokenClassification,
    CondCompModel,
)
from .modeling.modeling_condcomp_bert import (
    CondCompBertForMaskedLM,
    CondCompBertForSequenceClassification,
    CondCompBertForTokenClassification,
    CondCompBertModel,
)
from .modeling.modeling_condcomp_gpt2 import CondCompGPT2ForCausalLM, CondCompGPT2Model
from .modeling.modeling_condcomp_llama import CondCompLlamaForCausalLM, CondCompLlamaModel
from .spec import SPEC_FIELDS, UpcycleSpec, split_kwargs

_AUTO_SOURCE = {
    "base": AutoModel,
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "masked-lm": AutoModelForMaskedLM,
    "causal-lm": AutoModelForCausalLM,
}

# family: (config class, {task: target class}, layer prefix in the base model, source model types)
FAMILIES = {
    "bert": (
        CondCompBertConfig,
        {
            "base": CondCompBertModel,
            "sequence-classification": CondCompBertForSequenceClassification,
            "token-classification": CondCompBertForTokenClassification,
            "masked-lm": CondCompBertForMaskedLM,
        },
        "encoder.layer.{i}.",
        ("bert", "roberta", "xlm-roberta"),
    ),
    "gpt2": (
        CondCompGPT2Config,
        {"base": CondCompGPT2Model, "causal-lm": CondCompGPT2ForCausalLM},
        "h.{i}.",
        ("gpt2",),
    ),
    "llama": (
        CondCompLlamaConfig,
        {"base": CondCompLlamaModel, "causal-lm": CondCompLlamaForCausalLM},
        "layers.{i}.",
        ("llama", "mistral", "qwen2", "qwen3"),
    ),
    # Every other architecture (and Mistral / Qwen2 with sliding windows): transformers' own model
    # with MoE blocks in its FFNs' places (modeling_condcomp.py); where the FFN is comes from
    # architectures.py, so the layer prefix is found at upcycling time.
    "native": (
        CondCompConfig,
        {
            "base": CondCompModel,
            "sequence-classification": CondCompForSequenceClassification,
            "token-classification": CondCompForTokenClassification,
            "masked-lm": CondCompForMaskedLM,
            "causal-lm": CondCompForCausalLM,
        },
        None,
        (),
    ),
}
_FAMILY_OF = {model_type: family for family, spec in FAMILIES.items() for model_type in spec[3]}
GATED_FAMILIES = ("bert", "gpt2", "llama")

# The source architecture's own task, from `config.architectures[0]`'s suffix.
_ARCH_SUFFIX_TASK = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForMaskedLM", "masked-lm"),
    ("ForPreTraining", "masked-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForCausalLM", "causal-lm"),
    ("Model", "base"),
)
_CONFIG_KEYS_DROPPED = (
    "model_type",
    "architectures",
    "transformers_version",
    "quantization_config",
    "_name_or_path",
    "auto_map",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
)


def _error(argument, value, allowed):
    return ValueError(f"`{argument}` must be {allowed}, got {value!r}.")


def parse_layers(layers, num_layers: int, argument: str = "layers") -> list[int]:
    """`every_other` (layers 1, 3, 5, ... as in Switch/ST-MoE), `all`, '0,2,4', one int or a list of ints."""
    if isinstance(layers, int) and not isinstance(layers, bool):  # `layers=29` as YAML and flags read it
        layers = [layers]
    if layers == "every_other":
        return list(range(1, num_layers, 2))
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        try:
            layers = [int(part) for part in layers.split(",") if part.strip()]
        except ValueError:
            raise _error(argument, layers,
                         "'every_other', 'all' or comma-separated layer indices like '0,2,4'") from None
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(
            f"`{argument}` has layer index {bad[0] if bad else None!r} out of range: the source has {num_layers} "
            f"layers, so indices must be in [0, {num_layers - 1}]."
        )
    return sorted(set(layers))


def _task_of_architecture(architecture: str | None, family: str) -> str:
    if architecture:
        for suffix, task in _ARCH_SUFFIX_TASK:
            if architecture.endswith(suffix):
                return task
    return "base" if family in ("bert", "native") else "causal-lm"


def _load_source(source, task, num_labels, family_choice="auto"):
    """Returns (dense model, family, task, source name)."""
    if isinstance(source, PreTrainedModel):
        model, name = source, getattr(source.config, "_name_or_path", "") or type(source).__name__
        _refuse_upcycled(model.config, name)
        family = _family(model.config, family_choice)
        source_task = _task_of_architecture(type(model).__name__, family)
        task = task or source_task
        _check_task(task, family)
        if task != source_task:
            raise ValueError(
                f"`task`={task!r} differs from the loaded model's own task {source_task!r}: pass the source as a "
                "path or Hub id to change heads, or load it with the head you want."
            )
        return model, family, task, name
    if not isinstance(source, (str, bytes)) and not hasattr(source, "__fspath__"):
        raise _error("source", source, "a Hub id, a local folder or a loaded `PreTrainedModel`")
    name = str(source)
    path = assets.resolve(name)
    try:
        config = assets.load_config(path, "`source`")  # config.json there but unreadable: CheckpointError naming it
    except assets.CheckpointError:
        raise
    except (OSError, ValueError) as err:
        raise ValueError(
            f"`source`={name!r} could not be read as a Transformers checkpoint ({assets.one_line(err)}). Pass a Hub "
            "id, a folder with config.json and weights, or one of the embedded names: " + ", ".join(assets.EMBEDDED)
        ) from err
    _refuse_upcycled(config, name)
    family = _family(config, family_choice)
    architecture = (config.architectures or [None])[0]
    task = task or _task_of_architecture(architecture, family)
    _check_task(task, family)
    if family == "native":  # refuse an architecture without a known FFN before reading its weights
        with torch.device("meta"):
            try:
                skeleton = _AUTO_SOURCE[task].from_config(config)
            except ValueError as err:
                raise ValueError(f"`source`={name!r} (model type {config.model_type!r}) has no {task} model in "
                                 f"transformers: {err}") from err
        _native_layout(skeleton, task)
    kwargs = {}
    if num_labels is not None and task in ("sequence-classification", "token-classification"):
        kwargs["num_labels"] = num_labels
    try:
        model = assets.load_pretrained(_AUTO_SOURCE[task], path, "`source`", **kwargs)
    except assets.CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"`source`={name!r}: loading its weights failed ({assets.one_line(err)}).") from err
    return model, family, task, name


def _refuse_upcycled(config, name):
    if is_condcomp_config(config):
        source = (getattr(config, "upcycling", None) or {}).get("source_model_type")
        raise ValueError(
            f"`source`={name!r} is already an upcycled model (model type {config.model_type!r}"
            f"{f', upcycled from {source!r}' if source else ''}): upcycle its dense parent instead, or load it "
            "with `from_pretrained` to fine-tune it further (the recipes do so when given it)."
        )


def _family(config, choice="auto") -> str:
    """The hand-written family that expresses the source exactly, else (or when asked) `native`."""
    family = "native" if choice == "native" else _FAMILY_OF.get(config.model_type, "native")
    if family == "llama" and _sliding_window(config):
        return "native"
    return family


def _sliding_window(config):
    sliding = getattr(config, "sliding_window", None)
    return bool(sliding and getattr(config, "use_sliding_window", True) and sliding < config.max_position_embeddings)


def _check_task(task, family):
    tasks = FAMILIES[family][1]
    if task not in tasks:
        raise _error("task", task, f"one of {sorted(tasks)} for a {family} source")


def _target_config(src_config, family, **fields):
    config_class = FAMILIES[family][0]
    values = {k: v for k, v in src_config.to_dict().items() if k not in _CONFIG_KEYS_DROPPED}
    if src_config.model_type == "qwen2":
        values["qkv_bias"], values["attention_bias"] = True, False
    if src_config.model_type == "qwen3":
        values["qk_norm"] = True
    if src_config.model_type in _ROBERTA_TYPES:
        values["padding_offset_positions"] = True
    values.update(fields)
    return config_class(**_as_floats_where_expected(config_class, values))


_ROBERTA_TYPES = ("roberta", "xlm-roberta")
# RoBERTa's weight names -> the BERT family's (the encoder is BERT's; positions and heads differ).
_ROBERTA_KEYS = (
    ("roberta.", "bert."),
    ("lm_head.dense.", "cls.predictions.transform.dense."),
    ("lm_head.layer_norm.", "cls.predictions.transform.LayerNorm."),
    ("lm_head.decoder.", "cls.predictions.decoder."),
    ("lm_head.bias", "cls.predictions.bias"),
)


def _source_state(dense):
    """The source's state dict under the target family's names."""
    state = dense.state_dict()
    if dense.config.model_type not in _ROBERTA_TYPES:
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in _ROBERTA_KEYS:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


def _check_overrides(overrides, config_class, src_config):
    """Every `upcycle(..., name=value)` override must name a field of the target config (or of the
    source's): a misspelt name would otherwise be stored as an unused attribute and silently ignored."""
    known = {f.name for f in dataclasses.fields(config_class)} | set(src_config.to_dict())
    for name, value in overrides.items():
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
            raise ValueError(
                f"`{name}`={value!r} is not an upcycling argument nor a field of {config_class.__name__}.{hint}"
            )


def _as_floats_where_expected(config_class, values):
    """Whole numbers given for float fields (`capacity_factor=2`, `router_aux_loss_coef=0`, as YAML
    and the command line write them) become floats: the strict config would reject the int."""
    for field in dataclasses.fields(config_class):
        value = values.get(field.name)
        if isinstance(value, int) and not isinstance(value, bool):
            types = typing.get_args(field.type) or (field.type,)
            if float in types and int not in types:
                values[field.name] = float(value)
    return values


def _reinit_like(t, rows, gen):
    """Values drawn from N(mean, std) of `t`, for the given rows (dim 0)."""
    fresh = torch.randn((len(rows),) + tuple(t.shape[1:]), generator=gen, dtype=torch.float32)
    fresh = fresh * t.float().std() + t.float().mean()
    return fresh.to(t.dtype)


def balanced_kmeans(points: torch.Tensor, num_groups: int, gen: torch.Generator, iters: int = 15) -> list[torch.Tensor]:
    """Partition rows of `points` (I, D) into equal groups by cosine k-means with balanced assignment."""
    n = points.shape[0]
    size = n // num_groups
    x = torch.nn.functional.normalize(points.float(), dim=-1)
    centroids = x[torch.randperm(n, generator=gen)[:num_groups]]
    assign = torch.empty(n, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centroids.t()  # (I, E)
        order = torch.argsort(sim.reshape(-1), descending=True).tolist()
        assign.fill_(-1)
        fill = [0] * num_groups
        left = n
        for flat in order:  # greedy: best (neuron, group) pairs first, groups capped at `size`
            i, g = divmod(flat, num_groups)
            if assign[i] < 0 and fill[g] < size:
                assign[i] = g
                fill[g] += 1
                left -= 1
                if left == 0:
                    break
        centroids = torch.nn.functional.normalize(
            torch.stack([x[assign == g].mean(0) for g in range(num_groups)]), dim=-1
        )
    return [torch.nonzero(assign == g).squeeze(-1) for g in range(num_groups)]


def _experts_from_dense(ffn, num_experts, top_k, init, gen, noise_std, drop_ratio, gated):
    """Returns {name: tensor} for the experts module and the router weight (or None)."""
    ins, in_b, out, out_b, _ = ffn
    inter = out.shape[1]
    experts_in, experts_in_b, experts_out, experts_out_b = [], [], [], []
    router = None
    if init.startswith("split"):
        if inter % num_experts:
            raise ValueError(
                f"`init`={init!r} splits the FFN's {inter} neurons into `num_experts`={num_experts} equal groups: "
                "choose a number of experts that divides it."
            )
        if init == "split-kmeans":
            groups = balanced_kmeans(torch.cat(ins, dim=1), num_experts, gen)
        else:
            groups = list(torch.randperm(inter, generator=gen).view(num_experts, -1))
        for g in groups:
            experts_in.append([w[g] for w in ins])
            experts_in_b.append(None if in_b is None else [b[g] for b in in_b])
            experts_out.append(out[:, g])
            experts_out_b.append(None if out_b is None else out_b / top_k)
        router = torch.stack([ins[0][g].float().mean(0) for g in groups]).to(ins[0].dtype)  # (E, H)
    else:
        for _ in range(num_experts):
            e_in, e_out = [w.clone() for w in ins], out.clone()
            e_in_b = None if in_b is None else [b.clone() for b in in_b]
            if init == "noise":
                e_in = [w + torch.randn(w.shape, generator=gen).to(w.dtype) * noise_std * w.float().std() for w in e_in]
                e_out = e_out + torch.randn(e_out.shape, generator=gen).to(e_out.dtype) * noise_std * out.float().std()
            elif init == "drop":
                rows = torch.randperm(inter, generator=gen)[: int(round(drop_ratio * inter))]
                for w in e_in:
                    w[rows] = _reinit_like(w, rows, gen)
                if e_in_b is not None:
                    for b in e_in_b:
                        b[rows] = _reinit_like(b.unsqueeze(-1), rows, gen).squeeze(-1)
                e_out[:, rows] = _reinit_like(e_out.t(), rows, gen).t()
            experts_in.append(e_in)
            experts_in_b.append(e_in_b)
            experts_out.append(e_out)
            experts_out_b.append(None if out_b is None else out_b.clone())
    up = torch.stack([torch.cat(e, dim=0) for e in experts_in])  # (E, I' or 2I', H), [gate; up] when gated
    tensors = {("gate_up_proj" if gated else "up_proj"): up, "down_proj": torch.stack(experts_out)}  # (E, H, I')
    if experts_in_b[0] is not None:
        tensors[("gate_up_proj_bias" if gated else "up_proj_bias")] = torch.stack([torch.cat(b) for b in experts_in_b])
        tensors["down_proj_bias"] = torch.stack(experts_out_b)
    return tensors, router


def upcycle(source, **settings):
    """Upcycle a dense checkpoint into a conditional-computation model (see module docstring).

    Args:
        source: Hub id, local folder, embedded name (`all-MiniLM-L6-v2`, `SmolLM2-135M-Instruct`)
            or a loaded `PreTrainedModel` of any supported architecture (README: "Models and
            architectures").
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
    config_overrides = {**spec.config_overrides(), **config_overrides}
    (variant, num_experts, top_k, routing, capacity_factor, init, layers, task, num_labels, capacity, compute_penalty,
     threshold, mod_layers, noise_std, drop_ratio, seed, moe_implementation) = (getattr(spec, name) for name in (
        "variant", "num_experts", "top_k", "routing", "capacity_factor", "init", "layers", "task", "num_labels",
        "capacity", "compute_penalty", "threshold", "mod_layers", "noise_std", "drop_ratio", "seed",
        "moe_implementation"))

    dense, family, task, source_name = _load_source(source, task, num_labels, spec.family)
    _check_task(task, family)
    src_config = dense.config
    num_layers = src_config.num_hidden_layers
    chosen = parse_layers(layers, num_layers)

    native = None
    if family == "native":
        if variant != "moe" or mod_layers is not None:
            raise ValueError(
                f"`variant`={variant!r}{' with `mod_layers`' if variant == 'moe' else ''} is not supported for model "
                f"type {src_config.model_type!r}: Mixture-of-Depths and gated layers need the layer loop of the "
                f"hand-written families ({', '.join(m for f in GATED_FAMILIES for m in FAMILIES[f][3])}"
                f"{'; without sliding-window attention' if _sliding_window(src_config) else ''}), and this model "
                "is transformers' own. Use `variant='moe'`."
            )
        native = _native_layout(dense, task)
    fields = dict(moe_implementation=moe_implementation)
    if variant == "moe":
        split = init.startswith("split")
        inter = intermediate_size_of(src_config) if native is None else native[2]
        fields.update(
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_routing=routing,
            moe_capacity_factor=capacity_factor,
            moe_layers=chosen,
            router_unit_weights=split,
            moe_expert_intermediate_size=inter // num_experts if split else (None if native is None else inter),
        )
    if variant == "mod":
        fields.update(mod_layers=chosen, mod_capacity=capacity)
    elif variant == "gate":
        fields.update(gate_layers=chosen, gate_compute_penalty=compute_penalty, gate_threshold=threshold)
    elif mod_layers is not None:
        fields.update(mod_layers=parse_layers(mod_layers, num_layers, "mod_layers"), mod_capacity=capacity)
    if task == "sequence-classification" and src_config.model_type in _ROBERTA_TYPES:
        fields["classifier_head"] = "roberta"
    if task in ("sequence-classification", "token-classification"):
        fields["num_labels"] = src_config.num_labels
        fields["id2label"] = src_config.id2label
        fields["label2id"] = src_config.label2id
    fields["upcycling"] = {
        "source": source_name,
        "source_model_type": src_config.model_type,
        "task": task,
        "variant": variant,
        "layers": chosen,
        "init": init if variant == "moe" else None,
        "num_experts": num_experts if variant == "moe" else None,
        "top_k": top_k if variant == "moe" else None,
        "routing": routing if variant == "moe" else None,
        "capacity_factor": capacity_factor,
        "capacity": capacity if variant == "mod" else None,
        "compute_penalty": compute_penalty if variant == "gate" else None,
        "threshold": threshold if variant == "gate" else None,
        "noise_std": noise_std if init == "noise" else None,
        "drop_ratio": drop_ratio if init == "drop" else None,
        "seed": seed,
        "family": family,
    }
    target_class = FAMILIES[family][1][task]
    _check_overrides(config_overrides, target_class.config_class, src_config)
    if native is not None:
        config = _native_config(src_config, native, fields, config_overrides)
    else:
        fields.update(config_overrides)
        config = _target_config(src_config, family, **fields)

    with no_init_weights():  # every weight is overwritten below: skip the random init
        target = target_class(config)
    if native is not None:
        state = convert_native_state_dict(dense, target, config, native, init, seed, noise_std, drop_ratio)
    else:
        state = convert_state_dict(_source_state(dense), target, family, config, init, seed, noise_std, drop_ratio)
    target.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        # The model was built without `post_init`'s weight init, which is also where transformers
        # ties the head to the embeddings: tie here, or fine-tuning trains two copies of a matrix
        # that `save_pretrained` writes once.
        target.tie_weights()
    target.to(dense.dtype)
    # `save_pretrained` copies the source's pooling, `Normalize`, ... next to the upcycled model.
    st_name = source if not isinstance(source, PreTrainedModel) else getattr(source, "name_or_path", "")
    st_folder = sentence_transformers_folder(st_name)
    if st_folder is not None:
        setattr(target, SENTENCE_TRANSFORMERS_SOURCE, st_folder)
    return target.eval()


def sentence_transformers_folder(source) -> str | None:
    """The local folder holding the sentence-transformers files (`modules.json`, ...) of `source`: the folder
    itself, an embedded name's folder, or for a Hub id its snapshot, into which those files and the module
    folders are fetched. None for a source without them (a plain transformers checkpoint)."""
    if not source:
        return None
    name = assets.resolve(str(source))
    if Path(name).is_dir():
        return str(Path(name).resolve()) if sentence_transformers_modules(name) is not None else None
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        modules = sentence_transformers_modules(Path(hf_hub_download(name, "modules.json")).parent)
        if modules is None:
            return None
        return snapshot_download(name, allow_patterns=[*SENTENCE_TRANSFORMERS_FILES, *(f"{m}/*" for m in modules)])
    except (OSError, ValueError, EntryNotFoundError):  # not on the Hub, offline and not cached, no modules.json
        return None


def _native_layout(dense, task):
    """(layers' path in the dense model, FFN layout, dense FFN width) of a source built natively."""
    src_config = dense.config
    path, layers = find_layers(dense, src_config.num_hidden_layers)
    layout = detect_layout(src_config.model_type, layers[0], causal=task == "causal-lm")
    try:
        first_in = layers[0].get_submodule(layout.inputs[0])
        out = layers[0].get_submodule(layout.output)
    except AttributeError as err:
        raise ValueError(
            f"source model type {src_config.model_type!r}: its layers do not have the FFN modules its layout names "
            f"({layout.inputs + (layout.output,)}): {err}"
        ) from None
    layout = dataclasses.replace(layout, bias=first_in.bias is not None)
    inter = out.weight.shape[0] if layout.conv1d else out.weight.shape[1]
    return path, layout, inter


def _native_config(src_config, native, fields, overrides):
    """CondCompConfig around a copy of the source's config; overrides of the source's own fields
    (`hidden_dropout_prob=0.0`, ...) go into that copy."""
    _, layout, _ = native
    own = {f.name for f in dataclasses.fields(CondCompConfig)}
    text_config = copy.deepcopy(src_config)
    for name, value in overrides.items():
        if name in own:
            fields[name] = value
        else:
            setattr(text_config, name, value)
    for name in ("num_labels", "id2label", "label2id"):
        fields.pop(name, None)  # the head's labels live in the source's config, read from there
    return CondCompConfig(
        **_as_floats_where_expected(CondCompConfig, fields),
        text_config=text_config,
        ffn_layout=layout_to_dict(layout),
        ffn_activation=activation_of(src_config, layout),
        id2label=src_config.id2label,
        label2id=src_config.label2id,
    )


def _layout_ffn(state, prefix, layout):
    """The dense FFN of one layer, read from `state` at `prefix` + the layout's weight names, in a
    canonical form: inputs (list of (I, H): one, or [gate, up]), their biases, out (H, I), out
    bias, and the source keys consumed."""
    def weight(name):
        w = state[f"{prefix}{name}.weight"]
        return w.t() if layout.conv1d else w

    def bias(name, rows):
        b = state.get(f"{prefix}{name}.bias")
        return torch.zeros(rows, dtype=state[f"{prefix}{name}.weight"].dtype) if b is None else b

    ins = [weight(n) for n in layout.inputs]
    in_b = [bias(n, w.shape[0]) for n, w in zip(layout.inputs, ins)] if layout.bias else None
    if layout.fused:  # one matrix holding [gate; up]
        ins = list(ins[0].chunk(2, dim=0))
        in_b = None if in_b is None else list(in_b[0].chunk(2))
    out = weight(layout.output)
    out_b = bias(layout.output, out.shape[0]) if layout.bias else None
    keys = [f"{prefix}{n}.{p}" for n in (*layout.inputs, layout.output) for p in ("weight", "bias")
            if f"{prefix}{n}.{p}" in state]
    return ins, in_b, out, out_b, keys


def _check_native_ffn(layer, layout, ffn, activation, model_type):
    """The layout must reproduce the dense layer's FFN: run both on random inputs."""
    ins, in_b, out, out_b, _ = ffn
    x = torch.randn(2, 3, ins[0].shape[1], generator=torch.Generator().manual_seed(0)).to(ins[0].dtype)
    modules = [layer.get_submodule(layout.module)] + [layer.get_submodule(n) for n in layout.identity]
    was_training = layer.training
    layer.eval()
    with torch.no_grad():
        expected = x
        for module in modules:
            expected = module(expected)
        h = [torch.nn.functional.linear(x, w, None if in_b is None else b)
             for w, b in zip(ins, in_b or [None] * len(ins))]
        act = ACT2FN[activation]
        h = act(h[0]) * h[1] if layout.gated else act(h[0])
        got = torch.nn.functional.linear(h, out, out_b)
    layer.train(was_training)
    if not torch.allclose(got.float(), expected.float(), atol=1e-4, rtol=1e-3):
        raise ValueError(
            f"source model type {model_type!r}: its FFN does not compute out(act(in(x))) as its layout says "
            f"(max difference {(got - expected).abs().max().item():.3g}), so it cannot be upcycled exactly. "
            "Add an entry for it to hf_condcomp.modeling.architectures.LAYOUTS."
        )


def _moe_block_tensors(ffn, block_prefix, target_keys, config, gated, init, gen, noise_std, drop_ratio):
    """{target key: tensor} of the MoE block at `block_prefix` (experts and router) made from `ffn`."""
    tensors, router = _experts_from_dense(
        ffn, config.num_local_experts, config.num_experts_per_tok, init, gen, noise_std, drop_ratio, gated
    )
    out = {f"{block_prefix}experts.{name}": tensor.contiguous() for name, tensor in tensors.items()}
    router_key = f"{block_prefix}router.weight"
    if router is None:
        router = torch.randn(target_keys[router_key].shape, generator=gen) * config.initializer_range
    out[router_key] = router.to(ffn[2].dtype).contiguous()
    return out


def convert_native_state_dict(dense, target, config, native, init="copy", seed=0, noise_std=0.01, drop_ratio=0.5):
    """The dense state dict under `backbone.`, with the MoE layers' FFNs turned into experts."""
    path, layout, _ = native
    gen = torch.Generator().manual_seed(seed)
    src_state = dense.state_dict()
    layers = dense.get_submodule(path)  # found by `_native_layout`
    target_keys = dict(target.state_dict(keep_vars=True))
    out, consumed = {}, set()
    for i in config.moe_layers:
        src_prefix = f"{path}.{i}."
        ffn = _layout_ffn(src_state, src_prefix, layout)
        _check_native_ffn(layers[i], layout, ffn, config.ffn_activation, dense.config.model_type)
        out.update(_moe_block_tensors(ffn, f"backbone.{src_prefix}{layout.module}.", target_keys, config,
                                      layout.gated, init, gen, noise_std, drop_ratio))
        consumed.update(ffn[4])
    return _copy_rest(src_state, target, target_keys, out, consumed, config, gen, lambda key: key[len("backbone."):])


def convert_state_dict(src_state, target, family, config, init="copy", seed=0, noise_std=0.01, drop_ratio=0.5):
    """Map a dense state dict onto `target`'s keys; asserts that nothing is missing or dropped."""
    gen = torch.Generator().manual_seed(seed)
    layer_template = FAMILIES[family][2]
    base = "" if target.base_model is target else target.base_model_prefix + "."
    target_keys = dict(target.state_dict(keep_vars=True))
    out, consumed = {}, set()
    source_layout = LAYOUTS[family]  # the family's FFN as the source writes it (architectures.py)
    for i in config.moe_layers:
        prefix = base + layer_template.format(i=i)
        has_bias = f"{prefix}{source_layout.inputs[0]}.bias" in src_state
        ffn = _layout_ffn(src_state, prefix, dataclasses.replace(source_layout, bias=has_bias))
        out.update(_moe_block_tensors(ffn, f"{prefix}mlp.", target_keys, config, source_layout.gated, init, gen,
                                      noise_std, drop_ratio))
        consumed.update(ffn[4])
    return _copy_rest(src_state, target, target_keys, out, consumed, config, gen, lambda key: key)


def _copy_rest(src_state, target, target_keys, out, consumed, config, gen, source_key):
    """Every target weight not built yet is the source's `source_key(key)`, shape asserted; a
    source weight that nothing consumed is refused rather than dropped."""
    for key, param in target_keys.items():
        if key in out:
            continue
        src_key = source_key(key)
        if src_key not in src_state:
            fresh = _fresh_parameter(target, key, param, config, gen)
            if fresh is None:
                raise KeyError(f"upcycling: target weight {key!r} has no source weight and no initialiser")
            out[key] = fresh
            continue
        if tuple(src_state[src_key].shape) != tuple(param.shape):
            raise ValueError(f"upcycling: shape of {key!r} is {tuple(src_state[src_key].shape)} in the source, "
                             f"{tuple(param.shape)} in the target")
        out[key] = src_state[src_key]
        consumed.add(src_key)
    for key, tensor in out.items():
        if tuple(tensor.shape) != tuple(target_keys[key].shape):
            raise ValueError(f"upcycling: {key!r} built with shape {tuple(tensor.shape)}, "
                             f"expected {tuple(target_keys[key].shape)}")
    left = [k for k in src_state if k not in consumed and not _ignorable(k)]
    if left:
        raise ValueError(f"upcycling would drop source weights {left[:5]}{'...' if len(left) > 5 else ''}: refusing")
    return out


def _ignorable(key):
    # Buffers that the target recomputes (position ids, rotary frequencies), never learned weights.
    return bool(re.search(r"(position_ids|token_type_ids|inv_freq|masked_bias|attn\.bias)$", key))


def _fresh_parameter(target, key, param, config, gen):
    """Initial value of a weight the source does not have (gates, routers of routed blocks)."""
    module_name, _, name = key.rpartition(".")
    module = target.get_submodule(module_name)
    fresh = getattr(module, "_condcomp_fresh", None)
    if fresh is not None:
        return fresh(name, config, gen)
    return None


# `help(upcycle)` and `inspect.signature(upcycle)` show the spec's fields with its defaults.
upcycle.__signature__ = inspect.Signature(
    [inspect.Parameter("source", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
       for name, f in SPEC_FIELDS.items()]
    + [inspect.Parameter("config_overrides", inspect.Parameter.VAR_KEYWORD)]
)
