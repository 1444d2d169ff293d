"""Training transforms and the MixUp/CutMix collator, on real photographs shipped by scikit-image."""

import datasets
import PIL.Image
import pytest
import torch
from conftest import tiny_config
from skimage import data as skimage_data

from convnextv2_hf import ConvNextV2ForImageClassification
from convnextv2_hf.transforms import (
    MixUpCutMixCollator,
    fcmae_pretraining_transform,
    finetuning_transform,
    image_folder_dataset,
    with_image_transform,
)


def photos() -> list[PIL.Image.Image]:
    return [
        PIL.Image.fromarray(skimage_data.chelsea()),
        PIL.Image.fromarray(skimage_data.camera()),
        PIL.Image.fromarray(skimage_data.coffee()).convert("RGBA"),
    ]


@pytest.mark.parametrize("make", [fcmae_pretraining_transform, finetuning_transform])
def test_transforms_give_normalised_rgb_crops_and_are_deterministic_under_a_seed(make):
    transform = make(96)
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append(torch.stack([transform(image) for image in photos()]))
    assert outputs[0].shape == (3, 3, 96, 96) and outputs[0].dtype == torch.float32
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])
    assert -3.0 < outputs[0].mean().item() < 3.0


def test_fcmae_crops_cover_at_least_a_fifth_of_the_image():
    transform = fcmae_pretraining_transform(64)
    crop = transform.transforms[1]
    torch.manual_seed(0)
    image = photos()[0]
    areas = []
    for _ in range(200):
        params = crop.make_params([image])
        areas.append(params["height"] * params["width"] / (image.width * image.height))
    assert min(areas) >= 0.2 * 0.9 and max(areas) <= 1.0


def examples(count=8, num_labels=4, mixable=True):
    return [
        {"pixel_values": torch.randn(3, 32, 32), "labels": i % num_labels, "mixable": mixable} for i in range(count)
    ]


def test_collator_leaves_unmarked_evaluation_batches_alone():
    batch = examples(4, mixable=False)
    collated = MixUpCutMixCollator(num_labels=4)(batch)
    assert torch.equal(collated["labels"], torch.tensor([0, 1, 2, 3]))
    assert torch.equal(collated["pixel_values"], torch.stack([e["pixel_values"] for e in batch]))


def test_collator_mixes_images_and_gives_smoothed_soft_labels():
    collator = MixUpCutMixCollator(num_labels=4, label_smoothing=0.1)
    torch.manual_seed(0)
    batch = collator(examples())
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    labels = batch["labels"]
    assert labels.shape == (8, 4) and labels.dtype == torch.float32
    assert torch.allclose(labels.sum(-1), torch.ones(8))
    assert labels.min() >= 0.1 / 4 - 1e-6  # smoothing floor
    assert (labels > 0.1 / 4 + 1e-6).sum(-1).max() == 2  # two classes mixed per sample
    torch.manual_seed(0)
    assert torch.equal(collator(examples())["labels"], labels)


def test_collator_without_mixing_only_smooths():
    batch = MixUpCutMixCollator(num_labels=4, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.2)(examples(4))
    expected = torch.full((4, 4), 0.05) + 0.8 * torch.eye(4)
    assert torch.allclose(batch["labels"], expected)


def test_classifier_trains_on_collated_soft_labels():
    model = ConvNextV2ForImageClassification(tiny_config(num_labels=4))
    batch = MixUpCutMixCollator(num_labels=4)(
        [{"pixel_values": torch.randn(3, 64, 64), "labels": i % 4, "mixable": True} for i in range(4)]
    )
    loss = model(**batch).loss
    expected = -(batch["labels"] * model(batch["pixel_values"]).logits.log_softmax(-1)).sum(-1).mean()
    assert abs(loss.item() - expected.item()) <= 1e-5
    loss.backward()


def test_collator_rejects_bad_settings():
    with pytest.raises(ValueError, match="at least 2 labels"):
        MixUpCutMixCollator(num_labels=1)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        MixUpCutMixCollator(num_labels=3, label_smoothing=1.0)


def write_image_folder(root, per_class=3):
    """A real image folder on disk: crops of two scikit-image photos as two classes, train and validation."""
    sources = {"cat": skimage_data.chelsea(), "coffee": skimage_data.coffee()}
    for split in ("train", "validation"):
        for name, array in sources.items():
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                PIL.Image.fromarray(array[i * 20 : i * 20 + 200, i * 30 : i * 30 + 250]).save(
                    root / split / name / f"{i}.png"
                )


def test_image_folder_dataset_applies_the_transform_to_every_split(tmp_path):
    write_image_folder(tmp_path)
    splits = image_folder_dataset(tmp_path)
    splits = {
        name: with_image_transform(split, finetuning_transform(64), mixable=True) for name, split in splits.items()
    }
    assert set(splits) == {"train", "validation"}
    example = splits["train"][0]
    assert set(example) == {"pixel_values", "labels", "mixable"}
    assert example["pixel_values"].shape == (3, 64, 64)
    assert sorted(e["labels"] for e in splits["validation"]) == [0, 0, 0, 1, 1, 1]
    batch = MixUpCutMixCollator(num_labels=2)([splits["train"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["labels"].shape == (4, 2)


def test_with_image_transform_on_an_in_memory_dataset_and_bad_columns():
    dataset = datasets.Dataset.from_dict({"img": photos()[:2], "y": [1, 0]}).cast_column("img", datasets.Image())
    transformed = with_image_transform(dataset, fcmae_pretraining_transform(32), image_column="img", label_column="y")
    assert transformed[1]["pixel_values"].shape == (3, 32, 32) and transformed[1]["labels"] == 0
    unlabelled = with_image_transform(dataset, fcmae_pretraining_transform(32), image_column="img", label_column=None)
    assert set(unlabelled[0]) == {"pixel_values"}
    with pytest.raises(ValueError, match="image column 'image' not in the dataset's columns \\['img', 'y'\\]"):
        with_image_transform(dataset, fcmae_pretraining_transform(32))
    with pytest.raises(ValueError, match="label column 'label' not in"):
        with_image_transform(dataset, fcmae_pretraining_transform(32), image_column="img")


def test_image_folder_without_images_is_a_value_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        image_folder_dataset(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        image_folder_dataset(tmp_path / "missing")
