"""The code a user copies from README.md and docs/*.md runs: every ```python and ```bash block is
taken from the Markdown itself (not a copy of it) and run, so a change that breaks an example
breaks this test.

- A block that cannot run here (a GPU, the Hub, vLLM, several machines, a placeholder for the
  user's own files, or an expensive repeat of what another test runs) carries, on the line right
  above it, `<!-- not run: REASON -->`, which names the test that covers it where one does; it is
  reported as skipped with that reason. Any other block runs, and must succeed.
- Bash blocks run with `bash -eu` in a scratch folder that links the clone's `recipes/` and
  `tests/` (the data samples), with `python` this interpreter and `hf-condcomp` this package's
  command line. Every `python recipes/<name>.py` command gets `RECIPE_OVERRIDES` appended: the
  recipes' own `key=value` overrides (docs/recipes.md), which keep a run to two steps and eight
  evaluation examples. Nothing else in a block is changed.
- Blocks with output, not code (no language, or `text`), are not run.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import ROOT

DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python", "bash", "sh", "shell"}
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(\S.*?)\s*-->$")
# Appended to every `python recipes/<name>.py` command of a block: a short run of the same command.
RECIPE_OVERRIDES = ["max_train_steps=2", "max_eval_samples=8", "routing_eval_batches=1",
                    "with_tracking=false", "checkpointing_steps=null", "num_warmup_steps=0"]
# Blocks run by a test of their own, with checks on what they print or write: (document, the line above).
OWN_TESTS = {("README.md", "From Python:")}


@dataclass
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    above: str  # the last non-blank line before the fence

    @property
    def not_run(self):
        match = NOT_RUN.match(self.above)
        return match.group(1) if match else None


def doc_blocks(document):
    lines = (ROOT / document).read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, language = i, lines[i][3:].strip()
            i += 1
            while not lines[i].startswith("```"):
                i += 1
            above = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            yield Block(document, start + 1, language, "\n".join(lines[start + 1:i]) + "\n", above)
        i += 1


BLOCKS = [b for d in DOCUMENTS for b in doc_blocks(d) if b.language in RUNNABLE]


def python_block(markdown: str, heading: str) -> str:
    """The block right after the line `heading` in `markdown`."""
    return next(b.code for b in doc_blocks(markdown) if b.above == heading)


def with_recipe_overrides(script: str) -> str:
    """`script` with its continuation lines joined and RECIPE_OVERRIDES after each recipe command."""
    lines = script.replace("\\\n", " ").splitlines()
    return "\n".join(line + " " + " ".join(RECIPE_OVERRIDES) if re.search(r"\bpython\s+recipes/\w+\.py", line)
                     else line for line in lines) + "\n"


def scratch(tmp_path):
    """A folder to run a block in, and its environment: the clone's data and recipes, this interpreter."""
    for name in ("recipes", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a link would leave the venv
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "hf-condcomp").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m hf_condcomp.cli "$@"\n')
    (bin_dir / "hf-condcomp").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                  os.environ.get("PYTHONPATH")]))}
    return env


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.document}:{b.line}" for b in BLOCKS])
def test_doc_block_runs(block, tmp_path):
    if block.not_run:
        pytest.skip(f"marked not run: {block.not_run}")
    if (block.document, block.above) in OWN_TESTS:
        pytest.skip("run by a test of its own in this file")
    env = scratch(tmp_path)
    if block.language == "python":
        command = [sys.executable, "-c", block.code]
    else:
        command = ["bash", "-eu", "-c", with_recipe_overrides(block.code)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{block.document}:{block.line} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_not_run_markers_sit_on_code_blocks():
    """A marker names its reason and stands right above a code block (else it marks nothing)."""
    marked = {(b.document, b.line) for b in BLOCKS if b.not_run}
    for document in DOCUMENTS:
        lines = (ROOT / document).read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("<!-- not run"):
                assert NOT_RUN.match(line.strip()), f"{document}:{i + 1}: write `<!-- not run: REASON -->`"
                fence = next(j for j in range(i + 1, len(lines)) if lines[j].strip())
                assert (document, fence + 1) in marked, f"{document}:{i + 1}: the marker is not above a code block"


def test_the_readmes_python_example_runs(tmp_path):
    code = python_block("README.md", "From Python:")
    code += "\nassert out.loss.dim() == 0 and out.aux_loss is not None and out.logits.shape == (2, 77)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "minilm-moe" / "tokenizer_config.json").exists()
    assert (tmp_path / "minilm-moe" / "README.md").exists()  # save_pretrained writes the model card

