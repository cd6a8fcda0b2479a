"""What differs between the transformers releases this code runs on, decided once, here.

This file travels to the Hub with every saved model, so it must work on whatever release the
person who downloads the model has installed (see "Supported versions" in docs/sharing.md).

transformers 5.24 renamed the cache in every `ModelOutput` from `past_key_values` to `cache`
(a metaclass renames the keyword in each output's `__init__`), and `generate()` now passes
`cache=` to `forward` where earlier releases pass `past_key_values=`. Which name a release uses
is read off one of its own output classes rather than off its version number, so a backport or
a development build is handled by what it does, not by what it is called.
"""

import functools
from dataclasses import fields

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

# The transformers releases `benchmarks/compat.py` checks saved models on in CI (oldest, newest),
# and the torch releases the package is tested with (oldest, newest); the model card quotes them.
# Before 5.10.4 the remote-code loader fails to copy some of a model's sibling files (docs/sharing.md).
TESTED_TRANSFORMERS = ("5.11.0", "5.25.0")
TESTED_TORCH = ("2.13.0", "2.14.1")
MINIMUM_TORCH = "2.6"  # transformers 5's own floor


def cache_key_of(output_class) -> str:
    """The name an output dataclass gives its cache field: "cache" (>= 5.24) or "past_key_values"."""
    return "cache" if "cache" in {f.name for f in fields(output_class)} else "past_key_values"


# The name of the cache field in this release's model outputs.
CACHE_KEY = cache_key_of(BaseModelOutputWithPast)


def is_custom_code(model) -> bool:
    """The flag transformers hands `_initialize_weights` (which then skips a module of custom code
    whose every tensor is loaded): `is_custom_code()` from 5.13 on, `is_remote_code()` before."""
    method = getattr(model, "is_custom_code", None) or model.is_remote_code
    return bool(method())


def class_weight_renamings(class_name: str) -> dict:
    """{regex: replacement} of the renamings transformers registers for checkpoints of the class `class_name`
    (GPT-NeoX's `embed_out.` is `lm_head.` from 5.2x on), where the installed release has any."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return {}
    renamings = {}
    for transform in get_checkpoint_conversion_mapping(class_name) or []:
        if type(transform) is WeightRenaming and len(transform.source_patterns) == len(transform.target_patterns) == 1:
            renamings[transform.source_patterns[0]] = transform.target_patterns[0]
    return renamings


def cache_argument(past_key_values, cache):
    """The cache a forward was given, under either name (callers and `generate()` use both)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError(
            "Got both `past_key_values` and `cache`: they are two names for the same argument "
            "(transformers 5.24 renamed `past_key_values` to `cache`); pass only one."
        )
    return cache if cache is not None else past_key_values


@functools.lru_cache(maxsize=None)
def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.nn.functional.grouped_mm` runs for this device and dtype.

    It is missing before torch 2.8 and, depending on the build, refuses CPU tensors or some
    dtypes; the experts then use the per-expert loop. Probed once per (device, dtype) on a tiny
    problem rather than read off version numbers, for the same reason as `CACHE_KEY`.
    """
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped_mm is None:
        return False
    try:
        x = torch.ones(16, 16, device=device, dtype=dtype)  # (rows, in)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype)  # (E, in, out)
        offsets = torch.tensor([8, 16], device=device, dtype=torch.int32)
        grouped_mm(x, w, offs=offsets)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    return True


def _compilable_grouped_mm():
    """`F.grouped_mm` as an opaque custom op, for graphs `torch.compile` traces: torch's own meta
    function for it accepts bf16 only (torch 2.13), so an fp32 graph could not be traced. Eager
    calls use `F.grouped_mm` directly. Defined once per process: every copy of this file loaded
    as remote code (one per repository) finds the op the first one defined."""
    namespace = torch.ops.hf_condcomp
    if hasattr(namespace, "grouped_mm"):
        return namespace.grouped_mm
    if getattr(torch.nn.functional, "grouped_mm", None) is None or not hasattr(torch.library, "custom_op"):
        return None

    @torch.library.custom_op("hf_condcomp::grouped_mm", mutates_args=())
    def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.grouped_mm(x, weight, offs=offsets)

    @grouped_mm.register_fake
    def _(x, weight, offsets):
        if weight.dim() == 3:  # (S, in) x (E, in, out) -> (S, out)
            return x.new_empty(x.shape[0], weight.shape[-1])
        return x.new_empty(offsets.shape[0], x.shape[0], weight.shape[-1])  # (out, S) x (S, in) -> (E, out, in)

    return namespace.grouped_mm


COMPILABLE_GROUPED_MM = _compilable_grouped_mm()


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`F.grouped_mm(x, weight, offs=offsets)`, traceable by `torch.compile` in every dtype."""
    if COMPILABLE_GROUPED_MM is not None and torch.compiler.is_compiling():
        return COMPILABLE_GROUPED_MM(x, weight, offsets)
    return torch.nn.functional.grouped_mm(x, weight, offs=offsets)
