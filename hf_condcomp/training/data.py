"""Data files every recipe reads (csv, tsv, json, jsonl; a Hub dataset instead), their splits,
column checks, and the padding collator. Task-specific formats (translation pairs, chat
conversations) live in their recipes."""

from pathlib import Path

import torch

from .errors import RecipeError

# What this run read, for its model card: every local data file (path, flag, size, sha256, recorded
# where it is checked, before it is read) and the Hub dataset with the splits taken from it.
# `parse_args` starts each run with an empty record.
_READ = {"files": [], "hub": None}


def reset_data_record():
    _READ.update(files=[], hub=None)


def data_record() -> dict:
    """{"files": [file_record, ...], "hub": {"dataset", "config", "train_split", "eval_split"} or None}."""
    return {"files": list(_READ["files"]), "hub": _READ["hub"]}


def check_file(path, flag):
    """`path` as a Path, after checking it is a non-empty file; recorded as read for the model card."""
    from ..cards import file_record

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"`{flag}` {path}: no such file. "
                          "Check the path (relative paths start at the current folder).")
    if path.stat().st_size == 0:
        raise RecipeError(f"`{flag}` {path}: the file is empty. Point `{flag}` at a file with data rows.")
    if not any(r["path"] == str(path) for r in _READ["files"]):
        _READ["files"].append(file_record(path, f"`{flag}`"))
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
        eval_split = "validation" if "validation" in raw else "test" if "test" in raw else None
        _READ["hub"] = {"dataset": args.dataset_name, "config": args.dataset_config_name, "train_split": "train",
                        "eval_split": eval_split}
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


def _right_pad(rows, value):
    """Rows right-padded with `value` to the longest, and their masks (1 on the row's own tokens)."""
    length = max(len(r) for r in rows)
    return ([list(r) + [value] * (length - len(r)) for r in rows],
            [[1] * len(r) + [0] * (length - len(r)) for r in rows])


def pad_collate(pad_token_id):
    """Right-pads `input_ids` (pad id), `labels` (-100) and builds `attention_mask`, for decoders."""
    def collate(features):
        input_ids, attention_mask = _right_pad([f["input_ids"] for f in features], pad_token_id)
        labels, _ = _right_pad([f["labels"] for f in features], -100)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return {k: torch.tensor(v) for k, v in batch.items()}
    return collate


def seq2seq_collate(pad_token_id):
    """For encoder-decoder models: right-pads the encoder's `input_ids` (pad id, with `attention_mask`)
    and the decoder's `labels` (-100, with `decoder_attention_mask`, so the router losses leave the
    decoder's padding out) to their own lengths; the model shifts the labels into its decoder inputs."""
    def collate(features):
        input_ids, attention_mask = _right_pad([f["input_ids"] for f in features], pad_token_id)
        labels, decoder_attention_mask = _right_pad([f["labels"] for f in features], -100)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "decoder_attention_mask": decoder_attention_mask}
        return {k: torch.tensor(v) for k, v in batch.items()}
    return collate
