"""Export a model upcycled from a Llama, Mistral, Qwen2 or Qwen3 source to a native transformers
MoE architecture (T5 sources: export_seq2seq.py, Switch Transformers; M2M100 / NLLB sources: NLLB-MoE).

Serving engines (vLLM, SGLang, TGI, llama.cpp's converters) load native architectures, not remote
code. Where one expresses an upcycled model exactly, this writes the model in it, so that it loads
with no `trust_remote_code` and gives the same logits:

- `mixtral`: MoE in every layer (`MixtralForCausalLM`); attention without biases, top-k weights
  renormalised (Mixtral always renormalises); a Mistral source's sliding window kept.
- `qwen2_moe`: dense and MoE layers mixed, our default of every other layer: the dense layers go
  to `mlp_only_layers`, q/k/v biases follow the source (`qkv_bias`), the shared expert has width
  0 and contributes nothing, `norm_topk_prob` as ours.
- `qwen3_moe`: a Qwen3 source (per-head query/key norms, `qk_norm`), every layer or mixed
  (`mlp_only_layers`), `norm_topk_prob` as ours; the only format for such a model, since neither
  Mixtral nor Qwen2-MoE normalises queries and keys.

What no native architecture expresses is refused before anything is read or written, with the
feature named: expert-choice routing, capacity drops, Mixture-of-Depths and gated layers, MLP
biases, unit expert weights (split upcycling with top-k > 1), models of other sources (GPT-2, BERT,
...), a sliding window with dense layers, Qwen2 / Qwen3 windows in some layers.
Token-level differences that vanish at inference (Mixtral's router jitter scales the experts'
input as well as the router's) are noted in the README, not refused.

Key map (ours -> native): none. An MoE layer's `mlp.gate.weight` (the router) and
`mlp.experts.{gate_up_proj,down_proj}` ((E, 2I, H) / (E, H, I)) are the native names and layout;
dense layers' `mlp.{gate,up,down}_proj.weight` and everything outside the MLPs keep the source's
names, which are ours too. A folder saved with an earlier release's `condcomp_llama`
model type is converted first (legacy.py).
"""

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from .export_seq2seq import (
    SEQ2SEQ_FORMATS,
    nllb_moe_config,
    nllb_moe_state_dict,
    nllb_moe_weight_blocker,
    seq2seq_format,
    switch_config,
    switch_state_dict,
    verification_inputs,
)
from .legacy import LEGACY_TYPES, convert_folder
from .legacy import native_config as legacy_native_config
from .modeling.depth import GATED_VARIANTS
from .modeling.routing import get_routing_method
from .saving import check_output_dir, save_atomically

FORMATS = ("auto", "mixtral", "qwen2_moe", "qwen3_moe", *SEQ2SEQ_FORMATS)
SOURCES = ("llama", "mistral", "qwen2", "qwen3")  # source model types of the Llama family


class ExportError(ValueError):
    """The model cannot be written in the requested native architecture (nothing was written)."""


def _refuse(feature, fix):
    return ExportError(f"cannot export natively: {feature}. {fix}")


def _qkv_bias(config) -> bool:
    return bool(config.attention_bias if config.qkv_bias is None else config.qkv_bias)


_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                "attention_dropout", "rope_parameters", "head_dim")
_MOE_FIELDS = ("num_local_experts", "num_experts_per_tok", "moe_layers", "moe_routing", "moe_capacity_factor",
               "moe_expert_intermediate_size", "norm_topk_prob", "router_unit_weights", "router_jitter_noise",
               "router_aux_loss_coef", "upcycling")


def _llama_family_view(config):
    """What export reads of a `CondCompConfig` over a Llama, Mistral, Qwen2 or Qwen3 `text_config`:
    the source's own fields, its MoE settings, and `sliding_window`."""
    if isinstance(config, SimpleNamespace):
        return config
    model_type = getattr(config, "model_type", None)
    if model_type in LEGACY_TYPES:
        config = legacy_native_config(config.to_dict())
    elif model_type != "condcomp":
        raise _refuse(f"the model type is {model_type!r}, not a model of hf_condcomp",
                      "Pass a folder saved by hf_condcomp.")
    text = config.text_config
    source = getattr(text, "model_type", None)
    if source not in SOURCES:
        raise _refuse(
            f"the model was upcycled from {source!r}; native MoE architectures exist for Llama-family decoders only "
            f"(sources {SOURCES}), not for GPT-2 (Conv1D attention, learned positions), BERT encoders or others",
            "Share it with its remote code instead (`save_pretrained`, loaded with trust_remote_code=True).",
        )
    view = {name: getattr(text, name, None) for name in _TEXT_FIELDS}
    view.update({name: getattr(config, name) for name in _MOE_FIELDS})
    sliding = getattr(text, "sliding_window", None)
    if source in ("qwen2", "qwen3") and not getattr(text, "use_sliding_window", False):
        sliding = None  # Qwen2 / Qwen3 configs carry a window they use only when `use_sliding_window`
    if sliding is not None and source != "mistral":
        raise _refuse(f"{source!r} sliding-window attention in some layers (`max_window_layers`)",
                      "Keep this model as remote code (trust_remote_code=True).")
    view.update({v.layers_field: getattr(config, v.layers_field, None) for v in GATED_VARIANTS.values()})
    view.update(sliding_window=sliding,
                attention_bias=bool(getattr(text, "attention_bias", False)),
                qkv_bias=True if source == "qwen2" else None,
                mlp_bias=bool(getattr(text, "mlp_bias", False)), qk_norm=source == "qwen3")
    view["upcycling"] = {**(view["upcycling"] or {}), "source_model_type": source}
    return SimpleNamespace(**view)


def choose_format(config, requested: str = "auto") -> str:
    """The native architecture that expresses `config` exactly, or an `ExportError` naming what blocks it."""
    if requested not in FORMATS:
        raise ExportError(f"`--format` must be one of {FORMATS}, got {requested!r}.")
    if getattr(config, "decoder_ffn_layout", None) is not None:  # an encoder-decoder source
        fmt, blocker = seq2seq_format(config, requested)
        if blocker:
            raise _refuse(*blocker)
        return fmt
    if requested in SEQ2SEQ_FORMATS:
        raise _refuse(f"`{requested}` is an encoder-decoder architecture; this model is not one",
                      "Use --format auto.")
    config = _llama_family_view(config)
    source = (config.upcycling or {}).get("source_model_type", "llama")
    qk_norm = bool(getattr(config, "qk_norm", False))
    if requested == "qwen3_moe" and not qk_norm:
        raise _refuse(
            "`qwen3_moe` needs a Qwen3 source, whose attention normalises queries and keys per head; "
            f"this model was upcycled from {source!r}, which does not",
            "Use --format auto (mixtral or qwen2_moe).",
        )
    if qk_norm and requested in ("mixtral", "qwen2_moe"):
        raise _refuse(
            f"`{requested}` has no per-head query/key norms, which this model (upcycled from {source!r}) has",
            "Use --format qwen3_moe (or auto).",
        )
    blockers = [
        (not get_routing_method(config.moe_routing).exports_natively,
         f"`moe_routing`={config.moe_routing!r}: native MoE models route by token choice"),
        (config.moe_capacity_factor is not None,
         f"`moe_capacity_factor`={config.moe_capacity_factor!r}: native MoE models are dropless"),
        *((bool(getattr(config, v.layers_field, None)),
           f"`{v.layers_field}`={getattr(config, v.layers_field, None)}: {v.description}")
          for v in GATED_VARIANTS.values()),
        (bool(config.mlp_bias), "`mlp_bias`=True: native experts have no biases"),
        (config.router_unit_weights and config.num_experts_per_tok > 1,
         "`router_unit_weights`=True with top-k > 1 (split upcycling): native models weight experts by "
         "router probabilities"),
    ]
    for blocked, feature in blockers:
        if blocked:
            raise _refuse(feature, "Keep this model as remote code (trust_remote_code=True).")
    if not config.moe_layers:
        raise _refuse("the model has no MoE layer",
                      "Export applies to upcycled MoE models; a dense model is its source.")
    if qk_norm:
        if _qkv_bias(config) != bool(config.attention_bias):
            raise _refuse("q/k/v biases apart from the output projection's (Qwen3-MoE has one `attention_bias`)",
                          "Keep this model as remote code (trust_remote_code=True).")
        return "qwen3_moe"
    mixtral_blocker, qwen2_blocker = _mixtral_blocker(config), _qwen2_moe_blocker(config)
    if requested == "auto":
        requested = "mixtral" if mixtral_blocker is None else "qwen2_moe"
    blocker = mixtral_blocker if requested == "mixtral" else qwen2_blocker
    if blocker:
        other = "qwen2_moe" if requested == "mixtral" and qwen2_blocker is None else None
        raise _refuse(f"`{requested}` cannot express {blocker}",
                      f"Use --format {other}." if other else "Keep this model as remote code (trust_remote_code=True).")
    return requested


def _dense_layers(config) -> list[int]:
    return sorted(set(range(config.num_hidden_layers)) - set(config.moe_layers))


def _mixtral_blocker(config) -> str | None:
    if getattr(config, "sliding_window", None) is not None and _dense_layers(config):
        return "a sliding window with dense layers (Mixtral, which has sliding windows, is MoE in every layer)"
    if config.attention_bias or _qkv_bias(config):
        return "attention biases (Mixtral's attention has none)"
    if _dense_layers(config):
        return f"dense layers {_dense_layers(config)} (Mixtral is MoE in every layer)"
    if not (config.norm_topk_prob or config.num_experts_per_tok == 1):
        return "`norm_topk_prob`=False (Mixtral renormalises the top-k weights)"
    return None


def _qwen2_moe_blocker(config) -> str | None:
    if getattr(config, "sliding_window", None) is not None:
        return f"a sliding window of {config.sliding_window} in every layer (Qwen2-MoE windows the upper layers only)"
    if config.attention_bias:
        return "`attention_bias`=True on the output projection (Qwen2-MoE's has none)"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        return f"`head_dim`={head_dim} apart from hidden_size / num_attention_heads (Qwen2-MoE derives it)"
    return None


def _common_fields(config) -> dict:
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range, rms_norm_eps=config.rms_norm_eps, use_cache=config.use_cache,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings, attention_dropout=config.attention_dropout,
        rope_parameters=config.rope_parameters, num_experts_per_tok=config.num_experts_per_tok,
        router_aux_loss_coef=config.router_aux_loss_coef, output_router_logits=False,
    )


def native_config(config, fmt: str):
    """The native config of format `fmt` (from `choose_format`) for our `config`."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    config = _llama_family_view(config)
    expert_size = config.moe_expert_intermediate_size or config.intermediate_size
    fields = _common_fields(config)
    if fmt == "qwen3_moe":
        return Qwen3MoeConfig(**fields, head_dim=getattr(config, "head_dim", None),
                              intermediate_size=config.intermediate_size, moe_intermediate_size=expert_size,
                              num_experts=config.num_local_experts, decoder_sparse_step=1,
                              mlp_only_layers=_dense_layers(config), norm_topk_prob=config.norm_topk_prob,
                              attention_bias=config.attention_bias, use_sliding_window=False)
    if fmt == "mixtral":
        native = MixtralConfig(**fields, head_dim=getattr(config, "head_dim", None), intermediate_size=expert_size,
                               num_local_experts=config.num_local_experts,
                               sliding_window=getattr(config, "sliding_window", None),
                               router_jitter_noise=config.router_jitter_noise)
    else:
        native = Qwen2MoeConfig(**fields, intermediate_size=config.intermediate_size, moe_intermediate_size=expert_size,
                                num_experts=config.num_local_experts, shared_expert_intermediate_size=0,
                                decoder_sparse_step=1, mlp_only_layers=_dense_layers(config),
                                norm_topk_prob=config.norm_topk_prob, qkv_bias=_qkv_bias(config),
                                use_sliding_window=False)
    return native


def native_state_dict(state: dict, native_model) -> dict:
    """Our state dict, whose keys are the native model's; asserts that every key is matched once, with its shape."""
    out = dict(state)
    expected = native_model.state_dict()
    for key, param in expected.items():
        if key not in out and ".shared_expert" in key:
            # Qwen2-MoE's shared expert, width 0 (its gate is zero as well): it adds nothing.
            out[key] = torch.zeros_like(param)
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected:
        raise AssertionError(f"native key map is incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, param in expected.items():
        if tuple(out[key].shape) != tuple(param.shape):
            raise AssertionError(f"{key}: shape {tuple(out[key].shape)} does not fit the native {tuple(param.shape)}")
    return out


def export_native(model_dir, output_dir, format: str = "auto", overwrite: bool = False, verify: bool = True) -> dict:
    """Write the upcycled model in `model_dir` to `output_dir` in a native architecture (see module docstring).

    The tokenizer and generation config come along. With `verify`, the native model's logits are
    compared with ours on a random batch before anything is written (<= 1e-4 in float32).
    Returns {"format": ..., "architecture": ..., "max_abs_diff": ...}.
    """
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        MixtralForCausalLM,
        NllbMoeForConditionalGeneration,
        Qwen2MoeForCausalLM,
        Qwen3MoeForCausalLM,
        SwitchTransformersForConditionalGeneration,
    )
    from transformers.initialization import no_init_weights

    from .assets import load_config, load_pretrained
    from .cards import write_export_card
    from .modeling.modeling_condcomp import CondCompForCausalLM, CondCompForConditionalGeneration

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"MODEL_DIR {str(model_dir)!r} has no config.json: pass a folder saved by hf_condcomp.")
    output_dir = check_output_dir(output_dir, overwrite)
    config = load_config(model_dir, "MODEL_DIR")  # a config.json that does not read: one line naming it
    fmt = choose_format(config, format)  # refuses before any weight is read

    with tempfile.TemporaryDirectory(prefix="condcomp_export_") as tmp:
        folder = convert_folder(model_dir, tmp) if config.model_type in LEGACY_TYPES else model_dir
        ours_cls = CondCompForConditionalGeneration if fmt in SEQ2SEQ_FORMATS else CondCompForCausalLM
        ours = load_pretrained(ours_cls, folder, "MODEL_DIR", dtype="auto").eval()
    state = ours.state_dict()  # transformers' own Llama / Mistral / Qwen / T5 names
    native_cls = {"mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM,
                  "switch_transformers": SwitchTransformersForConditionalGeneration,
                  "nllb_moe": NllbMoeForConditionalGeneration}[fmt]
    if fmt == "nllb_moe" and (blocker := nllb_moe_weight_blocker(state)):
        raise _refuse(*blocker)  # before anything is written
    with no_init_weights():
        if fmt == "nllb_moe":
            native = native_cls(nllb_moe_config(ours.config))
            state = nllb_moe_state_dict(state)
        elif fmt in SEQ2SEQ_FORMATS:
            native = native_cls(switch_config(ours.config))
            state = switch_state_dict(state)
        else:
            native = native_cls(native_config(ours.config, fmt))
            state = native_state_dict(state, native)
    native.load_state_dict(state, strict=True)
    if native.config.tie_word_embeddings:
        native.tie_weights()
    native.to(ours.dtype).eval()
    try:
        native.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        pass  # no generation_config.json: the native model's default, built from its config

    diff = None
    if verify:
        if fmt in SEQ2SEQ_FORMATS:
            inputs = verification_inputs(native)
        else:
            inputs = {"input_ids": torch.randint(0, native.config.vocab_size, (2, 16),
                                                 generator=torch.Generator().manual_seed(0))}
        with torch.no_grad():
            diff = float((native(**inputs).logits.float() - ours(**inputs).logits.float()).abs().max())
        tolerance = 1e-4 if ours.dtype == torch.float32 else 5e-2
        if not diff <= tolerance:
            raise AssertionError(f"the {fmt} export differs from the model by {diff:.3g} (> {tolerance}); "
                                 "nothing written")
        if fmt in SEQ2SEQ_FORMATS:  # and the greedy tokens of the batch
            greedy = {name: model.generate(inputs["input_ids"], max_new_tokens=5, do_sample=False)
                      for name, model in (("native", native), ("ours", ours))}
            if not torch.equal(greedy["native"], greedy["ours"]):
                raise AssertionError(f"the {fmt} export's greedy tokens differ from the model's; nothing written")

    def write(folder):
        native.save_pretrained(folder)
        write_export_card(folder, model_dir, ours.config, native, diff, output_dir.name)  # README.md
        try:
            AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
        except (OSError, ValueError, TypeError):
            pass  # a model saved without a tokenizer exports without one

    save_atomically(output_dir, write, overwrite)
    return {"output_dir": str(output_dir), "format": fmt, "architecture": native_cls.__name__, "max_abs_diff": diff}
