"""The main job, offline, on an embedded default: scikit-learn's 1,797 handwritten digits.

1. Write the digits, upscaled, to an image folder (train / validation split, stratified).
2. FCMAE-pretrain ConvNeXt V2-Atto on the training images alone (``examples/pretrain_fcmae.py``).
3. Fine-tune it with layer-wise lr decay (``examples/finetune_image_classification.py``) and evaluate on the
   held-out split; fine-tune the same model from random initialisation too, to show what pretraining bought.
4. Save a Hub-ready folder (safetensors, config, processor, model card), reload it with
   ``pipeline("image-classification")`` and print predictions.

    python examples/main_job.py [--output_dir outputs/main_job] [--quick]

``--quick`` runs a much shorter schedule (for the test suite); the accuracy target is for the full run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_image_classification  # noqa: E402
import pretrain_fcmae  # noqa: E402

IMAGE_SIZE = 64


@dataclass
class MainJobArguments:
    output_dir: str = field(default="outputs/main_job", metadata={"help": "where the data and models go"})
    quick: bool = field(default=False, metadata={"help": "a short schedule, for tests"})


def write_digits(root: Path, image_size: int, validation_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """scikit-learn's digits as PNGs in ``root/{train,validation}/<digit>/``; returns the split sizes."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_ids, validation_ids = train_test_split(
        indices, test_size=validation_fraction, stratify=digits.target, random_state=seed
    )
    for split, ids in (("train", train_ids), ("validation", validation_ids)):
        for i in ids:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            image = PIL.Image.fromarray(pixels, mode="L").resize((image_size, image_size), PIL.Image.Resampling.BICUBIC)
            image.save(folder / f"{i:04d}.png")
    return {"train": len(train_ids), "validation": len(validation_ids)}


def common_arguments(output_dir: Path, epochs: float, batch: int) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--num_train_epochs", str(epochs), "--per_device_train_batch_size",
        str(batch), "--per_device_eval_batch_size", "128", "--use_cpu", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "20", "--seed", "0", "--dataloader_num_workers", "0",
        "--disable_tqdm", "true", "--image_size", str(IMAGE_SIZE),
    ]  # fmt: skip


def finetune(output_dir: Path, data_dir: Path, model: list[str], epochs: float) -> dict:
    return finetune_image_classification.main(
        [
            *common_arguments(output_dir, epochs, 32), "--data_dir", str(data_dir), *model,
            "--recipe", "atto", "--learning_rate", "2e-3", "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine",
            "--weight_decay", "0.05", "--horizontal_flip", "false", "--rand_augment_magnitude", "5",
            "--random_erasing", "0", "--ema_decay", "0", "--eval_strategy", "no",
        ]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(MainJobArguments).parse_args_into_dataclasses(args=argv)
    output = Path(args.output_dir)
    pretrain_epochs, finetune_epochs = (0.5, 0.5) if args.quick else (10, 8)
    started = time.perf_counter()

    data_dir = output / "digits"
    if not (data_dir / "train").exists():
        sizes = write_digits(data_dir, IMAGE_SIZE)
        print(f"[1] wrote {sizes['train']} training and {sizes['validation']} held-out digits to {data_dir}/")

    pretrain_fcmae.main(
        [
            *common_arguments(output / "fcmae", pretrain_epochs, 64), "--train_dir", str(data_dir / "train"),
            "--model_size", "atto", "--mask_ratio", "0.5", "--decoder_hidden_size", "256",
            "--learning_rate", "2e-3", "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine",
            "--weight_decay", "0.05", "--reconstruction_every", "0",
        ]
    )  # fmt: skip
    pretrain_seconds = time.perf_counter() - started
    print(f"[2] FCMAE pretraining done in {pretrain_seconds:.0f}s")

    pretrained = finetune(
        output / "classifier", data_dir, ["--model_name_or_path", str(output / "fcmae")], finetune_epochs
    )
    scratch = finetune(output / "classifier_from_scratch", data_dir, ["--model_size", "atto"], finetune_epochs)
    best = "eval_accuracy"

    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(output / "classifier"), device="cpu")
    samples = sorted((data_dir / "validation").glob("*/*.png"))[::40][:6]
    print("[4] predictions of the saved folder, reloaded with pipeline('image-classification'):")
    for path in samples:
        top = classifier(str(path), top_k=1)[0]
        print(f"    {path.parent.name}/{path.name}: predicted {top['label']} ({top['score']:.2f})")
    elapsed = time.perf_counter() - started
    summary = {
        "held_out_accuracy_fcmae_pretrained": pretrained[best],
        "held_out_accuracy_random_init": scratch[best],
        "metric": best,
        "seconds": round(elapsed),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[3] held-out accuracy: FCMAE-pretrained {pretrained[best]:.2%}, from random initialisation "
        f"{scratch[best]:.2%} ({best})"
    )
    print(f"done in {elapsed / 60:.1f} min; Hub-ready folder: {output / 'classifier'}/")


if __name__ == "__main__":
    main()
