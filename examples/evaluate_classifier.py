"""Top-1 / top-5 accuracy of a ConvNeXt V2 classifier on an image folder or a ``datasets`` dataset, with the
official eval transform.

    python examples/evaluate_classifier.py --model_name_or_path out/classifier --data_dir data/validation
    python examples/evaluate_classifier.py --model_name_or_path out/classifier --data_dir data --split test
    python examples/evaluate_classifier.py --model_name_or_path out/classifier --dataset_name path/to/dataset

``--data_dir`` is either one split's folder (one sub-folder per class, named as the model's labels, evaluated
whole) or a folder of split sub-folders (``train``, ``validation``/``val``, ``test``, ...) that each hold class
sub-folders. With several splits, ``--split`` picks one; it defaults to ``validation`` and is never guessed: when
there is no such split the script stops and lists the splits there are. The processor saved with the model is
used (the official evaluation transform), or ``--image_size`` builds one (a model folder saved without a processor
needs it). Images are decoded by ``convnextv2_hf.transforms.load_image``: an unreadable file stops the run with its
name, and an image over the decoding limit (``CONVNEXTV2_MAX_IMAGE_PIXELS``) is refused before it is decoded. The
pixels follow the package's image rule (``convnextv2_hf.image_loading``: EXIF orientation, alpha on white, 16-bit
scaled), the same as the processor's and the pipelines' for each file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ImageProcessor
from convnextv2_hf.metrics import load_top_k_accuracy
from convnextv2_hf.training import check_safetensors_files
from convnextv2_hf.transforms import IMAGE_EXTENSIONS, image_folder_dataset, with_image_transform

# folder names that `datasets` reads as splits, by the split they become (datasets.data_files.SPLIT_KEYWORDS)
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
SPLIT_FOLDER_NAMES = {name for names in SPLIT_FOLDERS.values() for name in names}
DEFAULT_SPLIT = "validation"


def _holds_class_folders(folder: Path) -> bool:
    """Images sit in sub-folders of ``folder`` (one per class), none directly in it. ``datasets`` would otherwise
    take the folder's own name (``validation``) for every image's label."""

    def is_image(path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS

    entries = list(folder.iterdir())
    in_subfolders = any(is_image(f) for p in entries if p.is_dir() for f in p.rglob("*"))
    return in_subfolders and not any(is_image(p) for p in entries)


@dataclass
class EvaluationArguments:
    model_name_or_path: str = field(metadata={"help": "a classifier folder"})
    data_dir: str | None = field(
        default=None, metadata={"help": "a folder of class sub-folders, or of split sub-folders holding them"}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "a datasets name or local path instead"})
    split: str | None = field(
        default=None,
        metadata={"help": f"the split to evaluate when the data has several (default {DEFAULT_SPLIT}; never guessed)"},
    )
    image_column: str = "image"
    label_column: str = "label"
    image_size: int | None = field(default=None, metadata={"help": "override the saved processor's size"})
    batch_size: int = 64
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    bf16_autocast: bool = field(
        default=False,
        metadata={"help": "evaluate under torch.autocast(bfloat16), as a Trainer run with --bf16 evaluates"},
    )


def check_arguments(args: EvaluationArguments) -> None:
    """``ValueError`` naming the flag for arguments that cannot work, before any data or weights are read."""
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError):  # torch's message lists every device type it knows
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")


def load_processor(args: EvaluationArguments) -> ConvNextV2ImageProcessor:
    """The processor saved with the model (the evaluation transform it was trained for), or one of
    ``--image_size``. A local model folder without one is a ``ValueError``: guessing a size could evaluate the
    model on inputs it was not trained for."""
    if args.image_size is not None:
        return ConvNextV2ImageProcessor(size={"shortest_edge": args.image_size})
    folder = Path(args.model_name_or_path)
    if folder.is_dir() and not (folder / "preprocessor_config.json").is_file():
        raise ValueError(
            f"the model folder {str(folder)!r} has no preprocessor_config.json (the evaluation transform saved "
            "with the model); pass --image_size N to evaluate with the official transform at N x N pixels"
        )
    return ConvNextV2ImageProcessor.from_pretrained(args.model_name_or_path)


def _pick_split(splits, wanted: str | None, source: str):
    name = wanted or DEFAULT_SPLIT
    if name not in splits:
        how = "" if wanted else f" (--split defaults to {DEFAULT_SPLIT})"
        raise ValueError(
            f"{source} has no {name!r} split{how}; its splits are {sorted(splits)}: choose one with --split"
        )
    return splits[name], name


def load_evaluation_split(args: EvaluationArguments):
    """(dataset, split name or None for a folder evaluated whole), checked: one source, the split exists, an
    image and a label column (class sub-folders) are there."""
    if (args.data_dir is None) == (args.dataset_name is None):
        raise ValueError("give exactly one of --data_dir and --dataset_name")
    if args.dataset_name is not None:
        from datasets import load_dataset

        dataset, split = _pick_split(load_dataset(args.dataset_name), args.split, f"dataset {args.dataset_name!r}")
        where = f"split {split!r} of {args.dataset_name!r}"
    else:
        root = Path(args.data_dir)
        if not root.is_dir():
            raise ValueError(f"--data_dir {str(root)!r} is not a folder")
        split_folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_FOLDER_NAMES)
        if split_folders:
            splits = image_folder_dataset(root, drop_labels=False)
            dataset, split = _pick_split(splits, args.split, f"{str(root)!r} ({split_folders})")
            where = f"split {split!r} of {str(root)!r}"
            folders = [root / name for name in split_folders if name.lower() in SPLIT_FOLDERS.get(split, (split,))]
        else:
            if args.split is not None:
                raise ValueError(
                    f"--split {args.split}: {str(root)!r} has no split sub-folders ({sorted(SPLIT_FOLDER_NAMES)}), so "
                    "it is evaluated whole; leave --split out, or point --data_dir at the folder that holds the splits"
                )
            dataset = image_folder_dataset(root, drop_labels=False)["train"]
            split, where, folders = None, repr(str(root)), [root]
        if not all(_holds_class_folders(folder) for folder in folders):
            raise ValueError(
                f"the images of {where} are not in class sub-folders: put each image in a sub-folder named after its "
                f"label (e.g. <folder>/<label>/image.png, one of {IMAGE_EXTENSIONS})"
            )
    if args.image_column not in dataset.column_names:
        raise ValueError(f"{where} has no {args.image_column!r} column (columns: {dataset.column_names})")
    if args.label_column not in dataset.column_names:
        raise ValueError(f"{where} has no {args.label_column!r} column (columns: {dataset.column_names})")
    return dataset, split


def evaluation_batches(dataset, processor, args: EvaluationArguments):
    """(pixel_values, labels) batches of ``args.batch_size``: each image decoded by ``load_image`` (an unreadable
    file is a ValueError naming it, an image over the pixel limit is refused before decoding), then the processor,
    which applies the package's image rule (``convnextv2_hf.image_loading``): the pixels the pipelines and the
    processor give for the same file."""
    images = with_image_transform(dataset, lambda image: image, args.image_column, args.label_column)
    for start in range(0, len(images), args.batch_size):
        batch = images[start : start + args.batch_size]
        yield processor(batch["pixel_values"], return_tensors="pt")["pixel_values"], np.asarray(batch["labels"])


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(args=argv)
    check_arguments(args)
    dataset, split = load_evaluation_split(args)  # fails before the model is read
    if Path(args.model_name_or_path).is_dir():
        check_safetensors_files(args.model_name_or_path)  # a truncated file is named, not a bare header error
    model = ConvNextV2ForImageClassification.from_pretrained(args.model_name_or_path).to(args.device).eval()
    processor = load_processor(args)
    label2id = {name: int(i) for name, i in model.config.label2id.items()}
    label_feature = dataset.features[args.label_column]
    if hasattr(label_feature, "names"):  # class folders / ClassLabel: names must be the model's labels
        names = label_feature.names
        unknown = [name for name in names if name not in label2id]
        if unknown:
            raise ValueError(f"classes {unknown} are not labels of the model ({sorted(label2id)})")
        to_model_id = np.array([label2id[name] for name in names])
    else:  # plain integer labels are the model's ids
        to_model_id = np.arange(model.config.num_labels)
    metric = load_top_k_accuracy()
    device_type = torch.device(args.device).type
    for pixels, labels in evaluation_batches(dataset, processor, args):
        with torch.inference_mode(), torch.autocast(device_type, torch.bfloat16, enabled=args.bf16_autocast):
            logits = model(pixels.to(args.device)).logits.float().cpu().numpy()
        if labels.min() < 0 or labels.max() >= len(to_model_id):
            raise ValueError(f"labels must be class ids in [0, {len(to_model_id)}), got {sorted(set(labels.tolist()))}")
        metric.add_batch(predictions=logits, references=to_model_id[labels])
    results = metric.compute(k=5)
    results["num_images"] = len(dataset)
    if split is not None:
        results["split"] = split
    print(
        " ".join(
            f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}" for key, value in results.items()
        )
    )
    return results


if __name__ == "__main__":
    main()
