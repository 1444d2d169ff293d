import numpy as np
import pytest
import torch
from helpers import LabelledImages, tiny_config

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


def test_top_k_accuracy_reads_class_ids_as_exact_top_1_and_refuses_top_k_from_ids():
    """What evaluate.evaluator passes: one class id per image. Top-1 is exact; top-k cannot be known from ids."""
    metric = load_top_k_accuracy()
    assert metric.compute(predictions=[1, 0, 2, 2], references=[1, 1, 2, 0]) == {"accuracy": 0.5}
    assert metric.compute(predictions=[1, 0, 2, 2], references=[1, 1, 2, 0], k=1) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match=r"top-5 accuracy needs \(N, num_labels\) scores, but the predictions are"):
        metric.compute(predictions=[1, 0], references=[1, 1], k=5)
    metric.add_batch(predictions=[1, 0], references=[1, 1])
    metric.add_batch(predictions=[2, 2], references=[2, 0])
    assert metric.compute() == {"accuracy": 0.5}
    # scores without k: the default k of 5, as before
    assert metric.compute(predictions=np.eye(3), references=[0, 1, 1]) == {"accuracy": 2 / 3, "top5_accuracy": 1.0}


def _toy_classifier(num_labels: int = 5):
    from convnextv2_hf import ConvNextV2ForImageClassification

    torch.manual_seed(0)
    return ConvNextV2ForImageClassification(tiny_config(num_labels=num_labels)).eval()


def test_top_k_accuracy_in_a_trainer_compute_metrics(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, data = _toy_classifier(), LabelledImages(count=12, size=32, seed=0)
    metric = load_top_k_accuracy()

    def compute_metrics(prediction):
        return metric.compute(predictions=prediction.predictions, references=prediction.label_ids, k=2)

    args = TrainingArguments(str(tmp_path), use_cpu=True, per_device_eval_batch_size=5, report_to="none")
    scores = Trainer(model=model, args=args, eval_dataset=data, compute_metrics=compute_metrics).evaluate()
    with torch.no_grad():
        logits = model(data.pixels).logits
    top2 = logits.topk(2, dim=1).indices
    assert scores["eval_accuracy"] == pytest.approx((top2[:, 0] == data.labels).float().mean().item())
    assert scores["eval_top2_accuracy"] == pytest.approx((top2 == data.labels[:, None]).any(1).float().mean().item())


def test_top_k_accuracy_leaves_out_ignored_references_and_refuses_bad_k_and_nan_scores():
    metric = load_top_k_accuracy()
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    # -100 (the Trainer's label padding) is not a wrong answer: rows 1 and 3 are scored alone
    assert metric.compute(predictions=scores, references=[-100, 2, -100, 1], k=2) == {
        "accuracy": 0.0,
        "top2_accuracy": 0.5,
    }
    assert metric.compute(predictions=[1, 0, 2, 2], references=[1, -100, 2, 0]) == {"accuracy": 2 / 3}
    with pytest.raises(ValueError, match=r"every reference is below 0"):
        metric.compute(predictions=scores[:2], references=[-100, -100], k=2)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"k must be a whole number >= 1"):
            metric.compute(predictions=scores, references=[1, 1, 0, 1], k=k)
    nan_row = scores.copy()
    nan_row[2] = np.nan  # argsort puts a NaN first: it would count as a hit in every top k
    with pytest.raises(ValueError, match=r"1 of 4 rows of scores hold NaN or infinite values"):
        metric.compute(predictions=nan_row, references=[1, 1, 0, 1], k=2)


def test_top_k_compute_metrics_takes_output_tuples_tensors_and_padded_labels(tmp_path):
    """A Trainer whose model also returns hidden states hands over (logits, hidden_states): evaluate cannot read the
    tuple, top_k_compute_metrics takes the logits out of it. Labels of -100 are left out."""
    from transformers import EvalPrediction, Trainer, TrainingArguments

    from convnextv2_hf.metrics import top_k_compute_metrics

    model, data = _toy_classifier(), LabelledImages(count=12, size=32, seed=0)
    model.config.output_hidden_states = True
    data.labels[[0, 5]] = -100
    args = TrainingArguments(str(tmp_path), use_cpu=True, per_device_eval_batch_size=5, report_to="none")
    scores = Trainer(model=model, args=args, eval_dataset=data, compute_metrics=top_k_compute_metrics(k=2)).evaluate()
    with torch.no_grad():
        logits = model(data.pixels).logits
    kept = data.labels >= 0
    top2, labels = logits[kept].topk(2, dim=1).indices, data.labels[kept]
    assert scores["eval_accuracy"] == pytest.approx((top2[:, 0] == labels).float().mean().item())
    assert scores["eval_top2_accuracy"] == pytest.approx((top2 == labels[:, None]).any(1).float().mean().item())
    # torch tensors, bf16 logits included (numpy has no bfloat16)
    tensors = EvalPrediction(predictions=(logits.bfloat16(), torch.zeros(12, 4)), label_ids=data.labels)
    assert top_k_compute_metrics(k=2)(tensors)["top2_accuracy"] == pytest.approx(scores["eval_top2_accuracy"])


@pytest.mark.slow
def test_top_k_accuracy_with_evaluate_evaluator_on_a_local_pipeline(tmp_path):
    """A real evaluate.evaluator("image-classification") run, offline, on a tiny saved classifier: it passes the
    pipeline's best label as an id, and the metric gives the exact top-1 accuracy of those predictions. (evaluate
    0.4.6 cannot take a Pipeline object under transformers 5: it looks up transformers.TFPreTrainedModel, gone in
    5; a model folder works.)"""
    import datasets
    import evaluate
    import PIL.Image

    from convnextv2_hf import ConvNextV2ImageProcessor

    labels = {0: "a", 1: "b", 2: "c"}
    model = _toy_classifier(num_labels=3)
    model.config.id2label, model.config.label2id = labels, {name: i for i, name in labels.items()}
    model.save_pretrained(tmp_path)
    ConvNextV2ImageProcessor(size={"shortest_edge": 32}).save_pretrained(tmp_path)
    rng = np.random.RandomState(0)
    images = [PIL.Image.fromarray(rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(9)]
    truth = [0, 1, 2] * 3
    data = datasets.Dataset.from_dict({"image": images, "label": truth}).cast_column("image", datasets.Image())
    result = evaluate.evaluator("image-classification").compute(
        model_or_pipeline=str(tmp_path), data=data, metric=load_top_k_accuracy(), label_mapping=model.config.label2id
    )
    processor = ConvNextV2ImageProcessor.from_pretrained(tmp_path)
    with torch.no_grad():  # the pipeline's best label: the arg-max of the model's logits on the processor's pixels
        predicted = model(processor(data["image"], return_tensors="pt")["pixel_values"]).logits.argmax(-1).tolist()
    expected = float(np.mean(np.asarray(predicted) == np.asarray(truth)))
    assert 0 < expected < 1  # the toy model gets some right and some wrong: the count is informative
    assert result["accuracy"] == pytest.approx(expected)
    assert not any(key.startswith("top") for key in result)  # ids say nothing about the top k


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
    assert (
        mean_iou(np.array([[1, 1]]), np.array([[-100, 255]]), num_labels=2)["per_category_iou"]
        == [pytest.approx(np.nan, nan_ok=True)] * 2
    )


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
