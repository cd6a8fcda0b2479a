"""What the three recipes in `recipes/` share: arguments and YAML configs, data files, the model
(upcycled on the fly or already upcycled), LoRA, the training loop with exact resume, routing
statistics, the output folder, the model card and the Hub upload.

The recipes stay readable top to bottom; everything here is a plain function they call.
Every user mistake raises `RecipeError` before training starts, naming the flag or file and the fix.
"""

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
import yaml

from . import assets
from .modeling.compat import MINIMUM_TORCH, TESTED_TORCH, TESTED_TRANSFORMERS

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "training_state.json"
# Folders in the output that are not part of the shared model.
NATIVE_DIR = "native"
HUB_IGNORE = [f"{CHECKPOINT_DIR}/*", "runs/*", f"{NATIVE_DIR}/*"]


class RecipeError(ValueError):
    """A user mistake found before training: the message names the flag or file and the fix."""


def run_recipe(main, argv=None) -> int:
    """A recipe's command-line entry: a user mistake is one line on stderr and exit status 2, not a
    traceback (as argparse does for unknown flags); anything else still raises with its traceback."""
    try:
        main(argv)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------
# Arguments: flags of the transformers examples, a YAML `--config`, and `key=value` overrides.
# ---------------------------------------------------------------------------------------------

UPCYCLING_KEYS = (
    "variant", "num_experts", "top_k", "routing", "capacity_factor", "init", "layers", "capacity",
    "compute_penalty", "threshold", "mod_layers", "noise_std", "drop_ratio", "seed", "moe_implementation",
    "router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "gate_init_bias", "gate_straight_through",
    "keep_pooled_token", "skipped_tokens_as_keys",
)


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
    a("--export_format", default="remote_code", choices=["remote_code", "native"],
      help="native: also write output_dir/native in a native transformers MoE architecture (Mixtral or "
           "Qwen2-MoE, Llama-family MoE models only; checked before training) and push that folder")


def yaml_value(text):
    """A command-line value read as YAML (true, 2, 0.5, [1, 3]); text that is no YAML stays text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_args(parser: argparse.ArgumentParser, argv=None):
    """Flags > key=value > YAML config > parser defaults. `upcycling.<key>=value` edits the
    upcycling section. Unknown YAML keys are errors that name the file."""
    argv = list(os.sys.argv[1:] if argv is None else argv)
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
    bad = sorted(set(upcycling) - set(UPCYCLING_KEYS))
    if bad:
        raise RecipeError(f"`upcycling` has unknown key(s) {bad}; allowed: {list(UPCYCLING_KEYS)}.")
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
    if args.resume_from_checkpoint:
        args.resume_from_checkpoint = str(find_checkpoint(args.resume_from_checkpoint, args.output_dir))


# ---------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------

def check_file(path, flag):
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"`{flag}` {path}: no such file. Check the path (relative paths start at the current folder).")
    if path.stat().st_size == 0:
        raise RecipeError(f"`{flag}` {path}: the file is empty. Point `{flag}` at a file with data rows.")
    return path


def load_table(path, flag):
    """A local csv, tsv, json or jsonl file as a `datasets.Dataset`."""
    import datasets

    path = check_file(path, flag)
    ext = path.suffix.lstrip(".").lower()
    if ext == "tsv":
        ds = datasets.load_dataset("csv", data_files=str(path), delimiter="\t", quoting=3, split="train")
    elif ext == "csv":
        ds = datasets.load_dataset("csv", data_files=str(path), split="train")
    elif ext in ("json", "jsonl"):
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        raise RecipeError(f"`{flag}` {path}: unsupported extension `.{ext}`; use csv, tsv, json or jsonl.")
    if len(ds) == 0:
        raise RecipeError(f"`{flag}` {path}: no data rows (only a header?). Point `{flag}` at a file with rows.")
    return ds


def load_splits(args, loader=load_table):
    """{"train", "validation", "test"} from `--*_file` flags, or else from `--dataset_name` on the Hub.

    Local files win: the shipped configs name the Hub dataset they were made for, and passing
    `--train_file` (offline, or for other data) replaces it."""
    import datasets

    if args.train_file is None and args.dataset_name is not None:
        try:
            raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        except Exception as err:  # offline, unknown name, no access: one line that says what to do
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RecipeError(
                f"`--dataset_name` {args.dataset_name!r} could not be loaded from the Hub ({type(err).__name__}: "
                f"{reason[:200]}). Offline, pass local files instead: `--train_file` (and `--validation_file`)."
            ) from None
        splits = {"train": raw["train"]}
        for name in ("validation", "test"):
            if name in raw:
                splits[name] = raw[name]
    else:
        splits = {}
        for split, flag in (("train", "--train_file"), ("validation", "--validation_file"), ("test", "--test_file")):
            path = getattr(args, flag[2:])
            if path:
                splits[split] = loader(path, flag)
    if "validation" not in splits:
        if "test" in splits:
            splits["validation"] = splits["test"]
        else:  # hold out 10% of train, deterministically
            parts = splits["train"].train_test_split(test_size=0.1, seed=args.seed)
            splits["train"], splits["validation"] = parts["train"], parts["test"]
    # Subsets are drawn at random (seeded): files sorted by label, like Banking77's, would
    # otherwise give a few classes only.
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_eval_samples}
    for name, limit in limits.items():
        if limit and name in splits and limit < len(splits[name]):
            splits[name] = splits[name].shuffle(seed=args.seed).select(range(limit))
    return splits


def require_columns(ds, columns, where, flags):
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        hint = ", ".join(f"`{f}`" for f in flags)
        raise RecipeError(
            f"{where}: column(s) {missing} not found; the file has {ds.column_names}. Set {hint} to the right column."
        )


def split_source(split_ds):
    """A readable name of where a split came from (for errors and the model card)."""
    files = getattr(split_ds, "cache_files", None) or []
    return files[0]["filename"] if files else "the dataset"


# Translation: JSON lines `{"translation": {"en": ..., "de": ...}}` or line-aligned plain text.

def load_translation_file(path, flag, source_lang, target_lang):
    """Returns a `datasets.Dataset` with a `translation` column of {source_lang, target_lang}."""
    import datasets

    path = Path(path)
    ext = path.suffix.lstrip(".").lower()
    if ext in ("json", "jsonl"):
        ds = load_table(path, flag)
        require_columns(ds, ["translation"], f"`{flag}` {path}", ["--train_file"])
        keys = set(ds[0]["translation"] or {})
        for lang, lang_flag in ((source_lang, "--source_lang"), (target_lang, "--target_lang")):
            if lang not in keys:
                raise RecipeError(
                    f"`{lang_flag}` {lang!r} is not a key of the `translation` records in `{flag}` {path}: they have "
                    f"{sorted(keys)}. Set `{lang_flag}` to one of them."
                )
        return ds
    # Plain text: `train.en` + `train.de`, passed as `train`, `train.en` or `train.de`.
    stem = str(path)
    for lang in (source_lang, target_lang):
        if stem.endswith("." + lang):
            stem = stem[: -len(lang) - 1]
    files = {lang: Path(f"{stem}.{lang}") for lang in (source_lang, target_lang)}
    for lang, file in files.items():
        if not file.is_file():
            others = sorted(p.name for p in Path(stem).parent.glob(Path(stem).name + ".*"))
            raise RecipeError(
                f"`{flag}` {path}: line-aligned text needs {file} for language {lang!r} (found {others or 'none'}). "
                "Check `--source_lang` / `--target_lang`, or pass JSON lines with a `translation` column."
            )
        check_file(file, flag)
    lines = {lang: file.read_text(encoding="utf-8").splitlines() for lang, file in files.items()}
    if len(lines[source_lang]) != len(lines[target_lang]):
        raise RecipeError(
            f"`{flag}`: {files[source_lang]} has {len(lines[source_lang])} lines but {files[target_lang]} has "
            f"{len(lines[target_lang])}; line-aligned files must match line for line."
        )
    pairs = [{source_lang: s, target_lang: t} for s, t in zip(lines[source_lang], lines[target_lang]) if s.strip() and t.strip()]
    if not pairs:
        raise RecipeError(f"`{flag}` {path}: no non-empty line pairs.")
    return datasets.Dataset.from_dict({"translation": pairs})


# Dialogue: JSON lines with `messages: [{"role", "content"}, ...]`; chitchat from PyPI.

ROLES = ("system", "user", "assistant")


def check_conversations(ds, where):
    require_columns(ds, ["messages"], where, ["--train_file"])
    for i, messages in enumerate(ds["messages"]):
        if not messages or not isinstance(messages, list):
            raise RecipeError(f"{where}: row {i} has an empty `messages` list; every row needs a conversation.")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise RecipeError(
                    f"{where}: row {i} has a message {m!r}; messages are {{\"role\": one of {ROLES}, \"content\": str}}."
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise RecipeError(f"{where}: row {i} has no `assistant` message, so nothing to learn from.")


def chitchat_conversations(limit=None):
    """The PyPI `chitchat_dataset` (dataset.json) as `messages` lists: the first speaker of each
    conversation is the user, the other the assistant; consecutive messages of one speaker are
    joined into one turn."""
    folder = assets._package_folder("chitchat_dataset")
    if folder is None:
        raise RecipeError("`--dataset_name chitchat` needs the package: pip install --no-deps chitchat-dataset==0.9.0")
    with open(folder / "dataset.json") as f:
        raw = json.load(f)
    conversations = []
    for key in sorted(raw):  # sorted: the same order on every machine
        turns = [t for t in raw[key]["messages"] if t]
        if len(turns) < 2:
            continue
        first = turns[0][0]["sender"]
        messages = [
            {"role": "user" if t[0]["sender"] == first else "assistant", "content": " ".join(m["text"].strip() for m in t)}
            for t in turns
        ]
        conversations.append({"messages": messages})
        if limit and len(conversations) >= limit:
            break
    return conversations


# ---------------------------------------------------------------------------------------------
# Model: upcycled on the fly from a dense checkpoint, or loaded if already upcycled.
# ---------------------------------------------------------------------------------------------

def load_model(args, auto_class, task, **head_kwargs):
    """Returns (model, source description). `head_kwargs`: num_labels, id2label, label2id."""
    from transformers import AutoConfig

    from .upcycle import upcycle

    name = args.model_name_or_path
    path = assets.resolve(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"`--model_name_or_path` {name!r} could not be read ({err}). Pass a Hub id, a folder with config.json, "
            f"or one of {list(assets.EMBEDDED)}."
        ) from err
    if config.model_type.startswith("condcomp_"):
        kwargs = dict(head_kwargs)
        if "num_labels" in kwargs and kwargs["num_labels"] != config.num_labels:
            kwargs["ignore_mismatched_sizes"] = True  # a new label set: fresh head, everything else kept
        model = auto_class.from_pretrained(path, trust_remote_code=args.trust_remote_code, **kwargs)
    else:
        settings = dict(args.upcycling)
        overrides = {k: settings.pop(k) for k in list(settings) if k.startswith("router_")}
        if isinstance(settings.get("layers"), int):  # `upcycling.layers=29` parses as a number
            settings["layers"] = [settings["layers"]]
        try:
            model = upcycle(path, task=task, num_labels=head_kwargs.get("num_labels"), **settings, **overrides)
        except ValueError as err:  # upcycle names the setting; here it is an `upcycling.` key
            raise RecipeError(f"`upcycling`: {err}") from None
        if isinstance(getattr(model.config, "upcycling", None), dict):
            model.config.upcycling["source"] = name
    for key in ("id2label", "label2id"):
        if key in head_kwargs:
            setattr(model.config, key, head_kwargs[key])
    if args.export_format == "native":  # refuse now, not after hours of training
        from .export import ExportError, choose_format

        try:
            choose_format(model.config)
        except ExportError as err:
            raise RecipeError(f"`--export_format native`: {err}") from None
    model.train()
    return model


def load_tokenizer(args):
    from transformers import AutoTokenizer

    path = args.tokenizer_name or assets.resolve(args.model_name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise RecipeError(f"no tokenizer at {path!r} ({err}): pass `--tokenizer_name`.") from err


def lora_targets(model, targets):
    """(target_modules, target_parameters) for attention and experts of the model's family."""
    family = model.config.model_type.removeprefix("condcomp_")
    attention = {
        "bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
        "gpt2": ["attn.c_attn", "attn.c_proj"],
        "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    }[family]
    up = "gate_up_proj" if family == "llama" else "up_proj"
    experts = [f"mlp.experts.{up}", "mlp.experts.down_proj"] if model.config.moe_layers else []
    return (attention if "attention" in targets else []), (experts if "experts" in targets else [])


def apply_lora(model, args):
    """LoRA on attention (modules) and experts (3-D parameters, PEFT `target_parameters`); routers,
    gates and classification heads stay fully trainable, so the router keeps learning."""
    if not args.lora_r:
        return model
    from peft import LoraConfig, get_peft_model

    targets = set(filter(None, args.lora_targets.split(",")))
    modules, parameters = lora_targets(model, targets)
    family = model.config.model_type
    if family == "condcomp_gpt2" and parameters and modules:
        # PEFT's parameter wrapper refuses fan_in_fan_out, which GPT-2's Conv1D attention needs.
        raise RecipeError("GPT-2: LoRA on attention (Conv1D) and experts together is not supported by PEFT; "
                          "set `--lora_targets attention` or `--lora_targets experts`.")
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout if not parameters else 0.0,
        target_modules=modules,
        target_parameters=parameters or None,
        fan_in_fan_out=family == "condcomp_gpt2" and bool(modules),
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


# ---------------------------------------------------------------------------------------------
# Training loop with exact resume
# ---------------------------------------------------------------------------------------------

def find_checkpoint(value, output_dir):
    """`--resume_from_checkpoint`: a folder written by `save_state`, or `latest` in output_dir."""
    if value == "latest":
        folder = Path(output_dir or ".") / CHECKPOINT_DIR
        found = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if folder.is_dir() else []
        if not found:
            raise RecipeError(f"`--resume_from_checkpoint latest`: no checkpoint in {folder}; pass a checkpoint folder.")
        value = found[-1]
    path = Path(value)
    state = path / STATE_FILE
    if not path.is_dir() or not state.is_file():
        raise RecipeError(
            f"`--resume_from_checkpoint` {path}: not a checkpoint of these recipes (needs a folder with {STATE_FILE} "
            f"and accelerate's state, e.g. {Path(output_dir or 'OUTPUT_DIR') / CHECKPOINT_DIR / 'step_100'})."
        )
    try:
        json.loads(state.read_text())["completed_steps"]
    except (ValueError, KeyError) as err:
        raise RecipeError(f"`--resume_from_checkpoint` {path}: {STATE_FILE} is unreadable ({err}); pick another checkpoint.") from err
    if not any(path.glob("model*.safetensors")) and not any(path.glob("pytorch_model*")) and not any(path.glob("*.bin")):
        raise RecipeError(f"`--resume_from_checkpoint` {path}: no model weights in it; pick another checkpoint.")
    return path


def make_accelerator(args):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    kwargs = {}
    if args.with_tracking:
        kwargs.update(log_with=args.report_to, project_dir=str(Path(args.output_dir) / "runs"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # The sampler is re-seeded per epoch (seed + epoch), so a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        **kwargs,
    )
    set_seed(args.seed)
    return accelerator


def schedule(args, accelerator, train_dataloader, optimizer):
    """Sets args.max_train_steps / num_train_epochs and returns the LR scheduler."""
    from transformers import get_scheduler

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    # The prepared scheduler steps once per process per update (accelerate's convention), hence the product.
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )


def routing_parameter_names(model) -> set[str]:
    """The parameters that decide where compute goes: MoE routers, MoD routers and their causal
    predictors, compute-allocation gates. One definition for the optimizer's groups,
    `--router_learning_rate` and the LoRA keep-list. Found by module type, so that any wrapper's
    prefix (PEFT's `base_model.model.`, DDP's `module.`) is part of the names it returns."""
    from .modeling.gating import ComputeGate, MoDPredictor, MoDRouter
    from .modeling.moe import MoEFeedForward

    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            owned = module.router.named_parameters(prefix=f"{prefix}.router")
        elif isinstance(module, (MoDRouter, MoDPredictor, ComputeGate)):
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


def router_loss_parts(outputs, config):
    """The weighted router/gate part of `outputs.loss` (task loss = loss - this)."""
    total = outputs.loss.new_zeros(())
    if getattr(outputs, "aux_loss", None) is not None:
        total = total + config.router_aux_loss_coef * outputs.aux_loss
    if getattr(outputs, "z_loss", None) is not None:
        total = total + config.router_z_loss_coef * outputs.z_loss
    if getattr(outputs, "compute_loss", None) is not None:
        total = total + outputs.compute_loss
    return total


def start_run(accelerator, args, model, name, what):
    """TensorBoard trackers (with the run's scalar settings) and one line saying what is trained."""
    if args.with_tracking:
        accelerator.init_trackers(name, {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    total, trainable = count_parameters(model)
    accelerator.print(f"{what}, {total / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trainable), "
                      f"{args.max_train_steps} steps on {accelerator.num_processes} process(es)")


def train(accelerator, model, optimizer, lr_scheduler, train_dataloader, args, config):
    """The loop of the transformers no-trainer examples: `accumulate`, periodic `save_state`,
    resume at the exact optimizer step (`skip_first_batches`), TensorBoard scalars.

    Dropout is seeded per micro-batch from (seed, batch index, process), so a resumed run draws
    the same masks as an uninterrupted one. Returns a dict of training results."""
    from tqdm.auto import tqdm

    batches_per_epoch = len(train_dataloader)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    completed_steps, starting_epoch, skip = 0, 0, 0
    if args.resume_from_checkpoint:
        accelerator.print(f"Resuming from {args.resume_from_checkpoint}")
        accelerator.load_state(args.resume_from_checkpoint)
        completed_steps = json.loads((Path(args.resume_from_checkpoint) / STATE_FILE).read_text())["completed_steps"]
        starting_epoch = completed_steps // steps_per_epoch
        skip = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
    progress = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process, desc="train")
    progress.update(completed_steps)
    sums = torch.zeros(4, device=accelerator.device)  # loss, task loss, aux loss, z loss since last log
    epoch_loss, epoch_batches, examples_seen = 0.0, 0, 0
    history = []
    for epoch in range(starting_epoch, args.num_train_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_dataloader, skip) if epoch == starting_epoch and skip else train_dataloader
        first = skip if epoch == starting_epoch else 0
        for index, batch in enumerate(batches, start=first):
            torch.manual_seed((args.seed * 1_000_003 + epoch * batches_per_epoch + index) * 64 + accelerator.process_index)
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            router = router_loss_parts(outputs, config).detach()
            aux = outputs.aux_loss.detach() if outputs.aux_loss is not None else router.new_zeros(())
            z = outputs.z_loss.detach() if outputs.z_loss is not None else router.new_zeros(())
            sums += torch.stack([loss.detach().float(), (loss.detach() - router).float(), aux.float(), z.float()])
            epoch_loss += loss.item()
            epoch_batches += 1
            examples_seen += batch["input_ids"].shape[0]
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            if completed_steps % args.logging_steps == 0 or completed_steps == args.max_train_steps:
                means = accelerator.reduce(sums, reduction="mean") / max(1, args.gradient_accumulation_steps * _since(completed_steps, args.logging_steps))
                logs = {
                    "train/loss": means[0].item(), "train/task_loss": means[1].item(),
                    "train/aux_loss": means[2].item(), "train/z_loss": means[3].item(),
                    "train/lr": lr_scheduler.get_last_lr()[0], "train/epoch": epoch,
                }
                history.append({"step": completed_steps, **logs})
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
                if args.with_tracking:
                    accelerator.log(logs, step=completed_steps)
                sums.zero_()
            if args.checkpointing_steps and completed_steps % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, completed_steps)
            if completed_steps >= args.max_train_steps:
                break
        if completed_steps >= args.max_train_steps:
            break
    progress.close()
    seen = accelerator.gather(torch.tensor([examples_seen], device=accelerator.device)).tolist()
    loss_sum = accelerator.reduce(torch.tensor([epoch_loss, float(epoch_batches)], device=accelerator.device), reduction="sum")
    return {
        "train_loss": (loss_sum[0] / loss_sum[1].clamp(min=1)).item(),  # over every process's batches
        "train_steps": completed_steps,
        "train_examples_per_process": seen,
        "log_history": history,
    }


def _since(step, every):
    return step % every or every


def save_checkpoint(accelerator, args, completed_steps):
    folder = Path(args.output_dir) / CHECKPOINT_DIR / f"step_{completed_steps}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps({"completed_steps": completed_steps}))
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# Evaluation helpers shared by the recipes
# ---------------------------------------------------------------------------------------------

def pad_collate(pad_token_id, keys=("input_ids", "labels")):
    """Right-pads `input_ids` (pad id), `labels` (-100) and builds `attention_mask`, for decoders."""
    def collate(features):
        length = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            n = len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [pad_token_id] * (length - n))
            batch["attention_mask"].append([1] * n + [0] * (length - n))
            batch["labels"].append(list(f["labels"]) + [-100] * (length - n))
        return {k: torch.tensor(v) for k, v in batch.items()}
    return collate


def evaluate_loss(accelerator, model, dataloader):
    """Token-weighted mean loss over the labelled tokens of every batch (eval mode: task loss
    only), its perplexity, and the mean executed-compute fraction."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # sum of NLL, tokens
    fractions = []
    for batch in dataloader:
        with torch.no_grad():
            outputs = model(**batch)
        tokens = (batch["labels"][:, 1:] != -100).sum()
        total += torch.stack([outputs.loss.double() * tokens, tokens.double()])
        fractions.append(float(outputs.compute_fraction))
    total = accelerator.reduce(total, reduction="sum")
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "compute_fraction": sum(fractions) / max(1, len(fractions))}


def generate(accelerator, model, tokenizer, prompts, max_new_tokens, batch_size, num_beams=1, stop_strings=None):
    """Greedy (or beam) continuations of token-id prompts, left-padded; each process generates
    its share and the texts are gathered in order. Returns the decoded new text per prompt.
    `stop_strings` (e.g. ["\\n"]) end a continuation early, as the end-of-sequence token does."""
    net = unwrap(accelerator, model)
    net.eval()
    # Unmerged LoRA on the 3-D expert weights rebuilds every expert's delta at each decoding step
    # (more FLOPs than the step itself): fold the adapters in while generating, then take them out.
    merge = hasattr(net, "merge_adapter") and not any(getattr(m, "merged", False) for m in net.modules())
    if merge:
        net.merge_adapter()
    try:
        texts = _generate_texts(accelerator, net, tokenizer, prompts, max_new_tokens, batch_size, num_beams, stop_strings)
    finally:
        if merge:
            net.unmerge_adapter()
    from accelerate.utils import gather_object

    return gather_object(texts) if accelerator.num_processes > 1 else texts


def _generate_texts(accelerator, net, tokenizer, prompts, max_new_tokens, batch_size, num_beams, stop_strings):
    pad = tokenizer.pad_token_id
    texts = []
    with accelerator.split_between_processes(list(range(len(prompts)))) as mine:
        for start in range(0, len(mine), batch_size):
            chunk = [prompts[i] for i in mine[start:start + batch_size]]
            length = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (length - len(p)) + list(p) for p in chunk], device=accelerator.device)
            mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in chunk], device=accelerator.device)
            with torch.no_grad():
                out = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   num_beams=num_beams, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                   **({"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}))
            texts += tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
    return texts


def routing_stats(accelerator, model, dataloader, max_batches):
    """Per-layer routing statistics on a few eval batches (hf_condcomp.inspect.routing_summary)."""
    from .inspect import routing_summary

    net = unwrap(accelerator, model)
    keep = ("input_ids", "attention_mask")
    batches = []
    for i, batch in enumerate(dataloader):
        if i >= max_batches:
            break
        batches.append({k: v for k, v in batch.items() if k in keep})
    was_training = net.training
    net.eval()
    with torch.no_grad():
        summary = routing_summary(net, batches)
    net.train(was_training)
    return summary


# ---------------------------------------------------------------------------------------------
# Output folder, model card, Hub upload
# ---------------------------------------------------------------------------------------------

def save_model(accelerator, model, tokenizer, args):
    """Weights, config, code files and tokenizer into output_dir; LoRA adapters are merged first
    so the folder is a plain upcycled model. Returns the saved (unwrapped) model."""
    accelerator.wait_for_everyone()
    net = accelerator.unwrap_model(model)
    if hasattr(net, "merge_and_unload"):
        net = net.merge_and_unload()
        state_dict = net.state_dict()
    else:
        state_dict = accelerator.get_state_dict(model)
    net.save_pretrained(
        args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state_dict
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        if args.export_format == "native":
            from .export import export_native

            export_native(args.output_dir, native_dir(args), overwrite=True)
    accelerator.wait_for_everyone()
    return net


def native_dir(args) -> Path:
    """Where `--export_format native` writes the native model (and what is pushed then)."""
    return Path(args.output_dir) / NATIVE_DIR


def write_results(args, results, accelerator):
    if accelerator.is_main_process:
        with open(Path(args.output_dir) / "all_results.json", "w") as f:
            json.dump(results, f, indent=2, default=float)


def _routing_rows(routing):
    rows = []
    for layer, s in sorted((routing or {}).get("moe_layers", {}).items(), key=lambda kv: int(kv[0])):
        rows.append(
            f"| {layer} | {s.get('tokens_per_expert')} | {s.get('load_entropy', float('nan')):.3f} | "
            f"{s.get('max_over_mean', float('nan')):.2f} | {s.get('dropped')} | {s.get('dead_experts')} |"
        )
    return "\n".join(rows)


def write_model_card(args, config, results, *, task_type, task_name, dataset_name, dataset_type, metrics, data_text,
                     template="model_cards/upcycled_model.md"):
    """README.md from `model_cards/<template>` with `huggingface_hub.ModelCard`; `metrics` maps
    result keys of all_results.json to metric types in the model-index."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    template_path = Path(__file__).resolve().parent.parent / template  # the repository's model_cards/
    up = dict(getattr(config, "upcycling", None) or {})
    name = args.hub_model_id or Path(args.output_dir).name
    evals = [
        EvalResult(task_type=task_type, task_name=task_name, dataset_type=dataset_type, dataset_name=dataset_name,
                   dataset_split="validation", metric_type=metric, metric_name=metric, metric_value=float(results[key]))
        for key, metric in metrics.items() if results.get(key) is not None
    ]
    card_data = ModelCardData(
        model_name=name, base_model=up.get("source") or args.model_name_or_path, library_name="transformers",
        tags=["hf_condcomp", "mixture-of-experts", "upcycling", up.get("variant") or "moe"],
        eval_results=evals, license=None, pipeline_tag=task_type,
    )
    settings = {k: v for k, v in up.items() if v is not None}
    training = {
        k: getattr(args, k) for k in (
            "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_train_steps",
            "num_train_epochs", "lr_scheduler_type", "num_warmup_steps", "weight_decay", "max_length", "seed",
            "mixed_precision", "lora_r", "lora_alpha", "lora_targets",
        )
    }
    training["num_processes"] = results.get("num_processes")
    card_kwargs = dict(
        model_id=name,
        source=up.get("source") or args.model_name_or_path,
        upcycling=settings,
        moe_layers=getattr(config, "moe_layers", []),
        data_text=data_text,
        training=training,
        results={k: results[k] for k in metrics if results.get(k) is not None},
        extra_results={k: v for k, v in results.items() if isinstance(v, (int, float)) and k not in metrics},
        routing_rows=_routing_rows(results.get("routing")),
        transformers_range=" to ".join(TESTED_TRANSFORMERS),
        torch_tested=TESTED_TORCH,
        torch_minimum=MINIMUM_TORCH,
        compute_fraction=(results.get("routing") or {}).get("compute_fraction", results.get("eval_compute_fraction")),
        auto_class=config.auto_map.get(_auto_class_for(task_type), "AutoModel").split(".")[-1] if getattr(config, "auto_map", None) else "",
        auto_name=_auto_class_for(task_type),
    )
    card = ModelCard.from_template(card_data, template_path=str(template_path), native=False, **card_kwargs)
    card.save(Path(args.output_dir) / "README.md")
    if args.export_format == "native":  # the folder that is pushed then gets a card of its own
        architecture = json.loads((native_dir(args) / "config.json").read_text())["architectures"][0]
        ModelCard.from_template(card_data, template_path=str(template_path), native=True,
                                native_architecture=architecture, **card_kwargs).save(native_dir(args) / "README.md")
    return card


def _auto_class_for(task_type):
    return {"text-classification": "AutoModelForSequenceClassification"}.get(task_type, "AutoModelForCausalLM")


def push_to_hub(args, accelerator):
    """Upload output_dir (without checkpoints and logs) from the main process only."""
    if not (args.push_to_hub and accelerator.is_main_process):
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(args.hub_model_id, exist_ok=True).repo_id
    folder = native_dir(args) if args.export_format == "native" else args.output_dir
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message="Upload upcycled model (hf_condcomp recipes)",
        ignore_patterns=HUB_IGNORE,
    )


def end_training(accelerator, args):
    if args.with_tracking:
        accelerator.end_training()
