"""The model a recipe trains: upcycled on the fly from a dense checkpoint or loaded as upcycled,
its tokenizer, LoRA, which parameters are routing parameters, and the optimizer's groups."""

import argparse
import contextlib
import re
from pathlib import Path

import torch

from .. import assets
from ..modeling.common import has_moe_layers
from .errors import RecipeError

# Where a model upcycled on the fly waits to be read in shards by transformers' engine (`--fsdp_size`).
UPCYCLED_SOURCE = "upcycled-source"


def load_model(args, auto_class, task, **head_kwargs):
    """The model to train: `--model_name_or_path` loaded as it is when it is already a model of this
    package (upcycled and perhaps fine-tuned, from a folder or the Hub), else upcycled
    from it with `args.upcycling`. `head_kwargs`: num_labels, id2label, label2id."""
    from ..modeling.configuration_condcomp import is_condcomp_config

    config = source_config(args)
    sharded = distributed_config(args)
    if sharded is not None and not is_condcomp_config(config):
        return _upcycled_then_sharded(args, auto_class, task, sharded, head_kwargs)
    if is_condcomp_config(config):
        model = _load_ours(args, auto_class, config, sharded, head_kwargs)
    else:
        model = _upcycle_source(args, task, head_kwargs)
    _set_labels(model.config, head_kwargs)
    if has_moe_layers(model.config):
        # The recipes train MoE layers with their router losses (load balancing, z-loss), whatever the
        # folder's `output_router_logits` says (folders of earlier releases say False).
        model.config.output_router_logits = True
    if args.export_format == "native":  # refuse now, not after hours of training
        from ..export import ExportError, choose_format

        try:
            choose_format(model.config)
        except ExportError as err:
            raise RecipeError(f"`--export_format native`: {err}") from None
    model.train()
    return model


def _load_ours(args, auto_class, config, sharded, head_kwargs):
    """A folder of this package, as it is (a new label set gets a fresh head), sharded by transformers'
    engine when `sharded` is a `DistributedConfig`."""
    kwargs = {} if sharded is None else {"distributed_config": sharded}
    if "num_labels" in head_kwargs:
        heads = _label_configs(config)
        if any(c.num_labels != head_kwargs["num_labels"] for c in heads):
            kwargs["ignore_mismatched_sizes"] = True  # a new label set: fresh head, everything else kept
        _set_labels(config, head_kwargs)
        kwargs["config"] = config
    path = assets.resolve(args.model_name_or_path)
    try:
        model = assets.load_pretrained(auto_class, path, "`--model_name_or_path`",
                                       trust_remote_code=args.trust_remote_code, **kwargs)
    except assets.CheckpointError as err:
        raise RecipeError(str(err)) from err
    except ValueError as err:
        if sharded is None:
            raise
        from .arguments import parallel_flags

        raise RecipeError(f"`{parallel_flags(args)}`: transformers' engine cannot shard this model "
                          f"({assets.one_line(err)}); train it with DDP or DeepSpeed instead (docs/scaling.md)."
                          ) from None
    if sharded is not None:
        compact_shards(model)
    return model


def _upcycle_source(args, task, head_kwargs):
    """A dense `--model_name_or_path` upcycled with `args.upcycling` (outside ZeRO-3's `zero.Init`)."""
    from ..upcycle import upcycle

    name = args.model_name_or_path
    try:  # `args.upcycling` holds fields of UpcycleSpec only (parse_args checks the keys)
        with outside_zero3_init():
            model = upcycle(assets.resolve(name), task=task, num_labels=head_kwargs.get("num_labels"),
                            **args.upcycling)
    except assets.CheckpointError as err:  # the source cannot be read, whatever the upcycling settings
        raise RecipeError(f"`--model_name_or_path` {err.detail}") from err
    except ValueError as err:  # upcycle names the setting; here it is an `upcycling.` key
        raise RecipeError(f"`upcycling`: {err}") from None
    if isinstance(getattr(model.config, "upcycling", None), dict):
        model.config.upcycling["source"] = name
    return model


def distributed_config(args):
    """transformers' `DistributedConfig` for `--fsdp_size` / `--ep_size` / `--tp_size`, None when all are 1."""
    from .arguments import parallel_sizes

    if not parallel_sizes(args):
        return None
    from transformers.distributed import DistributedConfig

    return DistributedConfig(fsdp_size=args.fsdp_size, ep_size=args.ep_size, tp_size=args.tp_size)


def compact_shards(model) -> int:
    """Give each parameter shard its own storage. transformers' engine reads a tensor and keeps a slice of it
    as the rank's shard: on the CPU the slice is a view, so every rank would keep every whole tensor (the
    measurement is in benchmarks/README.md). Done before the first forward, so that FSDP2 takes the new
    shards when it sets itself up (`FSDPParam.reset_sharded_param`). Returns the bytes freed per rank."""
    from torch.distributed.tensor import DTensor

    freed = 0
    for param in model.parameters():
        if not isinstance(param, DTensor):
            continue
        local = param._local_tensor
        storage = local.untyped_storage().nbytes()
        if storage > local.numel() * local.element_size():
            param._local_tensor = local.clone(memory_format=torch.contiguous_format)
            freed += storage - local.numel() * local.element_size()
    return freed


def _upcycled_then_sharded(args, auto_class, task, sharded, head_kwargs):
    """transformers shards a model while `from_pretrained` reads it: the main process upcycles the dense
    source once into `output_dir/upcycled-source` (on several machines, a folder they share), every
    process loads its shard of that folder, and the folder is removed."""
    import shutil

    from accelerate import PartialState

    state = PartialState()
    folder = Path(args.output_dir) / UPCYCLED_SOURCE
    try:
        if state.is_main_process:
            dense = {**vars(args), "fsdp_size": 1, "ep_size": 1, "tp_size": 1, "export_format": "remote_code"}
            model = load_model(argparse.Namespace(**dense), auto_class, task, **head_kwargs)
            if sharded.dp_size > 1 and not model.fsdp_plan:  # refused now, before any process reads a folder
                raise RecipeError(
                    f"`--fsdp_size {args.fsdp_size}`: {type(model).__name__} has no FSDP plan for transformers' "
                    "engine to shard it by; train it with DDP or DeepSpeed instead (docs/scaling.md).")
            model.save_pretrained(folder)
            del model
        state.wait_for_everyone()
        upcycled = argparse.Namespace(**{**vars(args), "model_name_or_path": str(folder), "upcycling": {}})
        model = load_model(upcycled, auto_class, task, **head_kwargs)
        state.wait_for_everyone()  # every process has read the folder before it goes
    finally:
        if state.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
    if isinstance(getattr(model.config, "upcycling", None), dict):
        model.config.upcycling["source"] = args.model_name_or_path
    return model


@contextlib.contextmanager
def outside_zero3_init():
    """Build a model whole under DeepSpeed ZeRO-3: upcycling copies the dense weights into the experts,
    which `zero.Init`'s partitioned (empty) parameters cannot give; the engine partitions the finished
    model in `prepare`. Each process then holds the whole model once, before `prepare`. transformers
    builds under `zero.Init` while a ZeRO-3 config is registered with it (accelerate registers the
    plugin's whatever its `zero3_init_flag`): it is unregistered meanwhile."""
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    if not is_deepspeed_zero3_enabled():
        yield
        return
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState().deepspeed_plugin
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf if getattr(plugin, "dschf", None) is not None else plugin.hf_ds_config)


def source_config(args):
    """The config of `--model_name_or_path` (dense or upcycled), read before any weight is loaded."""
    name = args.model_name_or_path
    what = "`--model_name_or_path`"
    try:
        return assets.load_config(assets.resolve(name), what, trust_remote_code=args.trust_remote_code)
    except assets.CheckpointError as err:
        raise RecipeError(str(err)) from err
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"{what} {name!r} could not be read ({assets.one_line(err)}). Pass a Hub id, a folder with config.json, "
            f"or one of {list(assets.EMBEDDED)}."
        ) from err


def is_encoder_decoder(config) -> bool:
    """Whether a config (a dense source's, or an upcycled model's, whose source config is its
    `text_config`) is an encoder-decoder model's: T5, BART, Marian, M2M100, ..."""
    text = getattr(config, "text_config", None)
    return bool(getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False))


def _label_configs(config):
    """The configs that hold a classifier's labels: the model's, and for a model of this package the
    source's `text_config` too, from which transformers builds the head."""
    text = getattr(config, "text_config", None)
    return [config] + ([text] if text is not None and hasattr(text, "num_labels") else [])


def _set_labels(config, head_kwargs):
    """Set the recipe's labels on the model's config; a `CondCompConfig` passes them on to its
    `text_config` itself (`CondCompConfig.__setattr__`)."""
    if "num_labels" in head_kwargs and config.num_labels != head_kwargs["num_labels"]:
        config.num_labels = head_kwargs["num_labels"]
    for key in ("id2label", "label2id"):
        if key in head_kwargs:
            setattr(config, key, head_kwargs[key])


def load_tokenizer(args):
    if args.tokenizer_name:
        path, what, fix = args.tokenizer_name, "`--tokenizer_name`", "pass a tokenizer folder or Hub id"
    else:
        path, what, fix = assets.resolve(args.model_name_or_path), "`--model_name_or_path`", "pass `--tokenizer_name`"
    try:
        return assets.load_tokenizer(path, what, fix, trust_remote_code=args.trust_remote_code)
    except assets.CheckpointError as err:
        raise RecipeError(str(err)) from err


# Attention modules by name: `attention`, `attn`, `self_attn`; an encoder-decoder's cross-attention
# (BART-family `encoder_attn`) and T5's `SelfAttention` / `EncDecAttention`.
_ATTENTION = re.compile(r"(self_|encoder_)?att(n|ention)|SelfAttention|EncDecAttention")


def lora_targets(model, targets):
    """(target_modules, target_parameters) for attention and experts, read off the model's modules
    for every architecture: each linear layer inside a layer's attention module, by its name from that
    module on (`self_attn.q_proj`, `attention.self.query`, `attn.c_attn`, ...), and the stacked
    weights of each MoE block's experts (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`; an
    encoder-decoder's `fc1.experts.up_proj`, `DenseReluDense.experts.gate_up_proj`, ...)."""
    from transformers.pytorch_utils import Conv1D

    from ..modeling.experts import Experts

    attention, experts = set(), set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            at = next((i for i, part in enumerate(parts) if _ATTENTION.fullmatch(part)), None)
            if at is not None:
                attention.add(".".join(parts[at:]))
        elif isinstance(module, Experts):
            block = ".".join(parts[-2:])  # the MoE block's name in its layer, and `experts`
            experts.update({f"{block}.{module.up_name}", f"{block}.down_proj"})
    return (sorted(attention) if "attention" in targets else []), (sorted(experts) if "experts" in targets else [])


def _conv1d_targets(model, modules):
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and any(name.endswith(t) for t in modules) for name, m in model.named_modules())


def apply_lora(model, args):
    """LoRA on attention (modules) and experts (3-D parameters, PEFT `target_parameters`); routers,
    gates and classification heads stay fully trainable, so the router keeps learning."""
    if not args.lora_r:
        return model
    from peft import LoraConfig, get_peft_model

    targets = set(filter(None, args.lora_targets.split(",")))
    modules, parameters = lora_targets(model, targets)
    conv1d = _conv1d_targets(model, modules)
    if conv1d and parameters and modules:
        # PEFT's parameter wrapper refuses fan_in_fan_out, which GPT-2's Conv1D attention needs.
        raise RecipeError("GPT-2: LoRA on attention (Conv1D) and experts together is not supported by PEFT; "
                          "set `--lora_targets attention` or `--lora_targets experts`.")
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout if not parameters else 0.0,
        target_modules=modules,
        target_parameters=parameters or None,
        fan_in_fan_out=conv1d,
    )
    model = get_peft_model(model, config)
    keep = [k for k in args.lora_trainable.split(",") if k]
    routing = routing_parameter_names(model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        if name in routing or any(re.search(rf"(^|\.){k}(\.|$)", name) for k in keep):
            param.requires_grad_(True)
    return model


def unwrap(accelerator, model):
    """The transformers model under DDP/FSDP wrappers and a PEFT model (LoRA layers stay injected)."""
    model = accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def count_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def routing_parameter_names(model) -> set[str]:
    """The parameters that decide where compute goes: MoE routers, MoD routers and their causal
    predictors, compute-allocation gates. One definition for the optimizer's groups,
    `--router_learning_rate` and the LoRA keep-list. Found by module type, so that any wrapper's
    prefix (PEFT's `base_model.model.`, DDP's `module.`) is part of the names it returns."""
    from ..modeling.moe import MoEFeedForward
    from ..modeling.variants import GATED_VARIANTS

    gated = tuple(cls for v in GATED_VARIANTS.values() for cls in v.modules.values())

    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            owned = module.gate.named_parameters(prefix=f"{prefix}.gate")
        elif isinstance(module, gated):
            owned = module.named_parameters(prefix=prefix)
        else:
            continue
        names.update(name for name, _ in owned)
    return names


def decays(name, param) -> bool:
    """Weight decay on weights only: not on biases (the dense model's `bias`, the experts'
    `*_proj_bias` of shape (E, out), the predictors' `b_*`) nor on norms, wherever they sit."""
    leaf = name.rsplit(".", 1)[-1]
    is_bias = leaf.endswith("bias") or leaf.startswith("b_")
    return param.ndim >= 2 and not is_bias and "norm" not in name.lower()


def make_optimizer(model, args, accelerator=None):
    """AdamW without weight decay on biases and norms (`decays`); routing parameters at `router_learning_rate`.

    The fused AdamW kernel is used on one process or plain DDP on CPU or CUDA: an MoE has several
    times its parent's parameters, and the default per-tensor AdamW loop is several times slower
    on the CPU. FSDP and DeepSpeed keep the default."""
    router_lr = args.learning_rate if args.router_learning_rate is None else args.router_learning_rate
    routing = routing_parameter_names(model)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = not decays(name, param)
        lr = router_lr if name in routing else args.learning_rate
        group = groups.setdefault((lr, no_decay), {"params": [], "lr": lr,
                                                   "weight_decay": 0.0 if no_decay else args.weight_decay})
        group["params"].append(param)
    fused = accelerator is None or (accelerator.device.type in ("cpu", "cuda")
                                    and accelerator.distributed_type.value in ("NO", "MULTI_CPU", "MULTI_GPU"))
    return torch.optim.AdamW(list(groups.values()), lr=args.learning_rate, fused=fused or None)
