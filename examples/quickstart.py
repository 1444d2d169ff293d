"""End-to-end tour of the package on generated images, offline, in about a minute on two CPU cores.

1. FCMAE-pretrain a ConvNeXt V2-Atto on unlabelled images (sparse masked encoder + decoder).
2. Save it, reload it through ``AutoModelForMaskedImageModeling``.
3. Load its encoder into ``ConvNextV2ForImageClassification`` and fine-tune on labelled images.
4. Save the classifier, reload it through ``AutoModelForImageClassification`` and classify held-out images.

The images are drawn here: three classes of striped or dotted patterns with random colours, phases and noise.
Run: ``python examples/quickstart.py [--output-dir DIR] [--steps N]``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageClassification, AutoModelForMaskedImageModeling

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling

CLASSES = ["horizontal stripes", "vertical stripes", "dots"]


def make_images(num_images: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (N, 3, size, size) images and their labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % len(CLASSES)
    coords = torch.arange(size, dtype=torch.float32)
    rows, cols = coords.view(-1, 1).expand(size, size), coords.view(1, -1).expand(size, size)
    images = []
    for label in labels.tolist():
        period = 6 + 10 * torch.rand(1, generator=generator).item()
        phase = 2 * math.pi * torch.rand(2, generator=generator)
        if label == 0:
            pattern = torch.sin(2 * math.pi * rows / period + phase[0])
        elif label == 1:
            pattern = torch.sin(2 * math.pi * cols / period + phase[0])
        else:
            pattern = torch.sin(2 * math.pi * rows / period + phase[0]) * torch.sin(
                2 * math.pi * cols / period + phase[1]
            )
        colour = torch.rand(3, 1, 1, generator=generator) * 2 - 1
        noise = 0.3 * torch.randn(3, size, size, generator=generator)
        images.append(colour * pattern + noise)
    return torch.stack(images), labels


def train(model: torch.nn.Module, steps: int, lr: float, loss_of_batch) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_of_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps for each of the two trainings")
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)

    train_images, train_labels = make_images(240, args.image_size, seed=1)
    test_images, test_labels = make_images(60, args.image_size, seed=2)
    sampler = torch.Generator().manual_seed(3)

    def random_batch(size: int = 24) -> torch.Tensor:
        return torch.randint(0, len(train_images), (size,), generator=sampler)

    # 1. FCMAE pretraining on the images alone
    config = ConvNextV2Config.from_preset("atto", decoder_hidden_size=256)
    fcmae = ConvNextV2ForMaskedImageModeling(config)
    fcmae_losses = train(fcmae, args.steps, 2e-3, lambda: fcmae(train_images[random_batch()]).loss)
    print(f"[1] FCMAE pretraining, {args.steps} steps: loss {fcmae_losses[0]:.3f} -> {_tail_mean(fcmae_losses):.3f}")

    # 2. save and reload through the Auto class
    fcmae.save_pretrained(output_dir / "fcmae")
    fcmae = AutoModelForMaskedImageModeling.from_pretrained(output_dir / "fcmae").eval()
    with torch.no_grad():
        noise = torch.rand(len(test_images), (args.image_size // 32) ** 2, generator=torch.Generator().manual_seed(4))
        test_reconstruction = fcmae(test_images, noise=noise).loss.item()
    print(f"[2] reloaded {type(fcmae).__name__}; held-out masked reconstruction loss {test_reconstruction:.3f}")

    # 3. fine-tune a classifier from the pretrained encoder
    classifier = ConvNextV2ForImageClassification.from_pretrained(
        output_dir / "fcmae",
        num_labels=len(CLASSES),
        id2label=dict(enumerate(CLASSES)),
        label2id={name: i for i, name in enumerate(CLASSES)},
    )

    def classification_loss() -> torch.Tensor:
        index = random_batch()
        return classifier(train_images[index], labels=train_labels[index]).loss

    cls_losses = train(classifier, args.steps, 2e-3, classification_loss)
    print(f"[3] fine-tuning, {args.steps} steps: loss {cls_losses[0]:.3f} -> {_tail_mean(cls_losses):.3f}")

    # 4. save, reload through the Auto class, classify held-out images
    classifier.save_pretrained(output_dir / "classifier")
    classifier = AutoModelForImageClassification.from_pretrained(output_dir / "classifier").eval()
    with torch.no_grad():
        probabilities = classifier(test_images).logits.softmax(-1)
    predictions = probabilities.argmax(-1)
    accuracy = (predictions == test_labels).float().mean().item()
    print(f"[4] reloaded {type(classifier).__name__}; held-out accuracy {accuracy:.1%} on {len(test_images)} images")
    for i in range(4):
        label = classifier.config.id2label[int(predictions[i])]
        print(
            f"    image {i}: predicted {label!r} ({probabilities[i].max():.2f}), true {CLASSES[int(test_labels[i])]!r}"
        )
    print(f"done in {time.perf_counter() - started:.0f}s; checkpoints in {output_dir}/")


def _tail_mean(values: list[float], count: int = 5) -> float:
    return sum(values[-count:]) / len(values[-count:])


if __name__ == "__main__":
    main()
