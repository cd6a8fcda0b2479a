"""Export an upcycled model to a native transformers MoE architecture: `hf-condcomp export`.

Serving engines (vLLM, SGLang, TGI, llama.cpp's converters) load native architectures, not remote
code. Where one expresses an upcycled model exactly, this writes the model in it, so that it loads
with no `trust_remote_code` and gives the same logits. Each architecture is an `ExportFormat` of
the registry in hf_condcomp/exporters/ (one module each: Mixtral, Qwen2-MoE, Qwen3-MoE from
Llama-family decoders; Switch Transformers from T5; NLLB-MoE from M2M100 / NLLB), which says what
it cannot express, builds its config, maps the weights and checks the result.

What no native architecture expresses is refused before anything is read or written, with the
feature named: expert-choice routing, capacity drops, Mixture-of-Depths and gated layers (the
list vLLM's refusal reads too: modeling/blockers.py), and models of sources no format reads
(GPT-2, BERT, ...); then what the chosen format cannot (modules of exporters/). Token-level
differences that vanish at inference (Mixtral's router jitter scales the experts' input as well
as the router's) are noted in the README, not refused.

The written folder is checked as a user loads it: read back in the model's dtype, its logits on a
random batch must match ours within `VERIFY_TOLERANCE` of that dtype (exporters/base.py), else
nothing is written. A folder saved with an earlier release's `condcomp_llama` model type is
converted first (legacy.py).
"""

import tempfile
from pathlib import Path

from .exporters import (
    EXPORT_FORMATS,
    KEEP,
    ExportError,
    export_blocker,
    export_format_choices,
    get_export_format,
    refuse,
)
from .legacy import LEGACY_TYPES, convert_folder, legacy_condcomp_config
from .saving import check_output_dir, save_atomically, save_with_tokenizer

__all__ = ["ExportError", "choose_format", "export_format_choices", "export_native"]


def condcomp_config(config):
    """`config` as today's `CondCompConfig` (an earlier release's converted); others refused."""
    model_type = getattr(config, "model_type", None)
    if model_type in LEGACY_TYPES:
        return legacy_condcomp_config(config.to_dict())
    if model_type != "condcomp":
        raise refuse(f"the model type is {model_type!r}, not a model of hf_condcomp",
                     "Pass a folder saved by hf_condcomp.")
    return config


def _expressing(config, formats) -> list[str]:
    return [fmt.name for fmt in formats if fmt.blocker(config) is None]


def choose_format(config, requested: str = "auto") -> str:
    """The registered format that expresses `config` exactly (`auto`: the first, in registration order),
    or an `ExportError` naming what blocks it."""
    if requested != "auto":
        get_export_format(requested)  # an unknown name: one line listing the choices
    config = condcomp_config(config)
    source = config.text_config.model_type
    readers = [fmt for fmt in EXPORT_FORMATS.values() if source in fmt.sources]
    if not readers:
        by_sources = {}
        for fmt in EXPORT_FORMATS.values():
            by_sources.setdefault(fmt.sources, []).append(fmt.name)
        read = "; ".join(f"{', '.join(names)} from {', '.join(sources)}" for sources, names in by_sources.items())
        raise refuse(f"the model was upcycled from {source!r}, which no native format reads ({read})",
                     "Share it with its remote code instead (`save_pretrained`, loaded with trust_remote_code=True).")
    shared = export_blocker(config)
    if shared:
        raise refuse(shared)
    if requested == "auto":
        names = _expressing(config, readers)
        if names:
            return names[0]
        raise refuse("; ".join(dict.fromkeys(fmt.blocker(config) for fmt in readers)))
    fmt = EXPORT_FORMATS[requested]
    others = _expressing(config, [f for f in readers if f is not fmt])
    fix = f"Use --format {others[0]} (or auto)." if others else KEEP
    if fmt not in readers:
        raise refuse(f"`{requested}` is not the architecture of a model upcycled from {source!r}", fix)
    blocker = fmt.blocker(config)
    if blocker:
        raise refuse(blocker, fix)
    return requested


def _load_ours(model_dir: Path, config, fmt):
    from .assets import load_pretrained
    from .modeling.modeling_condcomp import CondCompForCausalLM, CondCompForConditionalGeneration

    with tempfile.TemporaryDirectory(prefix="condcomp_export_") as tmp:
        folder = convert_folder(model_dir, tmp) if config.model_type in LEGACY_TYPES else model_dir
        cls = CondCompForConditionalGeneration if fmt.encoder_decoder else CondCompForCausalLM
        return load_pretrained(cls, folder, "MODEL_DIR", dtype="auto").eval()


def _build_native(fmt, ours, model_dir: Path):
    """The native model of format `fmt` holding our weights, in our dtype, with our generation config."""
    from transformers import GenerationConfig
    from transformers.initialization import no_init_weights

    state = ours.state_dict()  # transformers' own Llama / Mistral / Qwen / T5 / M2M100 names
    blocker = fmt.weight_blocker(state)
    if blocker:
        raise refuse(blocker)  # before anything is written
    with no_init_weights():
        native = fmt.native_class()(fmt.build_config(ours.config))
    native.load_state_dict(fmt.map_state_dict(state, native), strict=True)
    if native.config.tie_word_embeddings:
        native.tie_weights()
    native.to(ours.dtype).eval()
    try:
        native.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        pass  # no generation_config.json: the native model's default, built from its config
    return native


def export_native(model_dir, output_dir, format: str = "auto", overwrite: bool = False, verify: bool = True) -> dict:
    """Write the upcycled model in `model_dir` to `output_dir` in a native architecture (see module docstring).

    The tokenizer and generation config come along. With `verify`, the written folder is read back
    in the model's dtype and its logits compared with ours on a random batch (`VERIFY_TOLERANCE`)
    before it is moved into place. Returns {"output_dir", "format", "architecture", "max_abs_diff"}.
    """
    from .assets import load_config
    from .cards import write_export_card

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"MODEL_DIR {str(model_dir)!r} has no config.json: pass a folder saved by hf_condcomp.")
    output_dir = check_output_dir(output_dir, overwrite)
    config = load_config(model_dir, "MODEL_DIR")  # a config.json that does not read: one line naming it
    fmt = get_export_format(choose_format(config, format))  # refuses before any weight is read
    ours = _load_ours(model_dir, config, fmt)
    result = {"output_dir": str(output_dir), "format": fmt.name, "architecture": fmt.architecture,
              "dtype": str(ours.dtype).removeprefix("torch."), "max_abs_diff": None}

    def write(folder):
        # built here and dropped once saved: ours and one native copy in memory at a time
        save_with_tokenizer(_build_native(fmt, ours, model_dir), model_dir, folder)
        if verify:  # what a user loads, in the dtype both were saved in
            written = fmt.native_class().from_pretrained(folder, dtype=ours.dtype).eval()
            result["max_abs_diff"] = fmt.verify(written, ours)
        write_export_card(folder, model_dir, ours.config, fmt.architecture, result["max_abs_diff"], output_dir.name)

    save_atomically(output_dir, write, overwrite)
    return result
