"""One image, one set of pixels (issue 18): every way an image reaches the model gives the pixels of the package's
one image rule (``convnextv2_hf.image_loading``), for every image mode the rule names.

The matrix: each source image below is written to a real file (PNG, JPEG, TIFF) built here with PIL. Its
*reference* is the 8-bit RGB picture the documented rule says it shows, computed here in numpy from the values the
file was made of (not by the package). Each way in must give exactly the pixels that the same processing gives for
that reference (max abs difference 0), float arrays included (the processors read them as the 8-bit pixels they
stand for). The two processor backends differ from each other only by their resampling (torchvision's tensor
bicubic vs PIL's), checked separately with its own tolerance.
"""

from __future__ import annotations

import http.server
import io
import os
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from helpers import tiny_config
from transformers import ImageClassificationPipeline, pipeline

from convnextv2_hf import (
    ConvNextV2ForImageClassification,
    ConvNextV2ImageProcessor,
    ConvNextV2ImageProcessorPil,
    image_loading,
)
from convnextv2_hf.pipelines import ConvNextV2ImageClassificationPipeline, ConvNextV2ImageFeatureExtractionPipeline
from convnextv2_hf.transforms import (
    fcmae_evaluation_transform,
    fcmae_pretraining_transform,
    finetuning_transform,
    image_folder_dataset,
    streaming_image_dataset,
    with_image_transform,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import evaluate_classifier  # noqa: E402

SIZE = 32  # the processors' shortest_edge and the transforms' size
HEIGHT, WIDTH = 40, 56  # not square, so an orientation that is not applied changes the crop
BACKEND_MEAN_TOLERANCE = 0.02  # mean abs difference between the torchvision and the PIL backend (resampling only)


# ----------------------------------------------------------------------------------------------------------
# The source images and their references, from the rule's definitions (image_loading's docstring)
# ----------------------------------------------------------------------------------------------------------


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The rule's compositing, written out: round((c * a + 255 * (255 - a)) / 255)."""
    value = (colour.astype(np.float64) * alpha + 255.0 * (255 - alpha.astype(np.float64))) / 255.0
    return np.floor(value + 0.5).astype(np.uint8)


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


@dataclass
class Source:
    name: str
    path: Path
    reference: np.ndarray  # (H, W, 3) uint8: what the rule says the file shows
    array: str | None  # np.asarray(image) as an input: "exact", "float", a refusal's message regex, None: no such form
    why_no_array: str = ""


def opened_pixels(path: Path) -> np.ndarray:
    """The samples PIL decodes from a file, in its own mode (no rule applied)."""
    with PIL.Image.open(path) as image:
        return np.asarray(image)


def build_sources(folder: Path) -> dict[str, Source]:
    rng = np.random.RandomState(0)
    gradient = np.linspace(0, 255, WIDTH)[None, :, None] * np.ones((HEIGHT, 1, 3))
    scene = np.clip(gradient + rng.randint(-40, 41, (HEIGHT, WIDTH, 3)) * [1, 0.5, -1], 0, 255).round()
    scene = scene.astype(np.uint8)
    grey = scene[..., 0]
    alpha = np.tile(np.linspace(0, 255, HEIGHT).round().astype(np.uint8)[:, None], (1, WIDTH))
    alpha[:, :8], alpha[:, -8:] = 0, 255  # fully transparent and fully opaque bands
    sources = []

    def add(name, filename, image, reference, array, why_no_array="", **save):
        path = folder / filename
        image.save(path, **save)
        sources.append(Source(name, path, reference, array, why_no_array))

    add("RGB", "rgb.png", PIL.Image.fromarray(scene), scene, "exact")
    exif = PIL.Image.Exif()
    exif[image_loading.EXIF_ORIENTATION] = 6  # the camera was turned: display rotated 90 degrees clockwise
    add(
        "RGB JPEG, EXIF orientation 6",
        "phone.jpg",
        PIL.Image.fromarray(scene),
        None,
        None,
        "arrays carry no EXIF",
        exif=exif,
        quality=95,
    )
    stored = opened_pixels(folder / "phone.jpg")  # the JPEG's decoded samples, as stored
    sources[-1].reference = np.ascontiguousarray(np.rot90(stored, k=-1))
    exif[image_loading.EXIF_ORIENTATION] = 8  # rotated 90 degrees counter-clockwise
    add(
        "L PNG, EXIF orientation 8",
        "turned.png",
        PIL.Image.fromarray(grey),
        grey_rgb(np.rot90(grey, k=1)),
        None,
        "arrays carry no EXIF",
        exif=exif,
    )
    rgba = np.dstack([scene, alpha])
    add("RGBA", "rgba.png", PIL.Image.fromarray(rgba, "RGBA"), over_white(scene, alpha[..., None]), "exact")
    add(
        "LA",
        "la.png",
        PIL.Image.fromarray(np.dstack([grey, alpha]), "LA"),
        grey_rgb(over_white(grey, alpha)),
        r"shape \(40, 56, 2\) has no channel axis of 1, 3 or 4",
    )
    palette = rng.randint(0, 256, (16, 3)).astype(np.uint8)
    entry_alpha = np.array([0, 64, 128, 200] + [255] * 12, np.uint8)
    indices = (scene[..., 1] // 16).astype(np.uint8)
    paletted = PIL.Image.fromarray(indices, "P")
    paletted.putpalette(palette.reshape(-1).tolist())
    add(
        "P with transparency",
        "palette_trns.png",
        paletted,
        over_white(palette[indices], entry_alpha[indices][..., None]),
        None,
        "an array of indices has no palette",
        transparency=entry_alpha.tobytes(),
    )
    add("P", "palette.png", paletted, palette[indices], None, "an array of indices has no palette")
    bits = scene[..., 2] > 127
    add("1", "bits.png", PIL.Image.fromarray(bits), grey_rgb(bits.astype(np.uint8) * 255), "exact")
    add("L", "grey.png", PIL.Image.fromarray(grey), grey_rgb(grey), "exact")
    wide = np.clip(grey.astype(np.int64) * 257 + rng.randint(-120, 121, grey.shape), 0, 65535)
    eight = grey_rgb(np.floor(wide * 255 / 65535 + 0.5).astype(np.uint8))
    add("I;16 (16-bit PNG)", "scan16.png", PIL.Image.fromarray(wide.astype(np.uint16)), eight, "exact")
    add(
        "I;16B (16-bit TIFF)",
        "scan16b.tif",
        PIL.Image.frombytes("I;16B", (WIDTH, HEIGHT), wide.astype(">u2").tobytes()),
        eight,
        "exact",
    )
    add(
        "I (32-bit integer TIFF)",
        "scan32.tif",
        PIL.Image.fromarray(wide.astype(np.int32)),
        eight,
        r"int32 pixel values must lie in 0\.\.255 \(uint16 is read as 16-bit\)",
    )
    unit = (grey / 255.0 + rng.uniform(-0.001, 0.001, grey.shape)).clip(0, 1).astype(np.float32)
    add(
        "F in [0, 1] (float TIFF)",
        "unit.tif",
        PIL.Image.fromarray(unit),
        grey_rgb(np.floor(unit.astype(np.float64) * 255 + 0.5).astype(np.uint8)),
        None,
        "float arrays are taken as given for do_rescale (a [0, 1] array needs do_rescale=False)",
    )
    levels = (grey * (250 / 255) + 0.3).astype(np.float32)  # fractional values in 0..255
    add(
        "F in 0..255 (float TIFF)",
        "float.tif",
        PIL.Image.fromarray(levels),
        grey_rgb(np.floor(levels.astype(np.float64) + 0.5).astype(np.uint8)),
        "float",
    )
    ink = rng.randint(0, 256, (HEIGHT, WIDTH, 4)).astype(np.uint8)

    def cmyk_rgb(cmyk):
        c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
        return np.floor((255 - c) * (255 - k) / 255 + 0.5).astype(np.uint8)

    add("CMYK (TIFF)", "ink.tif", PIL.Image.fromarray(ink, "CMYK"), cmyk_rgb(ink), None, "a 4-channel array is RGBA")
    add("CMYK (JPEG)", "ink.jpg", PIL.Image.fromarray(ink, "CMYK"), None, None, "a 4-channel array is RGBA", quality=95)
    sources[-1].reference = cmyk_rgb(opened_pixels(folder / "ink.jpg"))  # the JPEG's decoded inks
    by_name = {source.name: source for source in sources}
    for source in by_name.values():  # the files are in the modes they are named after
        with PIL.Image.open(source.path) as image:
            assert image.mode == source.name.split(" ")[0], source.name
    return by_name


# ----------------------------------------------------------------------------------------------------------
# Fixtures: the files (one image folder), a tiny classifier folder, the pipelines, the processors
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_image")
    images = root / "data" / "train" / "pictures"  # one split, one class folder
    images.mkdir(parents=True)
    sources = build_sources(images)
    model_dir = root / "model"
    config = tiny_config(num_labels=2, id2label={0: "pictures", 1: "other"}, label2id={"pictures": 0, "other": 1})
    torch.manual_seed(0)
    ConvNextV2ForImageClassification(config).save_pretrained(model_dir)
    ConvNextV2ImageProcessor(size={"shortest_edge": SIZE}).save_pretrained(model_dir)
    return {"sources": sources, "data": root / "data", "images": images, "model": model_dir, "cache": {}}


PROCESSORS = {
    "torchvision": ConvNextV2ImageProcessor(size={"shortest_edge": SIZE}),
    "pil": ConvNextV2ImageProcessorPil(size={"shortest_edge": SIZE}),
}


def processed(backend: str, image) -> torch.Tensor:
    return PROCESSORS[backend](image, return_tensors="pt")["pixel_values"][0]


def finetune_evaluation(image) -> torch.Tensor:
    """examples/finetune_image_classification.py's evaluation transform: the processor on the decoded image."""
    return processed("torchvision", image)


def seeded(transform, image, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(image)


# what each way in's pixels must equal, given the reference picture
EXPECTED = {
    "torchvision": lambda picture: processed("torchvision", picture),
    "pil": lambda picture: processed("pil", picture),
    "fcmae-evaluation": lambda picture: fcmae_evaluation_transform(SIZE)(picture),
    "finetuning-seeded": lambda picture: seeded(finetuning_transform(SIZE), picture),
    "fcmae-pretraining-seeded": lambda picture: seeded(fcmae_pretraining_transform(SIZE), picture),
}


def captured_pixels(world, task: str, image) -> torch.Tensor:
    """The pixel_values the model of a real ``pipeline(task)`` receives (a forward pre-hook records them)."""
    key = f"pipeline {task}"
    if key not in world["cache"]:
        pipe = pipeline(task, model=str(world["model"]), device="cpu")
        seen = []
        pipe.model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True
        )
        world["cache"][key] = (pipe, seen)
    pipe, seen = world["cache"][key]
    seen.clear()
    pipe(image)
    assert len(seen) == 1
    return seen[0][0]


def by_file(world, key: str, build) -> dict[str, torch.Tensor]:
    """Pixels of every file from one dataset-based way in, built once: {file name: pixels}."""
    if key not in world["cache"]:
        world["cache"][key] = build(world)
    return world["cache"][key]


def _file_names(dataset) -> list[str]:
    undecoded = dataset.cast_column("image", datasets.Image(decode=False))
    return [Path(value["path"]).name for value in undecoded["image"]]


def _image_folder(transform, seed: int | None = None):
    def build(world):
        split = image_folder_dataset(world["data"])["train"]
        names = _file_names(split)
        transformed = image_folder_dataset(world["data"], transform)["train"]
        out = {}
        for index, name in enumerate(names):
            if seed is not None:
                torch.manual_seed(seed)
            out[name] = transformed[index]["pixel_values"]
        return out

    return build


def _datasets_bytes(world):
    """A ``datasets`` dataset holding the encoded files (as a Hub / parquet dataset does), with_image_transform."""
    files = sorted(world["images"].iterdir())
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": path.read_bytes(), "path": None} for path in files], "label": [0] * len(files)},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    transformed = with_image_transform(dataset, finetune_evaluation)
    return {path.name: transformed[index]["pixel_values"] for index, path in enumerate(files)}


def _streaming_fcmae_evaluation(world):
    stream = image_folder_dataset(world["data"], streaming=True)["train"]
    names = [
        Path(example["image"]["path"]).name for example in stream.cast_column("image", datasets.Image(decode=False))
    ]
    pixels = [example["pixel_values"] for example in streaming_image_dataset(stream, fcmae_evaluation_transform(SIZE))]
    return dict(zip(names, pixels, strict=True))


def _evaluate_classifier(world):
    args = evaluate_classifier.EvaluationArguments(
        model_name_or_path=str(world["model"]), data_dir=str(world["data"] / "train"), batch_size=4
    )
    dataset, _ = evaluate_classifier.load_evaluation_split(args)
    processor = evaluate_classifier.load_processor(args)
    pixels = torch.cat([batch for batch, _ in evaluate_classifier.evaluation_batches(dataset, processor, args)])
    return dict(zip(_file_names(dataset), pixels, strict=True))


def _array(source: Source, as_tensor: bool):
    values = opened_pixels(source.path)
    values = values.astype(values.dtype.newbyteorder("=")) if not values.dtype.isnative else values
    return torch.from_numpy(values.copy()) if as_tensor else values


WAYS = {  # way in: (pixels of a source, the kind of expected pixels)
    **{
        f"processor-{backend}/{form}": (make, backend)
        for backend in PROCESSORS
        for form, make in {
            "path": lambda world, source, b=backend: processed(b, str(source.path)),
            "pathlib": lambda world, source, b=backend: processed(b, source.path),
            "pil-opened-lazily": lambda world, source, b=backend: processed(b, PIL.Image.open(source.path)),
            "bytes": lambda world, source, b=backend: processed(b, source.path.read_bytes()),
            "numpy": lambda world, source, b=backend: processed(b, _array(source, as_tensor=False)),
            "tensor": lambda world, source, b=backend: processed(b, _array(source, as_tensor=True)),
        }.items()
    },
    "pipeline-image-classification/path": (
        lambda world, source: captured_pixels(world, "image-classification", str(source.path)),
        "torchvision",
    ),
    "pipeline-image-classification/pil": (
        lambda world, source: captured_pixels(world, "image-classification", PIL.Image.open(source.path)),
        "torchvision",
    ),
    "pipeline-image-feature-extraction/path": (
        lambda world, source: captured_pixels(world, "image-feature-extraction", str(source.path)),
        "torchvision",
    ),
    "pipeline-image-feature-extraction/pil": (
        lambda world, source: captured_pixels(world, "image-feature-extraction", PIL.Image.open(source.path)),
        "torchvision",
    ),
    "finetune-evaluation/image-folder": (
        lambda world, source: by_file(world, "finetune folder", _image_folder(finetune_evaluation))[source.path.name],
        "torchvision",
    ),
    "finetune-evaluation/datasets-bytes": (
        lambda world, source: by_file(world, "datasets bytes", _datasets_bytes)[source.path.name],
        "torchvision",
    ),
    "evaluate_classifier.py": (
        lambda world, source: by_file(world, "evaluate_classifier", _evaluate_classifier)[source.path.name],
        "torchvision",
    ),
    "fcmae-evaluation/image-folder": (
        lambda world, source: by_file(world, "fcmae folder", _image_folder(fcmae_evaluation_transform(SIZE)))[
            source.path.name
        ],
        "fcmae-evaluation",
    ),
    "fcmae-evaluation/streaming": (
        lambda world, source: by_file(world, "fcmae stream", _streaming_fcmae_evaluation)[source.path.name],
        "fcmae-evaluation",
    ),
    "finetuning-transform/image-folder-seeded": (
        lambda world, source: by_file(world, "finetuning folder", _image_folder(finetuning_transform(SIZE), 0))[
            source.path.name
        ],
        "finetuning-seeded",
    ),
    "finetuning-transform/pil-seeded": (
        lambda world, source: seeded(finetuning_transform(SIZE), PIL.Image.open(source.path)),
        "finetuning-seeded",
    ),
    "fcmae-pretraining-transform/pil-seeded": (
        lambda world, source: seeded(fcmae_pretraining_transform(SIZE), PIL.Image.open(source.path)),
        "fcmae-pretraining-seeded",
    ),
}

SOURCE_NAMES = [
    "RGB", "RGB JPEG, EXIF orientation 6", "L PNG, EXIF orientation 8", "RGBA", "LA", "P with transparency", "P",
    "1", "L", "I;16 (16-bit PNG)", "I;16B (16-bit TIFF)", "I (32-bit integer TIFF)", "F in [0, 1] (float TIFF)",
    "F in 0..255 (float TIFF)", "CMYK (TIFF)", "CMYK (JPEG)",
]  # fmt: skip


@pytest.mark.parametrize("source_name", SOURCE_NAMES)
def test_the_rule_gives_the_documented_picture(world, source_name):
    source = world["sources"][source_name]
    picture = image_loading.decode_image(str(source.path))
    assert picture.mode == "RGB" and picture.size == (source.reference.shape[1], source.reference.shape[0])
    assert np.array_equal(np.asarray(picture), source.reference), source_name


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("source_name", SOURCE_NAMES)
def test_every_way_in_sees_the_same_pixels(world, source_name, way):
    source = world["sources"][source_name]
    make, expected_kind = WAYS[way]
    is_array = way.endswith(("/numpy", "/tensor"))
    if is_array and source.array is None:
        pytest.skip(f"no array form: {source.why_no_array}")
    if is_array and source.array not in ("exact", "float"):  # refused, with a message naming the problem
        with pytest.raises(ValueError, match=f"image 0 of 1: .*{source.array}"):
            make(world, source)
        return
    expected = EXPECTED[expected_kind](PIL.Image.fromarray(source.reference))
    got = make(world, source)
    assert got.shape == expected.shape == (3, SIZE, SIZE)
    assert (got - expected).abs().max().item() == 0.0, (source_name, way)


@pytest.mark.parametrize("source_name", SOURCE_NAMES)
def test_the_two_backends_differ_only_by_resampling(world, source_name):
    source = world["sources"][source_name]
    difference = (processed("torchvision", str(source.path)) - processed("pil", str(source.path))).abs()
    assert difference.mean().item() <= BACKEND_MEAN_TOLERANCE


# ----------------------------------------------------------------------------------------------------------
# What the stock transformers parts give instead (the README says so), and the pipeline registration
# ----------------------------------------------------------------------------------------------------------


def test_stock_pipeline_loader_would_clip_16_bit_and_drop_alpha(world):
    """transformers' own pipeline class (``load_image`` first) on the same files: the 16-bit scan comes out white and
    the transparent band shows the colour stored under it. Ours gives the rule's pixels (the matrix above)."""
    stock = pipeline(
        "image-classification", model=str(world["model"]), device="cpu", pipeline_class=ImageClassificationPipeline
    )
    seen = []
    stock.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["pixel_values"][0]), with_kwargs=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    stock(str(world["sources"]["I;16 (16-bit PNG)"].path))
    assert ((seen[-1] * std + mean) > 0.99).float().mean().item() > 0.9  # nearly all white
    ours = processed("torchvision", str(world["sources"]["I;16 (16-bit PNG)"].path))
    assert 0.3 < (ours * std + mean).mean().item() < 0.7  # the gradient
    stock(str(world["sources"]["RGBA"].path))
    dropped = processed("torchvision", PIL.Image.open(world["sources"]["RGBA"].path).convert("RGB"))
    assert torch.equal(seen[-1], dropped)  # alpha dropped
    assert (seen[-1] - processed("torchvision", str(world["sources"]["RGBA"].path))).abs().max().item() > 1.0


def test_pipeline_registry_gives_our_classes_and_keeps_stock_models_stock(world, tmp_path):
    classify = pipeline("image-classification", model=str(world["model"]), device="cpu")
    assert type(classify) is ConvNextV2ImageClassificationPipeline
    features = pipeline("image-feature-extraction", model=str(world["model"]), device="cpu")
    assert type(features) is ConvNextV2ImageFeatureExtractionPipeline
    # a processor that does not read image sources (transformers' own) keeps transformers' load_image path
    from transformers import ConvNextImageProcessor

    stock_processor = ConvNextImageProcessor(size={"shortest_edge": SIZE})
    with_stock = pipeline("image-classification", model=str(world["model"]), image_processor=stock_processor)
    plain = pipeline(
        "image-classification",
        model=str(world["model"]),
        image_processor=stock_processor,
        pipeline_class=ImageClassificationPipeline,
    )
    path = str(world["sources"]["RGBA"].path)
    assert torch.equal(with_stock.preprocess(path)["pixel_values"], plain.preprocess(path)["pixel_values"])
    # a saved pipeline folder is a plain one: no custom_pipelines entry, no copied code
    classify.save_pretrained(tmp_path)
    assert "custom_pipelines" not in (tmp_path / "config.json").read_text()
    assert not {"pipelines.py", "image_loading.py"} & {path.name for path in tmp_path.glob("*.py")}


def test_pipeline_fetches_urls_and_base64_for_the_processor(world):
    source = world["sources"]["I;16 (16-bit PNG)"]
    folder = str(source.path.parent)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{source.path.name}"
        expected = processed("torchvision", PIL.Image.fromarray(source.reference))
        assert torch.equal(captured_pixels(world, "image-classification", url), expected)
        import base64

        encoded = "data:image/png;base64," + base64.b64encode(source.path.read_bytes()).decode()
        assert torch.equal(captured_pixels(world, "image-classification", encoded), expected)
        with pytest.raises(ValueError, match=r"cannot fetch the image .*missing\.png.*HTTP 404"):
            captured_pixels(world, "image-classification", url.replace(source.path.name, "missing.png"))
        with pytest.raises(ValueError, match="neither an image file, an http"):
            captured_pixels(world, "image-classification", "no/such/file.png")
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------------------------------------
# Bounded decoding
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_limits():
    ours, pils = image_loading.max_image_pixels(), PIL.Image.MAX_IMAGE_PIXELS
    environment = os.environ.get(image_loading.MAX_PIXELS_ENV)
    yield
    image_loading.set_max_image_pixels(ours)
    PIL.Image.MAX_IMAGE_PIXELS = pils  # set_max_image_pixels never lowers PIL's
    if environment is None:
        os.environ.pop(image_loading.MAX_PIXELS_ENV, None)
    else:
        os.environ[image_loading.MAX_PIXELS_ENV] = environment


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """The issue's file: a 12000 x 12000 1-bit PNG, about 18 KB on disk, 432 MB as RGB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    PIL.Image.new("1", (12000, 12000)).save(path)
    assert path.stat().st_size < 100_000
    return path


LIMIT_MESSAGE = r"12000 x 12000 = 144,000,000 pixels, over the limit of 89,478,485 pixels .*CONVNEXTV2_MAX_IMAGE_PIXELS"


@pytest.mark.skipif(image_loading.MAX_PIXELS_ENV in os.environ, reason="the limit is set by the environment")
def test_default_limit_is_documented_and_pil_s_own():
    assert image_loading.max_image_pixels() == image_loading.DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
    assert PIL.Image.MAX_IMAGE_PIXELS == 89_478_485


@pytest.mark.parametrize("backend", list(PROCESSORS))
def test_an_image_over_the_limit_is_refused_before_it_is_decoded(bomb, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns when the test opens it
        lazily = PIL.Image.open(bomb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning does not escape: it is our ValueError
        with pytest.raises(ValueError, match=f"image 0 of 1: '.*bomb.png' is {LIMIT_MESSAGE}"):
            processed(backend, str(bomb))
        with pytest.raises(ValueError, match=f"image 0 of 1: '.*bomb.png' is {LIMIT_MESSAGE}"):
            processed(backend, lazily)
    assert lazily.tile, "the pixels were decoded (PIL empties `tile` when it loads them)"
    lazily.close()
    with pytest.raises(ValueError, match=f"image 0 of 1: the image is {LIMIT_MESSAGE}"):
        processed(backend, bomb.read_bytes())


def test_the_limit_holds_in_the_pipelines_and_the_training_loaders(world, bomb, tmp_path):
    with pytest.raises(ValueError, match=LIMIT_MESSAGE):
        captured_pixels(world, "image-classification", str(bomb))
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    (folder / "bomb.png").write_bytes(bomb.read_bytes())
    train = image_folder_dataset(tmp_path, finetuning_transform(SIZE))["train"]
    with pytest.raises(ValueError, match=f"cannot read image .*bomb.png: {LIMIT_MESSAGE}.*skip_corrupt_images"):
        train[0]
    assert (
        image_folder_dataset(tmp_path, finetuning_transform(SIZE), skip_corrupt_images=True)["train"][0]["pixel_values"]
        is None
    )


def test_pil_s_decompression_bomb_error_names_the_file(tmp_path):
    path = tmp_path / "huge.png"
    PIL.Image.new("1", (14000, 14000)).save(path)  # over twice PIL's limit: PIL's open() itself refuses it
    with pytest.raises(
        ValueError,
        match=r"image 0 of 1: '.*huge.png' is too large to decode: Image size "
        r"\(196000000 pixels\) exceeds limit .*CONVNEXTV2_MAX_IMAGE_PIXELS",
    ):
        processed("torchvision", str(path))


def test_the_limit_is_set_in_one_place(world, restore_limits):
    source = str(world["sources"]["RGB"].path)  # 56 x 40 = 2240 pixels
    image_loading.set_max_image_pixels(2000)
    with pytest.raises(ValueError, match="56 x 40 = 2,240 pixels, over the limit of 2,000 pixels"):
        processed("pil", source)
    with pytest.raises(ValueError, match="over the limit of 2,000 pixels"):
        captured_pixels(world, "image-classification", source)
    image_loading.set_max_image_pixels("2_240")
    assert processed("pil", source).shape == (3, SIZE, SIZE)
    image_loading.set_max_image_pixels(200_000_000)  # above PIL's own limit: PIL's is raised with it
    assert PIL.Image.MAX_IMAGE_PIXELS == 200_000_000
    image_loading.set_max_image_pixels(None)
    assert image_loading.max_image_pixels() is None and PIL.Image.MAX_IMAGE_PIXELS is None
    for bad in (-1, 1.5, "many", True):
        with pytest.raises(ValueError, match="the image pixel limit must be a whole number >= 0 or None"):
            image_loading.set_max_image_pixels(bad)
    # a stricter PIL setting of the user's own stays in force, reported as ours
    image_loading.set_max_image_pixels(10**9)
    PIL.Image.MAX_IMAGE_PIXELS = 2000
    with pytest.raises(ValueError, match="over the limit of 2,000 pixels"):
        processed("torchvision", source)


def test_the_limit_set_in_the_parent_holds_in_spawned_dataloader_workers(tmp_path, restore_limits):
    """set_max_image_pixels in the training process reaches DataLoader workers started by "spawn" (which import the
    package afresh): a 56 x 40 image over a limit of 2,000 is refused there too, and allowed once it is raised."""
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    PIL.Image.new("RGB", (56, 40), (10, 20, 30)).save(folder / "0.png")
    train = image_folder_dataset(tmp_path, fcmae_evaluation_transform(SIZE))["train"]

    def first_batch():
        loader = torch.utils.data.DataLoader(train, batch_size=1, num_workers=1, multiprocessing_context="spawn")
        return next(iter(loader))["pixel_values"]

    image_loading.set_max_image_pixels(2000)
    assert os.environ[image_loading.MAX_PIXELS_ENV] == "2000"
    with pytest.raises(ValueError, match="56 x 40 = 2,240 pixels, over the limit of 2,000 pixels"):
        first_batch()
    image_loading.set_max_image_pixels(None)
    assert os.environ[image_loading.MAX_PIXELS_ENV] == "none"
    assert first_batch().shape == (1, 3, SIZE, SIZE)


def test_the_environment_variable_sets_the_limit():
    """The variable is read when the module is imported: a fresh interpreter loads the file on its own (it imports
    nothing of the package), once per value."""
    script = f"""
import importlib.util, os, PIL.Image
for value in ("1000", "200000000", "none", "lots"):
    os.environ["CONVNEXTV2_MAX_IMAGE_PIXELS"] = value
    spec = importlib.util.spec_from_file_location("loading", {image_loading.__file__!r})
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        print(module.max_image_pixels(), PIL.Image.MAX_IMAGE_PIXELS)
    except ValueError as error:
        print(error)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr[-1000:]
    lines = result.stdout.strip().splitlines()
    assert lines[:3] == ["1000 89478485", "200000000 200000000", "None None"]
    assert lines[3].startswith("CONVNEXTV2_MAX_IMAGE_PIXELS='lots': the image pixel limit must be a whole number")


def test_datasets_image_columns_keep_their_mode_for_masks():
    """load_image (the training loaders' decoder) turns images upright but keeps their mode: a segmentation mask
    stays a palette or grey image of class ids; only the transforms' ToRGB makes pixels of it."""
    from convnextv2_hf.transforms import load_image

    mask = PIL.Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4), "P")
    mask.putpalette([value for index in range(12) for value in (20 * index, 0, 255 - 20 * index)])
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    loaded = load_image({"bytes": buffer.getvalue(), "path": None})
    assert loaded.mode == "P" and np.array_equal(np.asarray(loaded), np.arange(12).reshape(3, 4))
    with pytest.raises(ValueError, match="cannot read image an image given as bytes .*holds neither bytes nor a path"):
        load_image({"bytes": None, "path": None})


# ----------------------------------------------------------------------------------------------------------
# Float arrays are 8-bit pixels too: exact in both backends, however sharp the picture
# ----------------------------------------------------------------------------------------------------------


FLOAT_FORMS = {  # form: (the float array made of 8-bit pixels, the call's settings)
    "0..255 HWC": (lambda pixels: pixels.astype(np.float32), {}),
    "[0, 1] HWC, do_rescale=False": (lambda pixels: pixels.astype(np.float32) / 255, {"do_rescale": False}),
    "0..255 CHW tensor": (lambda pixels: torch.from_numpy(pixels).permute(2, 0, 1).double(), {}),
    "[0, 1] CHW float16 tensor, do_rescale=False": (
        lambda pixels: torch.from_numpy(pixels).permute(2, 0, 1).half() / 255,
        {"do_rescale": False},
    ),
}


@pytest.mark.parametrize("backend", list(PROCESSORS))
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("form", list(FLOAT_FORMS))
def test_float_arrays_give_the_pixels_of_their_8_bit_values(backend, channels, form):
    """Noise (every pixel unlike its neighbours: bicubic overshoots most) as floats, in [0, 1] or 0..255, grey, RGB
    or RGBA: the pixels of the same values as uint8 (max difference 0 after rounding to float32). Resampled as
    floats, without the 8-bit path's clipping, they differed by up to 0.27 (16 levels) in the torchvision backend;
    float RGBA in 0..255 was refused there."""
    rng = np.random.RandomState(channels)
    pixels = rng.randint(0, 256, (HEIGHT, WIDTH, channels)).astype(np.uint8)
    if channels == 4:
        pixels[..., 3] = np.tile(np.linspace(0, 255, WIDTH).round().astype(np.uint8), (HEIGHT, 1))
    make, settings = FLOAT_FORMS[form]
    expected = PROCESSORS[backend](pixels, return_tensors="pt")["pixel_values"][0]
    got = PROCESSORS[backend](make(pixels), return_tensors="pt", **settings)["pixel_values"][0]
    assert got.shape == expected.shape == (3, SIZE, SIZE)
    assert (got.float() - expected).abs().max().item() <= 1e-5, (backend, channels, form)


# ----------------------------------------------------------------------------------------------------------
# Leftovers: spawned workers over a stream, a processor saved alone, untransformed image folders
# ----------------------------------------------------------------------------------------------------------


def _small_image_folder(root: Path, count: int = 3) -> list[Path]:
    folder = root / "train" / "a"
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        values = (np.arange(HEIGHT * WIDTH * 3).reshape(HEIGHT, WIDTH, 3) * (i + 3)) % 251
        paths.append(folder / f"{i}.png")
        PIL.Image.fromarray(values.astype(np.uint8)).save(paths[-1])
    return paths


def test_a_streamed_dataset_reaches_spawned_dataloader_workers(tmp_path):
    """streaming_image_dataset pickles (no closure): a "spawn" DataLoader worker (macOS/Windows default) reads the
    streamed image folder and gives, file for file, the pixels the processor gives for the same file."""
    paths = _small_image_folder(tmp_path)
    stream = image_folder_dataset(tmp_path, streaming=True)["train"]
    train = streaming_image_dataset(stream, finetune_evaluation, image_column="image")
    loader = torch.utils.data.DataLoader(train, batch_size=3, num_workers=1, multiprocessing_context="spawn")
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["index"].tolist() == [0, 1, 2]
    expected = torch.stack([processed("torchvision", str(path)) for path in paths])
    assert batches[0]["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert (batches[0]["pixel_values"] - expected).abs().max().item() == 0


def test_an_image_folder_without_a_transform_holds_the_limit(tmp_path, restore_limits):
    """image_folder_dataset(root) with no transform yields images decoded within the pixel limit, streamed or not:
    a 56 x 40 image over a lowered limit of 2,000 is a ValueError naming the file and the limit; under the limit
    it is the file's picture (the pixels the processor gives for the path)."""
    (path,) = _small_image_folder(tmp_path, count=1)
    splits = image_folder_dataset(tmp_path)
    stream = image_folder_dataset(tmp_path, streaming=True)["train"]
    image_loading.set_max_image_pixels(2000)
    refused = f"'{path}' is 56 x 40 = 2,240 pixels, over the limit of 2,000 pixels .*CONVNEXTV2_MAX_IMAGE_PIXELS"
    with pytest.raises(ValueError, match=refused):
        splits["train"][0]
    with pytest.raises(ValueError, match=refused):
        next(iter(splits["train"].shuffle(seed=0)))
    with pytest.raises(ValueError, match=refused):
        next(iter(stream))
    image_loading.set_max_image_pixels(2240)
    image = splits["train"][0]["image"]
    assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
    assert (processed("pil", image) - processed("pil", str(path))).abs().max().item() == 0
    assert next(iter(stream))["image"].size == (WIDTH, HEIGHT)
