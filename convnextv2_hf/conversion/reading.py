"""Reading an original checkpoint: locating it (``resolve_checkpoint``), loading it safely
(``load_original_checkpoint``, ``check_state_dict``), hashing it (``sha256_of_file``), and reading what it is off its
names and shapes (``detect_layout``, ``infer_architecture``).

Safety: tensors are checked (string names, no scalars, real finite floats, no shape larger than the data the file
stores) before anything is computed from them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import find_official_checkpoint
from ..configuration_convnextv2 import PRESETS
from .key_maps import FCMAE_ENCODER, FCMAE_PRETRAINING, FINETUNED, OTHER_ARCHITECTURES, Layout, StateDict

# ----------------------------------------------------------------------------------------------------------
# Reading a file
# ----------------------------------------------------------------------------------------------------------


@dataclass
class OriginalCheckpoint:
    """The tensors of an official file (``state_dict``) and, for files of the pretraining script, the ``args``
    it stored that the config needs (``mask_ratio``, ``norm_pix_loss``, ``input_size``)."""

    state_dict: StateDict
    training_args: dict = field(default_factory=dict)


def load_original_checkpoint(path: str | Path) -> OriginalCheckpoint:
    """Read ``torch.save({"model": state_dict, ...})`` with ``weights_only=True``: a pickle that would import or
    call anything beyond tensors and plain containers is refused. ``ValueError`` for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    try:
        # the pretraining script stores its argparse.Namespace beside the weights; it holds plain values only
        with torch.serialization.safe_globals([argparse.Namespace]):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
        if unsafe:
            raise ValueError(
                f"refused to load {path}: unpickling it would import or call {unsafe.group(1)!r}, which a "
                "weights-only load does not allow (a checkpoint holds tensors and plain containers only; this "
                "file would run code, or it is corrupted)"
            ) from None
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or not a torch.save file)") from None
    except (RuntimeError, EOFError, KeyError, OSError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated or not a torch.save file): "
            f"{type(error).__name__}: {str(error)[:200]}"
        ) from None

    if isinstance(content, dict) and isinstance(content.get("model"), dict):
        state_dict = content["model"]  # the official files: torch.save({"model": state_dict, ...})
    elif isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        state_dict = content  # a bare state dict
    else:
        found = f"top-level keys {sorted(map(str, content))[:10]}" if isinstance(content, dict) else type(content)
        raise ValueError(
            f"{path} holds no state dict: expected a dict of tensors, or one under the key 'model' (found {found})"
        )
    if not state_dict:
        raise ValueError(f"{path} holds an empty state dict")
    try:
        check_state_dict(state_dict)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    training_args = {}
    namespace = content.get("args") if isinstance(content, dict) else None
    if isinstance(namespace, argparse.Namespace):
        wanted = ("mask_ratio", "norm_pix_loss", "input_size")
        training_args = {key: value for key, value in vars(namespace).items() if key in wanted}
    return OriginalCheckpoint(dict(state_dict), training_args)


def check_state_dict(state_dict: dict) -> None:
    """``ValueError`` naming the first entry that is not a tensor an official checkpoint can hold: a name that
    is not a string, a value that is not a dense tensor, a 0-d tensor, a dtype that is not a real floating
    point, a shape larger than the data stored for it (a stride-0 or overlapping view: a small file declaring
    huge widths), or a NaN or infinite value. Runs before anything is computed from the tensors."""
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise ValueError(f"the state dict key {name!r} is a {type(name).__name__}, not a tensor name (a string)")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name!r} is a {type(value).__name__}, not a tensor")
        if value.layout is not torch.strided or value.is_quantized or value.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is not a dense CPU tensor (layout {value.layout}, {value.device})")
        if value.ndim == 0:
            raise ValueError(f"tensor {name!r} is 0-d (a scalar); every ConvNeXt V2 tensor has at least one axis")
        if value.is_complex() or not value.is_floating_point():
            raise ValueError(f"tensor {name!r} has dtype {value.dtype}; ConvNeXt V2 weights are real floating point")
        # every element of a saved tensor has its own bytes in the file; a view declaring more elements than its
        # storage holds (stride 0) would materialise into gigabytes at the first copy
        declared = value.numel() * value.element_size()
        stored = value.untyped_storage().nbytes() - value.storage_offset() * value.element_size()
        if declared > stored:
            raise ValueError(
                f"tensor {name!r} declares shape {tuple(value.shape)} ({declared:,} bytes) but the file stores only "
                f"{stored:,} bytes for it (an expanded or overlapping view, not a saved weight)"
            )
        if not bool(torch.isfinite(value).all()):
            nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
            raise ValueError(f"tensor {name!r} holds {nan} NaN and {inf} infinite value(s) of {value.numel()}")


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Layout and architecture
# ----------------------------------------------------------------------------------------------------------


def detect_layout(state_dict: StateDict) -> Layout:
    """Which official layout ``state_dict`` is in; ``ValueError`` naming it when it is another architecture."""
    names = list(state_dict)
    for pattern, what in OTHER_ARCHITECTURES:
        example = next((name for name in names if re.fullmatch(pattern, name)), None)
        if example is not None:
            raise ValueError(f"this is {what}, not an official ConvNeXt V2 checkpoint (found {example!r})")
    sparse = any(name.startswith("encoder.") for name in names)
    stem = "encoder.downsample_layers.0.0.weight" if sparse else "downsample_layers.0.0.weight"
    if stem not in state_dict:
        raise ValueError(
            f"not an official ConvNeXt V2 checkpoint: the stem tensor {stem!r} is missing (first tensors: {names[:5]})"
        )
    if not any(".grn." in name for name in names):
        raise ValueError("not a ConvNeXt V2 checkpoint: it has no GRN tensors (ConvNeXt V1 or another ConvNet?)")
    if sparse:
        return FCMAE_PRETRAINING
    if "head.weight" in state_dict or "norm.weight" in state_dict:
        return FINETUNED
    return FCMAE_ENCODER


@dataclass
class Architecture:
    """What the tensor shapes say: depths and widths of the stages, input channels, stem patch size, classes
    (fine-tuned) and decoder width and depth (pretraining)."""

    depths: list[int]
    hidden_sizes: list[int]
    num_channels: int = 3
    patch_size: int = 4
    num_labels: int | None = None
    decoder_hidden_size: int | None = None
    decoder_depth: int | None = None

    @property
    def size(self) -> str:
        """The official size name with these depths and widths, else ``"custom"``."""
        for name, preset in PRESETS.items():
            if preset["depths"] == self.depths and preset["hidden_sizes"] == self.hidden_sizes:
                return name
        return "custom"


def _numbered(state_dict: StateDict, pattern: str) -> list[tuple[int, ...]]:
    """The integer groups of every name that fully matches ``pattern``."""
    return [tuple(map(int, match.groups())) for name in state_dict if (match := re.fullmatch(pattern, name))]


def _depth(numbers: list[int], what: str) -> int:
    """The depth of blocks numbered 0..n-1; ``ValueError`` for a gap (a name ``stages.0.99999999.…`` must not
    make the model a hundred million blocks deep)."""
    found = sorted(set(numbers))
    if found != list(range(len(found))):
        numbers = set(found)
        first_missing = next(number for number in range(len(found) + 1) if number not in numbers)
        shown = ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")
        raise ValueError(f"{what} must be numbered 0, 1, ...; found blocks {shown} (no block {first_missing})")
    return len(found)


def infer_architecture(dense: StateDict, layout: Layout) -> Architecture:
    """Read depths, widths and the rest off the shapes of a state dict in the official dense layout.
    Blocks must be numbered without gaps; a missing tensor of a block shows up later, by name."""
    stem = dense["downsample_layers.0.0.weight"]  # (C0, in, p, p)
    if stem.ndim != 4:
        raise ValueError(f"the stem conv weight must be (C, in, p, p), got {tuple(stem.shape)}")
    blocks = _numbered(dense, r"stages\.(\d+)\.(\d+)\.dwconv\.weight")
    stages = sorted({stage for stage, _ in blocks})
    if not stages or stages != list(range(len(stages))):
        raise ValueError(f"the encoder's stages must be numbered 0, 1, ...; found stages {stages}")
    depths = [_depth([block for s, block in blocks if s == stage], f"the blocks of stage {stage}") for stage in stages]
    hidden_sizes = [dense[f"stages.{stage}.0.dwconv.weight"].shape[0] for stage in stages]
    architecture = Architecture(depths, hidden_sizes, num_channels=stem.shape[1], patch_size=stem.shape[-1])
    if layout is FINETUNED and "head.weight" in dense:
        architecture.num_labels = dense["head.weight"].shape[0]
    if layout is FCMAE_PRETRAINING:
        if "proj.weight" not in dense or "pred.weight" not in dense:
            raise ValueError("the pretraining checkpoint is missing its decoder projection 'proj' or prediction 'pred'")
        architecture.decoder_hidden_size = dense["proj.weight"].shape[0]
        decoder_blocks = _numbered(dense, r"decoder\.(\d+)\.dwconv\.weight")
        architecture.decoder_depth = _depth([block for (block,) in decoder_blocks], "the decoder blocks")
        total_stride = architecture.patch_size * 2 ** (len(depths) - 1)
        expected = total_stride**2 * architecture.num_channels
        if dense["pred.weight"].shape[0] != expected:
            raise ValueError(
                f"'pred' predicts {dense['pred.weight'].shape[0]} values per position; this decoder predicts one "
                f"{total_stride}x{total_stride} tile ({expected} values) per position of the last stage"
            )
    return architecture


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where downloaded official files go: torch.hub's checkpoint folder."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_checkpoint(reference: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """A local path for ``reference`` (a local file, an official URL or a table name) and the source to cite.

    Official files are looked up in ``cache_dir`` first and downloaded there with a progress bar only when
    missing; with ``HF_HUB_OFFLINE=1`` nothing is downloaded.
    """
    text = str(reference)
    if Path(text).is_file():
        official = find_official_checkpoint(text)
        return Path(text), official.url if official else Path(text).name
    official = find_official_checkpoint(text)
    url = official.url if official else (text if text.startswith(("https://", "http://")) else None)
    if url is None:
        raise ValueError(f"checkpoint not found: {text!r} is neither a file, a URL nor an official checkpoint name")
    target = Path(cache_dir or default_cache_dir()) / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target, url
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"{url} is not in {target.parent} and HF_HUB_OFFLINE is set: download it yourself")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except OSError as error:  # URLError and HTTPError are OSErrors
        raise ValueError(f"could not download {url}: {error}") from None
    return target, url
