"""Arguments of the recipes: the flags of the transformers no-trainer examples, a YAML `--config`,
`key=value` overrides (`upcycling.<key>=value` for the upcycling section), cross-flag checks, and
`RecipeError`: every user mistake, raised before training, naming the flag or file and the fix."""

import argparse
import os
import re
import sys
import time
from pathlib import Path

import yaml

from ..spec import RECIPE_KEYS, recipe_keys
from ..yaml_values import yaml_value
from .checkpoints import find_checkpoint
from .data import reset_data_record
from .errors import RecipeError


def run_recipe(main, argv=None) -> int:
    """A recipe's command-line entry: a user mistake is one line on stderr and exit status 2, not a
    traceback (as argparse does for unknown flags); anything else still raises with its traceback.

    Launched on several processes, every rank meets the same mistake: rank 0 says it at once and the
    others wait `RANK_WAIT_S` first, so the launcher, which stops every process when one fails, stops
    them before they repeat it. A mistake that is one rank's own is still said, after the wait."""
    try:
        main(argv)
    except RecipeError as err:
        if int(os.environ.get("RANK") or 0) > 0 and int(os.environ.get("WORLD_SIZE") or 1) > 1:
            time.sleep(RANK_WAIT_S)
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


RANK_WAIT_S = 5.0


# The keys an `upcycling:` section accepts: the fields of `hf_condcomp.spec.UpcycleSpec` but the
# two the recipe sets itself (task, num_labels); `parse_args` reads them again (`recipe_keys()`), so that
# a gated variant registered after import brings its settings.
UPCYCLING_KEYS = RECIPE_KEYS


def add_common_arguments(parser: argparse.ArgumentParser):
    a = parser.add_argument
    a("--config", default=None, help="YAML file of defaults (recipes/configs/); flags and key=value override it")
    a("--model_name_or_path", required=False, help="dense checkpoint (upcycled with `upcycling:`) or an upcycled one")
    a("--tokenizer_name", default=None, help="default: the model's own tokenizer")
    a("--dataset_name", default=None, help="Hub dataset name (instead of local files)")
    a("--dataset_config_name", default=None)
    a("--train_file", default=None)
    a("--validation_file", default=None)
    a("--test_file", default=None)
    a("--max_train_samples", type=int, default=None)
    a("--max_eval_samples", type=int, default=None)
    a("--max_length", type=int, default=128, help="tokens per example after truncation")
    a("--per_device_train_batch_size", type=int, default=8)
    a("--per_device_eval_batch_size", type=int, default=16)
    a("--learning_rate", type=float, default=5e-5)
    a("--router_learning_rate", type=float, default=None,
      help="learning rate of MoE routers, MoD routers/predictors and compute gates (default: learning_rate); "
           "zero-initialised gates barely move in a short fine-tuning at the model's learning rate")
    a("--weight_decay", type=float, default=0.0)
    a("--num_train_epochs", type=int, default=3)
    a("--max_train_steps", type=int, default=None, help="overrides num_train_epochs")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--lr_scheduler_type", default="linear")
    a("--num_warmup_steps", type=int, default=0)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate's setting")
    a("--output_dir", default=None)
    a("--seed", type=int, default=42)
    a("--checkpointing_steps", type=int, default=None, help="save_state every N optimizer steps")
    a("--resume_from_checkpoint", default=None, help="a checkpoint folder, or `latest` in output_dir")
    a("--with_tracking", action="store_true", help="TensorBoard logs in output_dir/runs")
    a("--report_to", default="tensorboard")
    a("--logging_steps", type=int, default=10)
    a("--routing_eval_batches", type=int, default=4, help="eval batches for routing statistics")
    a("--push_to_hub", action="store_true")
    a("--hub_model_id", default=None)
    a("--hub_token", default=None)
    a("--lora_r", type=int, default=0, help="0: full fine-tuning; >0: LoRA rank")
    a("--lora_alpha", type=int, default=16)
    a("--lora_dropout", type=float, default=0.0, help="only on attention modules; expert LoRA has none")
    a("--lora_targets", default="attention,experts", help="comma list of: attention, experts")
    a("--lora_trainable", default="classifier,score",
      help="module names kept fully trainable beside the LoRA adapters (the heads); every routing parameter "
           "(MoE routers, MoD routers and predictors, compute gates) always is")
    a("--trust_remote_code", action="store_true")
    a("--fsdp_size", type=int, default=1,
      help="transformers' engine: FSDP2-shard the model over this many processes at load time "
           "(`DistributedConfig(fsdp_size=...)`); launch with torchrun, see docs/scaling.md")
    a("--ep_size", type=int, default=1,
      help="transformers' engine: split each MoE layer's experts over this many processes (divides --fsdp_size)")
    a("--tp_size", type=int, default=1,
      help="transformers' engine: tensor parallelism (the recipes refuse it yet: its ranks share batches)")
    a("--export_format", default="remote_code", choices=["remote_code", "native"],
      help="native: also write output_dir/native in a native transformers MoE architecture (Mixtral or "
           "Qwen2-MoE, Llama-family MoE models only; checked before training) and push that folder")


def parse_args(parser: argparse.ArgumentParser, argv=None):
    """Flags > key=value > YAML config > parser defaults. `upcycling.<key>=value` edits the
    upcycling section. Unknown YAML keys are errors that name the file."""
    argv = list(os.sys.argv[1:] if argv is None else argv)
    reset_data_record()  # the model card lists the data files this run reads
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    dests = {action.dest for action in parser._actions}
    upcycling = {}
    if known.config:
        config = load_config(known.config)
        upcycling = dict(config.pop("upcycling", None) or {})
        unknown = sorted(set(config) - dests)
        if unknown:
            raise RecipeError(
                f"{known.config}: unknown key(s) {unknown}; valid keys are this recipe's flags without `--` "
                f"(see `--help`) plus `upcycling:`."
            )
        parser.set_defaults(**config)
    rest = []
    for token in argv:
        if re.fullmatch(r"[A-Za-z_][\w.]*=.*", token) and not token.startswith("-"):
            key, value = token.split("=", 1)
            if key.startswith("upcycling."):
                upcycling[key.split(".", 1)[1]] = yaml_value(value)
                continue
            if key not in dests:
                raise RecipeError(f"override `{token}`: `{key}` is not a flag of this recipe (see `--help`).")
            parser.set_defaults(**{key: _cast(parser, key, value)})
        else:
            rest.append(token)
    args = parser.parse_args(rest)
    allowed = recipe_keys()
    bad = sorted(set(upcycling) - set(allowed))
    if bad:
        raise RecipeError(f"`upcycling` has unknown key(s) {bad}; allowed: {list(allowed)}.")
    args.upcycling = upcycling
    if not args.model_name_or_path:
        raise RecipeError("`--model_name_or_path` is required (a dense or upcycled checkpoint, Hub id or folder).")
    if not args.output_dir:
        raise RecipeError("`--output_dir` is required: the folder that becomes the model's Hub repository.")
    return args


NULL_WORDS = ("null", "none", "~", "")


def _cast(parser, key, value):
    if value.strip().lower() in NULL_WORDS:  # `checkpointing_steps=null` resets an optional setting
        return None
    for action in parser._actions:
        if action.dest == key:
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                return bool(yaml_value(value))
            return action.type(value) if action.type else value
    return value


def load_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"`--config` {path}: no such file; configs live in recipes/configs/.")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise RecipeError(f"`--config` {path}: expected a mapping of flag names to values.")
    return config


def validate_args(args):
    """Cross-flag checks that need no data or model."""
    if args.dataset_name is None and args.train_file is None:
        raise RecipeError("pass `--train_file` (csv, tsv, json, jsonl, or text pairs) or `--dataset_name`.")
    if args.push_to_hub and not args.hub_model_id:
        raise RecipeError("`--push_to_hub` needs `--hub_model_id` (e.g. `--hub_model_id you/minilm-moe-banking77`).")
    for flag in ("learning_rate", "router_learning_rate"):
        value = getattr(args, flag)
        if value is not None and not value > 0:  # also rejects NaN
            raise RecipeError(f"`--{flag}` must be > 0, got {value!r}: pass a positive learning rate, e.g. 2e-4.")
    if args.lora_r and args.lora_r < 0:
        raise RecipeError(f"`--lora_r` must be >= 0, got {args.lora_r}.")
    bad = set(filter(None, args.lora_targets.split(","))) - {"attention", "experts"}
    if bad:
        raise RecipeError(f"`--lora_targets` has {sorted(bad)}: allowed are `attention` and `experts`.")
    _validate_parallel_sizes(args)
    if args.resume_from_checkpoint:
        args.resume_from_checkpoint = str(find_checkpoint(args.resume_from_checkpoint, args.output_dir))


PARALLEL_FLAGS = ("fsdp_size", "ep_size", "tp_size")


def parallel_sizes(args) -> dict:
    """The transformers-engine sizes a run asked for (`--fsdp_size`, `--ep_size`, `--tp_size` above 1), {} if none."""
    return {flag: getattr(args, flag) for flag in PARALLEL_FLAGS if (getattr(args, flag, 1) or 1) > 1}


def parallel_flags(args) -> str:
    """The sizes asked for, as the flags that asked (`--fsdp_size 2 --ep_size 2`), for error messages."""
    return " ".join(f"--{flag} {size}" for flag, size in parallel_sizes(args).items())


def _validate_parallel_sizes(args):
    for flag in PARALLEL_FLAGS:
        value = getattr(args, flag)
        if value is None or value < 1:
            raise RecipeError(f"`--{flag}` must be >= 1, got {value!r}: 1 leaves the model whole.")
    sizes = parallel_sizes(args)
    if not sizes:
        return
    if args.tp_size > 1:
        raise RecipeError(f"`--tp_size` {args.tp_size}: the ranks of a tensor-parallel group must read the same "
                          "batch, which the recipes' data loading does not do; use `--fsdp_size` (and `--ep_size`).")
    if args.ep_size > 1 and args.fsdp_size % args.ep_size:
        raise RecipeError(f"`--ep_size` {args.ep_size} must divide `--fsdp_size` {args.fsdp_size} (each process "
                          f"reads its own batch): pass `--fsdp_size {args.ep_size}` or a multiple of it.")
    used = [f"--{flag}" for flag in PARALLEL_FLAGS if flag in sizes]
    if args.lora_r:
        raise RecipeError(f"`--lora_r` {args.lora_r} with {used}: LoRA on a model sharded at load time is not "
                          "supported; pass `--lora_r 0` or leave the sizes at 1.")
    if args.checkpointing_steps or args.resume_from_checkpoint:
        raise RecipeError(f"`--checkpointing_steps`/`--resume_from_checkpoint` with {used}: a model sharded at load "
                          "time has no resumable checkpoints yet; pass `checkpointing_steps=null`.")
