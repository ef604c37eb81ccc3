"""Top-1 and top-5 accuracy from logits, as an `evaluate` metric module that works offline.

Load it by path (`evaluate.load("<dir of this file>")` or `hf_zsharp.metrics.load_accuracy()`):
`evaluate.load("accuracy")` would fetch the canonical module from the Hub.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 accuracy: the share of examples whose highest logit is the reference label. Top-5 accuracy (only
when there are at least 5 classes): the share whose reference label is among the 5 highest logits.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): logits (or probabilities), one row of `num_classes` scores
        per example.
    references (`list` of `int`): the reference class ids.
Returns:
    accuracy (`float`): top-1 accuracy in [0, 1].
    top5_accuracy (`float`): top-5 accuracy in [0, 1]; present when there are at least 5 classes.
Examples:
    >>> metric = evaluate.load("hf_zsharp/metrics/accuracy")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1])
    {'accuracy': 0.5}
"""

_CITATION = ""

TOP_K = 5


class Accuracy(evaluate.Metric):
    """Top-1 and top-5 accuracy computed from a matrix of logits."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        widths = {len(row) for row in predictions}
        if len(widths) != 1 or len(predictions) != len(references):
            raise ValueError(
                f"Expected one row of logits per reference, all of the same length; got {len(predictions)} rows "
                f"of lengths {sorted(widths)} for {len(references)} references."
            )
        logits = np.asarray(predictions, dtype=np.float32)
        labels = np.asarray(references, dtype=np.int64)
        num_classes = logits.shape[1]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"References must be class ids in [0, {num_classes}), got {labels.min()}..{labels.max()}."
            )
        results = {"accuracy": float(np.mean(logits.argmax(axis=1) == labels))}
        if num_classes >= TOP_K:
            top = np.argpartition(-logits, TOP_K - 1, axis=1)[:, :TOP_K]
            results["top5_accuracy"] = float(np.mean((top == labels[:, None]).any(axis=1)))
        return results
