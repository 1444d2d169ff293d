"""The 26 official ConvNeXt V2 checkpoints, as data.

One row per file of the official README's three tables (FCMAE pretrained encoders, ImageNet-1K fine-tuned and
ImageNet-22K -> 1K fine-tuned classifiers), with the numbers the README gives: resolution, acc@1 (None for the
self-supervised encoders), parameters in millions and GFLOPs (None where the README gives none). File names,
URLs, Hub repository names and model card titles follow from each row by one naming rule each.

Also the 1000 ImageNet-1K class names (``imagenet1k_labels.json`` beside this file, in torchvision's spelling),
the ``id2label`` of every converted classifier.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

BASE_URL = "https://dl.fbaipublicfiles.com/convnext/convnextv2"
# namespace of the suggested Hub repository ids; convert_all.py --namespace picks another
DEFAULT_HUB_NAMESPACE = "convnextv2-hf"
PAPER_URL = "https://arxiv.org/abs/2301.00808"
OFFICIAL_REPOSITORY_URL = "https://github.com/facebookresearch/ConvNeXt-V2"

# pretraining data, as the issue names them; the key is the tag used in official file names
FCMAE = "1K FCMAE"
FINETUNED_1K = "1K fine-tuned"
FINETUNED_22K = "22K→1K fine-tuned"


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One official file. ``params_m`` in millions and ``gflops`` as the README prints them."""

    size: str
    resolution: int
    pretraining: str
    acc1: float | None
    params_m: float
    gflops: float | None

    @property
    def is_classifier(self) -> bool:
        """Fine-tuned files hold a 1000-class ImageNet classifier; FCMAE files the encoder only."""
        return self.pretraining != FCMAE

    @property
    def name(self) -> str:
        """The official file name without ``.pt``, e.g. ``convnextv2_atto_1k_224_fcmae``."""
        data = "22k" if self.pretraining == FINETUNED_22K else "1k"
        suffix = "fcmae" if self.pretraining == FCMAE else "ema"
        return f"convnextv2_{self.size}_{data}_{self.resolution}_{suffix}"

    @property
    def url(self) -> str:
        folder = {FCMAE: "pt_only", FINETUNED_1K: "im1k", FINETUNED_22K: "im22k"}[self.pretraining]
        return f"{BASE_URL}/{folder}/{self.name}.pt"

    @property
    def file_name(self) -> str:
        return f"{self.name}.pt"

    @property
    def repo_name(self) -> str:
        """Suggested Hub repository name: ``convnextv2-atto-1k-224-fcmae``, ``convnextv2-nano-22k-384``."""
        return self.name.removesuffix("_ema").replace("_", "-")

    def repo_id(self, namespace: str = DEFAULT_HUB_NAMESPACE) -> str:
        """``namespace/repo_name``; ``ValueError`` for a namespace the Hub would refuse (see ``parse_namespace``)."""
        return f"{parse_namespace(namespace)}/{self.repo_name}"

    @property
    def title(self) -> str:
        """Model card title, e.g. "ConvNeXt V2 Atto (3.7M), FCMAE-pretrained on ImageNet-1K, 224x224"."""
        what = {
            FCMAE: "FCMAE-pretrained on ImageNet-1K",
            FINETUNED_1K: "fine-tuned on ImageNet-1K",
            FINETUNED_22K: "ImageNet-22K fine-tuned, then ImageNet-1K fine-tuned",
        }[self.pretraining]
        return f"ConvNeXt V2 {self.size.capitalize()} ({format_params(self.params_m)}), {what}, " + (
            f"{self.resolution}x{self.resolution}"
        )


def format_params(params_m: float) -> str:
    """3.7 -> "3.7M", 89.0 -> "89M" (the README's rounding)."""
    return f"{params_m:g}M"


def _rows(pretraining: str, rows: list[tuple]) -> list[OfficialCheckpoint]:
    return [OfficialCheckpoint(size, res, pretraining, acc1, params, flops) for size, res, acc1, params, flops in rows]


# size, resolution, acc@1, params (M), GFLOPs -- copied from the official README's tables
OFFICIAL_CHECKPOINTS: list[OfficialCheckpoint] = [
    *_rows(
        FCMAE,
        [
            ("atto", 224, None, 3.7, None),
            ("femto", 224, None, 5.2, None),
            ("pico", 224, None, 9.1, None),
            ("nano", 224, None, 15.6, None),
            ("tiny", 224, None, 28.6, None),
            ("base", 224, None, 89, None),
            ("large", 224, None, 198, None),
            ("huge", 224, None, 660, None),
        ],
    ),
    *_rows(
        FINETUNED_1K,
        [
            ("atto", 224, 76.7, 3.7, 0.55),
            ("femto", 224, 78.5, 5.2, 0.78),
            ("pico", 224, 80.3, 9.1, 1.37),
            ("nano", 224, 81.9, 15.6, 2.45),
            ("tiny", 224, 83.0, 28.6, 4.47),
            ("base", 224, 84.9, 89, 15.4),
            ("large", 224, 85.8, 198, 34.4),
            ("huge", 224, 86.3, 660, 115),
        ],
    ),
    *_rows(
        FINETUNED_22K,
        [
            ("nano", 224, 82.1, 15.6, 2.45),
            ("nano", 384, 83.4, 15.6, 7.21),
            ("tiny", 224, 83.9, 28.6, 4.47),
            ("tiny", 384, 85.1, 28.6, 13.1),
            ("base", 224, 86.8, 89, 15.4),
            ("base", 384, 87.7, 89, 45.2),
            ("large", 224, 87.3, 198, 34.4),
            ("large", 384, 88.2, 198, 101.1),
            ("huge", 384, 88.7, 660, 337.9),
            ("huge", 512, 88.9, 660, 600.8),
        ],
    ),
]

CHECKPOINTS_BY_NAME: dict[str, OfficialCheckpoint] = {row.name: row for row in OFFICIAL_CHECKPOINTS}


def find_official_checkpoint(reference: str | Path) -> OfficialCheckpoint | None:
    """The table row named by ``reference``: a table name, an official URL, or a path whose file name is an
    official file name (``convnextv2_atto_1k_224_ema.pt``); None when it names none."""
    text = str(reference)
    stem = re.sub(r"\.(pt|pth)$", "", text.rstrip("/").rsplit("/", 1)[-1])
    return CHECKPOINTS_BY_NAME.get(stem) or next((c for c in OFFICIAL_CHECKPOINTS if c.url == text), None)


def parse_repo_id(text: str) -> str:
    """A Hub repository id (``namespace/name``) as the Hub accepts it; ``ValueError`` naming what is wrong, so a
    bad id fails before a conversion, not after it at the push (and never ends up in a model card)."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(text))
    except ValueError as error:  # HFValidationError
        raise ValueError(f"{text!r} is not a Hub repository id: {error}") from None
    return str(text)


def parse_namespace(text: str) -> str:
    """A Hub user or organisation name (the part of a repository id before the ``/``); ``ValueError`` otherwise."""
    problem = "a user or organisation name, without '/'" if not text or "/" in str(text) else None
    if problem is None:
        try:
            parse_repo_id(f"{text}/convnextv2")
        except ValueError:
            problem = "letters, digits, '-', '_' and '.' only, not starting or ending with '-' or '.', no '--' or '..'"
    if problem is not None:
        raise ValueError(f"{text!r} is not a Hub namespace ({problem})")
    return str(text)


def select_checkpoints(filters: list[str] | None = None) -> list[OfficialCheckpoint]:
    """Rows whose name contains any of ``filters`` (substrings such as ``atto``, ``22k``, ``fcmae``,
    ``384``); every row when no filter is given."""
    if not filters:
        return list(OFFICIAL_CHECKPOINTS)
    return [c for c in OFFICIAL_CHECKPOINTS if any(f.lower() in c.name for f in filters)]


@cache
def imagenet1k_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names, index = class id (torchvision's names, shipped as JSON)."""
    labels = json.loads((Path(__file__).with_name("imagenet1k_labels.json")).read_text(encoding="utf-8"))
    if len(labels) != 1000:
        raise ValueError(f"imagenet1k_labels.json must hold 1000 names, found {len(labels)}")
    return tuple(labels)


def imagenet1k_id2label() -> dict[int, str]:
    return dict(enumerate(imagenet1k_labels()))


__all__ = [
    "CHECKPOINTS_BY_NAME",
    "DEFAULT_HUB_NAMESPACE",
    "FCMAE",
    "FINETUNED_1K",
    "FINETUNED_22K",
    "OFFICIAL_CHECKPOINTS",
    "OfficialCheckpoint",
    "find_official_checkpoint",
    "imagenet1k_id2label",
    "imagenet1k_labels",
    "parse_namespace",
    "parse_repo_id",
    "select_checkpoints",
]
