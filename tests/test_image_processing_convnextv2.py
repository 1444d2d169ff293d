"""Processors against the official evaluation transform, on real photographs shipped by scikit-image."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import randomize_, tiny_config
from skimage import data as skimage_data
from torchvision import transforms as T
from transformers import AutoImageProcessor, pipeline

from convnextv2_hf import (
    ConvNextV2ForImageClassification,
    ConvNextV2ImageProcessor,
    ConvNextV2ImageProcessorPil,
)

PIL_TOLERANCE = 1e-4  # max abs difference, PIL backend
TORCHVISION_MEAN_TOLERANCE = 0.02  # mean abs difference, torchvision backend (tensor bicubic vs PIL bicubic)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photos() -> dict[str, PIL.Image.Image]:
    return {
        "chelsea (cat)": PIL.Image.fromarray(skimage_data.chelsea()),  # 300x451
        "astronaut": PIL.Image.fromarray(skimage_data.astronaut()),  # 512x512
        "coffee": PIL.Image.fromarray(skimage_data.coffee()),  # 400x600
        "rocket": PIL.Image.fromarray(skimage_data.rocket()),  # 427x640
    }


def official_transform(size: int) -> T.Compose:
    if size < 384:
        resize = [T.Resize(int(size / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    else:
        resize = [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(MEAN, STD)])


@pytest.mark.parametrize("size", [224, 384])
def test_pil_backend_matches_the_official_transform(size):
    processor = ConvNextV2ImageProcessorPil(size={"shortest_edge": size})
    for name, image in photos().items():
        got = processor(image, return_tensors="pt")["pixel_values"][0]
        expected = official_transform(size)(image)
        assert got.shape == expected.shape == (3, size, size), name
        assert (got - expected).abs().max().item() <= PIL_TOLERANCE, name


@pytest.mark.parametrize("size", [224, 384])
def test_torchvision_backend_is_close_to_the_official_transform(size):
    processor = ConvNextV2ImageProcessor(size={"shortest_edge": size})
    differences = []
    for name, image in photos().items():
        got = processor(image, return_tensors="pt")["pixel_values"][0]
        expected = official_transform(size)(image)
        assert got.shape == expected.shape, name
        differences.append((got - expected).abs().mean().item())
    assert max(differences) <= TORCHVISION_MEAN_TOLERANCE, differences


def test_defaults_are_the_official_evaluation_transform():
    for processor in (ConvNextV2ImageProcessor(), ConvNextV2ImageProcessorPil()):
        assert list(processor.image_mean) == list(MEAN) and list(processor.image_std) == list(STD)
        assert processor.size["shortest_edge"] == 224 and processor.crop_pct == 0.875
        assert int(processor.resample) == int(PIL.Image.Resampling.BICUBIC)


def test_non_rgb_images_are_converted_and_mixed_sizes_batch():
    camera = PIL.Image.fromarray(skimage_data.camera())  # grayscale 512x512
    rgba = PIL.Image.fromarray(skimage_data.chelsea()).convert("RGBA")
    palette = PIL.Image.fromarray(skimage_data.coffee()).convert("P")
    for processor in (ConvNextV2ImageProcessor(), ConvNextV2ImageProcessorPil()):
        batch = processor([camera, rgba, palette, photos()["rocket"]], return_tensors="pt")["pixel_values"]
        assert batch.shape == (4, 3, 224, 224)
        gray = batch[0]
        # a grey image stays grey: the three channels are the same value before normalisation
        unnormalised = gray * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        assert (unnormalised[0] - unnormalised[1]).abs().max() <= 1e-2


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], "the batch of images is empty"),
        ([PIL.Image.new("RGB", (0, 10))], r"image 0 has no pixels \(size \(0, 10\)\)"),
        ([np.zeros((10, 0, 3), dtype=np.uint8)], "image 0 has no pixels"),
        ([PIL.Image.new("RGB", (40, 40)), "cat.jpg"], "image 1 is not an image.*'cat.jpg'"),
        ([PIL.Image.new("RGB", (40, 40)), {"a": 1}], "image 1 is not an image"),
        (np.zeros((5,)), "image 0 is not an image.*ndarray with shape \\(5,\\)"),
    ],
)
@pytest.mark.parametrize("processor_class", [ConvNextV2ImageProcessor, ConvNextV2ImageProcessorPil])
def test_bad_input_raises_value_error_naming_it(processor_class, images, message):
    with pytest.raises(ValueError, match=message):
        processor_class()(images, return_tensors="pt")


def save_classifier_folder(path, num_labels=3):
    config = tiny_config(
        num_labels=num_labels,
        id2label={0: "cat", 1: "coffee", 2: "rocket"},
        label2id={"cat": 0, "coffee": 1, "rocket": 2},
    )
    model = randomize_(ConvNextV2ForImageClassification(config)).eval()
    model.save_pretrained(path)
    ConvNextV2ImageProcessor().save_pretrained(path)
    return model


def test_auto_image_processor_gives_our_classes_for_both_backends(tmp_path):
    save_classifier_folder(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is ConvNextV2ImageProcessor
    assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")) is ConvNextV2ImageProcessorPil


def test_saved_processor_gives_the_same_pixels_with_stock_transformers(tmp_path):
    """Stock transformers falls back to its ConvNeXt processor with our saved values. Same pixels at 224 when the
    crop margin is even (the cat) and at 384 (warp, no crop); at 224 with an odd margin (the rocket) its crop sits
    one pixel off the official one, which ours follows."""
    cases = {"cat224": ("chelsea (cat)", 224), "rocket384": ("rocket", 384)}
    for folder, (photo_name, size) in cases.items():
        save_classifier_folder(tmp_path / folder)
        ConvNextV2ImageProcessor(size={"shortest_edge": size}).save_pretrained(tmp_path / folder)
        photos()[photo_name].save(tmp_path / folder / "photo.png")
    folders = json.dumps(list(cases))
    script = f"""
import sys, json; sys.modules['convnextv2_hf'] = None
import PIL.Image, torch
from transformers import AutoImageProcessor
out = {{}}
for folder in {folders}:
    for backend in ("torchvision", "pil"):
        p = AutoImageProcessor.from_pretrained(folder, backend=backend)
        out[folder + backend] = type(p).__name__
        pixels = p(PIL.Image.open(folder + "/photo.png"), return_tensors="pt")["pixel_values"]
        torch.save(pixels, folder + backend + ".pt")
print(json.dumps(out))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    classes = json.loads(result.stdout.strip().splitlines()[-1])
    for folder, (photo_name, _) in cases.items():
        for backend in ("torchvision", "pil"):
            assert classes[folder + backend].startswith("ConvNextImageProcessor")  # the built-in class
            ours = AutoImageProcessor.from_pretrained(tmp_path / folder, backend=backend)
            expected = ours(photos()[photo_name], return_tensors="pt")["pixel_values"]
            got = torch.load(tmp_path / f"{folder}{backend}.pt")
            assert (got - expected).abs().max().item() <= 1e-4, (folder, backend)


def test_pipeline_classifies_single_images_and_batches_offline(tmp_path):
    model = save_classifier_folder(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path), device="cpu")
    assert type(classifier.model).__name__ == "ConvNextV2ForImageClassification"
    assert type(classifier.image_processor) is ConvNextV2ImageProcessor
    images = list(photos().values())[:3]
    single = classifier(images[0], top_k=2)
    assert len(single) == 2 and {r["label"] for r in single} <= {"cat", "coffee", "rocket"}
    batch = classifier(images, top_k=1)
    assert len(batch) == 3 and all(len(r) == 1 for r in batch)
    # the pipeline's scores are the model's softmax on the processor's pixels
    pixels = ConvNextV2ImageProcessor()(images[0], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = model(pixels).logits.softmax(-1)[0]
    assert abs(single[0]["score"] - probabilities.max().item()) <= 1e-4
    assert single[0]["label"] == model.config.id2label[int(probabilities.argmax())]
    from_objects = pipeline("image-classification", model=model, image_processor=ConvNextV2ImageProcessorPil())
    assert from_objects(images[0], top_k=1)[0]["label"] == single[0]["label"]
