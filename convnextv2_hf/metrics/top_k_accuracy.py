"""Top-1 and top-k accuracy as an ``evaluate`` metric: predictions are (N, num_labels) scores or logits."""

import datasets
import evaluate
import numpy as np


class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of samples whose label is the top-1 prediction, and among the top-k predictions.",
            citation="",
            inputs_description="predictions: (N, num_labels) scores; references: (N,) class ids; k: int (default 5)",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k: int = 5):
        scores, labels = np.asarray(predictions, dtype=np.float64), np.asarray(references)
        if scores.ndim != 2 or len(scores) != len(labels) or len(labels) == 0:
            raise ValueError(f"expected (N, num_labels) predictions for N={len(labels)} references, got {scores.shape}")
        ranked = np.argsort(-scores, axis=1, kind="stable")
        # with fewer than k classes every label is in the top k: the key keeps the k asked for
        in_top_k = (ranked[:, : min(k, scores.shape[1])] == labels[:, None]).any(axis=1)
        return {"accuracy": float((ranked[:, 0] == labels).mean()), f"top{k}_accuracy": float(in_top_k.mean())}
