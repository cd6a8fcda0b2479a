"""Writing output folders, shared by every command that writes one (`upcycle`, `demo`, `export`):
the refusal of a non-empty OUTPUT_DIR and the atomic save that leaves no half-written checkpoint."""

import os
import shutil
import tempfile
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")  # what `merge` (mergekit's `dtype`) and `upcycle --dtype` save in


def check_output_dir(output_dir, overwrite: bool = False) -> Path:
    """`output_dir` as a Path; a ValueError naming it when it exists, is not empty and `overwrite` is off."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"OUTPUT_DIR {str(output_dir)!r} exists and is not empty: choose a new folder or pass "
                         "--overwrite.")
    return output_dir


def save_atomically(output_dir: Path, write, overwrite: bool = False):
    """Run `write(tmp_dir)` and move the result to `output_dir` only if it succeeded.

    A failure leaves `output_dir` as it was (absent or untouched): no half-written checkpoint.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        write(tmp)
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, old / "x")
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_with_tokenizer(model, source, folder) -> None:
    """`model.save_pretrained(folder)`, then what the folder needs beside the model from `source` (a
    local folder, an embedded name or a Hub id) where save_pretrained did not write it: the tokenizer
    and a sentence-transformers folder's files (`modules.json`, pooling, ...).

    Shared by `upcycle`, `merge`, `demo` and `export`, so every folder they write loads with
    `AutoTokenizer` (and `SentenceTransformer`) as its source did."""
    from transformers import AutoTokenizer

    from . import assets
    from .modeling.common import copy_sentence_transformers_files

    model.save_pretrained(folder)
    if not isinstance(source, (str, os.PathLike)):
        return
    source = assets.resolve(str(source))
    if not (Path(folder) / "modules.json").exists():
        copy_sentence_transformers_files(source, folder)
    if (Path(folder) / "tokenizer_config.json").exists():
        return
    try:
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError):
        pass  # a source without a tokenizer (random test checkpoints) still saves
