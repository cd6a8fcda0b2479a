"""Command line: `hf-condcomp inspect` and `hf-condcomp compare` (wired in by `cli.build_parser`):
a model folder loaded with its head and tokenizer, texts read from a file or a Hub dataset, the
result printed, plotted and written as JSON."""

from ..console import emit
from .figures import save_plots
from .report import format_compare, format_inspect
from .tokens import compare, inspect


def load_model_folder(folder, what="MODEL"):
    """(model in eval mode, tokenizer) from a folder written by `hf-condcomp upcycle` or
    `save_pretrained`; the head named in `config.architectures` is loaded when the Auto classes
    know it, so that a classifier loads as a classifier."""
    from pathlib import Path

    import transformers

    if not Path(folder).is_dir():
        raise ValueError(f"{what} {str(folder)!r} is not a folder: "
                         "pass the folder written by `hf-condcomp upcycle` or `save_pretrained`.")
    from .. import assets

    # A config.json or weights file that does not read, or no tokenizer: one line naming the file.
    config = assets.load_config(folder, what, trust_remote_code=True)
    tokenizer = assets.load_tokenizer(folder, what, "save one there with `tokenizer.save_pretrained`")
    arch = (getattr(config, "architectures", None) or [None])[0]
    auto = transformers.AutoModel
    for auto_name, ref in (getattr(config, "auto_map", None) or {}).items():
        if arch and str(ref).endswith("." + arch) and auto_name.startswith("AutoModel"):
            auto = getattr(transformers, auto_name)
    model = assets.load_pretrained(auto, folder, what, trust_remote_code=True).eval()
    return model, tokenizer


def _read_column(path, column):
    import csv
    import json

    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL  # GLUE TSVs are unquoted
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",", quoting=quoting))
    elif suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        rows = (json.loads(text) if suffix == ".json"
                else [json.loads(line) for line in text.splitlines() if line.strip()])
        if isinstance(rows, dict):
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
    elif suffix == ".parquet":
        import pandas as pd

        rows = pd.read_parquet(path).to_dict("records")
    else:
        raise ValueError(f"--data-file {str(path)!r} has suffix {suffix!r}: "
                         "use .csv, .tsv, .json, .jsonl or .parquet (or --text-file for plain text).")
    if rows and column not in rows[0]:
        raise ValueError(f"--column {column!r} is not in --data-file {str(path)!r}: its columns are {sorted(rows[0])}.")
    return [row[column] for row in rows]


def read_texts(args) -> list[str]:
    """Texts from --text-file (one per line), --data-file + --column, or --dataset (Hub) + --column,
    cut to --max-texts. Raises ValueError naming the file or dataset when nothing usable is there."""
    from pathlib import Path

    if args.text_file is not None:
        source, path = f"--text-file {args.text_file!r}", Path(args.text_file)
        if not path.is_file():
            raise ValueError(f"{source} does not exist (or is not a file): pass a text file with one text per line.")
        texts = path.read_text(encoding="utf-8").splitlines()
    elif args.data_file is not None:
        source, path = f"--data-file {args.data_file!r}", Path(args.data_file)
        if not path.is_file():
            raise ValueError(f"{source} does not exist (or is not a file): "
                             "pass a .csv, .tsv, .json, .jsonl or .parquet file.")
        texts = _read_column(path, args.column)
    else:
        source = f"--dataset {args.dataset!r} (split {args.split!r})"
        try:
            import datasets

            data = datasets.load_dataset(args.dataset, split=args.split)
        except Exception as err:  # offline, unknown name or split: datasets raises many kinds
            raise ValueError(
                f"{source} could not be loaded from the Hub ({type(err).__name__}: {str(err)[:200]}). "
                "Offline? Save the data locally and pass --data-file FILE --column COLUMN."
            ) from err
        if args.column not in data.column_names:
            raise ValueError(f"--column {args.column!r} is not in {source}: its columns are {data.column_names}.")
        texts = data[args.column]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if args.max_texts is not None:
        texts = texts[: args.max_texts]
    if not texts:
        raise ValueError(f"{source} holds no non-empty text: pass a file with at least one line of text.")
    return texts


def _write_json(result, path):
    import json
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def cmd_inspect(args):
    texts = read_texts(args)
    model, tokenizer = load_model_folder(args.model)
    result = inspect(model, texts, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                     top_tokens=args.top_tokens, sample_text=args.sample_text)
    if args.plots:
        result["plots"] = save_plots(result, args.plots)
    emit(format_inspect(result))
    for name, info in (result.get("plots") or {}).items():
        emit(f"plot {name}: {info['path']} ({info['width']}x{info['height']} px)")
    if args.json:
        _write_json(result, args.json)
        emit(f"json: {args.json}")
    return 0


def cmd_compare(args):
    texts = read_texts(args)
    model_a, tokenizer = load_model_folder(args.model_a, "MODEL_A")
    model_b, tokenizer_b = load_model_folder(args.model_b, "MODEL_B")
    if tokenizer.get_vocab() != tokenizer_b.get_vocab():
        raise ValueError(f"MODEL_A {args.model_a!r} and MODEL_B {args.model_b!r} have different tokenizers: "
                         "compare models upcycled from one source.")
    result = compare(model_a, model_b, texts, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    emit(format_compare(result))
    if args.json:
        _write_json(result, args.json)
        emit(f"json: {args.json}")
    return 0


def _add_text_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="plain text, one text per line")
    src.add_argument("--data-file", help=".csv, .tsv, .json, .jsonl or .parquet file; the texts are in --column")
    src.add_argument("--dataset", help="Hub dataset name (needs internet); the texts are in --column of --split")
    p.add_argument("--column", default="text", help="column holding the texts (--data-file, --dataset); default: text")
    p.add_argument("--split", default="train", help="--dataset split; default: train")
    p.add_argument("--max-texts", type=int, default=None, help="use only the first N texts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate texts to N tokens (default: the model's limit)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON to OUT")


def add_inspect_parsers(sub):
    """Register `inspect` and `compare` on the `hf-condcomp` subparsers."""
    p = sub.add_parser("inspect", help="show where a model routes tokens and spends compute")
    p.add_argument("model",
                   help="folder of an upcycled model (loaded with trust_remote_code, tokenizer from the folder)")
    _add_text_arguments(p)
    p.add_argument("--plots", default=None, metavar="DIR", help="write expert_load.png and token_map.png into DIR")
    p.add_argument("--top-tokens", type=int, default=5, help="most frequent tokens listed per expert")
    p.add_argument("--sample-text", default=None, help="sentence of the per-token map (default: the first text)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("compare", help="how routing differs between two models (e.g. before and after fine-tuning)")
    p.add_argument("model_a", help="folder of the first model")
    p.add_argument("model_b", help="folder of the second model (same MoE layout and tokenizer)")
    _add_text_arguments(p)
    p.set_defaults(func=cmd_compare)
