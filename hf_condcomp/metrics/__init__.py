"""Metric modules for `evaluate` that ship with the package and load offline by path
(`evaluate.load("<hub name>")` needs the network): accuracy, f1, sacrebleu_scores (BLEU and chrF).

    import evaluate
    from hf_condcomp import metrics
    accuracy = evaluate.load(metrics.path("accuracy"))
"""

from pathlib import Path

NAMES = ("accuracy", "f1", "sacrebleu_scores")


def path(name: str) -> str:
    """The file of metric `name`, for `evaluate.load`."""
    if name not in NAMES:
        raise ValueError(f"`name` must be one of {NAMES}, got {name!r}.")
    return str(Path(__file__).resolve().parent / f"{name}.py")


def load(name: str):
    """`evaluate.load` of the packaged metric `name` (offline). In memory: processes of a distributed
    run each compute on the gathered predictions and must not share cache files."""
    import evaluate

    return evaluate.load(path(name), keep_in_memory=True)
