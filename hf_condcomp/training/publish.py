"""The output folder as a Hub repository: weights (LoRA merged), code, tokenizer, a native export on
request, `all_results.json`, the model card (its template ships in `hf_condcomp/templates/`), and
the upload."""

import contextlib
import json
from importlib import resources
from pathlib import Path

from .. import assets
from ..modeling.compat import MINIMUM_TORCH, TESTED_TORCH, TESTED_TRANSFORMERS
from .checkpoints import CHECKPOINT_DIR
from .data import data_record
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


def write_model_card(args, config, results, *, task_type, task_name, metrics, data_text,
                     template="upcycled_model.md"):
    """README.md from the package's `templates/<template>` with `huggingface_hub.ModelCard`; `metrics` maps
    result keys of all_results.json to metric types in the model-index. The data section and metadata
    come from what the run read (`data.data_record`): the local files with their sha256, or the Hub
    dataset and its splits; `data_text` adds the task's own description (columns, counts)."""
    from huggingface_hub import EvalResult, ModelCard

    from ..cards import card_data, file_rows

    # Package data, so that a non-editable install writes cards too.
    template_path = resources.files("hf_condcomp") / "templates" / template
    up = dict(getattr(config, "upcycling", None) or {})
    name = args.hub_model_id or Path(args.output_dir).name
    read = data_record()
    hub = read["hub"]
    eval_data = _evaluated_on(args, read)
    evals = [
        EvalResult(task_type=task_type, task_name=task_name, metric_type=metric, metric_name=metric,
                   metric_value=float(results[key]), **eval_data)
        for key, metric in metrics.items() if results.get(key) is not None
    ]
    intro, base_models = _provenance(args, up)
    data = card_data(base_models, up.get("variant"), up.get("task"), [hub["dataset"]] if hub else None,
                     model_name=name, eval_results=evals)
    data.pipeline_tag = task_type
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
        intro=intro,
        upcycling=settings,
        moe_layers=_moe_layers(config),
        data_source=_data_source(args, read, file_rows),
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
    card = ModelCard.from_template(data, template_path=str(template_path), native=False, **card_kwargs)
    card.save(Path(args.output_dir) / "README.md")
    if args.export_format == "native":  # the folder that is pushed then gets a card of its own
        architecture = json.loads((native_dir(args) / "config.json").read_text())["architectures"][0]
        ModelCard.from_template(data, template_path=str(template_path), native=True,
                                native_architecture=architecture, **card_kwargs).save(native_dir(args) / "README.md")
    return card


def _evaluated_on(args, read) -> dict:
    """The model-index's dataset fields: the Hub dataset and split the run evaluated on, or the local
    evaluation file, named with the format `datasets` read it as."""
    hub = read["hub"]
    if hub:
        return dict(dataset_type=hub["dataset"], dataset_name=hub["dataset"], dataset_config=hub["config"],
                    dataset_split=hub["eval_split"] or "train")
    eval_file = args.validation_file or args.test_file or (read["files"][0]["path"] if read["files"] else None)
    return dict(dataset_type=_file_format(eval_file), dataset_name=str(eval_file))


def _file_format(path) -> str:
    """How `datasets` reads a local file (its packaged builder): csv (also tsv), json (also jsonl), else text."""
    ext = Path(str(path)).suffix.lower()
    return {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}.get(ext, "text")


def _data_source(args, read, file_rows) -> str:
    """Where the training and evaluation data came from: the Hub dataset and its splits, or the local
    files read, each with its sha256."""
    hub = read["hub"]
    if hub:
        config = f", config `{hub['config']}`" if hub["config"] else ""
        held_out = f"split `{hub['eval_split']}`" if hub["eval_split"] else "10% of `train` held out"
        text = (f"The Hub dataset [`{hub['dataset']}`](https://huggingface.co/datasets/{hub['dataset']}){config}: "
                f"split `{hub['train_split']}` for training, {held_out} for evaluation.")
    else:
        text = "Local files, read by this run:\n\n" + file_rows(read["files"])
        if not (args.validation_file or args.test_file):
            text += f"\n\nThe evaluation examples were held out from the training data (seed {args.seed})."
    limits = [f"`--{k}` {getattr(args, k)}" for k in ("max_train_samples", "max_eval_samples")
              if getattr(args, k, None)]
    if limits:
        text += f"\n\nSubsets drawn at random (seeded): {', '.join(limits)}."
    return text


def _provenance(args, up) -> tuple[str, list]:
    """(the card's first sentence, the Hub ids for `base_model`): upcycled on the fly from
    `--model_name_or_path`, or fine-tuned further from an upcycled checkpoint."""
    from ..cards import base_models_of, describe_source, our_card_data

    name = args.model_name_or_path
    what, hub = describe_source(name)
    expert_sources = list(dict.fromkeys(up.get("expert_sources") or []))
    if not expert_sources and up.get("source") == name:
        return (f"A conditional-computation model upcycled from {what} with the `hf_condcomp` package and "
                "fine-tuned with its `recipes/`.", [hub])
    # An upcycled checkpoint, trained further: its own card (a local folder's) names its Hub sources.
    base_models = [hub]
    card_file = Path(assets.resolve(name)) / "README.md"
    data = our_card_data(card_file) if hub is None else None
    if data is not None:
        base_models = base_models_of(data)
    if expert_sources:
        shared = (f"the base model `{up.get('source')}`" if up.get("shared_weights") == "base"
                  else "the sources' average")
        made = (f"whose experts were made from the dense fine-tunes {', '.join(f'`{s}`' for s in expert_sources)} "
                f"(each source's FFNs became its experts in each MoE layer), with the shared weights of {shared} and "
                f"routers initialised by `{up.get('router_init')}`")
    else:
        made = f"which was upcycled from `{up.get('source')}`"
    return (f"A conditional-computation model fine-tuned with the `recipes/` of the `hf_condcomp` package from {what}, "
            f"{made}.", base_models)


def _moe_layers(config):
    """The MoE layers for the card: a list, or per stack for an encoder-decoder model."""
    layers = getattr(config, "moe_layers", [])
    decoder = getattr(config, "decoder_moe_layers", None)
    if decoder is None or not is_encoder_decoder(config):
        return layers
    return f"encoder {list(layers)}, decoder {list(decoder)}"


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
