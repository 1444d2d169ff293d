"""examples/evaluate_classifier.py: which split it evaluates, and the clear errors for data and files it cannot use."""

import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from expected_errors import IMAGES_NOT_IN_CLASS_FOLDERS
from helpers import tiny_config

from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import evaluate_classifier  # noqa: E402

# images per class in each split: a model that always answers "b" scores the share of "b" images
SPLITS = {"train": {"a": 1, "b": 1}, "validation": {"a": 1, "b": 3}, "test": {"a": 3, "b": 1}}


@pytest.fixture(scope="module")
def always_b(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classifier")
    model = ConvNextV2ForImageClassification(
        tiny_config(num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    )
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 1.0]))
    model.save_pretrained(folder)
    ConvNextV2ImageProcessor(size={"shortest_edge": 64}).save_pretrained(folder)
    return folder


def image_folder(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    for split, counts in splits.items():
        for name, count in counts.items():
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                PIL.Image.new("RGB", (72, 72), color=(30 * i, 90, 150)).save(folder / f"{i}.png")
    return root


def evaluate(model: Path, *extra: str) -> dict:
    return evaluate_classifier.main(["--model_name_or_path", str(model), "--device", "cpu", *extra])


def test_validation_is_the_default_split_and_split_picks_another(always_b, tmp_path):
    data = image_folder(tmp_path / "data", SPLITS)
    results = evaluate(always_b, "--data_dir", str(data))
    assert results == {"accuracy": 0.75, "top5_accuracy": 1.0, "num_images": 4, "split": "validation"}
    assert evaluate(always_b, "--data_dir", str(data), "--split", "test")["accuracy"] == 0.25
    assert evaluate(always_b, "--data_dir", str(data), "--split", "train")["accuracy"] == 0.5


def test_a_class_folder_is_evaluated_whole(always_b, tmp_path):
    data = image_folder(tmp_path / "data", {"": {"a": 2, "b": 3}})
    results = evaluate(always_b, "--data_dir", str(data))
    assert results["accuracy"] == 0.6 and results["num_images"] == 5 and "split" not in results
    with pytest.raises(ValueError, match=r"--split test: .* has no split sub-folders .* evaluated whole"):
        evaluate(always_b, "--data_dir", str(data), "--split", "test")


def test_no_guessing_when_validation_is_missing(always_b, tmp_path):
    data = image_folder(tmp_path / "data", {"train": SPLITS["train"], "test": SPLITS["test"]})
    message = r"has no 'validation' split \(--split defaults to validation\); its splits are \['test', 'train'\]"
    with pytest.raises(ValueError, match=message):
        evaluate(always_b, "--data_dir", str(data))
    with pytest.raises(ValueError, match=r"has no 'dev' split; its splits are \['test', 'train'\]: choose one"):
        evaluate(always_b, "--data_dir", str(data), "--split", "dev")


def test_a_datasets_dataset_gets_the_same_split_rule(always_b, tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    image = PIL.Image.new("RGB", (64, 64))
    splits = DatasetDict(
        train=Dataset.from_dict({"image": [image] * 2, "label": [0, 1]}, features=features),
        test=Dataset.from_dict({"image": [image] * 4, "label": [1, 1, 1, 0]}, features=features),
    )
    # a local dataset folder of parquet files, as the Hub stores them, loads through load_dataset
    for name, split in splits.items():
        split.to_parquet(str(tmp_path / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"no 'validation' split .*\['test', 'train'\]"):
        evaluate(always_b, "--dataset_name", str(tmp_path / "parquet"))
    assert evaluate(always_b, "--dataset_name", str(tmp_path / "parquet"), "--split", "test")["accuracy"] == 0.75


def test_images_without_class_folders_get_a_clear_message(always_b, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        PIL.Image.new("RGB", (64, 64)).save(flat / f"{i}.png")
    with pytest.raises(ValueError, match=IMAGES_NOT_IN_CLASS_FOLDERS):
        evaluate(always_b, "--data_dir", str(flat))
    split_without_classes = tmp_path / "splits"
    for split in ("train", "validation"):
        (split_without_classes / split).mkdir(parents=True)
        PIL.Image.new("RGB", (64, 64)).save(split_without_classes / split / "0.png")
    with pytest.raises(ValueError, match=r"the images of split 'validation' of .* are not in class sub-folders"):
        evaluate(always_b, "--data_dir", str(split_without_classes))


def test_bad_sources_are_refused_before_the_model_is_read(tmp_path):
    missing_model = str(tmp_path / "no_model")
    with pytest.raises(ValueError, match="give exactly one of --data_dir and --dataset_name"):
        evaluate(Path(missing_model))
    with pytest.raises(ValueError, match="is not a folder"):
        evaluate(Path(missing_model), "--data_dir", str(tmp_path / "nowhere"))


def test_a_truncated_model_file_is_named(always_b, tmp_path):
    import shutil

    model = Path(shutil.copytree(always_b, tmp_path / "model"))
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    folder = image_folder(tmp_path / "data", {"": {"a": 1, "b": 1}})
    with pytest.raises(ValueError, match=r"model/model\.safetensors is not a complete safetensors file"):
        evaluate(model, "--data_dir", str(folder))


def test_class_folders_must_be_labels_of_the_model(always_b, tmp_path):
    data = image_folder(tmp_path / "data", {"": {"a": 1, "cat": 1}})
    with pytest.raises(ValueError, match=r"classes \['cat'\] are not labels of the model \(\['a', 'b'\]\)"):
        evaluate(always_b, "--data_dir", str(data))
