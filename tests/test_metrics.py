import numpy as np
import pytest
import torch

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


# --- mean IoU for semantic segmentation ------------------------------------------------------------------


def segmentation_pair():
    """2 images of 2x3 pixels, 3 classes, one pixel ignored (255). Counted by hand below."""
    references = np.array([[[0, 0, 1], [1, 2, 255]], [[0, 1, 1], [2, 2, 0]]])
    predictions = np.array([[[0, 1, 1], [1, 2, 0]], [[0, 1, 2], [2, 0, 0]]])
    # (true, predicted) over the 11 counted pixels (the ignored pixel's prediction 0 is not counted):
    # (0,0) x3, (0,1), (1,1) x3, (1,2), (2,2) x2, (2,0). Class 0: true 4, predicted 4, both 3 -> IoU 3 / 5;
    # class 1: 4, 4, 3 -> 3 / 5; class 2: 3, 3, 2 -> 2 / 4. Recall: 3 / 4, 3 / 4, 2 / 3.
    return predictions, references, [3 / 5, 3 / 5, 2 / 4], [3 / 4, 3 / 4, 2 / 3]


def test_mean_iou_counts_by_hand():
    from convnextv2_hf.metrics import mean_iou

    predictions, references, iou, recall = segmentation_pair()
    scores = mean_iou(predictions, references, num_labels=3)
    assert scores["per_category_iou"] == pytest.approx(iou)
    assert scores["mean_iou"] == pytest.approx(np.mean(iou))
    assert scores["per_category_accuracy"] == pytest.approx(recall)
    assert scores["overall_accuracy"] == pytest.approx(8 / 11)


def test_mean_iou_leaves_absent_classes_out_and_counts_missed_ones_as_zero():
    from convnextv2_hf.metrics import mean_iou

    references = np.array([[0, 0, 1, 1]])
    scores = mean_iou(np.array([[0, 0, 0, 0]]), references, num_labels=4)  # class 1 missed; 2 and 3 absent
    assert scores["per_category_iou"][:2] == [0.5, 0.0] and np.isnan(scores["per_category_iou"][2:]).all()
    assert scores["mean_iou"] == 0.25
    # the Trainer's -100 padding is not counted, nor is the ignore index
    assert mean_iou(np.array([[1, 1]]), np.array([[-100, 255]]), num_labels=2)["per_category_iou"] == [
        pytest.approx(np.nan, nan_ok=True)
    ] * 2


def test_mean_iou_accumulates_batches_and_takes_trainer_logits():
    from transformers import EvalPrediction

    from convnextv2_hf.metrics import MeanIoU, mean_iou

    predictions, references, iou, _ = segmentation_pair()
    metric = MeanIoU(num_labels=3)
    logits = np.eye(3)[predictions].transpose(0, 3, 1, 2)  # (N, K, H, W) one-hot: argmax gives the predictions
    assert metric(EvalPrediction(predictions=logits[:1], label_ids=references[:1]), compute_result=False) == {}
    result = metric(EvalPrediction(predictions=torch.as_tensor(logits[1:]), label_ids=references[1:]))
    assert result["mean_iou"] == pytest.approx(np.mean(iou)) and "per_category_iou" not in result
    assert metric.confusion.sum() == 0  # reset for the next evaluation
    assert mean_iou(predictions, references, 3)["mean_iou"] == pytest.approx(result["mean_iou"])


def test_mean_iou_rejects_mismatched_shapes_and_out_of_range_predictions():
    from convnextv2_hf.metrics import mean_iou

    with pytest.raises(ValueError, match=r"predictions \(1, 2\) and references \(1, 3\) differ in shape"):
        mean_iou(np.zeros((1, 2)), np.zeros((1, 3)), num_labels=2)
    with pytest.raises(ValueError, match=r"predictions must be class ids in \[0, 2\), got values from 0 to 5"):
        mean_iou(np.array([0, 5]), np.array([0, 1]), num_labels=2)


def test_mean_iou_loads_offline_through_evaluate_with_images_of_different_sizes():
    from convnextv2_hf.metrics import load_mean_iou

    predictions, references, iou, _ = segmentation_pair()
    metric = load_mean_iou()
    metric.add_batch(predictions=list(predictions), references=list(references))
    metric.add(predictions=np.array([[2]]), references=np.array([[2]]))  # a 1x1 image: one more class-2 hit
    scores = metric.compute(num_labels=3)
    assert scores["per_category_iou"] == pytest.approx([3 / 5, 3 / 5, 3 / 5])  # class 2: 4, 4, 3
