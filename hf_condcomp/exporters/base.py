"""`ExportFormat`: one native transformers architecture an upcycled model can be written in, and the
registry of them by name (`--format`), as routing methods and gated variants are registered.

A format owns what it cannot express (`blocker`), its config (`build_config`), its key map
(`map_state_dict`), its class (`architecture`) and its check (`verification_inputs`, `verify`).
What no format expresses (gated layers, routing other than dropless token choice: the list
vLLM's refusal reads too, modeling/blockers.py; a model without MoE layers) is refused before any
format is asked.
"""

import torch

from ..modeling.blockers import token_choice_blockers
from ..modeling.common import has_moe_layers

KEEP = "Keep this model as remote code (trust_remote_code=True)."

# How far a written export's logits may be from ours, both run in the model's dtype: (atol, rtol)
# with |native - ours| <= atol + rtol * max |ours|. The weights are ours bit for bit (checked
# apart), so in float32 the two agree to rounding. Half precisions round every activation to 11
# (float16) or 8 (bfloat16) bits, and the two implementations round at different steps: measured
# on SmolLM2-135M merged from two fine-tunes (30 MoE layers, logits up to 33), 0.086 (float16) and
# 0.88 (bfloat16) apart, less than either is from its own float32 logits in bfloat16 (1.1, 1.4).
VERIFY_TOLERANCE = {torch.float32: (1e-4, 0.0), torch.float16: (1e-3, 1e-2), torch.bfloat16: (1e-2, 8e-2)}

_EXPORT_REASONS = {"gated": "{description}", "routing": "native MoE models route by token choice",
                   "capacity": "native MoE models are dropless"}


class ExportError(ValueError):
    """The model cannot be written in the requested native architecture (nothing was written)."""


def refuse(feature: str, fix: str = KEEP) -> ExportError:
    return ExportError(f"cannot export natively: {feature}. {fix}")


def export_blocker(config) -> str | None:
    """What no native MoE architecture computes (the first such setting), or None."""
    blockers = token_choice_blockers(config)
    if blockers:
        return f"{blockers[0]}: " + _EXPORT_REASONS[blockers[0].kind].format(description=blockers[0].description)
    if not has_moe_layers(config):
        return "the model has no MoE layer (export applies to upcycled MoE models; a dense model is its source)"
    return None


class ExportFormat:
    """A native architecture, registered with `@register_export_format` under `name`.

    name: the `--format` value ("mixtral").
    architecture: the transformers class written ("MixtralForCausalLM").
    sources: the source model types (`text_config.model_type`) whose upcycles it may express.
    encoder_decoder: whether our model is a `CondCompForConditionalGeneration` (else `...ForCausalLM`).
    """

    name: str = None
    architecture: str = None
    sources: tuple = ()
    encoder_decoder: bool = False

    def blocker(self, config) -> str | None:
        """What of our `config` (a `CondCompConfig` of one of `sources`) this architecture cannot
        express, one phrase naming the field and value; None where it computes the model exactly."""
        raise NotImplementedError

    def weight_blocker(self, state: dict) -> str | None:
        """Like `blocker`, for what only the weights show (checked once read, before anything is written)."""
        return None

    def build_config(self, config):
        """The native config for our `config`."""
        raise NotImplementedError

    def map_state_dict(self, state: dict, native) -> dict:
        """Our state dict under the names of `native` (an instance of `architecture`)."""
        raise NotImplementedError

    def native_class(self):
        import transformers

        return getattr(transformers, self.architecture)

    def verification_inputs(self, config) -> dict:
        """A batch for the logits comparison, from the native config."""
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, config.vocab_size, (2, 16), generator=g)}

    def verify(self, native, ours) -> float:
        """The largest logit difference of `native` (read back from the written folder) and `ours` on
        `verification_inputs`; an `ExportError` where a weight is not ours or the difference exceeds
        the tolerance of their dtype (`VERIFY_TOLERANCE`)."""
        mapped = self.map_state_dict(ours.state_dict(), native)
        changed = [k for k, v in native.state_dict().items() if k in mapped and not torch.equal(v, mapped[k])]
        if changed:
            raise ExportError(f"the {self.name} export's weights {changed[:3]} are not the model's; nothing written. "
                              "Keep this model as remote code and report it.")
        inputs = self.verification_inputs(native.config)
        with torch.no_grad():
            theirs, own = native(**inputs).logits.float(), ours(**inputs).logits.float()
        diff = float((theirs - own).abs().max())
        atol, rtol = VERIFY_TOLERANCE.get(ours.dtype, VERIFY_TOLERANCE[torch.bfloat16])
        tolerance = atol + rtol * float(own.abs().max())
        if not diff <= tolerance:
            dtype = str(ours.dtype).removeprefix("torch.")
            raise ExportError(f"the {self.name} export differs from the model by {diff:.3g} in {dtype} (more than "
                              f"{tolerance:.3g}); nothing written. Keep this model as remote code and report it.")
        return diff

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


EXPORT_FORMATS: dict[str, ExportFormat] = {}


def register_export_format(cls):
    """Class decorator: register an `ExportFormat` subclass under its `name` (after those registered
    before it, which `--format auto` tries first)."""
    known = EXPORT_FORMATS.get(cls.name)
    if known is not None and (type(known).__module__, type(known).__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"export format {cls.name!r} is already registered ({known!r}).")
    EXPORT_FORMATS[cls.name] = cls()
    return cls


def get_export_format(name: str) -> ExportFormat:
    try:
        return EXPORT_FORMATS[name]
    except KeyError:
        raise ExportError(f"`--format` must be one of {export_format_choices()}, got {name!r}.") from None


def export_format_choices() -> tuple[str, ...]:
    """`auto` and every registered format, in the order `auto` tries them."""
    return ("auto", *EXPORT_FORMATS)
