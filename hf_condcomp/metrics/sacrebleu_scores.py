"""Corpus BLEU and chrF (sacrebleu, default tokenisation), as one `evaluate` metric module that
loads offline by path. One reference per hypothesis.

    evaluate.load(hf_condcomp.metrics.path("sacrebleu_scores")).compute(predictions=[...], references=[...])
    -> {"bleu": ..., "chrf": ...}
"""

import datasets
import evaluate
import sacrebleu


class SacreBleuScores(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacrebleu corpus BLEU (Post 2018) and chrF (Popovic 2015), scores in [0, 100].",
            citation="",
            inputs_description="predictions: list of str; references: list of str (one reference each)",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
                "chrf": sacrebleu.corpus_chrf(predictions, [references]).score}
