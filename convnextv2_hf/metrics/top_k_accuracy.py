"""Top-1 and top-k accuracy as an ``evaluate`` metric.

Predictions come in either of two forms, and the metric reads each for what it is:

- (N, num_labels) scores or logits (a Trainer's ``compute_metrics``, ``add_batch`` of model outputs): returns
  ``accuracy`` (top-1) and ``top{k}_accuracy`` (``k`` defaults to 5);
- (N,) class ids (what ``evaluate.evaluator("image-classification")`` passes: the pipeline's best label, mapped
  to an id): returns the exact ``accuracy`` (top-1) only, since ids say nothing about the other k - 1 guesses;
  asking for a ``k`` above 1 then is a ``ValueError`` saying so.

References below 0 (the -100 a Trainer pads labels with, the usual ignore index) are left out of both scores.
``k`` must be a positive whole number; scores that are NaN or infinite are a ``ValueError`` (a NaN sorts as the
best guess, which would count as a hit). In a Trainer, ``convnextv2_hf.metrics.top_k_compute_metrics`` also
takes the logits out of a tuple of model outputs, which ``evaluate`` cannot read.
"""

import datasets
import evaluate
import numpy as np

DEFAULT_K = 5
SCORES = datasets.Features(
    {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
)
CLASS_IDS = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of samples whose label is the top-1 prediction, and among the top-k predictions.",
            citation="",
            inputs_description=(
                "predictions: (N, num_labels) scores, or (N,) class ids (top-1 only); references: (N,) class ids; "
                f"k: int (default {DEFAULT_K}; scores only)"
            ),
            features=[SCORES, CLASS_IDS],  # evaluate picks the form the first batch comes in
        )

    def _compute(self, predictions, references, k: int | None = None):
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise ValueError(f"k must be a whole number >= 1, got {k!r}")
        labels = np.asarray(references)
        predictions = np.asarray(predictions)
        if len(labels) == 0:
            raise ValueError("no predictions to score: the evaluation set is empty")
        if len(predictions) == len(labels):
            scored = labels >= 0  # -100: the Trainer's padding, left out
            labels, predictions = labels[scored], predictions[scored]
            if len(labels) == 0:
                raise ValueError("no predictions to score: every reference is below 0 (ignored, as -100 is)")
        if predictions.ndim == 1:  # class ids
            if k is not None and k > 1:
                raise ValueError(
                    f"top-{k} accuracy needs (N, num_labels) scores, but the predictions are class ids (as "
                    "evaluate.evaluator passes them): only top-1 accuracy can be computed from ids; leave k out"
                )
            if len(predictions) != len(labels):
                raise ValueError(f"{len(predictions)} predicted class ids for {len(labels)} references")
            return {"accuracy": float((predictions == labels).mean())}
        k = DEFAULT_K if k is None else k
        scores = predictions.astype(np.float64)
        if scores.ndim != 2 or len(scores) != len(labels):
            raise ValueError(f"expected (N, num_labels) predictions for N={len(labels)} references, got {scores.shape}")
        bad_rows = int((~np.isfinite(scores)).any(axis=1).sum())
        if bad_rows:
            raise ValueError(f"{bad_rows} of {len(scores)} rows of scores hold NaN or infinite values")
        ranked = np.argsort(-scores, axis=1, kind="stable")
        # with fewer than k classes every label is in the top k: the key keeps the k asked for
        in_top_k = (ranked[:, : min(k, scores.shape[1])] == labels[:, None]).any(axis=1)
        return {"accuracy": float((ranked[:, 0] == labels).mean()), f"top{k}_accuracy": float(in_top_k.mean())}
