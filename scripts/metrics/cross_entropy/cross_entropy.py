"""Cross-entropy of a language or sequence model, from the summed negative log-likelihood (nats) and the number
of predicted tokens of each example: the mean loss per token, perplexity, bits per token, and with the data's
tokens per byte and per character, bits per byte and per character (enwik8's "bpc", text8's, ...):

    metric = evaluate.load("scripts/metrics/cross_entropy")
    metric.add_batch(nats=[40.1, 38.7], tokens=[31, 31])           # per example: sum of -log p, count
    metric.compute(tokens_per_byte=0.98)
    # {'loss': ..., 'perplexity': ..., 'bits_per_token': ..., 'bits_per_byte': ...}
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean negative log-likelihood per token (nats), perplexity, and bits per token, byte or character."
_INPUTS = """
    nats (`list` of `float`): per example, the summed negative log-likelihood of its predicted tokens (nats).
    tokens (`list` of `int`): per example, how many tokens were predicted.
    tokens_per_byte (`float`, *optional*): tokens per byte of the data, for bits_per_byte.
    tokens_per_char (`float`, *optional*): tokens per character of the data, for bits_per_char.
Returns:
    loss (`float`, nats per token), perplexity (`float`), bits_per_token (`float`), and bits_per_byte,
    bits_per_char (`float`) when their ratio is given.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class CrossEntropy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"nats": datasets.Value("float64"), "tokens": datasets.Value("int64")}),
        )

    def _compute(self, nats, tokens, tokens_per_byte=None, tokens_per_char=None):
        loss = float(np.sum(nats) / np.sum(tokens))
        bits = loss / math.log(2)
        results = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_token": bits}
        if tokens_per_byte is not None:
            results["bits_per_byte"] = bits * tokens_per_byte
        if tokens_per_char is not None:
            results["bits_per_char"] = bits * tokens_per_char
        return results
