"""F1, as an `evaluate` metric module that loads offline by path (scikit-learn underneath).

    evaluate.load(hf_condcomp.metrics.path("f1")).compute(predictions=..., references=..., average="macro")
"""

import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 score; `average` as in scikit-learn (binary, macro, micro, weighted).",
            citation="",
            inputs_description="predictions, references: lists of class ids; average: str",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary"):
        return {"f1": float(f1_score(references, predictions, average=average))}
