"""Mean IoU for semantic segmentation as an ``evaluate`` metric: predictions and references are (H, W) class-id
maps, one per image; the scores come from ``convnextv2_hf.metrics.segmentation``."""

import datasets
import evaluate
import numpy as np

from convnextv2_hf.metrics.segmentation import IGNORE_INDEX, mean_iou


class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Intersection over union per class, averaged over the classes present (semantic segmentation).",
            citation="",
            inputs_description=(
                "predictions, references: (H, W) class-id maps, one per image; num_labels: int; "
                f"ignore_index: reference value left out (default {IGNORE_INDEX})"
            ),
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index: int | None = IGNORE_INDEX):
        # images may differ in size: flatten each pair, the counts do not depend on the layout
        flat_predictions = np.concatenate([np.asarray(p).reshape(-1) for p in predictions])
        flat_references = np.concatenate([np.asarray(r).reshape(-1) for r in references])
        return mean_iou(flat_predictions, flat_references, num_labels, ignore_index)
