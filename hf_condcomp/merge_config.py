"""A mergekit-moe YAML read as the settings of `upcycle` with several sources (`hf-condcomp merge`).

mergekit-moe writes an MoE whose experts are dense fine-tunes of one base model, one expert per
fine-tune, with routers that start from prompts. The same file here gives our model (remote
code, trainable with the recipes), which `hf-condcomp export` writes as the native class
mergekit would write (Mixtral for Llama / Mistral sources, Qwen3-MoE for Qwen3 ones):

    base_model: path/to/base            # shared (non-FFN) weights; absent: the experts' average
    gate_mode: hidden                   # hidden, hidden_last, hidden_avg, cheap_embed, random
    dtype: bfloat16                     # float32, float16, bfloat16; absent: the base's
    experts_per_token: 2
    experts:
      - source_model: path/to/expert_a
        positive_prompts: ["..."]       # or a text / YAML file, relative to this file
        negative_prompts: ["..."]       # optional

Every layer is MoE (as mergekit writes). `gate_mode` names mergekit's modes: `hidden` and
`hidden_last` take each prompt's last token (`router_init` hidden_last), `hidden_avg` its mean
over tokens (`router_init` hidden). What mergekit has and this does not (`shared_experts`,
`architecture: qwen` or `deepseek`, `noise_scale`, `residual_scale`, `uniform_random`, model
references with `+lora`) is refused, named, before anything is loaded.
"""

from pathlib import Path

import yaml

from .saving import DTYPES
from .upcycling.router_init import read_prompt_file

GATE_MODES = {"hidden": "hidden_last", "hidden_last": "hidden_last", "hidden_avg": "hidden",
              "cheap_embed": "cheap_embed", "random": "random"}
ARCHITECTURES = ("mixtral", "qwen3")  # what `export` writes from Llama / Mistral and Qwen3 sources
TOP_KEYS = ("base_model", "gate_mode", "dtype", "experts_per_token", "experts", "architecture", "shared_experts")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
_UNSUPPORTED = {
    "shared_experts": "shared experts (Qwen2-MoE / DeepSeek outputs) are not made here; remove them",
    "noise_scale": "use the --init noise of `hf-condcomp upcycle` instead, or remove it",
    "residual_scale": "remove it (experts keep their sources' down projections)",
}


def _model_reference(value, where):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: `{where.rsplit('.', 1)[-1]}` must be a model path or Hub id, got {value!r}.")
    if "+" in value:
        raise ValueError(f"{where}: {value!r} names a LoRA adapter (`model+lora`), which is not supported: merge "
                         "the adapter into the model first.")
    return value


def _prompts(value, folder, where):
    """A list of prompts, or a file path (relative to the config's folder), as `router_init` reads them."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, str):
        return read_prompt_file(Path(value) if Path(value).is_absolute() else folder / value, where)
    raise ValueError(f"{where}: prompts must be a list of strings or a file path, got {value!r}.")


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CONFIG {str(path)!r} does not exist.")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"CONFIG {str(path)!r} is not valid YAML ({' '.join(str(err).split())}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"CONFIG {str(path)!r} must be a mapping with `experts`, got {type(config).__name__}.")
    return config


def _check_top_level(config: dict) -> None:
    """The keys beside `experts`: known, supported, and with values this package can take."""
    unknown = [key for key in config if key not in TOP_KEYS]
    if unknown:
        raise ValueError(f"CONFIG: unknown key(s) {unknown}; a mergekit-moe config has {list(TOP_KEYS)}.")
    if config.get("shared_experts"):
        raise ValueError(f"CONFIG: `shared_experts`: {_UNSUPPORTED['shared_experts']}.")
    architecture = config.get("architecture")
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(f"CONFIG: `architecture`={architecture!r} is not supported: use one of {ARCHITECTURES} (or "
                         "leave it out; `hf-condcomp export` picks the native class from the sources).")
    gate_mode = config.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise ValueError(f"CONFIG: `gate_mode`={gate_mode!r} is not supported: use one of {list(GATE_MODES)}.")
    dtype = config.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"CONFIG: `dtype`={dtype!r} is not supported: use one of {DTYPES}.")
    experts = config.get("experts")
    if not isinstance(experts, list) or not experts:
        raise ValueError("CONFIG: `experts` must be a non-empty list of {source_model, positive_prompts, ...}.")
    top_k = config.get("experts_per_token", 2)
    if not isinstance(top_k, int) or not 1 <= top_k <= len(experts):
        raise ValueError(f"CONFIG: `experts_per_token`={top_k!r} must be between 1 and the {len(experts)} experts.")


def _read_expert(i: int, expert, gate_mode: str, folder: Path) -> tuple[str, dict]:
    """(source, its router prompts) of `experts[i]`."""
    where = f"CONFIG: experts[{i}]"
    if not isinstance(expert, dict):
        raise ValueError(f"{where} must be a mapping with `source_model`, got {expert!r}.")
    unknown = [key for key in expert if key not in EXPERT_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; an expert has {list(EXPERT_KEYS)}.")
    for key in ("noise_scale", "residual_scale"):
        if expert.get(key) is not None:
            raise ValueError(f"{where}: `{key}` is not supported: {_UNSUPPORTED[key]}.")
    source = _model_reference(expert.get("source_model"), f"{where}.source_model")
    positive = _prompts(expert.get("positive_prompts"), folder, f"{where}.positive_prompts")
    negative = _prompts(expert.get("negative_prompts"), folder, f"{where}.negative_prompts")
    if GATE_MODES[gate_mode] != "random" and not positive:
        raise ValueError(f"{where}: `gate_mode`={gate_mode!r} needs `positive_prompts` for every expert.")
    return source, {"positive_prompts": positive or [], "negative_prompts": negative or []}


def read_merge_config(path) -> tuple[list, dict, str | None]:
    """(sources, `upcycle` settings, dtype) of a mergekit-moe YAML; a ValueError naming the field otherwise."""
    path = Path(path)
    config = _load_yaml(path)
    _check_top_level(config)
    gate_mode = config.get("gate_mode", "hidden")
    read = [_read_expert(i, expert, gate_mode, path.parent) for i, expert in enumerate(config["experts"])]
    sources = [source for source, _ in read]
    prompts = [prompt for _, prompt in read]
    base = config.get("base_model")
    settings = dict(
        base=None if base is None else _model_reference(base, "CONFIG: base_model"),
        num_experts=len(sources), top_k=config.get("experts_per_token", 2), layers="all",
        router_init=GATE_MODES[gate_mode], expert_prompts=prompts if GATE_MODES[gate_mode] != "random" else None,
    )
    return sources, settings, config.get("dtype")
