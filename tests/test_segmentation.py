"""examples/finetune_semantic_segmentation.py: UperNet on our backbone, trained with the stock Trainer on shapes
drawn over scikit-image photographs; mean IoU against chance; the saved model reloads with transformers alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from expected_errors import UNKNOWN_MODEL_SIZE
from skimage import data as skimage_data
from skimage import draw

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.metrics import mean_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import finetune_semantic_segmentation as segmentation  # noqa: E402

SIZE = 64  # a multiple of the total stride 32
CLASSES = ["background", "disc", "square", "triangle"]
# a small encoder (4 stages, 5 blocks) keeps 300 steps within ~20 s on one core
ENCODER = dict(depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 64, 128])


# --- the data: shapes with class ids drawn on crops of photographs -----------------------------------------


def shape_mask(kind: int, center: np.ndarray, radius: int) -> np.ndarray:
    r, c = int(center[0]), int(center[1])
    if kind == 1:
        rows, cols = draw.disk((r, c), radius, shape=(SIZE, SIZE))
    elif kind == 2:
        rows, cols = draw.rectangle((r - radius, c - radius), (r + radius, c + radius), shape=(SIZE, SIZE))
    else:
        rows, cols = draw.polygon([r - radius, r + radius, r + radius], [c, c - radius, c + radius], (SIZE, SIZE))
    mask = np.zeros((SIZE, SIZE), bool)
    mask[rows, cols] = True
    return mask


def inner_boundary(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def shapes_on_photographs(root: Path, count: int, seed: int) -> Path:
    """``root/images/NNN.jpg`` and ``root/masks/NNN.png``: 1-2 shapes per 64x64 photo crop. Class ids 1 disc,
    2 square, 3 triangle, 0 background; each shape's outline is 255 (ignored, as in Pascal VOC). A shape's colour
    is random but leans to one channel per class (red discs, green squares, blue triangles), so that a backbone
    trained from scratch learns the classes within the test's time budget; the photos hold those colours too."""
    rng = np.random.default_rng(seed)
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea(), skimage_data.rocket()]
    photos.append(np.stack([skimage_data.camera()] * 3, axis=-1))
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(count):
        step = int(rng.integers(1, 4))  # crops at three scales
        photo = photos[i % len(photos)][::step, ::step, :3]
        top, left = rng.integers(0, photo.shape[0] - SIZE), rng.integers(0, photo.shape[1] - SIZE)
        image = photo[top : top + SIZE, left : left + SIZE].copy()
        mask = np.zeros((SIZE, SIZE), np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            kind, radius = int(rng.integers(1, 4)), int(rng.integers(12, 20))
            inside = shape_mask(kind, rng.integers(radius, SIZE - radius, size=2), radius)
            colour = rng.integers(0, 256, size=3)
            colour[kind - 1] = 200 + colour[kind - 1] % 56
            image[inside] = colour
            mask[inside] = kind
            mask[inner_boundary(inside)] = 255
        PIL.Image.fromarray(image).save(root / "images" / f"{i:03d}.jpg", quality=95)
        PIL.Image.fromarray(mask, mode="L").save(root / "masks" / f"{i:03d}.png")
    return root


def read_masks(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(PIL.Image.open(p)) for p in sorted((folder / "masks").glob("*.png"))])


def chance_mean_iou(masks: np.ndarray) -> float:
    """The better of two label-blind predictors, scored by the same metric: always the majority class, and a
    uniformly random class per pixel (its expected per-class IoU from the class frequencies)."""
    counted = masks[masks != 255]
    majority = mean_iou(np.full_like(counted, np.bincount(counted).argmax()), counted, len(CLASSES))["mean_iou"]
    share, k = np.bincount(counted, minlength=len(CLASSES)) / counted.size, len(CLASSES)
    uniform = float(np.mean((share / k) / (share + 1 / k - share / k)))
    return max(majority, uniform)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    shapes_on_photographs(root / "train", 96, seed=0)
    shapes_on_photographs(root / "validation", 24, seed=1)
    return root


@pytest.fixture(scope="module")
def fcmae_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fcmae")
    torch.manual_seed(0)
    ConvNextV2ForMaskedImageModeling(ConvNextV2Config(**ENCODER, decoder_hidden_size=16)).save_pretrained(folder)
    return folder


def script_args(output: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(output), "--use_cpu", "--report_to", "none", "--disable_tqdm", "True",
        "--class_names", ",".join(CLASSES), "--image_size", str(SIZE), "--decoder_hidden_size", "32",
        "--auxiliary_channels", "16", "--per_device_train_batch_size", "8", "--save_strategy", "no", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(data, fcmae_checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("upernet")
    metrics = segmentation.main(
        script_args(
            output,
            "--model_name_or_path", str(fcmae_checkpoint),
            "--train_dir", str(data / "train"), "--validation_dir", str(data / "validation"),
            "--max_steps", "300", "--learning_rate", "3e-3", "--warmup_steps", "10", "--drop_path_rate", "0",
            "--layer_decay", "0.9", "--eval_on_start", "True", "--logging_steps", "100", "--seed", "0",
        )
    )  # fmt: skip
    return output, metrics


# --- training ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mean_iou_rises_well_above_chance_and_the_untrained_model(trained, data):
    output, metrics = trained
    chance = chance_mean_iou(read_masks(data / "validation"))
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    untrained = next(entry["eval_mean_iou"] for entry in history if "eval_mean_iou" in entry and entry["step"] == 0)
    print(f"chance mIoU {chance:.3f}, untrained {untrained:.3f}, after 300 steps {metrics['eval_mean_iou']:.3f}")
    assert 0.15 < chance < 0.3  # background is ~3/4 of the counted pixels: always-background scores ~0.75 / 4
    assert metrics["eval_mean_iou"] >= 2 * chance
    assert metrics["eval_mean_iou"] >= untrained + 0.3
    assert metrics["eval_overall_accuracy"] > 0.85


@pytest.mark.slow
def test_the_saved_model_reloads_with_transformers_alone(trained, data, tmp_path):
    output, _ = trained
    from transformers import UperNetForSemanticSegmentation

    ours = UperNetForSemanticSegmentation.from_pretrained(output).eval()
    assert type(ours.backbone).__module__.startswith("convnextv2_hf")
    validation = segmentation.pair_folder_dataset(str(data / "validation"), "image", "annotation")
    arguments = segmentation.DataArguments(train_dir="unused", image_size=SIZE, class_names=",".join(CLASSES))
    validation.set_transform(segmentation.segmentation_transform(arguments, len(CLASSES), train=False))
    pixels = torch.stack([validation[i]["pixel_values"] for i in range(4)])
    with torch.no_grad():
        logits = ours(pixel_values=pixels).logits
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    np.save(tmp_path / "logits.npy", logits.numpy())
    images = [str(p) for p in sorted((data / "validation" / "images").glob("*.jpg"))[:4]]
    program = f"""
import sys
sys.modules["convnextv2_hf"] = None  # importing the package now fails: transformers alone must do
import numpy as np, torch, PIL.Image
from transformers import AutoImageProcessor, UperNetForSemanticSegmentation
model = UperNetForSemanticSegmentation.from_pretrained({str(output)!r}).eval()
assert type(model.backbone).__module__ == "transformers.models.convnextv2.modeling_convnextv2", type(model.backbone)
pixels = torch.from_numpy(np.load({str(tmp_path / "pixels.npy")!r}))
with torch.no_grad():
    logits = model(pixel_values=pixels).logits.numpy()
print("logits", float(np.abs(logits - np.load({str(tmp_path / "logits.npy")!r})).max()))
processor = AutoImageProcessor.from_pretrained({str(output)!r})
processed = processor([PIL.Image.open(p) for p in {images!r}], return_tensors="pt")["pixel_values"]
print("processor", float((processed - pixels).abs().max()))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("logits", "processor")))
    print(f"stock transformers reload: logits within {reported['logits']}, processor within {reported['processor']}")
    assert float(reported["logits"]) <= 1e-5
    assert float(reported["processor"]) <= 1e-5  # the saved processor is the evaluation transform
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASSES)}
    assert config["backbone_config"]["model_type"] == "convnextv2"
    assert config["backbone_config"]["depths"] == ENCODER["depths"]
    assert config["backbone_config"]["out_features"] == ["stage1", "stage2", "stage3", "stage4"]


def test_a_datasets_dataset_trains_too_with_a_held_out_fraction(data, fcmae_checkpoint, tmp_path):
    """The same pairs as a local parquet dataset (image + annotation columns, train split only)."""
    from datasets import Dataset, Features, Image

    pairs = segmentation.pair_folder_dataset(str(data / "train"), "image", "annotation")
    dataset = Dataset.from_dict(pairs[:20], features=Features({"image": Image(), "annotation": Image()}))
    dataset.to_parquet(str(tmp_path / "dataset" / "data" / "train-00000-of-00001.parquet"))
    arguments = segmentation.DataArguments(
        dataset_name=str(tmp_path / "dataset"), class_names=",".join(CLASSES), image_size=SIZE, validation_fraction=0.2
    )
    train, validation = segmentation.load_splits(arguments, seed=0)
    assert (len(train), len(validation)) == (16, 4)
    # decoded dataset images give the same evaluation tensors as the files they came from
    validation.set_transform(segmentation.segmentation_transform(arguments, len(CLASSES), train=False))
    pairs.set_transform(segmentation.segmentation_transform(arguments, len(CLASSES), train=False))
    example = validation[0]
    twin = next(pairs[i] for i in range(20) if torch.equal(pairs[i]["labels"], example["labels"]))
    assert torch.equal(twin["pixel_values"], example["pixel_values"])
    metrics = segmentation.main(
        script_args(tmp_path / "out", "--model_name_or_path", str(fcmae_checkpoint), "--dataset_name",
                    str(tmp_path / "dataset"), "--validation_fraction", "0.2", "--max_steps", "2")
    )  # fmt: skip
    assert 0.0 <= metrics["eval_mean_iou"] <= 1.0 and (tmp_path / "out" / "model.safetensors").exists()


# --- initialisation from a checkpoint -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fcmae", "classifier"])
def test_the_backbone_takes_the_checkpoints_encoder_by_name(kind, tmp_path):
    config = ConvNextV2Config(**ENCODER, decoder_hidden_size=16, num_labels=3)
    model_class = ConvNextV2ForMaskedImageModeling if kind == "fcmae" else ConvNextV2ForImageClassification
    torch.manual_seed(1)
    source = model_class(config)
    source.save_pretrained(tmp_path / kind)
    upernet, report = segmentation.build_model(
        segmentation.ModelArguments(model_name_or_path=str(tmp_path / kind), decoder_hidden_size=16), CLASSES, 255
    )
    encoder = {k.removeprefix("convnextv2."): v for k, v in source.state_dict().items() if k.startswith("convnextv2.")}
    backbone = upernet.backbone.state_dict()
    assert report["loaded"] == sorted(k for k in encoder if k.startswith(("embeddings.", "encoder.")))
    assert all(torch.equal(backbone[k], encoder[k]) for k in report["loaded"])
    assert report["newly_initialised"] == sorted(k for k in backbone if k.startswith("hidden_states_norms."))
    expected_unused = {"convnextv2.layernorm.weight", "mask_token" if kind == "fcmae" else "classifier.weight"}
    assert expected_unused <= set(report["not_used"])
    assert upernet.config.backbone_config.depths == ENCODER["depths"]
    assert upernet.config.backbone_config.out_features == ["stage1", "stage2", "stage3", "stage4"]


# --- clear errors before training -----------------------------------------------------------------------------


def pair_folder(root: Path, count: int = 3, mask_mode: str = "L", mask_suffix: str = ".png", value: int = 1) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        PIL.Image.new("RGB", (SIZE, SIZE), (20 * i, 60, 90)).save(root / "images" / f"{i}.jpg")
        mask = PIL.Image.new("L", (SIZE, SIZE), value).convert(mask_mode)
        mask.save(root / "masks" / f"{i}{mask_suffix}")
    return root


def run_until_error(tmp_path, train_dir: Path, *extra: str):
    return segmentation.main(script_args(tmp_path / "out", "--train_dir", str(train_dir), "--max_steps", "1", *extra))


def test_unpaired_files_are_named(tmp_path):
    folder = pair_folder(tmp_path / "data")
    (folder / "masks" / "1.png").unlink()
    PIL.Image.new("L", (SIZE, SIZE)).save(folder / "masks" / "extra.png")
    with pytest.raises(ValueError, match=r"images without a mask \['1'\], masks without an image \['extra'\]"):
        run_until_error(tmp_path, folder)


@pytest.mark.parametrize(
    ("folder_kwargs", "message"),
    [
        ({"mask_suffix": ".jpg"}, r"mask .*0\.jpg is not a PNG"),
        ({"mask_mode": "RGB"}, r"mask .*0\.png has mode RGB: masks must be single-channel"),
        ({"value": 7}, r"\d\.png holds values \[7\] that are neither class ids 0\.\.3 nor the ignore index 255"),
    ],
)
def test_bad_masks_are_named(tmp_path, folder_kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_until_error(tmp_path, pair_folder(tmp_path / "data", **folder_kwargs))


def test_a_mask_of_another_size_than_its_image_is_named(tmp_path):
    folder = pair_folder(tmp_path / "data", count=4)
    for i in range(4):
        PIL.Image.new("L", (32, 32)).save(folder / "masks" / f"{i}.png")
    with pytest.raises(ValueError, match=r"\d\.png is 32x32, its image 64x64"):
        run_until_error(tmp_path, folder, "--validation_fraction", "0.5")


def test_batches_of_one_image_are_refused_or_avoided(tmp_path, caplog):
    """UperNet's pyramid pooling normalises 1x1 maps with BatchNorm: a training batch needs two images."""
    folder = pair_folder(tmp_path / "data", count=7)
    with pytest.raises(ValueError, match="per_device_train_batch_size must be >= 2"):
        run_until_error(tmp_path, folder, "--per_device_train_batch_size", "1")
    # 5 training images in batches of 2 would end with a batch of one: that image is left out, with a warning
    with caplog.at_level("WARNING"):
        metrics = run_until_error(
            tmp_path, folder, "--per_device_train_batch_size", "2", "--validation_fraction", "0.25",
            "--num_train_epochs", "1", "--max_steps", "-1", "--model_size", "atto",
        )  # fmt: skip
    assert "leaving out 1 of 5 training examples" in caplog.text
    assert metrics["epoch"] == 1.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image_size", "16"], "image_size must be at least the total stride 32, got 16"),
        (["--class_names", "a,a"], "--class_names must be distinct non-empty names"),
        (["--num_labels", "3"], r"--num_labels 3 but --class_names has 4 names"),
        (["--dataset_name", "x"], "give exactly one of --train_dir and --dataset_name"),
        (["--layer_decay", "1.5"], r"layer_decay must be in \(0, 1\], got 1.5"),
        (["--ignore_index", "2"], r"ignore_index 2 is a class id \(0..3\)"),
        (["--model_size", "gigantic"], UNKNOWN_MODEL_SIZE),
    ],
)
def test_bad_arguments_are_refused_before_training(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        run_until_error(tmp_path, pair_folder(tmp_path / "data"), *extra)


def test_classes_must_be_given(tmp_path):
    arguments = script_args(tmp_path / "out", "--train_dir", str(pair_folder(tmp_path / "data")))
    at = arguments.index("--class_names")
    with pytest.raises(ValueError, match="give the classes: --class_names a,b,c"):
        segmentation.main(arguments[:at] + arguments[at + 2 :])


def test_a_checkpoint_without_complete_weights_is_named(tmp_path, fcmae_checkpoint):
    import shutil

    folder = pair_folder(tmp_path / "data")
    broken = Path(shutil.copytree(fcmae_checkpoint, tmp_path / "broken"))
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"broken/model\.safetensors is not a complete safetensors file"):
        run_until_error(tmp_path, folder, "--model_name_or_path", str(broken), "--validation_fraction", "0.5")
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds no \*\.safetensors weights"):
        run_until_error(tmp_path, folder, "--model_name_or_path", str(broken), "--validation_fraction", "0.5")
