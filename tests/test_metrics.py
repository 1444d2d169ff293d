import numpy as np
import pytest

from convnextv2_hf.metrics import load_top_k_accuracy


def test_top_k_accuracy_loads_offline_and_counts_correctly():
    metric = load_top_k_accuracy()
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    result = metric.compute(predictions=scores, references=[1, 1, 0, 1], k=2)
    assert result == {"accuracy": 0.25, "top2_accuracy": 0.75}
    assert metric.compute(predictions=scores, references=[1, 1, 0, 1], k=5)["top5_accuracy"] == 1.0


def test_top_k_accuracy_accumulates_batches():
    metric = load_top_k_accuracy()
    metric.add_batch(predictions=np.eye(3), references=[0, 1, 2])
    metric.add_batch(predictions=np.eye(3), references=[1, 1, 1])
    assert metric.compute(k=1)["accuracy"] == pytest.approx(4 / 6)
