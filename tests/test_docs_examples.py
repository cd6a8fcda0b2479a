"""The code a user copies from the README runs: each block is taken from the Markdown itself (not a
copy of it), so a change that breaks the example breaks this test."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def python_block(markdown: str, heading: str) -> str:
    """The first ```python block after the line `heading` in `markdown`."""
    text = (ROOT / markdown).read_text(encoding="utf-8")
    match = re.search(re.escape(heading) + r"\s*\n\s*```python\n(.*?)```", text, re.S)
    assert match, f"{markdown}: no python block after {heading!r}"
    return match.group(1)


def test_the_readmes_python_example_runs(tmp_path):
    code = python_block("README.md", "From Python:")
    code += "\nassert out.loss.dim() == 0 and out.aux_loss is not None and out.logits.shape == (2, 77)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "minilm-moe" / "tokenizer_config.json").exists()
