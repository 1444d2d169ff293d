"""Metric scripts for ``evaluate`` that ship with the package (the Hub's metric scripts cannot be downloaded
offline). ``evaluate.load(TOP_K_ACCURACY)`` loads the top-1 / top-k accuracy metric, ``evaluate.load(MEAN_IOU)``
mean IoU for semantic segmentation. ``MeanIoU`` / ``mean_iou`` compute the same scores without ``evaluate``."""

from pathlib import Path

from .segmentation import MeanIoU, mean_iou, scores_from_confusion, segmentation_confusion_matrix

TOP_K_ACCURACY = str(Path(__file__).with_name("top_k_accuracy.py"))
MEAN_IOU = str(Path(__file__).with_name("mean_iou.py"))


def load_top_k_accuracy():
    import evaluate

    return evaluate.load(TOP_K_ACCURACY)


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
]
