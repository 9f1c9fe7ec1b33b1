"""Metrics through `evaluate` modules. The scripts ship theirs under scripts/metrics/ (accuracy, top_k_accuracy,
cross_entropy): they load by path, so evaluation needs no network; `--metric` takes a Hub module instead when
online, or any local module folder.

    with accelerator.main_process_first():
        metric = load_metric("accuracy")            # scripts/metrics/accuracy; "evaluate-metric/accuracy": the Hub
    metric.add_batch(predictions=..., references=...)
    metric.compute()                                # {'accuracy': ...}
    next_token_cross_entropy(model, eval_dataloader, accelerator, load_metric("cross_entropy"))  # {'loss': ...}
"""

from pathlib import Path

import evaluate
import numpy as np
import torch
import torch.nn.functional as F
from training_args import InputError

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
SHIPPED = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name_or_path: str, option: str = "--metric") -> evaluate.EvaluationModule:
    """A shipped module by name (scripts/metrics/NAME), a local module folder, or a Hub module; InputError at
    start-up when it cannot be loaded (offline, a wrong name)."""
    shipped = METRICS_DIR / name_or_path
    target = str(shipped) if name_or_path in SHIPPED else name_or_path
    try:
        return evaluate.load(target, keep_in_memory=True)
    except Exception as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise InputError(
            f"{option} {name_or_path!r}: cannot load this evaluate module ({reason}). Without a network use one "
            f"shipped with the scripts ({', '.join(SHIPPED)}) or the path of a local module folder."
        ) from error


def next_token_cross_entropy(model, dataloader, accelerator, metric, **compute_kwargs) -> dict:
    """Evaluate a causal LM on blocks of token ids: the negative log-likelihood of every next token of every
    block, gathered over processes, through the `cross_entropy` module (`compute_kwargs`: tokens_per_byte, ...)."""
    model.eval()
    for batch in dataloader:
        ids = batch["input_ids"]  # (B, T)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        nats = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none").sum(1)  # (B,)
        nats, tokens = accelerator.gather_for_metrics((nats, torch.full_like(nats, ids.shape[1] - 1)))
        metric.add_batch(nats=nats.tolist(), tokens=tokens.long().tolist())
    model.train()
    return metric.compute(**compute_kwargs)


def evaluate_classifier(model, dataloader, accelerator, metrics: dict, top_k: int) -> dict:
    """Cross-entropy, --metric (accuracy) and top-k accuracy over the whole evaluation set, gathered over
    processes, through evaluate modules."""
    model.eval()
    for batch in dataloader:
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits.float()  # (B, num_labels)
        nats = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")  # (B,)
        ranked = logits.topk(max(top_k, 1), dim=-1).indices  # (B, k), best first
        nats, ranked, labels = accelerator.gather_for_metrics((nats, ranked, batch["labels"]))
        metrics["loss"].add_batch(nats=nats.tolist(), tokens=[1] * len(nats))
        metrics["metric"].add_batch(predictions=ranked[:, 0].tolist(), references=labels.tolist())
        if top_k:
            metrics["top_k"].add_batch(predictions=ranked.tolist(), references=labels.tolist())
    model.train()
    values = {"loss": metrics["loss"].compute()["loss"]} | metrics["metric"].compute()
    if top_k:
        values |= metrics["top_k"].compute(k=[top_k])
    # the scalars (a Hub module may return numpy numbers, or lists such as per-class scores)
    return {f"eval_{k}": float(v) for k, v in values.items() if isinstance(v, int | float | np.number)}
