"""The parallel plans an upcycled model declares to transformers' own distributed engine
(`from_pretrained(..., distributed_config=DistributedConfig(...))`, `transformers.distributed`).

The engine reads four plans off a model, each `{module or parameter pattern: style}` with the layer
numbers written `*`: `tp_plan` (tensor parallelism, `tp_size`), `ep_plan` (expert parallelism,
`ep_size`), `fsdp_plan` (FSDP2 units, `fsdp_size` and `dp_replicate_size`) and `pp_plan`. An
upcycled model declares:

- the source's own plans (its class's and its base model's: attention and the dense layers' FFNs colwise /
  rowwise, the head), without the entries that name what an MoE layer changed (`drop_stale_plan_entries`);
- the expert-parallel plan of the MoE blocks, as Qwen3-MoE's `base_model_ep_plan` (`expert_parallel_plan`);
- one FSDP unit per layer of every stack of layers the model has (a decoder's, an encoder's, both stacks
  of an encoder-decoder), found from the model's structure (`layer_stacks`), where the source's plan
  names only `layers.*` (BERT keeps `encoder.layer`, T5 `encoder.block` / `decoder.block`).

`check_parallel` refuses, before a weight is read, what the engine cannot run, and says once what a
tensor-parallel run leaves whole on every rank.

This file travels to the Hub with every saved model: only sibling relative imports.
"""

import re

import torch.nn as nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import logging

from .common import has_moe_layers
from .experts import Experts
from .moe import MoEFeedForward

logger = logging.get_logger(__name__)

PARALLEL_PLANS = ("_tp_plan", "_ep_plan", "_pp_plan", "_fsdp_plan")


def _wildcard(name: str) -> str:
    """transformers' `replace_layer_number_by_wildcard`: `model.layers.3.mlp` -> `model.layers.*.mlp`."""
    return re.sub(r"\.\d+(\.|$)", r".*\1", name)


def drop_stale_plan_entries(model: nn.Module) -> None:
    """Keep, in the parallel plans of `model` and of every model inside it, only the entries that
    name a module or parameter of the model and nothing an MoE layer changed.

    The source's plans name its FFN modules with `*` for the layer number (Llama: `layers.*.mlp.gate_proj`
    colwise, `up_proj` colwise, `down_proj` rowwise). The engine applies an entry to each module it
    matches, so these still shard the FFNs of the dense layers, which an MoE layer has not got: as
    Qwen3-MoE's plan shards its dense `mlp_only_layers`. An entry that names an MoE block or a module
    in it, or an FFN module an MoE layer keeps as an `Identity` (BERT's `output.dense`), is dropped:
    that FFN then runs unsharded on every rank, while the others keep their sharding (each colwise /
    rowwise pair is whole)."""
    changed = set()
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            changed.update(id(m) for m in module.modules())
        elif isinstance(module, nn.Identity):
            changed.add(id(module))
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        for attr in PARALLEL_PLANS:
            plan = module.__dict__.get(attr)
            if plan:
                setattr(module, attr, {k: v for k, v in plan.items() if _names_unchanged(module, k, changed)})


def _names_unchanged(model: nn.Module, pattern: str, changed: set) -> bool:
    """Whether the plan entry `pattern` names a module or parameter of `model`, and no module in `changed`."""
    named = [m for name, m in model.named_modules() if _wildcard(name) == pattern]
    named += [m for name, m in model.named_modules() for p, _ in m.named_parameters(recurse=False)
              if _wildcard(f"{name}.{p}" if name else p) == pattern]
    return bool(named) and not any(id(m) in changed for m in named)


def expert_parallel_plan(model: nn.Module) -> dict:
    """transformers' expert-parallel plan for the MoE blocks, in the style of Qwen3-MoE's
    `base_model_ep_plan`: every experts parameter split on its expert dim (`grouped_gemm`), the
    experts module reached through the engine's token dispatch (`ep_dispatch_experts`). Layer
    numbers are `*`, as the engine matches them; a dense layer matches no entry. The router
    (`gate`) is in no plan: it runs whole on every rank and hands the experts global expert ids."""
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            name = _wildcard(name)
            plan.update({f"{name}.{param}": "grouped_gemm" for param, _ in module.named_parameters(recurse=False)})
            plan[name] = "ep_dispatch_experts"
    return plan


def layer_stacks(model: nn.Module) -> list:
    """Dotted paths of the model's stacks of transformer layers: every `ModuleList` of modules of one
    class that transformers checkpoints layer by layer (`GradientCheckpointingLayer`) or never splits
    across devices (`_no_split_modules`). A decoder has one (`model.layers`), an encoder one
    (`bert.encoder.layer`), an encoder-decoder two (`encoder.block` and `decoder.block`)."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())

    def source_class(module):  # a routed or gated layer is a subclass of its source class (depth.py)
        return getattr(type(module), "_condcomp_source_class", type(module))

    def is_layer(module):
        return isinstance(module, GradientCheckpointingLayer) or source_class(module).__name__ in no_split

    return [name for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) and len({source_class(m) for m in module}) == 1
            and all(is_layer(m) for m in module)]


def _matches(model: nn.Module, pattern: str) -> list:
    """The names of the modules of `model` that the plan entry `pattern` names (`*` a layer number)."""
    return [name for name, _ in model.named_modules() if _wildcard(name) == pattern]


def _holds_tied_weights(name: str, tied: dict) -> bool:
    """Whether the module `name` holds one end of a tied pair of weights (`{weight: the weight it is}`)
    and a module outside it the other (T5's `encoder.embed_tokens.weight`, which is `shared.weight`)."""
    prefix = f"{name}."
    return any(a.startswith(prefix) != b.startswith(prefix) for a, b in tied.items())


def fsdp_plan(model: nn.Module, source_plan: dict, tied: dict) -> dict:
    """The FSDP2 units: the source's entries that name modules of this model, and every layer of every
    stack (`layer_stacks`) freed after its forward (`free_full_weight`). A tied weight is wrapped once, as
    transformers' `_resolve_tied_embed_lm_head_plan` does for a tied embedding and head: a module that
    holds a weight tied to one outside it (`tied`: T5's, BART's and Marian's `encoder.embed_tokens` and
    `decoder.embed_tokens`, which are `shared`) is no unit of its own, and the root unit, which holds
    whatever no unit does, shards it."""
    plan = {pattern: style for pattern, style in source_plan.items()
            if (names := _matches(model, pattern)) and not any(_holds_tied_weights(n, tied) for n in names)}
    plan.update({f"{stack}.*": "free_full_weight" for stack in layer_stacks(model)})
    return plan


def parallel_plans(model: nn.Module, source: nn.Module) -> dict:
    """{plan attribute: plan} of an upcycled model, whose modules are the source model's. The source's
    own plans were gathered by transformers when it was built (its class's `_tp_plan` / `_fsdp_plan`,
    which name the head, and its base model's config plans) and pruned by `drop_stale_plan_entries`."""
    plans = {attr: dict(source.__dict__.get(attr) or {}) for attr in PARALLEL_PLANS}
    plans["_ep_plan"] = {**expert_parallel_plan(model), **plans["_ep_plan"]}
    tied = source.get_expanded_tied_weights_keys(all_submodels=True)  # BART ties its encoder's embedding in it
    plans["_fsdp_plan"] = fsdp_plan(model, plans["_fsdp_plan"], tied)
    return plans


def check_parallel(config) -> None:
    """Refuse, before a weight is read, what transformers' expert parallelism (`ep_size > 1` in the
    `distributed_config` given to `from_pretrained`) cannot run: its dispatch hands the experts each
    token's top-k, and each rank holds an equal share of every layer's experts. Say once that tensor
    parallelism alone (`tp_size > 1`, `ep_size` 1) leaves the experts whole on every rank."""
    distributed = getattr(config, "distributed_config", None)
    ep_size = getattr(distributed, "ep_size", None) or 1
    tp_size = getattr(distributed, "tp_size", None) or 1
    if not has_moe_layers(config):
        return
    if tp_size > 1 and ep_size == 1:
        logger.warning_once(
            f"`tp_size={tp_size}` with `ep_size=1`: tensor parallelism splits the attention, and the MoE layers' "
            f"experts and routers run whole on every rank (as Mixtral's and Qwen3-MoE's plans do); pass "
            f"`DistributedConfig(tp_size={tp_size}, ep_size={tp_size})` to split the experts over the same ranks.")
    if ep_size == 1:
        return
    if config.moe_routing != "token_choice":
        raise ValueError(
            f"`moe_routing={config.moe_routing!r}` cannot run with expert parallelism (`ep_size={ep_size}`): each "
            "expert picks its tokens from the whole batch, and the engine dispatches each token's top-k experts; "
            "use `moe_routing='token_choice'` or `ep_size=1`.")
    if config.moe_capacity_factor is not None:
        raise ValueError(
            f"`moe_capacity_factor={config.moe_capacity_factor!r}` cannot run with expert parallelism "
            f"(`ep_size={ep_size}`): a capacity ranks the tokens against each other and drops some, and the engine "
            "dispatches every token's top-k experts; use `moe_capacity_factor=None` (dropless) or `ep_size=1`.")
    if config.num_local_experts % ep_size:
        raise ValueError(
            f"`num_local_experts={config.num_local_experts}` is not divisible by `ep_size={ep_size}`: each rank "
            "holds an equal share of every MoE layer's experts; choose an `ep_size` that divides it.")
