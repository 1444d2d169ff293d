"""One call for the scripts: ``convert_checkpoint`` (source to verified output folder), the model card facts of a
conversion, and the argument parsers the scripts share.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints import (
    FCMAE,
    OfficialCheckpoint,
    find_official_checkpoint,
    imagenet1k_labels,
    parse_repo_id,
)
from ..configuration_convnextv2 import PRESETS
from ..model_card import CardFacts, card_facts_for_official, render_model_card
from .building import ConvertedCheckpoint, convert_state_dict
from .key_maps import FCMAE_PRETRAINING, FINETUNED
from .output import check_output_dir, write_output_folder
from .reading import load_original_checkpoint, resolve_checkpoint, sha256_of_file
from .verification import VERIFICATION_TOLERANCE, VerificationResult, top5_on_photo, verify_against_timm

# ----------------------------------------------------------------------------------------------------------
# Model card of a conversion
# ----------------------------------------------------------------------------------------------------------


def card_facts_for_conversion(
    converted: ConvertedCheckpoint, source: str, sha256: str, repo_id: str | None, verification: str | None
) -> CardFacts:
    """The card facts of a converted file: the table's for a released file, else read off the model."""
    if converted.official is not None and converted.layout is not FCMAE_PRETRAINING:
        facts = card_facts_for_official(converted.official, repo_id)
    else:
        architecture, layout, size = converted.architecture, converted.layout, converted.size
        label = size.capitalize() if size != "custom" else f"custom (depths {architecture.depths})"
        what = {"classifier": "image classifier", "encoder": "FCMAE encoder", "pretraining": "FCMAE model"}
        training = {"classifier": "fine-tuned classifier", "encoder": FCMAE, "pretraining": f"{FCMAE} with decoder"}
        facts = CardFacts(
            repo_id=repo_id or f"convnextv2-{size}-{layout.name}",
            title=f"ConvNeXt V2 {label}, {what[layout.kind]}, {converted.resolution}x{converted.resolution}",
            kind=layout.kind,
            size=size,
            depths=list(architecture.depths),
            hidden_sizes=list(architecture.hidden_sizes),
            resolution=converted.resolution,
            pretraining=training[layout.kind],
            params=f"{converted.model.num_parameters() / 1e6:.2f}M",
            source=source,
            official=False,
            num_labels=architecture.num_labels or 0,
        )
    facts.source, facts.source_sha256, facts.verification = source, sha256, verification
    return facts


# ----------------------------------------------------------------------------------------------------------
# One call for the scripts
# ----------------------------------------------------------------------------------------------------------

_FILE_NAME_PATTERN = re.compile(
    r"convnextv2[_-](?P<size>" + "|".join(PRESETS) + r")(?:[_-](?:1k|22k))?(?:[_-](?P<resolution>\d{3}))?"
)


def positive_int_argument(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parse_sha256(text: str) -> str:
    """A SHA-256 as 64 hexadecimal digits (any case, an optional ``sha256:`` prefix) -> lower case."""
    digest = str(text).strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"{text!r} is not a SHA-256 (64 hexadecimal digits)")
    return digest


def parse_model_name(name: str) -> tuple[str | None, OfficialCheckpoint | None]:
    """``--model-name``: a table name (``convnextv2_atto_1k_224_ema``), ``convnextv2_atto``, ``atto`` or
    ``custom`` -> (size or None for custom, table row or None)."""
    official = find_official_checkpoint(name)
    if official:
        return official.size, official
    key = name.lower().removeprefix("convnextv2_").removeprefix("convnextv2-")
    if key == "custom":
        return None, None
    if key not in PRESETS:
        raise ValueError(f"unknown model name {name!r}: use a size {list(PRESETS)}, 'custom' or an official name")
    return key, None


@dataclass
class ConversionReport:
    output_dir: Path
    converted: ConvertedCheckpoint
    source: str
    sha256: str
    verification: VerificationResult | None = None
    top5: list[tuple[str, float]] | None = None


def convert_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    model_name: str | None = None,
    resolution: int | None = None,
    verify: bool = True,
    verify_image_size: int | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    expected_sha256: str | None = None,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Convert one official checkpoint (path, URL or table name) into a Hugging Face folder at ``output_dir``.

    The model name (size) comes from ``model_name``, else the file name, else the tensor shapes. With
    ``verify`` the model is checked against timm before anything is written; a failed check raises
    ``VerificationError`` and leaves no folder. ``expected_sha256``: the file's SHA-256 must equal it, checked
    before the file is read. The folder records the source and its SHA-256 in ``CONVERSION_MARKER`` and the card.
    ``overwrite`` replaces only a folder an earlier conversion wrote (see ``check_output_dir``).
    """
    output_dir = Path(output_dir)
    if expected_sha256 is not None:
        expected_sha256 = parse_sha256(expected_sha256)
    if repo_id is not None:
        repo_id = parse_repo_id(repo_id)
    local = Path(str(checkpoint))
    check_output_dir(output_dir, source_path=local if local.is_file() else None, overwrite=overwrite)
    size, official = parse_model_name(model_name) if model_name else (None, None)
    path, source = resolve_checkpoint(checkpoint, cache_dir)
    check_output_dir(output_dir, source_path=path, overwrite=overwrite)  # a cached file is a source too
    official = official or find_official_checkpoint(path)
    if size is None and official is None and not model_name:
        match = _FILE_NAME_PATTERN.search(path.name)
        size = match["size"] if match else None
        resolution = resolution or (int(match["resolution"]) if match and match["resolution"] else None)
    sha256 = sha256_of_file(path)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise ValueError(
            f"{path} has SHA-256 {sha256}, not the expected {expected_sha256}: it is another file, or corrupted "
            "(a flipped bit still loads, and timm would read the same wrong bytes); nothing was converted"
        )
    log(f"reading {path} (sha256 {sha256[:16]}...{', as expected' if expected_sha256 else ''})")
    converted = convert_state_dict(load_original_checkpoint(path), size=size, resolution=resolution, official=official)
    architecture = converted.architecture
    log(
        f"layout: {converted.layout.description}; model convnextv2_{converted.size} (depths {architecture.depths}, "
        f"widths {architecture.hidden_sizes}) -> {type(converted.model).__name__} at {converted.resolution} px"
    )
    if converted.filled:
        log(f"not in the file, started at identity (weight 1, bias 0) as official fine-tuning does: {converted.filled}")

    report = ConversionReport(output_dir, converted, source, sha256)
    if verify:
        report.verification = verify_against_timm(converted, verify_image_size)
        log(f"{report.verification.summary()}: OK (tolerance {VERIFICATION_TOLERANCE:g})")
        if report.verification.note:
            log(f"note: {report.verification.note}")
    else:
        log("verification skipped (--no-verify)")
    if converted.layout is FINETUNED and converted.model.config.num_labels == len(imagenet1k_labels()):
        report.top5 = top5_on_photo(converted.model, converted.resolution)
        if report.top5 is None:
            log("scikit-image is not installed: no top-5 check on a real photo")
        else:
            log(
                "top-5 on scikit-image's chelsea (cat) photo: "
                + ", ".join(f"{label} {probability:.3f}" for label, probability in report.top5)
            )

    verification_text = None
    if report.verification is not None:
        verification_text = (
            f"max abs difference {report.verification.max_abs_diff:.2e} against {report.verification.reference} "
            f"(fp32, input {report.verification.input_shape})"
        )
    facts = card_facts_for_conversion(converted, source, sha256, repo_id, verification_text)
    provenance = {
        "source": source,
        "source_path": str(path.resolve()),
        "source_sha256": sha256,
        "source_size_bytes": path.stat().st_size,
        "layout": converted.layout.name,
        "verification": verification_text,
    }
    write_output_folder(
        converted, output_dir, render_model_card(facts), overwrite=overwrite, source_path=path, provenance=provenance
    )
    log(f"wrote {output_dir}")
    return report
