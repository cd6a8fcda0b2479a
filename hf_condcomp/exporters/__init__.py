"""Native export formats, one module each, registered by name (`--format`) in `EXPORT_FORMATS`.

A new format is a module with one `ExportFormat` subclass decorated by `@register_export_format`
(see mixtral.py), imported below; a format defined outside the package registers itself the same
way and is offered by `hf-condcomp export --format` and tried by `auto` after the built-in ones.
"""

from importlib import import_module

from .base import (
    EXPORT_FORMATS,
    KEEP,
    VERIFY_TOLERANCE,
    ExportError,
    ExportFormat,
    export_blocker,
    export_format_choices,
    get_export_format,
    refuse,
    register_export_format,
)

# The built-in formats, in the order `--format auto` tries them (Mixtral before Qwen2-MoE: every
# layer MoE and no attention biases is written as Mixtral, which more tools read).
BUILTIN_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe", "switch_transformers", "nllb_moe")
for _module in BUILTIN_FORMATS:
    import_module(f".{_module}", __name__)

__all__ = ["EXPORT_FORMATS", "KEEP", "VERIFY_TOLERANCE", "ExportError", "ExportFormat", "export_blocker",
           "export_format_choices", "get_export_format", "refuse", "register_export_format"]
