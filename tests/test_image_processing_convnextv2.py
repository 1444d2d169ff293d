"""Processors against the official evaluation transform, on real photographs shipped by scikit-image."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from expected_errors import (
    CROP_PCT_OUT_OF_RANGE,
    EMPTY_BATCH_OF_IMAGES,
    IMAGE_MEAN_WRONG_LENGTH,
    IMAGE_STD_NOT_POSITIVE,
    RESCALE_FACTOR_NOT_POSITIVE,
    SHORTEST_EDGE_NOT_POSITIVE,
    SIZE_NOT_SHORTEST_EDGE,
)
from helpers import randomize_, tiny_config
from huggingface_hub.errors import StrictDataclassError
from skimage import data as skimage_data
from torchvision import transforms as T
from transformers import AutoImageProcessor, ConvNextImageProcessor, ConvNextImageProcessorPil, pipeline

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


BACKENDS = [ConvNextV2ImageProcessor, ConvNextV2ImageProcessorPil]
ONE_LEVEL = 1 / 255  # one 8-bit step, in pixel values before normalisation


def unnormalised(pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixel values back in [0, 1] (before mean/std), where one 8-bit step is 1/255."""
    return pixel_values * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def grey_scene(height: int = 48, width: int = 64) -> np.ndarray:
    """An 8-bit grey image with a full 0..255 gradient and texture, so resize and crop see structure."""
    gradient = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    texture = np.random.RandomState(0).randint(-20, 21, (height, width))
    return np.clip(gradient + texture, 0, 255).round().astype(np.uint8)


def sixteen_bit(eight_bit: np.ndarray) -> np.ndarray:
    """The 16-bit version of an 8-bit image, with low-order bits that rounding to 8 bits must drop."""
    offsets = np.random.RandomState(1).randint(-120, 121, eight_bit.shape)
    return np.clip(eight_bit.astype(np.int64) * 257 + offsets, 0, 65535).astype(np.uint16)


def wide_mode_images(scene: np.ndarray) -> dict[str, PIL.Image.Image]:
    wide = sixteen_bit(scene)
    height, width = scene.shape
    return {
        "I;16": PIL.Image.fromarray(wide),
        "I;16B": PIL.Image.frombytes("I;16B", (width, height), wide.astype(">u2").tobytes()),
        "I": PIL.Image.fromarray(wide.astype(np.int32)),
        "F in [0, 1]": PIL.Image.fromarray((scene / 255).astype(np.float32)),
        "F in 0..255": PIL.Image.fromarray(scene.astype(np.float32)),
    }


@pytest.mark.parametrize("processor_class", BACKENDS)
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F in [0, 1]", "F in 0..255"])
def test_16_bit_and_float_pil_images_give_the_pixels_of_their_8_bit_image(processor_class, mode):
    scene = grey_scene()
    image = wide_mode_images(scene)[mode]
    assert image.mode == mode.split()[0]
    processor = processor_class(size={"shortest_edge": 32})
    expected = processor(PIL.Image.fromarray(scene), return_tensors="pt")["pixel_values"][0]
    got = processor(image, return_tensors="pt")["pixel_values"][0]
    assert got.shape == (3, 32, 32)
    assert (unnormalised(got) - unnormalised(expected)).abs().max().item() <= ONE_LEVEL + 1e-6
    # neither clipped white (16-bit) nor black ([0, 1] floats): the mean brightness is the 8-bit image's
    assert abs(unnormalised(got).mean().item() - unnormalised(expected).mean().item()) <= ONE_LEVEL
    assert 0.3 < unnormalised(got).mean().item() < 0.7


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_16_bit_png_file_by_path_and_opened_lazily(processor_class, tmp_path):
    scene = grey_scene()
    PIL.Image.fromarray(sixteen_bit(scene)).save(tmp_path / "scan.png")
    processor = processor_class(size={"shortest_edge": 32})
    expected = processor(PIL.Image.fromarray(scene), return_tensors="pt")["pixel_values"]
    lazily_opened = PIL.Image.open(tmp_path / "scan.png")
    assert lazily_opened.mode == "I;16"
    for image in (lazily_opened, str(tmp_path / "scan.png"), tmp_path / "scan.png"):
        got = processor(image, return_tensors="pt")["pixel_values"]
        assert (unnormalised(got[0]) - unnormalised(expected[0])).abs().max().item() <= ONE_LEVEL + 1e-6


@pytest.mark.parametrize("processor_class", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_integer_and_bool_arrays_are_read_by_their_dtype(processor_class, as_tensor):
    scene = np.stack([grey_scene()] * 3, axis=-1)  # (H, W, 3)
    convert = torch.from_numpy if as_tensor else np.asarray
    processor = processor_class(size={"shortest_edge": 32})

    def pixels(array):
        return unnormalised(processor(convert(array), return_tensors="pt")["pixel_values"][0])

    expected = pixels(scene)
    assert (pixels(sixteen_bit(scene)) - expected).abs().max().item() <= ONE_LEVEL + 1e-6  # uint16 is 16-bit
    assert (pixels(scene.astype(np.int64)) - expected).abs().max().item() <= 1e-6  # other integers: 0..255
    mask = scene > 127
    assert (pixels(mask) - pixels(mask.astype(np.uint8) * 255)).abs().max().item() <= 1e-6  # bool: 0/255
    with pytest.raises(
        ValueError, match=r"image 0 of 1: (torch\.)?int64 pixel values must lie in 0\.\.255.*got 300\.\.300"
    ):
        processor(convert(np.full((8, 8, 3), 300, dtype=np.int64)))


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_float_images_already_in_0_1_warn_when_rescaled(processor_class):
    processor = processor_class(size={"shortest_edge": 32})
    scene = np.stack([grey_scene()] * 3, axis=-1)
    in_unit_range = (scene / 255).astype(np.float32)
    batch = [scene, in_unit_range, scene.astype(np.float32), torch.from_numpy(in_unit_range).permute(2, 0, 1)]
    with pytest.warns(UserWarning, match=r"images \[1, 3\] are floating point with every value in \[0, 1\]"):
        processor(batch, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        processor([scene, scene.astype(np.float32)], return_tensors="pt")
        scaled = processor(in_unit_range, do_rescale=False, return_tensors="pt")["pixel_values"][0]
    expected = processor(scene, return_tensors="pt")["pixel_values"][0]
    assert (unnormalised(scaled) - unnormalised(expected)).abs().max().item() <= 0.02  # uint8 vs float resize


def test_pil_backend_reads_float_arrays_in_0_255_as_8_bit():
    """The PIL backend resizes 8-bit images (transformers refuses float values above 1 there): float arrays given for
    do_rescale are rounded to 8 bits, as mode F images are, so they give the pixels of their uint8 image."""
    scene = np.stack([grey_scene()] * 3, axis=-1)
    processor = ConvNextV2ImageProcessorPil(size={"shortest_edge": 32})
    expected = processor(scene, return_tensors="pt")["pixel_values"]
    nearly = scene + np.where(scene < 128, 0.2, -0.2)  # rounds back to the 8-bit values
    for image in (nearly.astype(np.float32), torch.from_numpy(nearly).permute(2, 0, 1)):
        assert torch.equal(processor(image, return_tensors="pt")["pixel_values"], expected)
    with pytest.raises(ValueError, match=r"image 0 of 1: float pixel values must lie in 0\.\.255 .*got 0\.\.300"):
        processor(np.full((8, 8, 3), 300.0, np.float32) * np.eye(8)[..., None])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("crop_pct", 0, CROP_PCT_OUT_OF_RANGE),
        ("crop_pct", 1.2, "crop_pct must be a number in .*got 1.2"),
        ("crop_pct", -0.5, "crop_pct must be .*got -0.5"),
        ("crop_pct", "0.9", "crop_pct must be .*got '0.9'"),
        ("size", {"shortest_edge": 0}, SHORTEST_EDGE_NOT_POSITIVE),
        ("size", -224, r"size\['shortest_edge'\] must be a positive integer, got -224"),
        ("size", {"shortest_edge": 224.5}, r"size\['shortest_edge'\] must be a positive integer, got 224.5"),
        ("size", {"height": 0, "width": 224}, r"size\['height'\] must be a positive integer, got 0"),
        ("size", {"height": 224, "width": -1}, r"size\['width'\] must be a positive integer, got -1"),
        ("size", {"height": 224, "width": 224}, SIZE_NOT_SHORTEST_EDGE),
        ("image_mean", [0.5, 0.5], IMAGE_MEAN_WRONG_LENGTH),
        ("image_mean", [0.5, 0.5, 0.5, 0.5], "image_mean must have 3 values .*got 4"),
        ("image_std", [0.2], "image_std must have 3 values .*got 1"),
        ("image_std", [0.2, 0.0, 0.2], IMAGE_STD_NOT_POSITIVE),
        ("image_std", 0.0, IMAGE_STD_NOT_POSITIVE),
        ("image_mean", [0.5, float("nan"), 0.5], "image_mean must hold finite numbers"),
        ("rescale_factor", 0, RESCALE_FACTOR_NOT_POSITIVE),
    ],
)
@pytest.mark.parametrize("processor_class", BACKENDS)
def test_bad_settings_raise_value_error_naming_the_field(processor_class, field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        processor_class(**{field: value})
    good = processor_class().to_dict()
    with pytest.raises(ValueError, match=message):
        processor_class.from_dict({**good, field: value})
    tiny_config().save_pretrained(tmp_path)  # names the model type for a torchvision-saved folder
    processor_class().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):  # a keyword override of a saved processor
        processor_class.from_pretrained(tmp_path, **{field: value})
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**saved, field: value}, allow_nan=True))
    with pytest.raises(ValueError, match=message):  # an edited file
        AutoImageProcessor.from_pretrained(tmp_path, backend=processor_class().backend)
    # also a value given to one call; transformers checks the types of those first (StrictDataclassError)
    with pytest.raises((ValueError, StrictDataclassError), match=field):
        processor_class()(PIL.Image.new("RGB", (40, 40)), **{field: value})


def truncated_png(path) -> str:
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    PIL.Image.fromarray(noise).save(path)
    data = open(path, "rb").read()
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])
    return str(path)


BAD_IMAGES = {  # a builder given tmp_path, and the message expected
    "None": (lambda tmp: None, "image 3 of 5: is not an image .*got None"),
    "dict": (lambda tmp: {"a": 1}, "image 3 of 5: is not an image .*got dict"),
    "complex array": (
        lambda tmp: np.zeros((10, 10), dtype=np.complex64),
        "image 3 of 5: pixels of dtype complex64 are not an image",
    ),
    "object array": (
        lambda tmp: np.zeros((10, 10), dtype=object),
        "image 3 of 5: pixels of dtype object are not an image",
    ),
    "NaN array": (
        lambda tmp: np.full((10, 10), np.nan, dtype=np.float32),
        "image 3 of 5: holds NaN or infinite values",
    ),
    "1-D array": (lambda tmp: np.zeros((5,)), r"image 3 of 5: ndarray of shape \(5,\) is not an image"),
    "4-D array in a list": (
        lambda tmp: np.zeros((2, 10, 10, 3)),
        r"image 3 of 5: ndarray of shape \(2, 10, 10, 3\) is not an image",
    ),
    "no channel axis": (lambda tmp: np.zeros((10, 10, 7)), r"image 3 of 5: shape \(10, 10, 7\) has no channel axis"),
    "empty array": (lambda tmp: np.zeros((10, 0, 3), dtype=np.uint8), "image 3 of 5: has no pixels"),
    "empty tensor": (lambda tmp: torch.zeros(3, 0, 10), "image 3 of 5: has no pixels"),
    "empty PIL image": (lambda tmp: PIL.Image.new("RGB", (0, 10)), r"image 3 of 5: has no pixels \(size \(0, 10\)\)"),
    "truncated file opened lazily": (
        lambda tmp: PIL.Image.open(truncated_png(tmp / "t.png")),
        "image 3 of 5: cannot decode the image data",
    ),
    "truncated file by path": (lambda tmp: truncated_png(tmp / "t.png"), "image 3 of 5: cannot decode the image data"),
    "missing path": (lambda tmp: str(tmp / "missing.jpg"), "image 3 of 5: no such image file: '.*missing.jpg'"),
    "not an image file": (
        lambda tmp: (tmp / "notes.txt").write_text("hello") and str(tmp / "notes.txt"),
        "image 3 of 5: cannot open",
    ),
    "negative F image": (
        lambda tmp: PIL.Image.fromarray(np.full((8, 8), -1.0, dtype=np.float32)),
        "image 3 of 5: mode 'F' values",
    ),
    "I beyond 16 bits": (
        lambda tmp: PIL.Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)),
        "image 3 of 5: mode 'I' is read",
    ),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
@pytest.mark.parametrize("processor_class", BACKENDS)
def test_a_bad_image_in_a_batch_raises_value_error_naming_its_index(processor_class, case, tmp_path):
    bad, message = BAD_IMAGES[case]
    good = [PIL.Image.new("RGB", (40, 30)), np.zeros((30, 40, 3), dtype=np.uint8), torch.zeros(3, 30, 40)]
    batch = [*good, bad(tmp_path), PIL.Image.new("L", (20, 20))]
    with pytest.raises(ValueError, match=message):
        processor_class()(batch, return_tensors="pt")


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_empty_batch_raises_and_image_files_load_by_path(processor_class, tmp_path):
    with pytest.raises(ValueError, match=EMPTY_BATCH_OF_IMAGES):
        processor_class()([], return_tensors="pt")
    photo = photos()["coffee"]
    photo.save(tmp_path / "coffee.png")
    processor = processor_class()
    from_path = processor([str(tmp_path / "coffee.png"), tmp_path / "coffee.png"], return_tensors="pt")
    expected = processor(photo, return_tensors="pt")["pixel_values"][0]
    assert (from_path["pixel_values"] - expected).abs().max().item() == 0.0


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


@pytest.mark.parametrize("with_model_config", [False, True])
def test_auto_image_processor_reloads_the_backend_that_saved_the_folder(tmp_path, with_model_config):
    saved = {}
    for processor_class in BACKENDS:
        folder = tmp_path / processor_class.__name__
        if with_model_config:
            tiny_config().save_pretrained(folder)
        processor_class(size={"shortest_edge": 160}, crop_pct=0.9).save_pretrained(folder)
        saved[processor_class] = folder
    # the PIL backend writes a name stock transformers knows as its ConvNeXt processor; the torchvision one none,
    # so that AutoImageProcessor goes by the model type in config.json
    pil_json = json.loads((saved[ConvNextV2ImageProcessorPil] / "preprocessor_config.json").read_text())
    torchvision_json = json.loads((saved[ConvNextV2ImageProcessor] / "preprocessor_config.json").read_text())
    assert pil_json["image_processor_type"] == "ConvNextImageProcessorPil"
    assert "image_processor_type" not in torchvision_json

    pil = AutoImageProcessor.from_pretrained(saved[ConvNextV2ImageProcessorPil])
    assert type(pil) is ConvNextV2ImageProcessorPil and pil.backend == "pil"
    assert pil.crop_pct == 0.9 and pil.size["shortest_edge"] == 160
    asked = AutoImageProcessor.from_pretrained(saved[ConvNextV2ImageProcessorPil], backend="torchvision")
    assert type(asked) is ConvNextV2ImageProcessor and asked.crop_pct == 0.9
    if with_model_config:  # without config.json nothing names the model type of a torchvision-saved folder
        assert type(AutoImageProcessor.from_pretrained(saved[ConvNextV2ImageProcessor])) is ConvNextV2ImageProcessor
    # the same pixels as the processor that was saved
    image = photos()["rocket"]
    expected = ConvNextV2ImageProcessorPil(size={"shortest_edge": 160}, crop_pct=0.9)(image, return_tensors="pt")
    assert torch.equal(pil(image, return_tensors="pt")["pixel_values"], expected["pixel_values"])


def test_stock_convnext_folders_still_load_transformers_classes(tmp_path):
    """The name our PIL backend saves under is routed to our classes only by its own registry entry: folders that
    transformers' ConvNeXt processors saved (ConvNeXt, ResNet, RegNet, ...) keep loading transformers' classes."""
    ConvNextImageProcessorPil(size={"shortest_edge": 256}).save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is ConvNextImageProcessor
    assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")) is ConvNextImageProcessorPil


@pytest.mark.slow
def test_saved_processor_gives_the_same_pixels_with_stock_transformers(tmp_path):
    """Stock transformers loads folders saved by either backend as its ConvNeXt processor with our saved values
    (torchvision unless asked for PIL). Same pixels at 224 when the crop margin is even (the cat) and at 384 (warp,
    no crop); at 224 with an odd margin (the rocket) its crop sits one pixel off the official one, which ours
    follows."""
    cases = {
        "cat224": ("chelsea (cat)", 224, ConvNextV2ImageProcessor),
        "rocket384": ("rocket", 384, ConvNextV2ImageProcessor),
        "cat224pil": ("chelsea (cat)", 224, ConvNextV2ImageProcessorPil),
        "coffee384pil": ("coffee", 384, ConvNextV2ImageProcessorPil),
    }
    for folder, (photo_name, size, processor_class) in cases.items():
        save_classifier_folder(tmp_path / folder)
        processor_class(size={"shortest_edge": size}).save_pretrained(tmp_path / folder)
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
    for folder, (photo_name, _, _) in cases.items():
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
