"""The output folder as a Hub repository: weights (LoRA merged), code, tokenizer, a native export on
request, `all_results.json`, the model card (its template ships in `hf_condcomp/templates/`), and
the upload."""

import contextlib
import json
from importlib import resources
from pathlib import Path

from ..modeling.compat import MINIMUM_TORCH, TESTED_TORCH, TESTED_TRANSFORMERS
from .checkpoints import CHECKPOINT_DIR
from .models import is_encoder_decoder

# Folders in the output that are not part of the shared model.
NATIVE_DIR = "native"
HUB_IGNORE = [f"{CHECKPOINT_DIR}/*", "runs/*", f"{NATIVE_DIR}/*"]


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
    with _saved_as_its_class(net):
        net.save_pretrained(
            args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
            state_dict=state_dict
        )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        if args.export_format == "native":
            from ..export import export_native

            export_native(args.output_dir, native_dir(args), overwrite=True)
    accelerator.wait_for_everyone()
    return net


@contextlib.contextmanager
def _saved_as_its_class(net):
    """FSDP2's `fully_shard` (transformers' engine, `--fsdp_size`) turns the model's class into a subclass
    `FSDP<Class>` defined in torch's FSDP module, whose files transformers would then save as the model's
    code (and name in `auto_map`). While saving, that subclass answers with its model class's module and name."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(net)
    if not isinstance(net, FSDPModule):
        yield
        return
    base = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    names = cls.__module__, cls.__name__, cls.__qualname__
    cls.__module__, cls.__name__, cls.__qualname__ = base.__module__, base.__name__, base.__qualname__
    try:
        yield
    finally:
        cls.__module__, cls.__name__, cls.__qualname__ = names


def native_dir(args) -> Path:
    """Where `--export_format native` writes the native model (and what is pushed then)."""
    return Path(args.output_dir) / NATIVE_DIR


def write_results(args, results, accelerator):
    if accelerator.is_main_process:
        with open(Path(args.output_dir) / "all_results.json", "w") as f:
            json.dump(results, f, indent=2, default=float)


def write_predictions(args, rows, accelerator):
    """`eval_predictions.jsonl`: one JSON object per evaluated example, what the metrics were computed on."""
    if accelerator.is_main_process:
        with open(Path(args.output_dir) / "eval_predictions.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _routing_rows(routing):
    rows = []
    for layer, s in sorted((routing or {}).get("moe_layers", {}).items(), key=lambda kv: _layer_key(kv[0])):
        rows.append(
            f"| {layer} | {s.get('tokens_per_expert')} | {s.get('load_entropy', float('nan')):.3f} | "
            f"{s.get('max_over_mean', float('nan')):.2f} | {s.get('dropped')} | {s.get('dead_experts')} |"
        )
    return "\n".join(rows)


def _layer_key(layer):
    """Sort key of a routing-table layer: `3`, or an encoder-decoder's `encoder.1` before `decoder.0`."""
    stack, _, index = layer.rpartition(".")
    return (stack != "encoder", stack, int(index))


def write_model_card(args, config, results, *, task_type, task_name, dataset_name, dataset_type, metrics, data_text,
                     template="upcycled_model.md"):
    """README.md from the package's `templates/<template>` with `huggingface_hub.ModelCard`; `metrics` maps
    result keys of all_results.json to metric types in the model-index."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    # Package data, so that a non-editable install writes cards too.
    template_path = resources.files("hf_condcomp") / "templates" / template
    up = dict(getattr(config, "upcycling", None) or {})
    name = args.hub_model_id or Path(args.output_dir).name
    evals = [
        EvalResult(task_type=task_type, task_name=task_name, dataset_type=dataset_type, dataset_name=dataset_name,
                   dataset_split="validation", metric_type=metric, metric_name=metric, metric_value=float(results[key]))
        for key, metric in metrics.items() if results.get(key) is not None
    ]
    source = up.get("source") or args.model_name_or_path
    # Several fine-tunes as experts: the card's base models are the base (if any) and every source.
    expert_sources = list(dict.fromkeys(up.get("expert_sources") or []))
    base_models = list(dict.fromkeys([source, *expert_sources])) if up.get("shared_weights") == "base" else None
    card_data = ModelCardData(
        model_name=name, base_model=base_models or (expert_sources or source), library_name="transformers",
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
        source=source,
        expert_sources=expert_sources,
        shared_weights=up.get("shared_weights"),
        router_init=up.get("router_init"),
        upcycling=settings,
        moe_layers=_moe_layers(config),
        data_text=data_text,
        training=training,
        results={k: results[k] for k in metrics if results.get(k) is not None},
        extra_results={k: v for k, v in results.items() if isinstance(v, (int, float)) and k not in metrics},
        routing_rows=_routing_rows(results.get("routing")),
        transformers_range=" to ".join(TESTED_TRANSFORMERS),
        torch_tested=" and ".join(TESTED_TORCH),
        torch_minimum=MINIMUM_TORCH,
        compute_fraction=(results.get("routing") or {}).get("compute_fraction", results.get("eval_compute_fraction")),
        auto_class=(config.auto_map.get(_auto_class_for(task_type, config), "AutoModel").split(".")[-1]
                    if getattr(config, "auto_map", None) else ""),
        auto_name=_auto_class_for(task_type, config),
    )
    card = ModelCard.from_template(card_data, template_path=str(template_path), native=False, **card_kwargs)
    card.save(Path(args.output_dir) / "README.md")
    if args.export_format == "native":  # the folder that is pushed then gets a card of its own
        architecture = json.loads((native_dir(args) / "config.json").read_text())["architectures"][0]
        ModelCard.from_template(card_data, template_path=str(template_path), native=True,
                                native_architecture=architecture, **card_kwargs).save(native_dir(args) / "README.md")
    return card


def _moe_layers(config):
    """The MoE layers for the card: a list, or per stack for an encoder-decoder model."""
    layers = getattr(config, "moe_layers", [])
    decoder = getattr(config, "decoder_moe_layers", None)
    return layers if decoder is None else f"encoder {list(layers)}, decoder {list(decoder)}"


def _auto_class_for(task_type, config=None):
    if config is not None and is_encoder_decoder(config):
        return "AutoModelForSeq2SeqLM"
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
