"""Multi-turn chat fine-tuning of an upcycled decoder; the loss covers the assistant's turns only.

    accelerate launch recipes/dialogue.py --config recipes/configs/dialogue_chitchat_smollm2.yaml
    python recipes/dialogue.py --config recipes/configs/dialogue_chitchat_smollm2.yaml max_train_steps=20

Data: JSON lines with a `messages` list of {"role", "content"} (the chat format of transformers'
chat templates), a Hub dataset with a `messages` column, or `--dataset_name chitchat` (the PyPI
package `chitchat_dataset`, converted to `messages`). Conversations are rendered with the
tokenizer's chat template. Reports held-out perplexity before and after training, a few sample
replies, routing statistics, and writes a Hub-ready output folder with a model card.
"""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from hf_condcomp import assets, training  # noqa: E402

# For tokenizers without a chat template (GPT-2): ChatML, as SmolLM2 and many others use.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Dialogue: JSON lines with `messages: [{"role", "content"}, ...]`; chitchat from PyPI.

ROLES = ("system", "user", "assistant")


def check_conversations(ds, where):
    training.require_columns(ds, ["messages"], where, ["--train_file"])
    for i, messages in enumerate(ds["messages"]):
        if not messages or not isinstance(messages, list):
            raise training.RecipeError(f"{where}: row {i} has an empty `messages` list; "
                                       "every row needs a conversation.")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise training.RecipeError(
                    f"{where}: row {i} has a message {m!r}; "
                    f"messages are {{\"role\": one of {ROLES}, \"content\": str}}."
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise training.RecipeError(f"{where}: row {i} has no `assistant` message, so nothing to learn from.")


def chitchat_conversations(limit=None):
    """The PyPI `chitchat_dataset` (dataset.json) as `messages` lists: the first speaker of each
    conversation is the user, the other the assistant; consecutive messages of one speaker are
    joined into one turn."""
    folder = assets._package_folder("chitchat_dataset")
    if folder is None:
        raise training.RecipeError("`--dataset_name chitchat` needs the package: "
                                   "pip install --no-deps chitchat-dataset==0.9.0")
    with open(training.check_file(folder / "dataset.json", "--dataset_name chitchat")) as f:
        raw = json.load(f)
    conversations = []
    for key in sorted(raw):  # sorted: the same order on every machine
        turns = [t for t in raw[key]["messages"] if t]
        if len(turns) < 2:
            continue
        first = turns[0][0]["sender"]
        messages = [
            {"role": "user" if t[0]["sender"] == first else "assistant",
             "content": " ".join(m["text"].strip() for m in t)}
            for t in turns
        ]
        conversations.append({"messages": messages})
        if limit and len(conversations) >= limit:
            break
    return conversations


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_common_arguments(parser)
    parser.add_argument("--validation_split_percentage", type=float, default=5.0,
                        help="held-out share of the training conversations when no --validation_file is given")
    parser.add_argument("--num_sample_replies", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens per sample reply")
    return parser


def load_conversations(args):
    if args.train_file is None and args.dataset_name == "chitchat":
        rows = chitchat_conversations()
        ds = datasets.Dataset.from_list(rows)
        parts = ds.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        splits = {"train": parts["train"], "validation": parts["test"]}
        for name, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
            if limit and limit < len(splits[name]):
                splits[name] = splits[name].select(range(limit))
        return splits
    return training.load_splits(args)


def main(argv=None):
    """setup, train (with held-out perplexity before and after), evaluate, save: each a step below."""
    args = training.parse_args(build_parser(), argv)
    training.validate_args(args)
    splits = load_conversations(args)  # checked before anything expensive
    for name, ds in splits.items():
        check_conversations(ds, f"{name} split ({getattr(args, name + '_file', None) or args.dataset_name})")
    run = setup(args, splits)
    before = training.evaluate_loss(run.accelerator, run.model, run.eval_dataloader)
    results = training.train(run.accelerator, run.model, run.optimizer, run.lr_scheduler, run.train_dataloader,
                             args, run.config)
    evaluate(run, args, splits, results, before)
    save(run, args, results)
    return results


def setup(args, splits) -> SimpleNamespace:
    """Accelerator, tokenizer (with a chat template), model, tokenized loaders (labels on the
    assistant turns), optimizer and schedule, prepared for the engine the launch set up."""
    accelerator = training.make_accelerator(args)
    tokenizer = training.load_tokenizer(args)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = training.load_model(args, AutoModelForCausalLM, "causal-lm")
    model = training.apply_lora(model, args)
    config = training.unwrap(accelerator, model).config
    render = renderer(tokenizer)

    def tokenize(example):
        """Labels are the tokens of each assistant turn: the rendered conversation up to and with
        the turn, minus the rendering up to the turn's generation prompt (chat templates render
        prefixes consistently)."""
        messages = example["messages"]
        ids = render(messages)
        labels = [-100] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(render(messages[:i], add_generation_prompt=True))
                if start >= args.max_length:  # this turn and later ones are truncated away: stop
                    break                     # (rendering every prefix is quadratic in turns)
                end = len(render(messages[: i + 1]))
                labels[start:end] = ids[start:end]
        return {"input_ids": ids[: args.max_length], "labels": labels[: args.max_length]}

    with accelerator.main_process_first():
        processed = {name: ds.map(tokenize, remove_columns=ds.column_names, desc=f"tokenize {name}")
                     for name, ds in splits.items()}
        processed = {name: ds.filter(lambda e: any(t != -100 for t in e["labels"][1:]))
                     for name, ds in processed.items()}
    collate = training.pad_collate(tokenizer.pad_token_id)
    run = training.prepare_training(accelerator, args, model, processed, collate)
    training.start_run(accelerator, args, run.model, "dialogue", f"{len(processed['train'])} conversations")
    run.__dict__.update(tokenizer=tokenizer, config=config, render=render, num_train=len(processed["train"]),
                        num_eval=len(processed["validation"]))
    return run


def renderer(tokenizer):
    """A conversation's token ids under the tokenizer's chat template."""
    def render(messages, **kwargs):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])
    return render


def evaluate(run, args, splits, results, before):
    """Held-out perplexity after training (beside `before`), a few sample replies (the context up to
    the last assistant turn, answered greedily) and routing statistics, into `results`."""
    accelerator, model = run.accelerator, run.model
    after = training.evaluate_loss(accelerator, model, run.eval_dataloader)
    contexts, references = [], []
    for messages in splits["validation"]["messages"][: args.num_sample_replies]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        contexts.append(messages[:last])
        references.append(messages[last]["content"])
    prompts = [run.render(c, add_generation_prompt=True)[-args.max_length:] for c in contexts]
    replies = training.generate(accelerator, model, run.tokenizer, prompts, args.max_new_tokens,
                                args.per_device_eval_batch_size)
    results.update(
        eval_loss_before=before["loss"],
        perplexity_before=before["perplexity"],
        eval_loss=after["loss"],
        perplexity=after["perplexity"],
        eval_samples=run.num_eval,
        eval_compute_fraction=after["compute_fraction"],
        num_processes=accelerator.num_processes,
        sample_replies=[{"last_user_turn": c[-1]["content"] if c else "", "reference": r, "reply": p.strip()}
                        for c, r, p in zip(contexts, references, replies)],
        routing=training.routing_stats(accelerator, model, run.eval_dataloader, args.routing_eval_batches),
    )
    accelerator.print(json.dumps({k: results[k] for k in ("perplexity_before", "perplexity", "train_loss")}))
    if args.with_tracking:
        accelerator.log({"eval/perplexity": results["perplexity"]}, step=results["train_steps"])


def save(run, args, results):
    """A complete Hub repository and its model card; then the push."""
    accelerator = run.accelerator
    saved = training.save_model(accelerator, run.model, run.tokenizer, args)
    training.write_results(args, results, accelerator)
    if accelerator.is_main_process:
        training.write_model_card(
            args, saved.config, results, task_type="text-generation", task_name="Dialogue",
            metrics={"perplexity": "perplexity", "perplexity_before": "perplexity_before"},
            data_text=f"{run.num_train} conversations rendered with the chat template, loss on "
                      "assistant turns only.",
        )
    training.push_to_hub(args, accelerator)
    training.end_training(accelerator, args)


if __name__ == "__main__":
    sys.exit(training.run_recipe(main))
