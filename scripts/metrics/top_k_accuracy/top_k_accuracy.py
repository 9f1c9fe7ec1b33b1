"""Top-k accuracy: the fraction of examples whose reference is among the k best-ranked predictions, for each k
asked for (top-1 is the accuracy). The predictions of an example are its labels ranked best first, e.g.
`logits.topk(5).indices`:

    metric = evaluate.load("scripts/metrics/top_k_accuracy")
    metric.compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[0, 1], k=[1, 2])
    # {'top_1_accuracy': 0.5, 'top_2_accuracy': 1.0}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-k accuracy: the reference is among the k first of the ranked predicted labels."
_INPUTS = """
    predictions (`list` of `list` of `int`): per example, labels ranked best first (at least max(k) of them).
    references (`list` of `int`): true labels.
    k (`list` of `int`, defaults to [1, 5]): the k to report.
Returns:
    top_{k}_accuracy (`float`) for each k.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        ranked = np.asarray(predictions)  # (N, K)
        if ranked.ndim != 2 or ranked.shape[1] < max(k):
            raise ValueError(f"top_k_accuracy: each prediction needs at least {max(k)} ranked labels.")
        hits = ranked == np.asarray(references)[:, None]  # (N, K): at most one True per row
        return {f"top_{n}_accuracy": float(hits[:, :n].any(axis=1).mean()) for n in k}
