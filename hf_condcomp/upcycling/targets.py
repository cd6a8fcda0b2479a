"""The target model classes of upcycling, the task check, and the checks of config overrides.

Every source becomes transformers' own model of it with the chosen layers made conditional
(modeling_condcomp.py); the task picks the head class."""

import dataclasses
import difflib
import typing

from ..modeling.configuration_condcomp import SEQ2SEQ_GATED_REFUSAL, CondCompConfig
from ..modeling.modeling_condcomp import TASK_CLASSES
from ..modeling.variants import variant_fields
from ..spec import _error
from .layers import gated_beside_moe

TARGETS = TASK_CLASSES  # the task's model class


def check_task(task):
    if task not in TARGETS:
        raise _error("task", task, f"one of {sorted(TARGETS)}")


def check_upcycle(spec, src_config, task, stacks, overrides):
    """Every check of the settings against the source, in one place: the task, what an encoder-decoder
    source (two `stacks`) does not take, and the config overrides."""
    check_task(task)
    if len(stacks) > 1:
        beside = gated_beside_moe(spec)
        if spec.variant != "moe" or beside:
            with_mod = "".join(f" with `{v.layers_field}`" for v in beside)
            raise ValueError(f"`variant`={spec.variant!r}{with_mod} is not supported on encoder-decoder models (model "
                             f"type {src_config.model_type!r}): {SEQ2SEQ_GATED_REFUSAL}")
        if spec.router_init != "random":
            raise ValueError(f"`router_init`={spec.router_init!r} is not supported on encoder-decoder models (model "
                             f"type {src_config.model_type!r}): prompts start the routers of one stack's layers. "
                             "Use router_init='random'.")
    check_overrides(overrides, src_config)


def check_overrides(overrides, src_config, config_class=CondCompConfig):
    """Every `upcycle(..., name=value)` override must name a field of the target config (or of the
    source's): a misspelt name would otherwise be stored as an unused attribute and silently ignored."""
    known = {f.name for f in dataclasses.fields(config_class)} | set(src_config.to_dict())
    known |= {f.name for f in variant_fields()}
    for name, value in overrides.items():
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
            raise ValueError(
                f"`{name}`={value!r} is not an upcycling argument nor a field of {config_class.__name__}.{hint}"
            )


def as_floats_where_expected(config_class, values):
    """Whole numbers given for float fields (`capacity_factor=2`, `router_aux_loss_coef=0`, as YAML
    and the command line write them) become floats: the strict config would reject the int. The
    registered gated variants' fields count, whether or not `config_class` declares them."""
    for field in [*dataclasses.fields(config_class), *variant_fields()]:
        value = values.get(field.name)
        if isinstance(value, int) and not isinstance(value, bool):
            types = typing.get_args(field.type) or (field.type,)
            if float in types and int not in types:
                values[field.name] = float(value)
    return values
