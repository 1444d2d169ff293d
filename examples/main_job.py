"""The main job, offline, on an embedded default: scikit-learn's 1,797 handwritten digits.

1. Write the digits, upscaled, to an image folder (train / validation split, stratified).
2. FCMAE-pretrain ConvNeXt V2-Atto on the training images alone (``examples/pretrain_fcmae.py``).
3. Fine-tune it with layer-wise lr decay (``examples/finetune_image_classification.py``) and evaluate on the
   held-out split; fine-tune the same model from random initialisation too, to show what pretraining bought.
4. Save a Hub-ready folder (safetensors, config, processor, model card), reload it with
   ``pipeline("image-classification")`` and print predictions.

    python examples/main_job.py [--output_dir outputs/main_job] [--quick] [--bf16_autocast auto|on|off] [--seed 0]
                                [--keep_freed_memory auto|on|off]

``--quick`` runs a much shorter schedule (for the test suite); the accuracy target is for the full run.
``--bf16_autocast``: pretraining and fine-tuning under bf16 autocast (the Trainer's ``--bf16``). ``auto`` (the
default) uses it only on a CPU with native bf16 (AMX-BF16 or AVX512-BF16), where it can be faster; elsewhere torch
emulates bf16, slower than fp32, and the job runs in fp32. On an AVX512-BF16 CPU bf16 kept the held-out accuracy
(-0.28 and +0.56 points on two seeds) and was 1.08-1.16x faster: BENCHMARKS.md, "The main job in bf16".
``--keep_freed_memory``: the scripts' flag (``KeepFreedMemoryCallback``), passed on; ``auto`` keeps freed memory in
the process while training on the CPU (BENCHMARKS.md, "glibc keeping freed memory in training").
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

from convnextv2_hf.cpu_memory import KEEP_FREED_MEMORY_SETTINGS  # noqa: E402
from convnextv2_hf.fast_paths_convnextv2 import native_bf16_cpu  # noqa: E402

IMAGE_SIZE = 64


@dataclass
class MainJobArguments:
    output_dir: str = field(default="outputs/main_job", metadata={"help": "where the data and models go"})
    quick: bool = field(default=False, metadata={"help": "a short schedule, for tests"})
    seed: int = field(default=0, metadata={"help": "the training seed (the data split stays seed 0)"})
    bf16_autocast: str = field(
        default="auto",
        metadata={
            "help": "bf16 autocast in pretraining and fine-tuning: auto (only on a CPU with native bf16), on, off",
            "choices": ["auto", "on", "off"],
        },
    )
    keep_freed_memory: str = field(
        default="auto",
        metadata={
            "help": "glibc keeps freed memory for reuse while training: auto (on the CPU), on, off",
            "choices": list(KEEP_FREED_MEMORY_SETTINGS),
        },
    )


def use_bf16_autocast(setting: str) -> bool:
    """``--bf16_autocast``: ``auto`` is on only where the CPU has native bf16 (``native_bf16_cpu``)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"--bf16_autocast must be auto, on or off, got {setting!r}")
    return native_bf16_cpu() if setting == "auto" else setting == "on"


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


def common_arguments(
    output_dir: Path, epochs: float, batch: int, bf16: bool = False, seed: int = 0, keep_freed_memory: str = "auto"
) -> list[str]:
    return (["--bf16", "true"] if bf16 else []) + ["--keep_freed_memory", keep_freed_memory] + [
        "--output_dir", str(output_dir), "--num_train_epochs", str(epochs), "--per_device_train_batch_size",
        str(batch), "--per_device_eval_batch_size", "128", "--use_cpu", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "20", "--seed", str(seed), "--dataloader_num_workers", "0",
        "--disable_tqdm", "true", "--image_size", str(IMAGE_SIZE),
    ]  # fmt: skip


def finetune(
    output_dir: Path,
    data_dir: Path,
    model: list[str],
    epochs: float,
    bf16: bool = False,
    seed: int = 0,
    keep_freed_memory: str = "auto",
) -> dict:
    return finetune_image_classification.main(
        [
            *common_arguments(output_dir, epochs, 32, bf16, seed, keep_freed_memory),
            "--data_dir", str(data_dir), *model,
            "--recipe", "atto", "--learning_rate", "2e-3", "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine",
            "--weight_decay", "0.05", "--horizontal_flip", "false", "--rand_augment_magnitude", "5",
            "--random_erasing", "0", "--ema_decay", "0", "--eval_strategy", "no",
        ]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(MainJobArguments).parse_args_into_dataclasses(args=argv)
    output = Path(args.output_dir)
    pretrain_epochs, finetune_epochs = (0.5, 0.5) if args.quick else (10, 8)
    bf16 = use_bf16_autocast(args.bf16_autocast)
    keep = args.keep_freed_memory  # one of its choices: the parser refused any other
    started = time.perf_counter()
    if bf16:
        why = "asked for" if args.bf16_autocast == "on" else "this CPU has native bf16; --bf16_autocast off for fp32"
        print(f"[0] training under bf16 autocast ({why})")

    data_dir = output / "digits"
    if not (data_dir / "train").exists():
        sizes = write_digits(data_dir, IMAGE_SIZE)
        print(f"[1] wrote {sizes['train']} training and {sizes['validation']} held-out digits to {data_dir}/")

    pretrain_fcmae.main(
        [
            *common_arguments(output / "fcmae", pretrain_epochs, 64, bf16, args.seed, keep),
            "--train_dir", str(data_dir / "train"),
            "--model_size", "atto", "--mask_ratio", "0.5", "--decoder_hidden_size", "256",
            "--learning_rate", "2e-3", "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine",
            "--weight_decay", "0.05", "--reconstruction_every", "0",
        ]
    )  # fmt: skip
    pretrain_seconds = time.perf_counter() - started
    print(f"[2] FCMAE pretraining done in {pretrain_seconds:.0f}s")

    pretrained = finetune(
        output / "classifier", data_dir, ["--model_name_or_path", str(output / "fcmae")], finetune_epochs, bf16,
        args.seed, keep,
    )  # fmt: skip
    scratch = finetune(
        output / "classifier_from_scratch", data_dir, ["--model_size", "atto"], finetune_epochs, bf16, args.seed, keep
    )
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
        "bf16_autocast": bf16,
        "keep_freed_memory": keep,
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
