"""ConvNeXt V2 models: encoder, classifier, backbone and FCMAE masked image modeling.

Parameter names and shapes are those of transformers' built-in ``convnextv2`` classes, so state dicts move between the
two with strict loading, and the outputs are the same for every input the built-in accepts. This file holds the
reference math; the speed-ups that compute the same numbers live in ``fast_paths_convnextv2.py`` and run only where
``fast_path_allowed`` says they may (``config.fast_paths=False`` turns them off). It travels to the Hub as remote code:
it imports only torch, transformers and its sibling files.

Layouts: the residual stream is (N, C, H, W); block internals run channels-last (N, H, W, C). On the FCMAE "sparse"
path the residual stream of each stage is the visible positions gathered per sample, (N, V, C); see
``SparseStageMask``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithNoAttention,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .compat_convnextv2 import functorch_transforms_active
from .configuration_convnextv2 import MAX_BLOCKS, MAX_PARAMETERS, ConvNextV2Config, check_local_path
from .fast_paths_convnextv2 import (
    block_mlp,
    dense_depthwise_conv,
    sparse_depthwise_conv,
    sparse_downsample_matmul,
)

GRN_EPS = 1e-6
BLOCK_NORM_EPS = 1e-6
IGNORE_INDEX = -100  # class-index labels to leave out of the loss, as transformers' losses do


def check_pixel_values(pixel_values: torch.Tensor, config: ConvNextV2Config, multiple: int | None = None) -> None:
    """Raise ``ValueError`` unless ``pixel_values`` is a floating-point (N, num_channels, H, W) tensor with H and W at
    least the total stride (32: every stage keeps at least one position), and multiples of ``multiple`` if given."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a 4-D tensor (batch, channels, height, width), got {shape}")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}; images go through the "
            "image processor (rescaled and normalised) first"
        )
    _, channels, height, width = pixel_values.shape
    if channels != config.num_channels:
        raise ValueError(
            f"pixel_values has {channels} channels but the model expects num_channels={config.num_channels} "
            f"(input shape {tuple(pixel_values.shape)})"
        )
    stride = config.total_stride
    if height < stride or width < stride:
        raise ValueError(
            f"height and width must be at least {stride} (the total stride: each stage halves the map), got "
            f"{height}x{width} (input shape {tuple(pixel_values.shape)})"
        )
    if multiple is not None and (height % multiple or width % multiple):
        raise ValueError(
            f"height and width must be multiples of mask_patch_size={multiple}, got {height}x{width} "
            f"(input shape {tuple(pixel_values.shape)})"
        )


def _open_safetensors(path: Path):
    """``safe_open`` on ``path`` (headers only); ``ValueError`` naming the file when it is unreadable or cut short."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # SafetensorError ("incomplete metadata", "invalid header length"), OSError
        raise ValueError(f"{path} is not a complete safetensors file: {error} (is it truncated?)") from error


def check_safetensors_files(folder: str | os.PathLike) -> None:
    """``ValueError`` naming the first ``*.safetensors`` file in ``folder`` that is unreadable or cut short (its
    header must describe exactly the bytes present). Reads headers only."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        with _open_safetensors(path):
            pass


# ---- what from_pretrained reads from a local folder, checked before transformers reads it ------------------------

# Stored dtypes that load as model weights: transformers casts each to the dtype the model is built in (float32 by
# default, ``dtype=`` or the checkpoint's own with ``dtype="auto"``). An integer or bool tensor would be cast too,
# into meaningless weights, and float8 needs a quantization config this model does not have.
WEIGHT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}

SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS_NAME, BIN_WEIGHTS_INDEX_NAME = "pytorch_model.bin", "pytorch_model.bin.index.json"


def _with_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors``: the variant goes before the last suffix, as in
    transformers (``model.safetensors.index.fp16.json`` for an index)."""
    if not variant:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def _wrong_dtype_error(where, name: str, dtype) -> ValueError:
    return ValueError(
        f"{where} stores the tensor {name!r} as {dtype}; model weights must be floating point "
        f"({', '.join(WEIGHT_DTYPES)}, cast to the model's dtype on loading): an integer, bool or float8 tensor would "
        "load as meaningless weights"
    )


def check_weight_dtypes(path: str | os.PathLike) -> None:
    """``ValueError`` naming the file and the tensor unless every tensor of the weights file ``path`` is stored in
    one of ``WEIGHT_DTYPES``. Reads the safetensors header (a ``.bin`` file is mapped onto the meta device), never
    the tensor data."""
    path = Path(path)
    if path.name.endswith(".safetensors"):
        with _open_safetensors(path) as file:
            for name in file.keys():
                dtype = file.get_slice(name).get_dtype()
                if dtype not in WEIGHT_DTYPES:
                    raise _wrong_dtype_error(path, name, dtype)
        return
    try:
        try:
            state = torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
        except RuntimeError:  # mmap needs the zip format of torch >= 1.6; older files load without it
            state = torch.load(str(path), map_location="meta", weights_only=True)
    except Exception as error:  # pickle, zip and unpickler errors all mean the file cannot be read as weights
        raise ValueError(f"{path} is not a readable PyTorch weights file: {error}") from error
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors")
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.dtype not in WEIGHT_DTYPES.values():
            raise _wrong_dtype_error(path, name, tensor.dtype)


def _inside(folder: Path, path: Path) -> bool:
    """Whether ``path`` (symbolic links followed) lies in ``folder``. A Hub cache snapshot's files are links into
    the repository's ``blobs`` folder, which counts as inside."""
    folder, target = folder.resolve(), path.resolve()
    if target.is_relative_to(folder):
        return True
    return folder.parent.name == "snapshots" and target.is_relative_to(folder.parent.parent / "blobs")


def check_shard_index(index_file: str | os.PathLike) -> list[Path]:
    """The shard files a checkpoint index (``model.safetensors.index.json``) names, each checked to be a file inside
    the index's folder before any is read; ``ValueError`` naming the index and the entry otherwise, or when the
    index is not JSON, has no ``weight_map`` object of tensor name -> file name, or no ``metadata`` object."""
    index_file = Path(index_file)
    folder = index_file.parent
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{index_file} is not a valid JSON file: {error}") from None
    if not isinstance(index, dict):
        raise ValueError(f"{index_file} holds a JSON {type(index).__name__}, not a checkpoint index object")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f"{index_file} is not a checkpoint index: it needs a non-empty 'weight_map' object from tensor names to "
            f"shard file names, got {type(weight_map).__name__ if weight_map is not None else 'none'}"
        )
    if not isinstance(index.get("metadata"), dict):
        raise ValueError(
            f"{index_file} is not a checkpoint index: it needs a 'metadata' object (save_pretrained writes one)"
        )
    wrong = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if wrong is not None:
        raise ValueError(f"{index_file}: weight_map[{wrong[0]!r}] must be a shard file name, got {wrong[1]!r}")
    shards = []
    for name in sorted(set(weight_map.values())):
        path = folder / name
        if os.path.isabs(name) or not _inside(folder, path):
            raise ValueError(
                f"{index_file} names the shard {name!r}, which is outside {folder}: an index may name only files "
                "inside its own folder"
            )
        if not path.is_file():
            raise ValueError(f"{index_file} names the shard {name!r}, which is not a file in {folder}")
        shards.append(path)
    return shards


def check_checkpoint_folder(
    folder: str | os.PathLike,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    weights_name: str | None = None,
) -> list[Path]:
    """Check the weights ``from_pretrained`` would read from the local ``folder`` (the same choice as transformers:
    ``weights_name`` from the config's ``transformers_weights``, else ``model.safetensors``, its index, then
    ``pytorch_model.bin`` and its index unless ``use_safetensors``) and return those files: a shard index may name
    only files inside the folder (``check_shard_index``, before any shard is opened), every ``*.safetensors`` file
    must be complete, and every tensor stored in a ``WEIGHT_DTYPES`` dtype. ``ValueError`` naming the file
    otherwise. A folder with no weights file is left to transformers (its error lists the names it looked for)."""
    folder = Path(folder)
    if weights_name:  # transformers then reads this file and no other
        names = [weights_name]
    else:
        names = [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME] if use_safetensors is not False else []
        names += [BIN_WEIGHTS_NAME, BIN_WEIGHTS_INDEX_NAME] if not use_safetensors else []
        names = [_with_variant(name, variant) for name in names]
    chosen = next((folder / name for name in names if (folder / name).is_file()), None)
    if chosen is None:
        files = []
    else:
        files = check_shard_index(chosen) if chosen.name.endswith(".index.json") else [chosen]
    check_safetensors_files(folder)
    for path in files:
        check_weight_dtypes(path)
    return files


def check_state_dict_dtypes(state_dict: Mapping[str, torch.Tensor], what: str = "state_dict") -> None:
    """The ``WEIGHT_DTYPES`` rule for weights given as a state dict (``from_pretrained(None, state_dict=...)``)."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.dtype not in WEIGHT_DTYPES.values():
            raise _wrong_dtype_error(what, name, tensor.dtype)


def _explicit_weights_name(folder: Path, config) -> str | None:
    """The weights file a config names in ``transformers_weights`` (transformers then loads that file only), from
    ``config`` when given, else from ``folder``'s config.json; ``ValueError`` when it points outside the folder."""
    if config is None:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # no or broken config.json: loading the config names the problem
            return None
    values = config if isinstance(config, dict) else getattr(config, "__dict__", {})
    name = values.get("transformers_weights") if isinstance(values, dict) else None
    if not isinstance(name, str) or not name:
        return None
    if os.path.isabs(name) or not _inside(folder, folder / name):
        raise ValueError(f"transformers_weights={name!r} in the config names a file outside {folder}")
    return name


class NonFiniteWeightsError(ValueError):
    """Weights holding NaN or inf: ``check_finite_weights`` raises it, and no code path of this package saves them."""


def check_finite_weights(state: Mapping[str, torch.Tensor], what: str) -> None:
    """``NonFiniteWeightsError`` unless every floating-point tensor of ``state`` is finite. The message names
    ``what`` (e.g. "the weights to save to out/"), the first tensor (in ``state``'s order) holding NaN or inf with
    its count of such values, and how many tensors hold any.

    One pass over the data and no copy of it: each tensor is reduced on its own device (the only temporary is its
    bool ``isfinite`` map), and the answers are read back with one sync per device. Integer, bool and meta tensors
    (no data) are skipped; non-tensor entries too."""
    names, flags = [], []
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
            continue
        if tensor.is_floating_point() or tensor.is_complex():
            names.append(name)
            flags.append(torch.isfinite(tensor.detach()).all())
    finite: dict[int, bool] = {}
    by_device: dict[torch.device, list[int]] = {}
    for index, flag in enumerate(flags):
        by_device.setdefault(flag.device, []).append(index)
    for indices in by_device.values():  # one host sync per device, not one per tensor
        finite.update(zip(indices, torch.stack([flags[i] for i in indices]).tolist(), strict=True))
    bad = [names[index] for index in range(len(names)) if not finite[index]]
    if bad:
        first = state[bad[0]].detach()
        count = int(torch.isfinite(first).logical_not_().sum())
        raise NonFiniteWeightsError(
            f"{what}: {len(bad)} of {len(names)} floating-point tensors hold NaN or inf, the first {bad[0]!r} "
            f"({count} of {first.numel()} values)"
        )


class ConvNextV2GRN(nn.Module):
    """Global Response Normalization: GRN(x) = gamma * (x * Nx) + beta + x, with Nx = Gx / mean_c(Gx) and Gx the L2
    norm of each channel over all positions of a sample.

    Works on (N, H, W, C) maps and on gathered (N, V, C) positions alike (positions are every axis between the batch
    axis and the last, channel axis). ``visible`` (broadcastable to the input, 1 = visible) restricts the statistics
    to visible positions, as the masked dense FCMAE path needs. The norm accumulates in fp32 (fp64 for fp64 inputs),
    so a half-precision sum of squares cannot overflow.
    """

    # the fast paths may fuse this exact class (not a subclass) into its neighbours: it offers their GRN interface
    # (``fast_paths_convnextv2.GRNInterface``: weight, bias, norm, scale, a call taking ``norm``)
    fast_path_fusable = True

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def norm(self, hidden_states: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Gx: the L2 norm of every channel over the (visible) positions of each sample, (N, C) in fp32 or fp64."""
        statistics_input = hidden_states if visible is None else hidden_states * visible
        positions = statistics_input.flatten(1, -2)  # (N, positions, C)
        accumulate = torch.promote_types(positions.dtype, torch.float32)
        return torch.linalg.vector_norm(positions, ord=2, dim=1, dtype=accumulate)

    def scale(self, norm: torch.Tensor) -> torch.Tensor:
        """The per-sample channel scale 1 + gamma * Nx from Gx, (N, C) in Gx's dtype."""
        relative_norm = norm / (norm.mean(dim=-1, keepdim=True) + GRN_EPS)
        return self.weight.reshape(-1) * relative_norm + 1.0

    def forward(
        self,
        hidden_states: torch.Tensor,
        visible: torch.Tensor | None = None,
        norm: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``norm``: Gx when already computed (N, C); by default ``self.norm(hidden_states, visible)``. ``out``: the
        tensor to write the result into (``hidden_states`` itself, where the caller owns it and no graph needs it)."""
        norm = self.norm(hidden_states, visible) if norm is None else norm
        scale = self.scale(norm).to(hidden_states.dtype)
        scale = scale.reshape(scale.shape[0], *[1] * (hidden_states.ndim - 2), scale.shape[1])
        # gamma * (x * Nx) + beta + x == x * (1 + gamma * Nx) + beta, one pass over x
        shift = self.bias.reshape(-1).to(hidden_states.dtype)
        if out is None:
            return torch.addcmul(shift, hidden_states, scale)
        return torch.addcmul(shift, hidden_states, scale, out=out)


class ConvNextV2LayerNorm(nn.LayerNorm):
    """LayerNorm over channels for (N, H, W, C) (``channels_last``) or (N, C, H, W) (``channels_first``) maps.

    Gathered (N, V, C) positions have their channels last whatever the data format, so they are normalised over the
    last axis in both formats.
    """

    fast_path_fusable = True  # per position: the MLP-in-chunks path may run it on a few samples at a time

    def __init__(self, normalized_shape: int, *, eps: float = BLOCK_NORM_EPS, data_format: str = "channels_last"):
        super().__init__(normalized_shape, eps=eps)
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
        self.data_format = data_format

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_first" and features.ndim == 4:
            return super().forward(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(features)


class ConvNextV2DropPath(nn.Module):
    """Stochastic depth: drops the residual branch of whole samples while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        keep = torch.empty(shape, dtype=hidden_states.dtype, device=hidden_states.device).bernoulli_(keep_prob)
        return hidden_states * keep.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


# ----------------------------------------------------------------------------------------------------------
# FCMAE masks. One object per stage; a block asks it how to run the depthwise conv and GRN's statistics, a stage
# how to downsample. Everything else in a block is per position and needs no mask.
# ----------------------------------------------------------------------------------------------------------


@runtime_checkable
class StageMask(Protocol):
    """The FCMAE mask of one stage: where the dense (paper) and sparse encoders differ, and only there."""

    def from_dense(self, features: torch.Tensor) -> torch.Tensor:
        """A full (N, C, h, w) map -> this stage's residual stream, masked positions removed or zeroed."""

    def to_dense(self, features: torch.Tensor) -> torch.Tensor:
        """This stage's residual stream -> a full (N, C, h, w) map with zeros at masked positions."""

    def depthwise_conv(self, conv: nn.Conv2d, hidden_states: torch.Tensor, fast_paths) -> torch.Tensor:
        """The block's depthwise conv on the residual stream, masked as the paper does; channels-last output."""

    def grn_visible(self, features: torch.Tensor) -> torch.Tensor | None:
        """What restricts GRN's statistics to visible positions (``None``: every position given is visible)."""

    def to_residual(self, branch: torch.Tensor) -> torch.Tensor:
        """A block's channels-last branch output in the residual stream's layout."""

    def downsample(self, norm: nn.Module, conv: nn.Conv2d, hidden_states: torch.Tensor, fast_paths) -> torch.Tensor:
        """The stage's LayerNorm + 2x2 stride-2 conv, from the previous stage's stream into this one's."""


class DenseStageMask:
    """The paper's masked dense recipe: full maps, zeroed at masked positions around every depthwise conv, GRN
    statistics over visible positions."""

    def __init__(self, visible: torch.Tensor):
        self.visible = visible  # (N, 1, h, w), 1 = visible

    def _visible(self, like: torch.Tensor) -> torch.Tensor:
        return self.visible.to(like.dtype)

    def from_dense(self, features: torch.Tensor) -> torch.Tensor:
        return features * self._visible(features)

    to_dense = from_dense

    def depthwise_conv(self, conv: nn.Conv2d, hidden_states: torch.Tensor, fast_paths) -> torch.Tensor:
        visible = self._visible(hidden_states)
        masked = hidden_states * visible
        fast = dense_depthwise_conv(conv, masked, fast_paths)  # the same numbers, in training
        return ((conv(masked) if fast is None else fast) * visible).permute(0, 2, 3, 1)

    def grn_visible(self, features: torch.Tensor) -> torch.Tensor:
        return self._visible(features).permute(0, 2, 3, 1)

    def to_residual(self, branch: torch.Tensor) -> torch.Tensor:
        return branch.permute(0, 3, 1, 2)

    def downsample(self, norm: nn.Module, conv: nn.Conv2d, hidden_states: torch.Tensor, fast_paths) -> torch.Tensor:
        return conv(norm(hidden_states))


class SparseStageMask:
    """Visible positions of one stage, gathered per sample into a regular (N, V, C) batch.

    Entries are ordered patch by patch, and inside a patch so that every 2x2 window of the stage is four consecutive
    entries (row-major inside the window) and the windows follow the next stage's order: the stride-2 downsampling
    conv is then a reshape and a matmul. Gathering and scattering work on rows of the (N * h * w, C) matrix of a
    channels-last map (``index_select`` and ``index_copy_``: several times faster on CPU than ``gather``/``scatter``
    along the position axis, and their backward keeps only the index).
    """

    def __init__(self, index: torch.Tensor, height: int, width: int):
        """``index`` (N, V): the flat position (row * width + col) of each gathered entry."""
        self.height, self.width = height, width
        offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * (height * width)
        self.rows = (index + offsets).reshape(-1)

    def gather(self, channels_last: torch.Tensor) -> torch.Tensor:
        """(N, h, w, C) map -> (N, V, C) visible positions."""
        batch, _, _, channels = channels_last.shape
        return channels_last.reshape(-1, channels).index_select(0, self.rows).view(batch, -1, channels)

    def from_dense(self, features: torch.Tensor) -> torch.Tensor:
        return self.gather(features.permute(0, 2, 3, 1))

    def to_dense(self, features: torch.Tensor) -> torch.Tensor:
        """(N, V, C) -> (N, C, h, w) with zeros at masked positions (channels_last memory)."""
        batch, _, channels = features.shape
        dense = features.new_zeros(batch * self.height * self.width, channels)
        dense.index_copy_(0, self.rows, features.reshape(-1, channels))  # in place: no copy of the zeros
        return dense.view(batch, self.height, self.width, channels).permute(0, 3, 1, 2)

    def depthwise_conv(self, conv: nn.Conv2d, hidden_states: torch.Tensor, fast_paths) -> torch.Tensor:
        fast = sparse_depthwise_conv(self, conv, hidden_states, fast_paths)
        if fast is not None:
            return fast
        # the depthwise conv is cheap: run it on the zero-filled map, keep the visible outputs
        return self.gather(conv(self.to_dense(hidden_states)).permute(0, 2, 3, 1))

    def grn_visible(self, features: torch.Tensor) -> None:
        return None

    def to_residual(self, branch: torch.Tensor) -> torch.Tensor:
        return branch

    def downsample(self, norm: nn.Module, conv: nn.Conv2d, hidden_states: torch.Tensor, fast_paths) -> torch.Tensor:
        hidden_states = norm(hidden_states)
        batch, positions, channels = hidden_states.shape
        windows = hidden_states.reshape(batch, positions // 4, 4 * channels)  # (row, col, channel) per window
        fast = sparse_downsample_matmul(windows, conv, fast_paths)
        if fast is not None:
            return fast
        # the conv, called as a module, on each window as a 2x2 image
        images = windows.reshape(-1, 2, 2, channels).permute(0, 3, 1, 2)
        return conv(images).reshape(batch, positions // 4, -1)


def _patch_offsets(cells: int, levels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offsets, inside a patch of (cells * 2**levels)² positions, of each entry in gather order.

    The high part of an entry's number is the raster index among ``cells``² coarse cells; the low ``2 * levels`` bits
    interleave row and column bits (Z-order), so 2x2 windows are consecutive at every level.
    """
    side = cells << levels
    entry = torch.arange(side * side, device=device)
    coarse, fine = entry >> (2 * levels), entry & ((1 << (2 * levels)) - 1)
    rows, cols = (coarse // cells) << levels, (coarse % cells) << levels
    for bit in range(levels):
        rows = rows | (((fine >> (2 * bit + 1)) & 1) << bit)
        cols = cols | (((fine >> (2 * bit)) & 1) << bit)
    return rows, cols


def num_kept_patches(num_patches: int, mask_ratio: float) -> int:
    """``int(L * (1 - mask_ratio))`` patches stay visible (the official rule). ``ValueError`` unless at least one
    patch is kept and at least one removed: FCMAE learns nothing from an image with no removed patch, and its loss
    would divide by zero."""
    num_kept = int(num_patches * (1 - mask_ratio))
    if num_kept == 0 or num_kept >= num_patches:
        what = "keeps no patch" if num_kept == 0 else "removes no patch"
        raise ValueError(
            f"mask_ratio={mask_ratio} {what} of the {num_patches} patches of this image size; FCMAE needs at least "
            "one patch kept and one removed: change mask_ratio or the image size"
        )
    return num_kept


def draw_mask(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The masking rule. Bool mask (N, L), True = removed: each sample keeps its ``num_kept_patches`` smallest-noise
    patches."""
    if not isinstance(noise, torch.Tensor) or noise.ndim != 2:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a tensor (N, L): one value per patch of each sample, got {shape}")
    if noise.is_complex() or noise.dtype == torch.bool:
        raise ValueError(f"noise must hold real numbers (one per patch, smallest kept), got dtype {noise.dtype}")
    # NaN would sort last (removed) and infs tie: a mask nobody asked for. Reading the values is a host sync, and
    # impossible inside a graph being traced or compiled: there the check steps aside.
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling() or functorch_transforms_active()
    if not tracing and not bool(torch.isfinite(noise).all()):
        bad = int(torch.isfinite(noise).logical_not_().sum())
        raise ValueError(
            f"noise holds {bad} NaN or infinite values of {noise.numel()}; every patch needs a finite value"
        )
    num_kept = num_kept_patches(noise.shape[1], mask_ratio)
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return rank >= num_kept


def build_stage_masks(
    bool_masked_pos: torch.Tensor, grid: tuple[int, int], config: ConvNextV2Config, num_kept: int | None = None
) -> list[StageMask]:
    """Per-stage views of a patch mask (N, L), True = removed, on a ``grid`` of (rows, cols) patches, for the encoder
    ``config.fcmae_impl`` names.

    ``num_kept``: the kept-patch count of every sample when the caller knows it (a mask from ``random_masking``);
    otherwise the sparse path reads and checks it from the mask, a host sync.
    """
    batch = bool_masked_pos.shape[0]
    grid_rows, grid_cols = grid
    cells = config.mask_patch_size // config.total_stride  # last-stage positions per patch side
    if config.fcmae_impl == "dense":
        visible = (~bool_masked_pos).view(batch, 1, grid_rows, grid_cols).float()
        scales = [cells << (config.num_stages - 1 - stage) for stage in range(config.num_stages)]
        return [DenseStageMask(visible.repeat_interleave(s, 2).repeat_interleave(s, 3)) for s in scales]

    if num_kept is None:
        kept_counts = (~bool_masked_pos).sum(dim=1)
        if bool(torch.any(kept_counts != kept_counts[0])):
            raise ValueError(
                "the sparse FCMAE path needs the same number of removed patches in every sample, got per-sample "
                f"kept counts {kept_counts.tolist()}; use ConvNextV2Config(fcmae_impl='dense') for masks that differ"
            )
        num_kept = int(kept_counts[0])
    # kept patches in ascending patch order
    ids_keep = torch.argsort(bool_masked_pos.to(torch.int32), dim=1, stable=True)[:, :num_kept]
    patch_rows, patch_cols = (ids_keep // grid_cols).unsqueeze(-1), (ids_keep % grid_cols).unsqueeze(-1)
    stage_masks: list[StageMask] = []
    for stage in range(config.num_stages):
        levels = config.num_stages - 1 - stage
        side = cells << levels
        rows, cols = _patch_offsets(cells, levels, bool_masked_pos.device)
        index = (patch_rows * side + rows) * (grid_cols * side) + patch_cols * side + cols
        stage_masks.append(SparseStageMask(index.reshape(batch, -1), grid_rows * side, grid_cols * side))
    return stage_masks


def normalized_pixel_targets(
    patches: torch.Tensor, norm_pix_loss: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """FCMAE's regression target from patchified pixels (N, L, p² * C): with ``norm_pix_loss`` each patch normalised by
    its own mean and standard deviation (returned too, (N, L, 1), to map predictions back to pixels). fp32."""
    target = patches.float()
    if not norm_pix_loss:
        return target, None, None
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    return (target - mean) / std, mean, std


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


class ConvNextV2Embeddings(nn.Module):
    """Stem: 4x4 stride-4 patchify conv, then LayerNorm over channels."""

    def __init__(self, config: ConvNextV2Config):
        super().__init__()
        self.patch_embeddings = nn.Conv2d(
            config.num_channels, config.hidden_sizes[0], kernel_size=config.patch_size, stride=config.patch_size
        )
        self.layernorm = ConvNextV2LayerNorm(config.hidden_sizes[0], eps=BLOCK_NORM_EPS, data_format="channels_first")
        self.num_channels = config.num_channels

    def forward(self, pixel_values: torch.Tensor, stage_mask: StageMask | None = None) -> torch.Tensor:
        embeddings = self.patch_embeddings(pixel_values.to(self.patch_embeddings.weight.dtype))
        if stage_mask is not None:
            embeddings = stage_mask.from_dense(embeddings)
        return self.layernorm(embeddings)


class ConvNextV2Layer(GradientCheckpointingLayer):
    """ConvNeXt V2 block: 7x7 depthwise conv, LayerNorm, Linear C->4C, GELU, GRN, Linear 4C->C, residual.

    Without a mask the residual stream is (N, C, H, W). With an FCMAE stage mask it is whatever the mask keeps: full
    maps for the dense recipe, gathered (N, V, C) positions for the sparse one.
    """

    def __init__(self, config: ConvNextV2Config, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.config = config  # read at run time: config.fast_paths may change after construction
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = ConvNextV2LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = ACT2FN[config.hidden_act]
        self.grn = ConvNextV2GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = ConvNextV2DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def fast_paths(self) -> bool | list[str]:
        return self.config.fast_paths

    @property
    def hidden_act(self) -> str:
        return self.config.hidden_act

    def forward(self, hidden_states: torch.Tensor, stage_mask: StageMask | None = None) -> torch.Tensor:
        if stage_mask is None:
            fast = dense_depthwise_conv(self.dwconv, hidden_states, self.fast_paths)  # the same numbers, in training
            features = (self.dwconv(hidden_states) if fast is None else fast).permute(0, 2, 3, 1)  # (N, H, W, C)
            visible = None
        else:
            features = stage_mask.depthwise_conv(self.dwconv, hidden_states, self.fast_paths)
            visible = stage_mask.grn_visible(features)
        fast = block_mlp(self, features, visible)  # the same numbers, by the fast paths that may run here
        if fast is None:
            features = self.pwconv1(self.layernorm(features))
            fast = self.pwconv2(self.grn(self.act(features), visible))
        features = self.drop_path(fast)
        features = features.permute(0, 3, 1, 2) if stage_mask is None else stage_mask.to_residual(features)
        return hidden_states + features


class ConvNextV2Stage(nn.Module):
    """Optional downsampling (LayerNorm, 2x2 stride-2 conv) followed by ``depth`` blocks."""

    def __init__(
        self,
        config: ConvNextV2Config,
        in_channels: int,
        out_channels: int,
        stride: int = 2,
        depth: int = 2,
        drop_path_rates: list[float] | None = None,
    ):
        super().__init__()
        self.config = config  # read at run time: config.fast_paths may change after construction
        if in_channels != out_channels or stride > 1:
            self.downsampling_layer = nn.ModuleList(
                [
                    ConvNextV2LayerNorm(in_channels, eps=BLOCK_NORM_EPS, data_format="channels_first"),
                    nn.Conv2d(in_channels, out_channels, kernel_size=stride, stride=stride),
                ]
            )
        else:
            self.downsampling_layer = nn.ModuleList()
        drop_path_rates = drop_path_rates or [0.0] * depth
        self.layers = nn.ModuleList(
            [ConvNextV2Layer(config, dim=out_channels, drop_path=drop_path_rates[j]) for j in range(depth)]
        )

    def forward(self, hidden_states: torch.Tensor, stage_mask: StageMask | None = None) -> torch.Tensor:
        if len(self.downsampling_layer) > 0:
            norm, conv = self.downsampling_layer
            if stage_mask is None:
                hidden_states = conv(norm(hidden_states))
            else:
                hidden_states = stage_mask.downsample(norm, conv, hidden_states, self.config.fast_paths)
        for layer in self.layers:
            hidden_states = layer(hidden_states, stage_mask)
        return hidden_states


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------

AUTO_MAP = {
    "AutoConfig": "configuration_convnextv2.ConvNextV2Config",
    "AutoModel": "modeling_convnextv2.ConvNextV2Model",
    "AutoModelForImageClassification": "modeling_convnextv2.ConvNextV2ForImageClassification",
    "AutoModelForMaskedImageModeling": "modeling_convnextv2.ConvNextV2ForMaskedImageModeling",
    "AutoBackbone": "modeling_convnextv2.ConvNextV2Backbone",
}


# ---- the size of the model a config builds, known before anything is allocated ----------------------------------

ARCHITECTURES = (
    "ConvNextV2Encoder",
    "ConvNextV2Model",
    "ConvNextV2ForImageClassification",
    "ConvNextV2Backbone",
    "ConvNextV2ForMaskedImageModeling",
)


def _block_parameters(dim: int) -> int:
    """One ``ConvNextV2Layer`` of width ``dim``."""
    dwconv, layernorm, grn = 49 * dim + dim, 2 * dim, 8 * dim
    pwconv1, pwconv2 = 4 * dim * dim + 4 * dim, 4 * dim * dim + dim
    return dwconv + layernorm + pwconv1 + grn + pwconv2


def estimated_parameters(config: ConvNextV2Config, architecture: str = "ConvNextV2ForImageClassification") -> int:
    """The parameter count of ``architecture`` (one of ``ARCHITECTURES``) built from ``config``, computed from the
    config's numbers alone: nothing is allocated, so it is instant for any config. Exact (the tests compare it with
    the built models of every preset); bytes are this times the element size of the dtype."""
    widths, depths = list(config.hidden_sizes), list(config.depths)
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    encoder = sum(depth * _block_parameters(width) for depth, width in zip(depths, widths, strict=True))
    # every stage after the first starts with a LayerNorm and a 2x2 stride-2 conv
    downsampling = zip(widths[:-1], widths[1:], strict=True)
    encoder += sum(2 * before + 4 * before * after + after for before, after in downsampling)
    stem = widths[0] * config.num_channels * patch * patch + widths[0] + 2 * widths[0]  # conv + LayerNorm
    model = stem + encoder + 2 * widths[-1]  # + the final LayerNorm
    if architecture == "ConvNextV2Encoder":
        return encoder
    if architecture == "ConvNextV2Model":
        return model
    if architecture == "ConvNextV2ForImageClassification":
        labels = config.num_labels or 0
        return model + (widths[-1] * labels + labels if labels > 0 else 0)
    if architecture == "ConvNextV2Backbone":  # no final LayerNorm; one LayerNorm per output map
        channels = dict(zip(config.stage_names, [widths[0], *widths], strict=True))
        return stem + encoder + sum(2 * channels[name] for name in config.out_features)
    if architecture == "ConvNextV2ForMaskedImageModeling":
        width, pixels = config.decoder_hidden_size, config.total_stride**2 * config.num_channels
        embed, mask_token, predict = widths[-1] * width + width, width, width * pixels + pixels
        return model + embed + mask_token + config.decoder_depth * _block_parameters(width) + predict
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")


def check_model_size(config: ConvNextV2Config, architecture: str) -> None:
    """``ValueError`` giving the estimate when ``architecture`` built from ``config`` would exceed ``MAX_PARAMETERS``
    parameters or ``MAX_BLOCKS`` blocks (see the configuration file), unless ``config.allow_large_model``. Every
    model class calls it before it allocates anything."""
    if getattr(config, "allow_large_model", False):
        return
    parameters = estimated_parameters(config, architecture)
    blocks = sum(config.depths) + (config.decoder_depth if architecture == "ConvNextV2ForMaskedImageModeling" else 0)
    if parameters <= MAX_PARAMETERS and blocks <= MAX_BLOCKS:
        return
    dtype = torch.get_default_dtype()  # what the weights are built in (from_pretrained sets it from its dtype=)
    raise ValueError(
        f"this config (depths={list(config.depths)}, hidden_sizes={list(config.hidden_sizes)}) builds a "
        f"{architecture} of {parameters:,} parameters ({parameters * dtype.itemsize / 1e9:,.1f} GB in "
        f"{str(dtype).removeprefix('torch.')}) and {blocks:,} blocks, beyond the bounds of {MAX_PARAMETERS:,} "
        f"parameters and {MAX_BLOCKS:,} blocks (MAX_PARAMETERS, MAX_BLOCKS); was the config edited by hand? If this "
        "size is intended, pass allow_large_model=True (to the config, or to from_pretrained)"
    )


class ConvNextV2PreTrainedModel(PreTrainedModel):
    config_class = ConvNextV2Config
    config: ConvNextV2Config
    base_model_prefix = "convnextv2"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ConvNextV2Layer"]

    def __init__(self, config, *inputs, **kwargs):
        # configs from stock transformers (AutoConfig without this package, `from_config`) gain our fields
        if not isinstance(config, ConvNextV2Config):
            config = ConvNextV2Config.from_dict(config.to_dict())
        architecture = next((base.__name__ for base in type(self).__mro__ if base.__name__ in ARCHITECTURES), None)
        if architecture is not None:  # before any layer exists: a hand-edited config fails here, not in malloc
            check_model_size(config, architecture)
        super().__init__(config, *inputs, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Official init: truncated normal (std ``initializer_range``) for conv and linear weights, zero biases, unit
        LayerNorms, zero GRN, normal(0.02) mask token."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ConvNextV2GRN):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ConvNextV2ForMaskedImageModeling):
            init.normal_(module.mask_token, std=0.02)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers' ``from_pretrained``, with the weights of a local folder checked before transformers
        reads them (``check_checkpoint_folder``): a truncated or corrupt file, a shard index naming files outside
        the folder or a broken index, and tensors stored as integers or bool are a ``ValueError`` naming the file
        (and the tensor). Float tensors load and are cast as transformers casts them. Weights given as
        ``state_dict=`` are held to the same dtypes. The config's model size is checked before the model is built
        (``check_model_size``; ``allow_large_model=True`` lifts the bound)."""
        check_local_path(pretrained_model_name_or_path)
        if pretrained_model_name_or_path is not None:
            folder = Path(str(pretrained_model_name_or_path)).expanduser() / kwargs.get("subfolder", "")
            if folder.is_dir():
                weights_name = _explicit_weights_name(folder, kwargs.get("config"))
                check_checkpoint_folder(folder, kwargs.get("variant"), kwargs.get("use_safetensors"), weights_name)
        if kwargs.get("state_dict") is not None:
            check_state_dict_dtypes(kwargs["state_dict"])
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, *args, **kwargs):
        """Save as usual; config.json also gets an ``auto_map`` for every class here, and the configuration, modeling
        and fast-path files are copied beside the weights, so ``trust_remote_code=True`` works without this
        package.

        Weights holding NaN or inf (``state_dict=`` when given, as the Trainer passes it, else the model's own) are
        refused with ``NonFiniteWeightsError`` naming the first such tensor, before anything is written."""
        check_finite_weights(
            self.state_dict() if state_dict is None else state_dict,
            f"the {type(self).__name__} weights to save to {os.fspath(save_directory)} (nothing was written)",
        )
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, is_main_process, state_dict, *args, **kwargs)


class ConvNextV2Encoder(ConvNextV2PreTrainedModel):
    """The four stages. ``output_hidden_states`` (True, or indices such as ``[0, 2, -1]``) records the stem output
    and each stage's output through transformers' output capturing, as the built-in encoder does."""

    main_input_name = "hidden_states"
    _can_record_outputs = {"hidden_states": ConvNextV2Stage}

    def __init__(self, config: ConvNextV2Config):
        super().__init__(config)
        drop_path_rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").split(
            config.depths
        )
        self.stages = nn.ModuleList()
        previous_channels = config.hidden_sizes[0]
        for i in range(config.num_stages):
            self.stages.append(
                ConvNextV2Stage(
                    self.config,
                    in_channels=previous_channels,
                    out_channels=config.hidden_sizes[i],
                    stride=2 if i > 0 else 1,
                    depth=config.depths[i],
                    drop_path_rates=drop_path_rates[i].tolist(),
                )
            )
            previous_channels = config.hidden_sizes[i]
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, hidden_states: torch.Tensor, stage_masks: list[StageMask] | None = None, **kwargs
    ) -> BaseModelOutputWithNoAttention:
        """With ``stage_masks`` (FCMAE) every stream stays in its mask's layout, recorded hidden states included."""
        stage_masks = stage_masks or [None] * len(self.stages)
        for stage, stage_mask in zip(self.stages, stage_masks, strict=True):
            hidden_states = stage(hidden_states, stage_mask)
        return BaseModelOutputWithNoAttention(last_hidden_state=hidden_states)


class ConvNextV2Model(ConvNextV2PreTrainedModel):
    """The ConvNeXt V2 encoder with global average pooling and the final LayerNorm."""

    def __init__(self, config: ConvNextV2Config):
        super().__init__(config)
        self.embeddings = ConvNextV2Embeddings(self.config)
        self.encoder = ConvNextV2Encoder(self.config)
        self.layernorm = nn.LayerNorm(self.config.hidden_sizes[-1], eps=self.config.layer_norm_eps)
        self.post_init()

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs) -> BaseModelOutputWithPoolingAndNoAttention:
        """
        pixel_values: (N, num_channels, H, W), any H, W >= 32 (the built-in's sizes; each stage floors H and W / 2).
        output_hidden_states: True for all five maps, or indices (``[0, 2, -1]``), None at the others.
        Returns ``last_hidden_state`` (N, C_last, H/32, W/32), ``pooler_output`` (N, C_last) and, when asked,
        ``hidden_states``: the stem output and each stage's output, (N, C_i, H_i, W_i).
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        check_pixel_values(pixel_values, self.config)
        encoder_outputs = self.encoder(self.embeddings(pixel_values), **kwargs)
        last_hidden_state = encoder_outputs.last_hidden_state
        pooled_output = self.layernorm(last_hidden_state.mean(dim=(-2, -1)))
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled_output,
            hidden_states=encoder_outputs.hidden_states,
        )


def check_classification_labels(labels: torch.Tensor, logits: torch.Tensor, config: ConvNextV2Config) -> None:
    """``ValueError`` naming the problem unless ``labels`` fit ``logits`` (N, num_labels) and the problem type."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
    batch, num_labels = logits.shape[0], logits.shape[-1]
    if config.num_labels == 0:
        raise ValueError("labels given, but the model has no classification head (num_labels=0)")
    problem_type = config.problem_type
    if problem_type == "regression" or (problem_type is None and num_labels == 1):
        if labels.numel() != logits.numel():
            raise ValueError(f"regression labels must hold {logits.numel()} values, got shape {tuple(labels.shape)}")
        return
    if problem_type == "multi_label_classification":
        if tuple(labels.shape) != tuple(logits.shape):
            raise ValueError(
                f"multi-label labels must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() and bool(((labels < 0) | (labels > 1)).any()):
            raise ValueError("multi-label labels must lie in [0, 1]")
        return
    if labels.is_floating_point():  # soft labels, e.g. MixUp/CutMix targets
        if tuple(labels.shape) != tuple(logits.shape):
            raise ValueError(
                f"soft labels must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        if not bool(torch.isfinite(labels).all()) or bool((labels < 0).any()):
            raise ValueError("soft labels must be finite and non-negative (a probability distribution per row)")
        sums = labels.sum(dim=-1, dtype=torch.float64)
        if not bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
            raise ValueError(f"soft labels must sum to 1 in every row (within 1e-3), got row sums {sums.tolist()[:8]}")
        return
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"class-index labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.numel() != batch or (labels.ndim > 1 and labels.shape[0] != batch):
        raise ValueError(f"class-index labels must have shape ({batch},), got {tuple(labels.shape)}")
    counted = labels[labels != IGNORE_INDEX]  # -100 marks a sample to leave out, as in transformers' losses
    if counted.numel() and bool(((counted < 0) | (counted >= num_labels)).any()):
        raise ValueError(
            f"class-index labels must lie in [0, {num_labels - 1}] (num_labels={num_labels}) or be {IGNORE_INDEX} "
            f"(ignored), got values from {int(counted.min())} to {int(counted.max())}"
        )


def share_of_step_loss(
    loss_sum: torch.Tensor, num_items_in_batch: torch.Tensor | int, batch_items: torch.Tensor | int
) -> torch.Tensor:
    """``loss_sum / num_items_in_batch``: this batch's share of the mean loss over a whole optimizer step.

    ``num_items_in_batch`` counts the items (``labels`` entries other than -100, the Trainer's rule) of every
    accumulation micro-batch and every process of the step; ``batch_items`` is this batch's own count, part of it.
    The shares of the micro-batches add up to the mean over all of them whatever their sizes; across processes the
    Trainer multiplies each loss by the world size and DDP averages the gradients, which again gives the mean.
    ``ValueError`` when the count is smaller than this batch's (it was then not counted over the step).
    """
    total = torch.as_tensor(num_items_in_batch, device=loss_sum.device)
    if total.numel() != 1 or bool(total.reshape(()) < batch_items):
        raise ValueError(
            f"num_items_in_batch ({total.tolist()}) must be one number counting the items of the whole optimizer "
            f"step (accumulation micro-batches and processes), at least this batch's {int(batch_items)}"
        )
    return loss_sum / total.reshape(()).clamp(min=1)  # a step of no items has a zero sum: 0, not 0/0


def image_classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    config: ConvNextV2Config,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Cross-entropy for class indices and for soft labels (N, num_labels) such as MixUp/CutMix targets; MSE for
    ``problem_type="regression"``; BCE for ``problem_type="multi_label_classification"``. Labels are checked first.

    Without ``num_items_in_batch``: the mean over this batch (as transformers' built-in model). With it (the
    Trainer's count of label entries over the optimizer step, see ``share_of_step_loss``): the sum over this batch
    divided by it, so accumulation and several processes give the whole batch's mean. The Trainer counts every entry
    of a soft-label row, ``num_labels`` per example, so a row's cross-entropy is weighted by ``num_labels`` too;
    the per-entry MSE/BCE losses count one per label entry already. (A regression target of exactly -100 is one
    the Trainer leaves out of its count.)
    """
    check_classification_labels(labels, logits, config)
    labels = labels.to(logits.device)
    if logits.shape[0] == 0:  # an empty batch: a zero loss, where a mean over nothing would be 0/0
        return logits.float().sum() * 0.0
    reduction = "mean" if num_items_in_batch is None else "sum"
    problem_type = config.problem_type
    if problem_type == "regression" or (problem_type is None and config.num_labels == 1):
        loss = F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float(), reduction=reduction)
    elif problem_type == "multi_label_classification":
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.dtype).float(), reduction=reduction)
    elif labels.is_floating_point():
        per_example = torch.sum(-labels * F.log_softmax(logits.float(), dim=-1), dim=-1)
        loss = per_example.mean() if num_items_in_batch is None else per_example.sum() * labels.shape[-1]
    elif num_items_in_batch is None and not bool((labels != IGNORE_INDEX).any()):
        return logits.float().sum() * 0.0  # every sample ignored: a mean over none would be 0/0
    else:
        loss = F.cross_entropy(logits.float().view(-1, config.num_labels), labels.view(-1), reduction=reduction)
    if num_items_in_batch is None:
        return loss
    return share_of_step_loss(loss, num_items_in_batch, labels.ne(-100).sum())


class ConvNextV2ForImageClassification(ConvNextV2PreTrainedModel):
    """ConvNeXt V2 with a linear classifier on the pooled features."""

    # forward normalises its loss by the Trainer's num_items_in_batch (sum / count over the optimizer step), so the
    # Trainer must pass it and not divide by the accumulation steps: exact with uneven micro-batches and processes
    accepts_loss_kwargs = True

    def __init__(self, config: ConvNextV2Config):
        super().__init__(config)
        self.num_labels = self.config.num_labels
        self.convnextv2 = ConvNextV2Model(self.config)
        self.classifier = (
            nn.Linear(self.config.hidden_sizes[-1], self.num_labels) if self.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention:
        """
        pixel_values: (N, num_channels, H, W), any H, W >= 32.
        labels: (N,) class indices, (N, num_labels) soft labels (e.g. MixUp/CutMix), or regression targets.
        num_items_in_batch: the Trainer's count of label entries over the whole optimizer step; the loss is then this
            batch's share of the step's mean (see ``image_classification_loss``), else this batch's mean.
        Returns ``logits`` (N, num_labels), ``loss`` when labels are given, and ``hidden_states`` when asked.
        """
        outputs = self.convnextv2(pixel_values, **kwargs)
        logits = self.classifier(outputs.pooler_output)
        loss = None if labels is None else image_classification_loss(logits, labels, self.config, num_items_in_batch)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class ConvNextV2Backbone(BackboneMixin, ConvNextV2PreTrainedModel):
    """Feature maps of the stages named in ``config.out_features`` (``stem``, ``stage1`` ... ``stage4``), each
    normalised by its own LayerNorm, for detection and segmentation heads."""

    has_attentions = False

    def __init__(self, config: ConvNextV2Config):
        super().__init__(config)
        self.embeddings = ConvNextV2Embeddings(self.config)
        self.encoder = ConvNextV2Encoder(self.config)
        self.num_features = [self.config.hidden_sizes[0]] + list(self.config.hidden_sizes)
        self.hidden_states_norms = nn.ModuleDict(
            {
                stage: ConvNextV2LayerNorm(channels, data_format="channels_first")
                for stage, channels in zip(self.out_features, self.channels, strict=True)
            }
        )
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BackboneOutput:
        """pixel_values: (N, num_channels, H, W), any H, W >= 32. Returns ``feature_maps``: one (N, C_i, H_i, W_i)
        map per entry of ``out_features``, and ``hidden_states`` when asked (True or indices)."""
        check_pixel_values(pixel_values, self.config)
        encoder_outputs = self.encoder(self.embeddings(pixel_values), **kwargs)
        hidden_states = encoder_outputs.hidden_states
        feature_maps = tuple(
            self.hidden_states_norms[stage](hidden_state)
            for stage, hidden_state in zip(self.stage_names, hidden_states, strict=True)
            if stage in self.out_features
        )
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states)


@dataclass
class ConvNextV2MaskedImageModelingOutput(ModelOutput):
    """
    loss: MSE on removed patches (normalised per patch when ``norm_pix_loss``), a scalar.
    logits: predicted pixels (N, L, mask_patch_size² * num_channels), each patch flattened in (row, column, channel)
        order; ``unpatchify`` turns them back into images.
    mask: (N, L) float, 1 = removed, 0 = kept (patches in raster order).
    hidden_states: the encoder's stem and stage outputs, full maps with zeros at masked positions (None at the
        positions ``output_hidden_states`` does not select).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor | None, ...] | None = None


class ConvNextV2ForMaskedImageModeling(ConvNextV2PreTrainedModel):
    """FCMAE: the ConvNeXt V2 encoder sees only the visible patches; a light ConvNeXt V2 decoder fills in a learned
    mask token at removed patches and predicts their pixels.

    With ``FCMAECollator``'s ``labels`` (the mask, -100 at kept patches) the Trainer counts the removed patches of
    each optimizer step into ``num_items_in_batch`` and the loss is this batch's share of their mean, so gradient
    accumulation and several processes equal one process on the whole batch, uneven micro-batches included. Without
    labels the Trainer has no count: it divides each batch's mean by the accumulation steps, exact when micro-batches
    hold the same number of images (``dataloader_drop_last=True``); ``compute_loss_func=fcmae_loss`` gets the count
    from the collator's labels instead.

    The encoder is a full ``ConvNextV2Model`` under ``convnextv2.`` so its weights load straight into the classifier
    for fine-tuning; its final LayerNorm is not used by FCMAE and is kept frozen so that distributed training finds no
    unused trainable parameter.
    """

    accepts_loss_kwargs = True  # see above: the loss is normalised by num_items_in_batch when labels count it

    def __init__(self, config: ConvNextV2Config):
        super().__init__(config)
        config = self.config
        self.convnextv2 = ConvNextV2Model(config)
        self.convnextv2.layernorm.requires_grad_(False)
        self.decoder_embed = nn.Conv2d(config.hidden_sizes[-1], config.decoder_hidden_size, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, config.decoder_hidden_size, 1, 1))
        self.decoder = nn.ModuleList(
            [ConvNextV2Layer(config, dim=config.decoder_hidden_size) for _ in range(config.decoder_depth)]
        )
        self.decoder_pred = nn.Conv2d(
            config.decoder_hidden_size, config.total_stride**2 * config.num_channels, kernel_size=1
        )
        self.post_init()

    # --- the recipe, step by step -------------------------------------------------------------------------------

    def patchify(self, pixel_values: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p² * C) with patches in raster order, pixels in (row, column, channel) order."""
        p = patch_size or self.config.mask_patch_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"patchify takes images (N, C, H, W), got {shape}")
        batch, channels, height, width = pixel_values.shape
        if height % p or width % p:
            raise ValueError(
                f"patchify needs height and width that are multiples of the patch size {p}, got {height}x{width}"
            )
        patches = pixel_values.reshape(batch, channels, height // p, p, width // p, p)
        return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)

    def unpatchify(
        self, patches: torch.Tensor, image_size: tuple[int, int] | None = None, patch_size: int | None = None
    ) -> torch.Tensor:
        """(N, L, p² * C) -> (N, C, H, W). ``image_size`` (H, W) is needed for non-square images."""
        p = patch_size or self.config.mask_patch_size
        channels = self.config.num_channels
        if not isinstance(patches, torch.Tensor) or patches.ndim != 3 or patches.shape[-1] != p * p * channels:
            shape = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
            raise ValueError(f"unpatchify takes patches (N, L, p^2 * C) = (N, L, {p * p * channels}), got {shape}")
        batch, num_patches, _ = patches.shape
        if image_size is None:
            side = int(round(num_patches**0.5))
            if side * side != num_patches:
                raise ValueError(f"{num_patches} patches do not form a square; pass image_size=(height, width)")
            image_size = (side * p, side * p)
        rows, cols = image_size[0] // p, image_size[1] // p
        if rows * cols != num_patches:
            raise ValueError(f"image_size {tuple(image_size)} holds {rows * cols} patches of {p}, got {num_patches}")
        image = patches.reshape(batch, rows, cols, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return image.reshape(batch, channels, rows * p, cols * p)

    def num_kept_patches(self, num_patches: int) -> int:
        """``int(L * (1 - mask_ratio))``, the official keep count; at least one patch kept and one removed."""
        return num_kept_patches(num_patches, self.config.mask_ratio)

    def random_masking(self, batch_size: int, num_patches: int, noise: torch.Tensor | None = None, device=None):
        """Bool mask (N, L), True = removed: per sample exactly ``num_kept_patches(L)`` patches are kept, those with
        the smallest ``noise`` (uniform random when not given)."""
        if noise is None:
            noise = torch.rand(batch_size, num_patches, device=device)
        elif not isinstance(noise, torch.Tensor):
            raise ValueError(f"noise must be a tensor (batch, patches), got {type(noise).__name__}")
        elif tuple(noise.shape) != (batch_size, num_patches):
            raise ValueError(
                f"noise must have shape (batch, patches) = {(batch_size, num_patches)}, got {tuple(noise.shape)}"
            )
        return draw_mask(noise, self.config.mask_ratio)

    def pixel_targets(self, pixel_values: torch.Tensor):
        """The regression target of every patch (N, L, p² * C) in fp32, and the per-patch mean and std (N, L, 1) that
        ``norm_pix_loss`` divided out (``None`` without it): ``prediction * std + mean`` are pixels again."""
        return normalized_pixel_targets(self.patchify(pixel_values), self.config.norm_pix_loss)

    def forward_decoder(self, latent: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Encoder map (N, C_last, h, w) -> logits (N, L, mask_patch_size² * C)."""
        batch, _, height, width = latent.shape
        stride = self.config.total_stride
        cells = self.config.mask_patch_size // stride
        removed = bool_masked_pos.view(batch, 1, height // cells, width // cells)
        removed = removed.repeat_interleave(cells, 2).repeat_interleave(cells, 3)
        hidden_states = self.decoder_embed(latent)
        hidden_states = torch.where(removed, self.mask_token.to(hidden_states.dtype), hidden_states)
        for layer in self.decoder:
            hidden_states = layer(hidden_states)
        prediction = self.decoder_pred(hidden_states)  # (N, stride² * C, h, w), one stride x stride tile each
        tiles = prediction.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
        if cells == 1:  # a tile is a patch (the official setting): already in patchify's order
            return tiles
        image = self.unpatchify(tiles, (height * stride, width * stride), patch_size=stride)
        return self.patchify(image)

    def forward_loss(
        self,
        pixel_values: torch.Tensor,
        logits: torch.Tensor,
        mask: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Mean over removed patches of the per-patch MSE against the (normalised) target pixels; 0 when no patch is
        removed (never 0/0). With ``num_items_in_batch``, the removed patches of the whole optimizer step: the sum
        over this batch's removed patches divided by it (this batch's share of the step's mean)."""
        target, _, _ = self.pixel_targets(pixel_values)
        if logits.shape != target.shape or tuple(mask.shape) != tuple(target.shape[:2]):
            raise ValueError(
                f"forward_loss needs logits of the targets' shape {tuple(target.shape)} and a mask "
                f"{tuple(target.shape[:2])}, got logits {tuple(logits.shape)} and mask {tuple(mask.shape)}"
            )
        per_patch = (logits.float() - target).pow(2).mean(dim=-1)
        mask = mask.to(per_patch.dtype)
        if num_items_in_batch is not None:
            return share_of_step_loss((per_patch * mask).sum(), num_items_in_batch, mask.sum())
        return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)

    def _check_bool_masked_pos(self, bool_masked_pos: torch.Tensor, batch: int, num_patches: int, image) -> None:
        if not isinstance(bool_masked_pos, torch.Tensor):
            raise ValueError(f"bool_masked_pos must be a tensor, got {type(bool_masked_pos).__name__}")
        if tuple(bool_masked_pos.shape) != (batch, num_patches):
            raise ValueError(
                f"bool_masked_pos must have shape (batch, patches) = {(batch, num_patches)} for {image} images and "
                f"mask_patch_size={self.config.mask_patch_size}, got {tuple(bool_masked_pos.shape)}"
            )
        if bool_masked_pos.dtype != torch.bool and not bool(((bool_masked_pos == 0) | (bool_masked_pos == 1)).all()):
            raise ValueError(
                f"bool_masked_pos must be bool or hold only 0 and 1 (1 = removed), got dtype {bool_masked_pos.dtype} "
                "with other values"
            )
        if batch and bool((bool_masked_pos.bool().sum(dim=1) == num_patches).any()):
            raise ValueError("bool_masked_pos removes every patch of a sample; keep at least one patch visible")

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_loss: bool = True,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> ConvNextV2MaskedImageModelingOutput:
        """
        pixel_values: (N, C, H, W), H and W multiples of ``mask_patch_size``.
        bool_masked_pos: optional (N, L) bool (or 0/1), True = removed, L = (H / mask_patch_size) * (W /
            mask_patch_size). Without it a random mask is drawn (reproducible through ``noise``, (N, L) finite
            values, smallest kept). Giving both is a ``ValueError``.
        return_loss: always computed; the argument tells the Trainer that evaluation gets an ``eval_loss``.
        labels: optional (N, L), ``FCMAECollator``'s mask: -100 at kept patches, anything else at removed ones; it
            must match the mask used. It tells that ``num_items_in_batch`` counts removed patches.
        num_items_in_batch: the Trainer's count of ``labels`` entries other than -100 over the whole optimizer step
            (accumulation micro-batches and processes). With ``labels`` the loss is the sum over this batch's removed
            patches divided by it; otherwise it is ignored and the loss is this batch's mean (``fcmae_loss`` takes
            the labels away and rescales that mean itself).
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        config = self.config
        check_pixel_values(pixel_values, config, multiple=config.mask_patch_size)
        batch, _, height, width = pixel_values.shape
        if batch == 0:
            raise ValueError("FCMAE needs at least one image (got a batch of 0): there is no patch to reconstruct")
        grid = (height // config.mask_patch_size, width // config.mask_patch_size)
        num_patches = grid[0] * grid[1]
        num_kept = None  # known without looking at the mask only when we draw it
        if bool_masked_pos is not None and noise is not None:
            raise ValueError(
                "pass bool_masked_pos or noise, not both: bool_masked_pos is the mask itself and noise only draws one, "
                "so one of them would be silently ignored"
            )
        if bool_masked_pos is None:
            bool_masked_pos = self.random_masking(batch, num_patches, noise, pixel_values.device)
            num_kept = self.num_kept_patches(num_patches)
        else:
            self._check_bool_masked_pos(bool_masked_pos, batch, num_patches, f"{height}x{width}")
            bool_masked_pos = bool_masked_pos.bool()

        stage_masks = build_stage_masks(bool_masked_pos, grid, config, num_kept)
        if output_hidden_states is not None:
            kwargs["output_hidden_states"] = output_hidden_states
        embeddings = self.convnextv2.embeddings(pixel_values, stage_masks[0])
        encoder_outputs = self.convnextv2.encoder(embeddings, stage_masks, **kwargs)
        latent = stage_masks[-1].to_dense(encoder_outputs.last_hidden_state)
        hidden_states = encoder_outputs.hidden_states
        if hidden_states is not None:  # the stem's stream is in stage 1's layout; each stage's in its own
            layouts = [stage_masks[0], *stage_masks]
            hidden_states = tuple(
                None if state is None else mask.to_dense(state)
                for mask, state in zip(layouts, hidden_states, strict=True)
            )

        logits = self.forward_decoder(latent, bool_masked_pos)
        mask = bool_masked_pos.to(logits.dtype)
        if labels is not None:  # what the Trainer counted into num_items_in_batch must be the mask used here
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(bool_masked_pos.shape):
                shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels must be the (batch, patches) = {(batch, num_patches)} mask, got {shape}")
            if not torch.equal(labels.ne(-100), bool_masked_pos):
                raise ValueError(
                    "labels (-100 at kept patches) do not mark the removed patches of this mask; take both from "
                    "FCMAECollator (its noise and labels) so num_items_in_batch counts the patches the loss sums"
                )
        loss = self.forward_loss(pixel_values, logits, mask, None if labels is None else num_items_in_batch)
        return ConvNextV2MaskedImageModelingOutput(loss=loss, logits=logits, mask=mask, hidden_states=hidden_states)


ConvNextV2Model.register_for_auto_class("AutoModel")
ConvNextV2ForImageClassification.register_for_auto_class("AutoModelForImageClassification")
ConvNextV2ForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")
ConvNextV2Backbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "ConvNextV2Backbone",
    "ConvNextV2ForImageClassification",
    "ConvNextV2ForMaskedImageModeling",
    "ConvNextV2MaskedImageModelingOutput",
    "ConvNextV2Model",
    "ConvNextV2PreTrainedModel",
    "NonFiniteWeightsError",
    "StageMask",
    "check_checkpoint_folder",
    "check_finite_weights",
    "check_model_size",
    "check_shard_index",
    "check_weight_dtypes",
    "draw_mask",
    "estimated_parameters",
    "num_kept_patches",
]
