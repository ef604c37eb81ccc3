"""The packaged top-1/top-5 accuracy metric (an `evaluate` module loaded by local path, offline)."""

import evaluate
import numpy as np
import pytest
from sklearn.metrics import top_k_accuracy_score
from transformers import EvalPrediction

from hf_zsharp.metrics import ACCURACY_PATH, compute_metrics, load_accuracy

# Four examples, six classes. Example 0 and 3: top-1 hits. Example 1: its label has the 2nd highest logit
# (a top-5 hit only). Example 2: its label has the lowest logit (a miss at top-5 too).
LOGITS = np.array(
    [
        [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 4.0, 3.0, 1.0, 0.5, 0.2],
        [3.0, 2.0, 1.0, 0.5, 0.2, -9.0],
        [0.0, 0.0, 0.0, 7.0, 0.0, 0.0],
    ]
)
LABELS = np.array([0, 2, 5, 3])


@pytest.fixture(scope="module")
def accuracy():
    return load_accuracy()


def test_hand_made_logits(accuracy):
    assert accuracy.compute(predictions=LOGITS, references=LABELS) == {"accuracy": 0.5, "top5_accuracy": 0.75}


def test_loadable_by_path_with_evaluate(tmp_path):
    metric = evaluate.load(ACCURACY_PATH, cache_dir=str(tmp_path))
    for start in (0, 2):  # incremental use
        metric.add_batch(predictions=LOGITS[start : start + 2], references=LABELS[start : start + 2])
    assert metric.compute() == {"accuracy": 0.5, "top5_accuracy": 0.75}


def test_no_top5_below_five_classes(accuracy):
    result = accuracy.compute(predictions=[[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], references=[1, 1, 1])
    assert result == {"accuracy": pytest.approx(2 / 3)}


def test_agrees_with_scikit_learn(accuracy):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 20))
    labels = rng.integers(0, 20, size=300)
    result = accuracy.compute(predictions=logits, references=labels)
    assert result["accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == labels)))
    expected = top_k_accuracy_score(labels, logits, k=5, labels=np.arange(20))
    assert result["top5_accuracy"] == pytest.approx(expected)


def test_compute_metrics_for_trainer():
    assert compute_metrics(EvalPrediction(predictions=LOGITS, label_ids=LABELS)) == {
        "accuracy": 0.5,
        "top5_accuracy": 0.75,
    }
    # models that return extra outputs give a tuple whose first element is the logits
    extra = np.zeros((4, 3, 2))
    assert compute_metrics(EvalPrediction(predictions=(LOGITS, extra), label_ids=LABELS))["accuracy"] == 0.5


def test_bad_inputs(accuracy):
    with pytest.raises(ValueError, match="one row of logits per reference"):
        accuracy.compute(predictions=[[0.1, 0.9], [0.3]], references=[0, 1])
    with pytest.raises(ValueError, match=r"class ids in \[0, 2\)"):
        accuracy.compute(predictions=[[0.1, 0.9]], references=[2])
