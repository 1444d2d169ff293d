"""Top-1 / top-5 accuracy of a ConvNeXt V2 classifier on an image folder, with the official eval transform.

    python examples/evaluate_classifier.py --model_name_or_path out/classifier --data_dir data/validation

The folder holds one sub-folder per class, named as the model's labels (``id2label``); the processor saved
with the model is used (the official evaluation transform), or ``--image_size`` builds one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser

from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ImageProcessor
from convnextv2_hf.metrics import load_top_k_accuracy
from convnextv2_hf.transforms import image_folder_dataset


@dataclass
class EvaluationArguments:
    model_name_or_path: str = field(metadata={"help": "a classifier folder"})
    data_dir: str = field(metadata={"help": "image folder, one sub-folder per class"})
    image_size: int | None = field(default=None, metadata={"help": "override the saved processor's size"})
    batch_size: int = 64
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(args=argv)
    model = ConvNextV2ForImageClassification.from_pretrained(args.model_name_or_path).to(args.device).eval()
    if args.image_size is None:
        processor = ConvNextV2ImageProcessor.from_pretrained(args.model_name_or_path)
    else:
        processor = ConvNextV2ImageProcessor(size={"shortest_edge": args.image_size})
    split = next(iter(image_folder_dataset(args.data_dir).values()))
    folder_names = split.features["label"].names
    label2id = {name: int(i) for name, i in model.config.label2id.items()}
    unknown = [name for name in folder_names if name not in label2id]
    if unknown:
        raise ValueError(f"class folders {unknown} are not labels of the model ({sorted(label2id)})")
    metric = load_top_k_accuracy()
    for start in range(0, len(split), args.batch_size):
        batch = split[start : start + args.batch_size]
        pixels = processor(batch["image"], return_tensors="pt")["pixel_values"].to(args.device)
        with torch.inference_mode():
            logits = model(pixels).logits.float().cpu().numpy()
        references = np.array([label2id[folder_names[i]] for i in batch["label"]])
        metric.add_batch(predictions=logits, references=references)
    results = metric.compute(k=5)
    results["num_images"] = len(split)
    print(
        " ".join(
            f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}" for key, value in results.items()
        )
    )
    return results


if __name__ == "__main__":
    main()
