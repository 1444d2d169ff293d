"""Conversion of the official ConvNeXt V2 checkpoints into this package's Hugging Face models.

The conversion is data plus a small engine:

- ``SPARSE_TO_DENSE_RULES``: how the MinkowskiEngine names and shapes of the official *pretraining* code
  (``encoder.…`` sparse blocks, ``proj``, ``mask_token``, ``decoder.0``, ``pred``) become the official dense
  layout, with one reshape rule per kind of tensor (``sparse_kernel_to_dense`` is the documented kernel remapping).
- ``KEY_TABLE``: official dense names -> our (= transformers') names, as regular expressions.
- ``checkpoints.OFFICIAL_CHECKPOINTS``: the 26 released files.

The engine reads a file safely (``load_original_checkpoint``), recognises one of three layouts
(``detect_layout``), reads depths and widths off the tensor shapes (``infer_architecture``), renames, loads the
model with every tensor accounted for (``convert_state_dict``), checks it against timm's ConvNeXt V2 loaded
through timm's own checkpoint filter from the same original tensors (``verify_against_timm``), and writes the
output folder atomically (``write_output_folder``). Every problem with the input is a ``ValueError`` naming it.

Safety: tensors are checked (string names, no scalars, real finite floats, no shape larger than the data the file
stores) before anything is computed from them, and the model is first built on the meta device, so a small
hostile file cannot make the conversion allocate gigabytes. An output folder carries a marker
(``CONVERSION_MARKER``: source, SHA-256, time, package version); ``overwrite`` replaces only such a folder, never
the working directory, an ancestor of it or of the source, the root or the home folder.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel

from . import __version__
from .checkpoints import (
    FCMAE,
    OfficialCheckpoint,
    find_official_checkpoint,
    imagenet1k_id2label,
    imagenet1k_labels,
    parse_repo_id,
)
from .configuration_convnextv2 import PRESETS, ConvNextV2Config
from .image_processing_convnextv2 import processor_for_resolution
from .model_card import CardFacts, card_facts_for_official, render_model_card
from .modeling_convnextv2 import (
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2Model,
    draw_mask,
)

VERIFICATION_TOLERANCE = 1e-4  # max abs difference, fp32
DEFAULT_RESOLUTION = 224
StateDict = dict[str, torch.Tensor]


class VerificationError(ValueError):
    """The converted model does not reproduce the reference within the tolerance."""


# ----------------------------------------------------------------------------------------------------------
# The three official layouts
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    name: str
    model_class: type[PreTrainedModel]
    description: str
    kind: str  # "classifier", "encoder" or "pretraining": what the model card says about it


FINETUNED = Layout(
    name="fine-tuned",
    model_class=ConvNextV2ForImageClassification,
    description="fine-tuned classifier (dense layout with final norm and head)",
    kind="classifier",
)
FCMAE_ENCODER = Layout(
    name="fcmae-encoder",
    model_class=ConvNextV2Model,
    description="FCMAE encoder (dense layout, no final norm, no head)",
    kind="encoder",
)
FCMAE_PRETRAINING = Layout(
    name="fcmae-pretraining",
    model_class=ConvNextV2ForMaskedImageModeling,
    description="FCMAE pretraining checkpoint (MinkowskiEngine sparse encoder with decoder)",
    kind="pretraining",
)

# The FCMAE files have no final LayerNorm (the encoder never used one). Our models keep it, as the official
# fine-tuning model does, so it starts where the official fine-tuning starts it: weight 1, bias 0.
FINAL_NORM_IDENTITY = {"convnextv2.layernorm.weight": torch.ones, "convnextv2.layernorm.bias": torch.zeros}

# ----------------------------------------------------------------------------------------------------------
# Data: key tables
# ----------------------------------------------------------------------------------------------------------

# a ConvNeXt V2 block sits in the encoder (stages.i.j) or in the FCMAE decoder (decoder.k); same parts in both
_BLOCK_PREFIXES = [
    (r"stages\.(?P<stage>\d+)\.(?P<block>\d+)\.", r"convnextv2.encoder.stages.\g<stage>.layers.\g<block>."),
    (r"decoder\.(?P<block>\d+)\.", r"decoder.\g<block>."),
]
_BLOCK_PARTS = [
    (r"(?P<layer>dwconv|pwconv1|pwconv2)\.(?P<param>weight|bias)", r"\g<layer>.\g<param>"),
    (r"norm\.(?P<param>weight|bias)", r"layernorm.\g<param>"),
    (r"grn\.gamma", "grn.weight"),
    (r"grn\.beta", "grn.bias"),
]

# official dense name (full match) -> our name; shapes are equal on both sides
KEY_TABLE: list[tuple[str, str]] = [
    (r"downsample_layers\.0\.0\.(?P<param>weight|bias)", r"convnextv2.embeddings.patch_embeddings.\g<param>"),
    (r"downsample_layers\.0\.1\.(?P<param>weight|bias)", r"convnextv2.embeddings.layernorm.\g<param>"),
    (
        r"downsample_layers\.(?P<stage>[1-9]\d*)\.(?P<part>[01])\.(?P<param>weight|bias)",
        r"convnextv2.encoder.stages.\g<stage>.downsampling_layer.\g<part>.\g<param>",
    ),
    *[(prefix + part, ours + our_part) for prefix, ours in _BLOCK_PREFIXES for part, our_part in _BLOCK_PARTS],
    (r"norm\.(?P<param>weight|bias)", r"convnextv2.layernorm.\g<param>"),
    (r"head\.(?P<param>weight|bias)", r"classifier.\g<param>"),
    (r"proj\.(?P<param>weight|bias)", r"decoder_embed.\g<param>"),
    (r"mask_token", "mask_token"),
    (r"pred\.(?P<param>weight|bias)", r"decoder_pred.\g<param>"),
]


def sparse_kernel_to_dense(kernel: torch.Tensor) -> torch.Tensor:
    """MinkowskiEngine kernel -> dense conv weight, the documented remapping.

    (k*k, in, out) -> (out, in, k, k) for a regular conv; (k*k, C) -> (C, 1, k, k) for a depthwise one. The
    sparse kernel enumerates the window with the other spatial axis fastest, hence the final swap.
    """
    if kernel.ndim == 2:  # depthwise: one input channel per group
        kernel = kernel.unsqueeze(1)
    if kernel.ndim != 3:
        raise ValueError(f"a sparse kernel has 2 or 3 dimensions, got shape {tuple(kernel.shape)}")
    volume, in_channels, out_channels = kernel.shape
    side = math.isqrt(volume)
    if side * side != volume:
        raise ValueError(f"a sparse kernel's first axis must be k*k, got {volume} (shape {tuple(kernel.shape)})")
    dense = kernel.permute(2, 1, 0).reshape(out_channels, in_channels, side, side)
    return dense.transpose(2, 3).contiguous()


def _sparse_bias_to_dense(bias: torch.Tensor) -> torch.Tensor:
    """(1, C) -> (C,); a dense (C,) bias passes unchanged."""
    if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
        raise ValueError(f"a bias must have shape (C,) or (1, C), got {tuple(bias.shape)}")
    return bias.reshape(-1)


def _sparse_grn_to_dense(parameter: torch.Tensor) -> torch.Tensor:
    """(1, C) -> (1, 1, 1, C), the dense GRN's channels-last broadcast shape."""
    return parameter.reshape(1, 1, 1, -1)


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# official pretraining (sparse) name (full match) -> official dense name, with the reshape each needs; first match
SPARSE_TO_DENSE_RULES: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]] = [
    (r"encoder\.(?P<module>.+)\.kernel", r"\g<module>.weight", sparse_kernel_to_dense),
    (r"encoder\.(?P<module>.+)\.(ln|linear)\.(?P<param>weight|bias)", r"\g<module>.\g<param>", _unchanged),
    (r"encoder\.(?P<module>.+\.grn)\.(?P<param>gamma|beta)", r"\g<module>.\g<param>", _sparse_grn_to_dense),
    (r"encoder\.(?P<module>.+)\.bias", r"\g<module>.bias", _sparse_bias_to_dense),
    (r"encoder\.(?P<name>.+)", r"\g<name>", _unchanged),  # the stem: a dense conv and LayerNorm
    (r"(?P<name>(proj|pred|decoder)\..+|mask_token)", r"\g<name>", _unchanged),  # the decoder is dense
]

# signatures of checkpoints that are not official ConvNeXt V2 files, to name what the user passed
OTHER_ARCHITECTURES: list[tuple[str, str]] = [
    (r"(encoder\.)?stages\.\d+\.\d+\.gamma", "a ConvNeXt V1 checkpoint (layer-scale 'gamma' tensors, no GRN)"),
    (
        r".*(cls_token|pos_embed|position_embeddings|attn\.qkv\.weight|attention\.query\.weight)",
        "a Vision Transformer checkpoint (class token, position embeddings or attention tensors)",
    ),
    (r"convnextv2\..+", "already a transformers ConvNeXt V2 state dict (load it with from_pretrained)"),
    (r"stem\.0\.weight|stages\.\d+\.blocks\..+", "a timm ConvNeXt state dict, not an official file"),
]


def apply_key_rules(state_dict: StateDict, rules: list[tuple]) -> tuple[StateDict, dict[str, str], list[str]]:
    """Rename (and reshape) every tensor with the first rule whose pattern fully matches its name.

    ``rules``: (pattern, replacement) or (pattern, replacement, reshape) tuples. Returns the new state dict,
    new name -> original name, and the names no rule matched.
    """
    renamed, origin, unmatched = {}, {}, []
    for name, tensor in state_dict.items():
        for pattern, replacement, *reshape in rules:
            match = re.fullmatch(pattern, name)
            if match:
                new_name = match.expand(replacement)
                try:
                    renamed[new_name] = reshape[0](tensor) if reshape else tensor
                except ValueError as error:
                    raise ValueError(f"tensor {name!r}: {error}") from None
                origin[new_name] = name
                break
        else:
            unmatched.append(name)
    return renamed, origin, unmatched


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
# Conversion
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ConvertedCheckpoint:
    """A converted model and what is known about it. ``original_dense`` is the original in the official dense
    layout (after the sparse remapping for pretraining files), the verification's input; ``filled`` lists the
    tensors the file does not have and the model starts at their identity values."""

    model: PreTrainedModel
    layout: Layout
    architecture: Architecture
    resolution: int
    original: OriginalCheckpoint
    original_dense: StateDict
    official: OfficialCheckpoint | None = None
    filled: list[str] = field(default_factory=list)

    @property
    def size(self) -> str:
        return self.architecture.size


def _build_config(architecture: Architecture, layout: Layout, resolution: int, training_args: dict) -> ConvNextV2Config:
    fields = dict(
        depths=architecture.depths,
        hidden_sizes=architecture.hidden_sizes,
        num_stages=len(architecture.depths),
        num_channels=architecture.num_channels,
        patch_size=architecture.patch_size,
        image_size=resolution,
        layer_norm_eps=1e-6,  # the official final norm; transformers' default would be 1e-12
    )
    if architecture.num_labels is not None:
        fields["num_labels"] = architecture.num_labels
        if architecture.num_labels == 1000:
            fields["id2label"] = id2label = imagenet1k_id2label()
            fields["label2id"] = {label: index for index, label in id2label.items()}
    if layout is FCMAE_PRETRAINING:
        total_stride = architecture.patch_size * 2 ** (len(architecture.depths) - 1)
        fields.update(
            decoder_hidden_size=architecture.decoder_hidden_size,
            decoder_depth=architecture.decoder_depth,
            mask_patch_size=total_stride,
            # the official pretraining recipe; the file's own args win when it stored them
            mask_ratio=float(training_args.get("mask_ratio", 0.6)),
            norm_pix_loss=bool(training_args.get("norm_pix_loss", True)),
        )
    try:
        return ConvNextV2Config(**fields)
    except ValueError as error:  # a value the pretraining script stored in the file, not one the user gave
        stored = f" (from the checkpoint's stored training args {training_args})" if training_args else ""
        raise ValueError(f"{error}{stored}") from None


def _describe(names: list[str], origin: dict[str, str] | None = None, limit: int = 8) -> str:
    shown = [f"{name} (from {origin[name]!r})" if origin and name in origin else name for name in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def convert_state_dict(
    original: OriginalCheckpoint,
    *,
    size: str | None = None,
    resolution: int | None = None,
    official: OfficialCheckpoint | None = None,
) -> ConvertedCheckpoint:
    """Convert an official state dict (any of the three layouts) into the matching model of this package.

    ``size``: the official size the caller expects (from the file name or ``--model-name``); a checkpoint of
    other shapes is an error. ``official``: the table row of the file, whose layout must match. Every tensor of
    the file must land in the model and every model tensor must come from the file (except the final norm of
    FCMAE files, started at its identity), with equal shapes; otherwise ``ValueError`` lists them.
    """
    check_state_dict(original.state_dict)
    layout = detect_layout(original.state_dict)
    if official is not None:
        expected = (FINETUNED,) if official.is_classifier else (FCMAE_ENCODER, FCMAE_PRETRAINING)
        if layout not in expected:
            raise ValueError(
                f"{official.name} should be a {expected[0].description}, but the file is a {layout.description}"
            )
        size = size or official.size
    dense = original.state_dict
    if layout is FCMAE_PRETRAINING:
        dense, _, unmatched = apply_key_rules(dense, SPARSE_TO_DENSE_RULES)
        if unmatched:
            raise ValueError(f"tensors that are not part of an FCMAE pretraining checkpoint: {_describe(unmatched)}")

    architecture = infer_architecture(dense, layout)
    if size is not None and size != architecture.size:
        raise ValueError(
            f"the checkpoint's shapes (depths {architecture.depths}, widths {architecture.hidden_sizes}) are those "
            f"of {architecture.size!r}, not of the expected model {size!r}"
        )
    training_args = original.training_args
    given = resolution or (official.resolution if official else None) or training_args.get("input_size")
    resolution = int(given or DEFAULT_RESOLUTION)
    total_stride = architecture.patch_size * 2 ** (len(architecture.depths) - 1)
    # the saved processor feeds the model images of this size: they must fit its stride (and its masks, for FCMAE)
    if resolution < total_stride or (layout is FCMAE_PRETRAINING and resolution % total_stride):
        rule = "a multiple of" if layout is FCMAE_PRETRAINING else "at least"
        raise ValueError(
            f"resolution {resolution} does not fit this model: images must be {rule} its total stride "
            f"{total_stride} px (the saved processor makes images of the resolution)"
        )

    renamed, origin, unmatched = apply_key_rules(dense, KEY_TABLE)
    if unmatched:
        raise ValueError(f"unexpected tensors that no ConvNeXt V2 layout has: {_describe(unmatched)}")
    filled = []
    if layout in (FCMAE_ENCODER, FCMAE_PRETRAINING):
        for name, make in FINAL_NORM_IDENTITY.items():
            if name not in renamed:
                renamed[name] = make(architecture.hidden_sizes[-1])
                filled.append(name)
    model_class = layout.model_class
    if model_class is ConvNextV2Model:  # the base model's names have no "convnextv2." prefix
        prefix = ConvNextV2Model.base_model_prefix + "."
        renamed = {name.removeprefix(prefix): tensor for name, tensor in renamed.items()}
        origin = {name.removeprefix(prefix): source for name, source in origin.items()}
        filled = [name.removeprefix(prefix) for name in filled]

    config = _build_config(architecture, layout, resolution, training_args)
    # built on the meta device first: shapes are compared before any memory is allocated, so widths a hostile
    # file declares (with tensors missing) cannot make the model gigabytes large
    with torch.device("meta"):
        model = model_class(config).eval()
    expected_shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = [name for name in expected_shapes if name not in renamed]
    if missing:
        raise ValueError(f"the checkpoint is missing {len(missing)} tensor(s) the model needs: {_describe(missing)}")
    extra = [name for name in renamed if name not in expected_shapes]
    if extra:
        raise ValueError(
            f"the checkpoint has {len(extra)} tensor(s) the model has no place for: {_describe(extra, origin)}"
        )
    wrong = [
        f"{name} (from {origin.get(name, '?')!r}): {tuple(renamed[name].shape)}, expected {shape}"
        for name, shape in expected_shapes.items()
        if tuple(renamed[name].shape) != shape
    ]
    if wrong:
        raise ValueError(f"tensors with the wrong shape: {'; '.join(wrong[:8])}")
    # now every model tensor has the shape of a tensor the file stores: memory is bounded by the file's size.
    # Own fp32 copies, so the model never aliases the originals the verification reads.
    weights = {
        name: tensor.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        for name, tensor in renamed.items()
    }
    model.load_state_dict(weights, strict=True, assign=True)
    left_on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left_on_meta:  # a buffer outside the state dict would need its own initialisation
        raise RuntimeError(f"model tensors not set from the checkpoint: {left_on_meta}")
    return ConvertedCheckpoint(model, layout, architecture, resolution, original, dense, official, filled)


# ----------------------------------------------------------------------------------------------------------
# Verification against timm
# ----------------------------------------------------------------------------------------------------------


@dataclass
class VerificationResult:
    """Per compared output: the max abs difference to the reference and the reference's max abs value."""

    reference: str
    differences: dict[str, float]
    magnitudes: dict[str, float]
    input_shape: tuple[int, ...]
    note: str = ""

    @property
    def max_abs_diff(self) -> float:
        return max(self.differences.values())

    def summary(self) -> str:
        parts = ", ".join(
            f"{what} max abs diff {value:.3e} (reference values up to {self.magnitudes[what]:.3g})"
            for what, value in self.differences.items()
        )
        return f"verification vs {self.reference} on a fixed {tuple(self.input_shape)} input: {parts}"


def _compare(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    if ours.shape != reference.shape:
        raise VerificationError(f"output shapes differ: ours {tuple(ours.shape)}, reference {tuple(reference.shape)}")
    return (ours - reference).abs().max().item(), reference.abs().max().item()


def remap_pretraining_checkpoint_like_official(state_dict: StateDict) -> StateDict:
    """The encoder of a pretraining checkpoint in the official dense layout, remapped the way the official
    fine-tuning script does it (string surgery on the names). A second, independent implementation of the
    documented rule, used only to check the table-driven one."""
    remapped = {}
    for name, tensor in state_dict.items():
        if not name.startswith("encoder."):
            continue
        parts = name.split(".")[1:]
        if parts[-1] == "kernel":
            parts[-1] = "weight"
            window = tensor.shape[0]
            side = math.isqrt(window)
            columns = tensor if tensor.ndim == 3 else tensor[:, None, :]  # (k*k, in, out)
            tensor = torch.einsum("wio->oiw", columns).unflatten(-1, (side, side)).transpose(-1, -2)
        parts = [part for part in parts if part not in ("ln", "linear")]
        if parts[-1] == "bias":
            tensor = tensor.flatten()
        elif "grn" in parts:
            tensor = tensor.view(1, 1, 1, -1)
        remapped[".".join(parts)] = tensor
    return remapped


def _timm():
    try:
        import timm
        from timm.models.convnext import ConvNeXtBlock, checkpoint_filter_fn
    except ImportError as error:
        raise ValueError("verification needs timm (pip install timm), or pass --no-verify") from error
    return timm, ConvNeXtBlock, checkpoint_filter_fn


def build_timm_reference(encoder_state_dict: StateDict, architecture: Architecture, num_classes: int) -> nn.Module:
    """timm's ConvNeXt V2 with the checkpoint's depths and widths, loaded through timm's own checkpoint filter
    from official dense-layout tensors. Files without a final norm leave timm's ``head.norm`` at its init."""
    timm, _, checkpoint_filter_fn = _timm()
    size = architecture.size if architecture.size != "custom" else "atto"  # the name picks the V2 block flavour
    model = timm.create_model(
        f"convnextv2_{size}",
        pretrained=False,
        num_classes=num_classes,
        depths=tuple(architecture.depths),
        dims=tuple(architecture.hidden_sizes),
        in_chans=architecture.num_channels,
        patch_size=architecture.patch_size,
    )
    missing, unexpected = model.load_state_dict(checkpoint_filter_fn(encoder_state_dict, model), strict=False)
    allowed_missing = set() if "norm.weight" in encoder_state_dict else {"head.norm.weight", "head.norm.bias"}
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(f"timm could not read the original tensors: missing {missing}, unexpected {unexpected}")
    return model.eval()


def _timm_decoder_blocks(original: StateDict, width: int, depth: int) -> nn.Module:
    """The decoder's ConvNeXt V2 blocks as timm blocks, named and reshaped by timm's checkpoint filter."""
    _, ConvNeXtBlock, checkpoint_filter_fn = _timm()
    holder = nn.Module()  # mimics timm's module tree (stages.0.blocks.k) so its filter can address the blocks
    holder.stages = nn.ModuleList([nn.Module()])
    holder.stages[0].blocks = nn.Sequential(
        *[ConvNeXtBlock(width, conv_mlp=True, use_grn=True, ls_init_value=None) for _ in range(depth)]
    )
    decoder = {f"stages.0.{name[len('decoder.') :]}": t for name, t in original.items() if name.startswith("decoder.")}
    holder.load_state_dict(checkpoint_filter_fn(decoder, holder), strict=True)
    return holder.stages[0].blocks.eval()


def _fixed_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def verify_against_timm(
    converted: ConvertedCheckpoint,
    image_size: int | None = None,
    tolerance: float = VERIFICATION_TOLERANCE,
    batch_size: int = 2,
) -> VerificationResult:
    """Compare the converted model with timm's ConvNeXt V2 built from the same original tensors, on a fixed
    (batch, C, image_size, image_size) input (``image_size`` defaults to the checkpoint's resolution).

    Classifiers: logits (N, num_labels). FCMAE encoders: final feature maps (N, C_last, H/32, W/32).
    Pretraining files (timm cannot read the sparse layout): the encoder after the documented kernel remapping,
    done a second, independent way, and the decoder (N, L, 32*32*C) against timm ConvNeXt V2 blocks with the
    official decoder's projection, mask-token fill and prediction. ``VerificationError`` past ``tolerance``.
    """
    model, architecture, layout = converted.model.eval(), converted.architecture, converted.layout
    image_size = image_size or converted.resolution
    total_stride = architecture.patch_size * 2 ** (len(architecture.depths) - 1)
    if image_size < total_stride:
        raise ValueError(
            f"the verification input must be at least {total_stride} px (the total stride), got {image_size}"
        )
    pixels = _fixed_input((batch_size, architecture.num_channels, image_size, image_size))
    note, compared = "", {}
    if layout is FINETUNED:
        reference = build_timm_reference(converted.original_dense, architecture, architecture.num_labels)
        compared["logits"] = _compare(model(pixels).logits, reference(pixels))
    elif layout is FCMAE_ENCODER:
        reference = build_timm_reference(converted.original_dense, architecture, 0)
        compared["final feature map"] = _compare(model(pixels).last_hidden_state, reference.forward_features(pixels))
    else:
        note = (
            "timm cannot read the sparse MinkowskiEngine layout: the encoder was compared after the documented "
            "kernel remapping (permute (k*k, in, out) to (out, in, k*k), reshape to (out, in, k, k), swap the last "
            "two axes), the decoder against timm ConvNeXt V2 blocks"
        )
        encoder = remap_pretraining_checkpoint_like_official(converted.original.state_dict)
        reference = build_timm_reference(encoder, architecture, 0)
        latent = model.convnextv2(pixels).last_hidden_state
        compared["encoder final feature map"] = _compare(latent, reference.forward_features(pixels))
        compared["decoder prediction"] = _compare(*_decoder_outputs(converted, latent))
    result = VerificationResult(
        f"timm convnextv2_{converted.size}",
        {what: difference for what, (difference, _) in compared.items()},
        {what: magnitude for what, (_, magnitude) in compared.items()},
        tuple(pixels.shape),
        note,
    )
    if not result.max_abs_diff <= tolerance:  # also catches NaN
        raise VerificationError(
            f"{result.summary()}: exceeds the tolerance {tolerance:g}, the conversion is wrong"
            + (f" ({result.note})" if result.note else "")
        )
    return result


def _decoder_outputs(converted: ConvertedCheckpoint, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our decoder's logits and the official decoder's computation, both (N, L, 32*32*C), on ``latent``
    (N, C, h, w) with a fixed random mask: 1x1 ``proj``, removed positions set to ``mask_token``, the blocks,
    1x1 ``pred``."""
    # the decoder is dense in the file: read its tensors straight from there, not through our rules
    original, model, architecture = converted.original.state_dict, converted.model, converted.architecture
    batch, _, height, width = latent.shape
    removed = draw_mask(_fixed_input((batch, height * width), seed=1), model.config.mask_ratio)  # the model's rule
    blocks = _timm_decoder_blocks(original, architecture.decoder_hidden_size, architecture.decoder_depth)
    hidden = nn.functional.conv2d(latent, original["proj.weight"], original["proj.bias"])
    mask = removed.view(batch, 1, height, width).to(hidden.dtype)
    hidden = hidden * (1.0 - mask) + original["mask_token"] * mask
    prediction = nn.functional.conv2d(blocks(hidden), original["pred.weight"], original["pred.bias"])
    reference = prediction.flatten(2).transpose(1, 2)  # as the official loss reads it
    return model.forward_decoder(latent, removed), reference


@torch.no_grad()
def top5_on_photo(model: PreTrainedModel, resolution: int) -> list[tuple[str, float]] | None:
    """Top-5 (label, probability) of scikit-image's ``chelsea`` cat photo through the official evaluation
    processor; None when scikit-image is not installed."""
    try:
        from skimage import data
    except ImportError:
        return None
    import PIL.Image

    pixels = processor_for_resolution(resolution)(PIL.Image.fromarray(data.chelsea()), return_tensors="pt")
    probabilities = model.eval()(pixels["pixel_values"]).logits.softmax(dim=-1)[0]
    top = probabilities.topk(5)
    labels = model.config.id2label
    return [(labels[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]


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
# Sources, output folder, Hub
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


CONVERSION_MARKER = ".convnextv2_hf_conversion.json"  # in every folder a conversion writes, and only there
_MARKER_FORMAT = "convnextv2-hf conversion"
_PARTIAL_SUFFIX = ".partial"


class ConversionInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while an output folder was being written (SIGINT raises ``KeyboardInterrupt``).
    The staging folder is removed before it propagates; ``signum`` gives the conventional exit status
    ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``ConversionInterrupted`` as SIGINT raises ``KeyboardInterrupt``,
    so ``except``/``finally`` clean-up runs instead of the process dying mid-write. Handlers can only be set from
    the main thread; elsewhere the block runs with the process's own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise ConversionInterrupted(signum)

    numbers = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {number: signal.signal(number, interrupt) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Clean-up that a second Ctrl-C must not cut short: SIGINT, SIGTERM and SIGHUP wait until the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    deferred = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def read_conversion_marker(folder: str | Path) -> dict | None:
    """The marker a conversion left in ``folder`` (a dict), or None when there is none or it is not ours."""
    marker = Path(folder) / CONVERSION_MARKER
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and content.get("format") == _MARKER_FORMAT else None


def _write_marker(folder: Path, provenance: dict, **fields) -> None:
    content = {
        "format": _MARKER_FORMAT,
        "package_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance,
        **fields,
    }
    (folder / CONVERSION_MARKER).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(output_dir: str | Path, *, source_path: str | Path | None = None, overwrite: bool = False) -> Path:
    """``ValueError`` unless a conversion may write ``output_dir``; returns it resolved.

    Never a symbolic link or an existing file; never a folder whose removal would delete something the conversion
    did not create: the filesystem root, the home folder, the current directory, an ancestor of any of these or
    of the source file. An existing folder is replaced only with ``overwrite``, and only when it is empty or a
    conversion wrote it (it holds ``CONVERSION_MARKER``) and it holds nothing the conversion did not write.
    """
    output_dir = Path(output_dir)
    if output_dir.is_symlink():
        raise ValueError(f"the output folder {output_dir} is a symbolic link: give the real path of a new folder")
    target = output_dir.resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"the output folder {output_dir} is an existing file, not a folder")
    blocking = next((parent for parent in target.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"cannot create the output folder {output_dir}: {blocking} is a file, not a folder")
    protected = {
        Path(target.anchor): "the filesystem root",
        Path.home().resolve(): "your home folder",
        Path.cwd().resolve(): "the current directory",
    }
    if source_path is not None:
        source_path = Path(source_path)
        protected[source_path.absolute()] = f"the source checkpoint {source_path}"
        protected[source_path.resolve()] = f"the source checkpoint {source_path}"
    for path, what in protected.items():
        if _is_within(path, target):
            relation = "is" if path == target else "holds"
            raise ValueError(
                f"refusing to write the output folder {output_dir}: it {relation} {what}, which a conversion must "
                "never replace; choose a new folder"
            )
    if not target.exists():
        return target
    if not overwrite:
        raise ValueError(f"{output_dir} already exists (pass --overwrite to replace it)")
    contents = sorted(path.name for path in target.iterdir())
    if not contents:
        return target
    marker = read_conversion_marker(target)
    if marker is None:
        raise ValueError(
            f"refusing to replace {output_dir}: it is not empty and no conversion wrote it (it has no "
            f"{CONVERSION_MARKER}; it holds {_describe(contents, limit=5)}). Choose a new folder, or empty it yourself"
        )
    foreign = sorted(set(contents) - set(marker.get("files", [])) - {CONVERSION_MARKER})
    if foreign:
        raise ValueError(
            f"refusing to replace {output_dir}: a conversion wrote it, but it now also holds files the conversion "
            f"did not write ({_describe(foreign, limit=5)}). Move them away first"
        )
    return target


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(output_dir: str | Path) -> list[Path]:
    """Remove the staging folders (``.<name>.*.partial`` beside ``output_dir``) that killed runs (SIGKILL, power
    loss) left behind: those whose marker names a writer process on this host that no longer runs, and empty ones.
    Folders without our marker, and those of a running conversion, stay. Returns the removed paths."""
    output_dir = Path(output_dir)
    parent, prefix = output_dir.parent, f".{output_dir.name}."
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        if not (path.name.startswith(prefix) and path.name.endswith(_PARTIAL_SUFFIX)) or path.is_symlink():
            continue
        if not path.is_dir():
            continue
        marker = read_conversion_marker(path)
        if marker is None:
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds when empty: killed between mkdtemp and the marker
                removed.append(path)
            continue
        writer = marker.get("writer")
        if isinstance(writer, dict):  # a staging folder; without one, a finished folder moved aside to be replaced
            if writer.get("host") != socket.gethostname():
                continue  # written from another machine (a shared disk): its process cannot be checked from here
            pid = writer.get("pid")
            if not isinstance(pid, int) or pid <= 0 or _process_is_alive(pid):
                continue
        with _signals_deferred():
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def write_output_folder(
    converted: ConvertedCheckpoint,
    output_dir: str | Path,
    card: ModelCard,
    overwrite: bool = False,
    *,
    source_path: str | Path | None = None,
    provenance: dict | None = None,
) -> Path:
    """Save weights (safetensors), config, processor, model card and the conversion marker (``provenance``: the
    source and its SHA-256) into a ``.partial`` sibling folder, check that it loads back to the same tensors, then
    rename it into place. A failure, Ctrl-C, SIGTERM or SIGHUP leaves no ``.partial`` folder and the previous
    output (if any) in place; a disk error (full, read-only) is a ``ValueError``. See ``check_output_dir`` for
    what ``overwrite`` may replace; ``source_path`` is protected from it."""
    target = check_output_dir(output_dir, source_path=source_path, overwrite=overwrite)
    provenance = dict(provenance or {})
    staging = aside = None
    try:
        with _signals_raise():
            try:
                remove_stale_partials(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_PARTIAL_SUFFIX, dir=target.parent))
                # the marker first: a later run can tell this folder is ours and whether its writer still runs
                _write_marker(staging, provenance, writer={"pid": os.getpid(), "host": socket.gethostname()})
                converted.model.save_pretrained(staging)
                processor_for_resolution(converted.resolution).save_pretrained(staging)
                card.save(staging / "README.md")
                reloaded = type(converted.model).from_pretrained(staging)
                expected = converted.model.state_dict()
                if reloaded.state_dict().keys() != expected.keys() or any(
                    not torch.equal(tensor, expected[name]) for name, tensor in reloaded.state_dict().items()
                ):
                    raise ValueError(f"the saved folder does not load back to the converted tensors ({staging})")
                files = sorted(path.name for path in staging.iterdir() if path.name != CONVERSION_MARKER)
                _write_marker(staging, provenance, files=files)
                if target.exists():  # checked replaceable above; moved aside so the swap is two renames
                    # a staging-like name: if this process dies here, the next run removes it as stale
                    aside = staging.with_name(
                        staging.name.removesuffix(_PARTIAL_SUFFIX) + ".replaced" + _PARTIAL_SUFFIX
                    )
                    target.rename(aside)
                staging.rename(target)
                staging = None
            except BaseException:
                with _signals_deferred():
                    if staging is not None:
                        shutil.rmtree(staging, ignore_errors=True)
                    if aside is not None and aside.exists() and not target.exists():
                        aside.rename(target)  # put the previous output back
                raise
            finally:
                if aside is not None:
                    with _signals_deferred():
                        shutil.rmtree(aside, ignore_errors=True)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        raise ValueError(_describe_write_error(error, target)) from None
    return target


def _describe_write_error(error: OSError | SafetensorError, output_dir: Path) -> str:
    number = getattr(error, "errno", None)
    if number is None and (match := re.search(r"os error (\d+)", str(error))):
        number = int(match.group(1))
    reason = {
        errno.ENOSPC: "no space left on the disk",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(number, getattr(error, "strerror", None) or str(error))
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    return f"could not write the output folder {output_dir}: {reason}{where}; nothing was written"


def is_converted_folder(path: str | Path) -> bool:
    """A finished output folder: folders appear only complete, by rename, and with the conversion marker."""
    path = Path(path)
    return read_conversion_marker(path) is not None and all(
        (path / name).is_file() for name in ("config.json", "model.safetensors", "README.md")
    )


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Create ``repo_id`` if needed (``private``), create branch ``revision`` if needed, and upload ``folder``.

    ``endpoint`` and ``token`` default to ``HF_ENDPOINT`` and ``HF_TOKEN`` read now (huggingface_hub reads
    ``HF_ENDPOINT`` once, at import). Unchanged files are not re-uploaded; an unchanged folder makes no commit.
    The conversion marker stays local.
    """
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token or os.environ.get("HF_TOKEN"))
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        revision=revision,
        commit_message=commit_message or f"Upload ConvNeXt V2 converted with convnextv2-hf {__version__}",
        # the marker is local bookkeeping (a local path, a time); the card carries the source and its SHA-256
        ignore_patterns=[CONVERSION_MARKER],
    )


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


__all__ = [
    "FCMAE_ENCODER",
    "FCMAE_PRETRAINING",
    "FINETUNED",
    "KEY_TABLE",
    "SPARSE_TO_DENSE_RULES",
    "VERIFICATION_TOLERANCE",
    "Architecture",
    "CONVERSION_MARKER",
    "ConversionInterrupted",
    "ConversionReport",
    "ConvertedCheckpoint",
    "Layout",
    "OriginalCheckpoint",
    "VerificationError",
    "VerificationResult",
    "apply_key_rules",
    "card_facts_for_conversion",
    "check_output_dir",
    "check_state_dict",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_layout",
    "infer_architecture",
    "is_converted_folder",
    "load_original_checkpoint",
    "parse_sha256",
    "push_folder_to_hub",
    "read_conversion_marker",
    "remove_stale_partials",
    "resolve_checkpoint",
    "sparse_kernel_to_dense",
    "verify_against_timm",
    "write_output_folder",
]
