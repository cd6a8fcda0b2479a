"""Accuracy, as an `evaluate` metric module that loads offline by path (scikit-learn underneath).

    evaluate.load(hf_condcomp.metrics.path("accuracy")).compute(predictions=[...], references=[...])
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference.",
            citation="",
            inputs_description="predictions, references: lists of class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(accuracy_score(references, predictions))}
