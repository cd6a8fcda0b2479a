"""The packaged `evaluate` metric modules load offline by path and give scikit-learn's and
sacrebleu's numbers."""

import random

import pytest
import sacrebleu
from sklearn.metrics import accuracy_score, f1_score

from hf_condcomp import metrics


def test_classification_metrics_equal_scikit_learn(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    rng = random.Random(0)
    refs = [rng.randrange(5) for _ in range(200)]
    preds = [r if rng.random() < 0.6 else rng.randrange(5) for r in refs]
    assert (metrics.load("accuracy").compute(predictions=preds, references=refs)["accuracy"]
            == accuracy_score(refs, preds))
    for average in ("macro", "micro", "weighted"):
        got = metrics.load("f1").compute(predictions=preds, references=refs, average=average)["f1"]
        assert got == pytest.approx(f1_score(refs, preds, average=average), abs=1e-12)


def test_bleu_and_chrf_equal_sacrebleu(monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    refs = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch."]
    hyps = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest."]
    scores = metrics.load("sacrebleu_scores").compute(predictions=hyps, references=refs)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-12)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-12)
    assert 0 < scores["bleu"] < 100


def test_unknown_metric_names_the_choices():
    with pytest.raises(ValueError, match="`name` must be one of"):
        metrics.path("rouge")
