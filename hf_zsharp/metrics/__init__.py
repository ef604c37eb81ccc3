"""Evaluation metrics shipped with the package, so that evaluation works without the Hub."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import evaluate
from transformers import EvalPrediction

ACCURACY_PATH = str(Path(__file__).parent / "accuracy")


def load_accuracy(**kwargs: Any) -> evaluate.EvaluationModule:
    """The top-1/top-5 accuracy metric module of this package, loaded by local path (no Hub access)."""
    return evaluate.load(ACCURACY_PATH, **kwargs)


@cache
def _accuracy_in_memory() -> evaluate.EvaluationModule:
    # In memory: no cache files, so processes of a distributed run never share a lock file.
    return load_accuracy(keep_in_memory=True)


def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """`Trainer` hook: top-1 ("accuracy") and top-5 ("top5_accuracy") accuracy from the evaluation logits."""
    logits = eval_pred.predictions
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return _accuracy_in_memory().compute(predictions=logits, references=eval_pred.label_ids)
