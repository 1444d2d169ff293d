"""Mean intersection over union for semantic segmentation, in plain numpy (no Hub download, no ``evaluate``).

The confusion matrix is the whole state: batches (and processes, once gathered) add up exactly, so the score of
a dataset does not depend on how it was split into batches. ``MeanIoU`` is the accumulator; it is also a
``compute_metrics`` for the stock Trainer with ``batch_eval_metrics=True``.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


def segmentation_confusion_matrix(
    predictions, references, num_labels: int, ignore_index: int | None = IGNORE_INDEX
) -> np.ndarray:
    """(num_labels, num_labels) int64 counts: row = true class, column = predicted class.

    ``predictions`` and ``references``: class-id maps of the same shape, e.g. (N, H, W). Pixels whose reference is
    ``ignore_index``, or outside [0, num_labels) (such as the -100 the Trainer pads with), are not counted.
    ``ValueError`` for shapes that differ or predictions outside [0, num_labels).
    """
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
    valid = (references >= 0) & (references < num_labels)
    if ignore_index is not None:
        valid &= references != ignore_index
    predicted, true = predictions[valid].astype(np.int64), references[valid].astype(np.int64)
    if predicted.size and (predicted.min() < 0 or predicted.max() >= num_labels):
        low, high = predicted.min(), predicted.max()
        raise ValueError(f"predictions must be class ids in [0, {num_labels}), got values from {low} to {high}")
    return np.bincount(true * num_labels + predicted, minlength=num_labels**2).reshape(num_labels, num_labels)


def scores_from_confusion(confusion: np.ndarray) -> dict:
    """``mean_iou``, ``mean_accuracy`` (per-class recall), ``overall_accuracy`` and the per-class lists.

    A class absent from both references and predictions has an undefined IoU (NaN in ``per_category_iou``) and is
    left out of the means; a class in the references that is never predicted correctly counts with IoU 0.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    intersection = np.diag(confusion)
    true_total, predicted_total = confusion.sum(axis=1), confusion.sum(axis=0)
    union = true_total + predicted_total - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
        accuracy = np.where(true_total > 0, intersection / true_total, np.nan)
    total = confusion.sum()
    return {
        "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mean_accuracy": float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else float("nan"),
        "overall_accuracy": float(intersection.sum() / total) if total else float("nan"),
        "per_category_iou": iou.tolist(),
        "per_category_accuracy": accuracy.tolist(),
    }


def mean_iou(predictions, references, num_labels: int, ignore_index: int | None = IGNORE_INDEX) -> dict:
    """Scores (see ``scores_from_confusion``) of class-id maps ``predictions`` against ``references``."""
    return scores_from_confusion(segmentation_confusion_matrix(predictions, references, num_labels, ignore_index))


class MeanIoU:
    """Accumulates a confusion matrix over batches.

        metric = MeanIoU(num_labels=150)
        metric.update(predicted_ids, label_ids)          # any number of times, (N, H, W) each
        scores = metric.compute()                         # then starts afresh

    As ``Trainer(compute_metrics=MeanIoU(K), args=TrainingArguments(batch_eval_metrics=True, ...))`` it takes each
    evaluation batch (predictions: class ids, or (N, K, H, W) logits, which are arg-maxed) and returns the scores
    without the per-class lists at the last batch (the Trainer logs scalars), keyed ``mean_iou`` etc.
    """

    def __init__(self, num_labels: int, ignore_index: int | None = IGNORE_INDEX):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_labels, num_labels), dtype=np.int64)

    def update(self, predictions, references) -> None:
        self.confusion += segmentation_confusion_matrix(predictions, references, self.num_labels, self.ignore_index)

    def compute(self, reset: bool = True) -> dict:
        scores = scores_from_confusion(self.confusion)
        if reset:
            self.confusion = np.zeros_like(self.confusion)
        return scores

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict:
        predictions, references = eval_prediction.predictions, eval_prediction.label_ids
        predictions = _to_numpy(predictions[0] if isinstance(predictions, (tuple, list)) else predictions)
        references = _to_numpy(references)
        if predictions.ndim == references.ndim + 1:  # logits (N, K, H, W)
            predictions = predictions.argmax(axis=1)
        self.update(predictions, references)
        if not compute_result:
            return {}
        scores = self.compute()
        return {key: value for key, value in scores.items() if not isinstance(value, list)}


def _to_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor (batch_eval_metrics hands over tensors)
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()  # numpy has no bfloat16
    return np.asarray(array)
