"""Training transforms and the MixUp/CutMix collator, on real photographs shipped by scikit-image."""

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from expected_errors import EVERY_IMAGE_OF_BATCH_SKIPPED, FOLDER_HOLDS_NO_IMAGES, SKIPPING_UNREADABLE_IMAGE
from helpers import tiny_config
from skimage import data as skimage_data

from convnextv2_hf import ConvNextV2ForImageClassification
from convnextv2_hf.training import FCMAECollator
from convnextv2_hf.transforms import (
    MixUpCutMixCollator,
    fcmae_evaluation_transform,
    fcmae_pretraining_transform,
    finetuning_transform,
    image_folder_dataset,
    load_image,
    with_example_index,
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
    with pytest.raises(ValueError, match=FOLDER_HOLDS_NO_IMAGES):
        image_folder_dataset(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        image_folder_dataset(tmp_path / "missing")


def test_fcmae_evaluation_transform_is_deterministic_and_centred():
    transform = fcmae_evaluation_transform(64)
    torch.manual_seed(0)
    first = torch.stack([transform(image) for image in photos()])
    torch.manual_seed(1)
    assert torch.equal(torch.stack([transform(image) for image in photos()]), first)
    assert first.shape == (3, 3, 64, 64)


def test_example_index_wrapper_adds_index_and_fields_in_single_and_batched_access(tmp_path):
    write_image_folder(tmp_path)
    split = image_folder_dataset(tmp_path, fcmae_pretraining_transform(32))["train"]
    indexed = with_example_index(split, fixed_mask=True)
    assert len(indexed) == 6
    assert indexed[4]["index"] == 4 and indexed[4]["fixed_mask"] is True and indexed[4]["labels"] == 1
    batch = indexed.__getitems__([5, 0, 2])
    assert [example["index"] for example in batch] == [5, 0, 2] and [e["labels"] for e in batch] == [1, 0, 0]
    assert all(example["pixel_values"].shape == (3, 32, 32) for example in batch)


def write_folder_with_unreadable_images(root):
    """Two classes of real photos; one truncated PNG, one truncated JPEG (half their bytes) among them."""
    write_image_folder(root, per_class=3)
    jpeg = root / "train" / "cat" / "1.jpg"
    PIL.Image.open(root / "train" / "cat" / "1.png").save(jpeg, quality=90)
    (root / "train" / "cat" / "1.png").unlink()
    bad = [jpeg, root / "train" / "coffee" / "2.png"]
    for path in bad:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return bad


def test_a_truncated_image_is_an_error_naming_the_file(tmp_path):
    bad_jpeg, bad_png = write_folder_with_unreadable_images(tmp_path)
    train = image_folder_dataset(tmp_path, finetuning_transform(32))["train"]
    readable = [i for i in range(len(train)) if i not in (1, 5)]
    assert all(train[i]["pixel_values"].shape == (3, 32, 32) for i in readable)
    for index, path in ((1, bad_jpeg), (5, bad_png)):
        with pytest.raises(ValueError, match=f"cannot read image {path}: image file is truncated.*skip_corrupt_images"):
            train[index]
    with pytest.raises(ValueError, match=f"cannot read image {bad_jpeg}"):
        train[:]  # a whole batch too: the first unreadable file is named


def test_skip_corrupt_images_warns_and_the_collators_leave_them_out(tmp_path, caplog):
    bad_jpeg, bad_png = write_folder_with_unreadable_images(tmp_path)
    train = image_folder_dataset(tmp_path, finetuning_transform(32), skip_corrupt_images=True)["train"]
    with caplog.at_level("WARNING"):
        examples = [train[i] for i in range(len(train))]
    warned = [record.getMessage() for record in caplog.records if SKIPPING_UNREADABLE_IMAGE in record.getMessage()]
    assert len(warned) == 2 and str(bad_jpeg) in warned[0] and str(bad_png) in warned[1]
    assert [example["pixel_values"] is None for example in examples] == [False, True, False, False, False, True]
    batch = MixUpCutMixCollator(num_labels=2, mixup_alpha=0, cutmix_alpha=0)(examples)
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].tolist() == [0, 0, 1, 1]
    fcmae = FCMAECollator(tiny_config(), image_size=32 * 2)
    assert fcmae([dict(e, pixel_values=torch.zeros(3, 64, 64)) for e in examples[:2]])["pixel_values"].shape[0] == 2
    assert fcmae([examples[1], examples[0] | {"pixel_values": torch.zeros(3, 64, 64)}])["noise"].shape == (1, 4)
    for collator in (MixUpCutMixCollator(num_labels=2), fcmae):
        with pytest.raises(ValueError, match=EVERY_IMAGE_OF_BATCH_SKIPPED):
            collator([examples[1], examples[5]])


def test_load_image_reads_paths_bytes_and_pil_images(tmp_path):
    path = tmp_path / "cat.png"
    photos()[0].save(path)
    from_path = load_image(str(path))
    from_bytes = load_image({"bytes": path.read_bytes(), "path": None})
    assert from_path.size == from_bytes.size == (451, 300)
    assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))
    with pytest.raises(ValueError, match="cannot read image an image given as bytes"):
        load_image(b"not an image")
    assert load_image(b"not an image", skip_corrupt_images=True) is None
