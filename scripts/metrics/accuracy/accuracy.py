"""Accuracy: the fraction of predictions equal to their reference. The same inputs and output as the Hub's
`accuracy` metric (`evaluate.load("accuracy")`), computed with numpy, so it loads by path without a network:

    metric = evaluate.load("scripts/metrics/accuracy")
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])   # {'accuracy': 0.666...}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy = (number of correct predictions) / (number of predictions)."
_INPUTS = """
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): true labels.
    normalize (`bool`, defaults to True): the fraction correct; False gives the number correct.
    sample_weight (`list` of `float`, *optional*): a weight per example.
Returns:
    accuracy (`float`).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        total = float((correct * weights).sum())
        return {"accuracy": float(total / weights.sum()) if normalize else total}
