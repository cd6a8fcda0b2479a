"""Fine-tune an upcycled encoder (BERT, RoBERTa, DeBERTa-v2, ModernBERT, ...) for text classification.

    accelerate launch recipes/classification.py --config recipes/configs/classification_banking77.yaml
    python recipes/classification.py --config recipes/configs/classification_banking77.yaml max_train_steps=50

A dense `--model_name_or_path` is upcycled with the config's `upcycling:` section; an already
upcycled checkpoint is loaded as is. Reports accuracy and macro-F1 (scikit-learn), routing
statistics, and writes a Hub-ready output folder with a model card.
"""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from hf_condcomp import metrics, training  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_common_arguments(parser)
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--text_pair_column", default=None, help="second text of sentence-pair tasks")
    parser.add_argument("--label_column", default="label")
    return parser


def main(argv=None):
    """setup, train, evaluate, save: each a step below, read top to bottom."""
    args = training.parse_args(build_parser(), argv)
    training.validate_args(args)
    data = load_data(args)  # checked before anything expensive
    run = setup(args, data)
    # Router aux and z losses are part of the model's loss in training mode.
    results = training.train(run.accelerator, run.model, run.optimizer, run.lr_scheduler, run.train_dataloader,
                             args, run.config)
    predictions = evaluate(run, args, data, results)
    save(run, args, data, results, predictions)
    return results


def load_data(args) -> SimpleNamespace:
    """The splits, with the columns checked and Hub `ClassLabel`s as names, and the label list."""
    splits = training.load_splits(args)
    columns = [args.text_column] + ([args.text_pair_column] if args.text_pair_column else []) + [args.label_column]
    for name, ds in splits.items():
        flag = f"--{name}_file" if args.train_file else "--dataset_name"
        training.require_columns(ds, columns, f"`{flag}` {getattr(args, name + '_file', None) or args.dataset_name}",
                                 ["--text_column", "--label_column"])
    names = getattr(splits["train"].features.get(args.label_column), "names", None)
    if names:  # a Hub `ClassLabel` column (PolyAI/banking77, stanfordnlp/sst2): label by name, not number
        splits = {k: ds.cast_column(args.label_column, datasets.Value("int64")).map(
            lambda batch: {args.label_column: [names[i] if i >= 0 else None for i in batch[args.label_column]]},
            batched=True) for k, ds in splits.items()}
    label_list = sorted({str(label) for label in splits["train"][args.label_column]})
    if len(label_list) < 2:
        raise training.RecipeError(
            f"`--label_column` {args.label_column!r} of `--train_file` {args.train_file or args.dataset_name} has one "
            f"class only ({label_list}); classification needs at least two. Check `--label_column` or the file."
        )
    unseen = sorted({str(v) for v in splits["validation"][args.label_column]} - set(label_list))
    if unseen:
        raise training.RecipeError(
            f"the evaluation file has labels {unseen[:5]} that `--train_file` lacks; use matching splits."
        )
    return SimpleNamespace(splits=splits, label_list=label_list,
                           label2id={label: i for i, label in enumerate(label_list)})


def setup(args, data) -> SimpleNamespace:
    """Accelerator, tokenizer, model (upcycled on the fly from a dense checkpoint), tokenized loaders,
    optimizer and schedule, prepared for the engine the launch set up."""
    accelerator = training.make_accelerator(args)
    tokenizer = training.load_tokenizer(args)
    model = training.load_model(
        args, AutoModelForSequenceClassification, "sequence-classification", num_labels=len(data.label_list),
        id2label=dict(enumerate(data.label_list)), label2id=data.label2id,
    )
    model = training.apply_lora(model, args)
    config = training.unwrap(accelerator, model).config

    def tokenize(examples):
        texts = (examples[args.text_column],) + ((examples[args.text_pair_column],) if args.text_pair_column else ())
        out = tokenizer(*[[str(t) for t in col] for col in texts], truncation=True, max_length=args.max_length)
        out["labels"] = [data.label2id[str(label)] for label in examples[args.label_column]]
        return out

    with accelerator.main_process_first():
        processed = {
            name: ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenize {name}")
            for name, ds in data.splits.items()
        }
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None)
    run = training.prepare_training(accelerator, args, model, processed, collator)
    data.num_train = len(processed["train"])
    training.start_run(accelerator, args, run.model, "classification",
                       f"{data.num_train} train examples, {len(data.label_list)} labels")
    run.tokenizer, run.config = tokenizer, config
    return run


def evaluate(run, args, data, results) -> list[tuple[int, int]]:
    """Accuracy, macro-F1, executed compute and routing statistics into `results`; returns the
    (prediction, reference) pairs."""
    accelerator, model = run.accelerator, run.model
    model.eval()
    predictions, references, fractions = [], [], []
    for batch in run.eval_dataloader:
        with torch.no_grad():
            outputs = model(**batch)
        preds, refs = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch["labels"]))
        predictions += preds.tolist()
        references += refs.tolist()
        fractions.append(getattr(outputs, "compute_fraction", 1.0))  # 1.0: an MoE model skips no layer
    results.update(
        eval_accuracy=metrics.load("accuracy").compute(predictions=predictions, references=references)["accuracy"],
        eval_macro_f1=metrics.load("f1").compute(predictions=predictions, references=references, average="macro")["f1"],
        eval_samples=len(references),
        eval_compute_fraction=sum(fractions) / len(fractions),
        num_labels=len(data.label_list),
        num_processes=accelerator.num_processes,
        routing=training.routing_stats(accelerator, model, run.eval_dataloader, args.routing_eval_batches),
    )
    accelerator.print(json.dumps({k: results[k] for k in ("eval_accuracy", "eval_macro_f1", "train_loss")}))
    if args.with_tracking:
        accelerator.log({"eval/accuracy": results["eval_accuracy"], "eval/macro_f1": results["eval_macro_f1"]},
                        step=results["train_steps"])
    return list(zip(predictions, references))


def save(run, args, data, results, predictions):
    """A complete Hub repository: weights (LoRA merged), config, code, tokenizer, card; then the push."""
    accelerator = run.accelerator
    saved = training.save_model(accelerator, run.model, run.tokenizer, args)
    training.write_results(args, results, accelerator)
    labels = data.label_list
    training.write_predictions(args, [{"label": labels[r], "prediction": labels[p]} for p, r in predictions],
                               accelerator)
    if accelerator.is_main_process:
        training.write_model_card(
            args, saved.config, results, task_type="text-classification", task_name="Text Classification",
            metrics={"eval_accuracy": "accuracy", "eval_macro_f1": "f1"},
            data_text=f"Text column `{args.text_column}`, label column `{args.label_column}`, "
                      f"{len(labels)} labels, {data.num_train} training examples.",
        )
    training.push_to_hub(args, accelerator)
    training.end_training(accelerator, args)


if __name__ == "__main__":
    sys.exit(training.run_recipe(main))
