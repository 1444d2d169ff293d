"""Metric scripts for ``evaluate`` that ship with the package (the Hub's metric scripts cannot be downloaded
offline). ``evaluate.load(TOP_K_ACCURACY)`` loads the top-1 / top-k accuracy metric, ``evaluate.load(MEAN_IOU)``
mean IoU for semantic segmentation; ``top_k_compute_metrics(k)`` is the top-k one as a Trainer's
``compute_metrics``. ``MeanIoU`` / ``mean_iou`` compute the same scores without ``evaluate``."""

from pathlib import Path

from .segmentation import MeanIoU, _to_numpy, mean_iou, scores_from_confusion, segmentation_confusion_matrix

TOP_K_ACCURACY = str(Path(__file__).with_name("top_k_accuracy.py"))
MEAN_IOU = str(Path(__file__).with_name("mean_iou.py"))


def load_top_k_accuracy():
    import evaluate

    return evaluate.load(TOP_K_ACCURACY)


def top_k_compute_metrics(k: int = 5):
    """A Trainer ``compute_metrics`` giving ``accuracy`` and ``top{k}_accuracy`` from the evaluation logits.

    Takes what a Trainer hands over: ``predictions`` as (N, num_labels) logits, or a tuple of model outputs whose
    first item they are (models that return hidden states too), numpy or torch; ``label_ids`` with -100 padding,
    which is left out. Scores through ``load_top_k_accuracy()``, the metric ``evaluate.evaluator`` runs too."""
    metric = load_top_k_accuracy()

    def compute_metrics(prediction) -> dict:
        logits, references = prediction.predictions, prediction.label_ids
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return metric.compute(predictions=_to_numpy(logits), references=_to_numpy(references), k=k)

    return compute_metrics


def load_mean_iou():
    import evaluate

    return evaluate.load(MEAN_IOU)


__all__ = [
    "MEAN_IOU",
    "TOP_K_ACCURACY",
    "MeanIoU",
    "load_mean_iou",
    "load_top_k_accuracy",
    "mean_iou",
    "scores_from_confusion",
    "segmentation_confusion_matrix",
    "top_k_compute_metrics",
]
