"""ConvNeXt V2 models: encoder, classifier, backbone and FCMAE masked image modeling.

Parameter names and shapes are those of transformers' built-in ``convnextv2`` classes, so state dicts move
between the two with strict loading. This file travels to the Hub as remote code: it imports only torch,
transformers and its sibling ``configuration_convnextv2.py``.

Layout conventions: the classifier path keeps the residual stream in (N, C, H, W); block internals run
channels-last. The FCMAE "sparse" path keeps the residual stream of each stage as gathered visible
positions (N, V, C); see ``_SparseStageMask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithNoAttention,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_convnextv2 import ConvNextV2Config

GRN_EPS = 1e-6
BLOCK_NORM_EPS = 1e-6


def check_pixel_values(pixel_values: torch.Tensor, config: ConvNextV2Config, multiple: int | None = None) -> None:
    """Raise ``ValueError`` unless ``pixel_values`` is (N, num_channels, H, W) with H, W divisible by ``multiple``."""
    multiple = multiple or config.total_stride
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a 4-D tensor (batch, channels, height, width), got {shape}")
    _, channels, height, width = pixel_values.shape
    if channels != config.num_channels:
        raise ValueError(
            f"pixel_values has {channels} channels but the model expects num_channels={config.num_channels} "
            f"(input shape {tuple(pixel_values.shape)})"
        )
    if height == 0 or width == 0 or height % multiple or width % multiple:
        raise ValueError(
            f"height and width must be positive multiples of {multiple}, got {height}x{width} "
            f"(input shape {tuple(pixel_values.shape)})"
        )


def _l2_norm_over_positions(positions: torch.Tensor) -> torch.Tensor:
    """(N, P, C) -> (N, C): the L2 norm over positions, accumulated in fp32 or fp64 (no half-precision overflow).

    On CPU in eager mode, torch's norm reduction over a non-innermost axis is several times slower than squaring
    and summing. At inference it squares a few samples at a time, so the temporary stays small (a fresh
    allocation above glibc's 32 MB mmap threshold costs a page fault per 4 KB); under autograd in one piece, as
    the backward of chunks would copy the whole gradient to join them. On GPUs and in compiled graphs the norm
    is one fused reduction.
    """
    accumulate = _accumulation_dtype(positions.dtype)
    if positions.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.linalg.vector_norm(positions, ord=2, dim=1, dtype=accumulate)
    samples_per_chunk = max(1, (1 << 22) // max(positions[0].numel(), 1))
    if positions.requires_grad or positions.shape[0] <= samples_per_chunk:
        return _sqrt_zero_gradient_at_zero(positions.to(accumulate).square().sum(dim=1))
    chunks = positions.split(samples_per_chunk)
    return torch.cat([chunk.to(accumulate).square().sum(dim=1) for chunk in chunks]).sqrt()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half precision and fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _sqrt_zero_gradient_at_zero(sum_of_squares: torch.Tensor) -> torch.Tensor:
    """sqrt whose gradient is 0 where its input is 0, as torch's norm defines it. Plain sqrt's gradient there is
    inf, and inf times the square's gradient at 0 is NaN: one channel that is zero at every position of a sample
    (a dead unit, or fp16 GELU outputs that flush to zero) would turn every gradient NaN. (N, C): cheap."""
    if not sum_of_squares.requires_grad:
        return sum_of_squares.sqrt()
    positive = sum_of_squares > 0
    return torch.where(positive, torch.where(positive, sum_of_squares, 1.0).sqrt(), 0.0)


def _eager_autograd(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is on its way into a plain eager autograd graph, where our training-only autograd
    functions may replace the modules: not while compiling (Inductor plans the backward itself) and not under
    torch.func transforms (``grad``, ``vmap``), which need functions written for them."""
    return (
        tensor.requires_grad and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
    )


def _bare(module: nn.Module, kind: type[nn.Module] = nn.Linear) -> bool:
    """A plain ``kind`` layer that nothing wraps or observes: not a subclass (a PEFT LoRA layer, a quantized or
    parametrized layer) and without hooks. Only such a layer may be bypassed by arithmetic on its weight or
    have its output modified in place: anything else must be called as a module."""
    return type(module) is kind and not module._forward_hooks and not module._forward_pre_hooks


class ConvNextV2GRN(nn.Module):
    """Global Response Normalization over every axis between the batch axis and the (last) channel axis.

    Works on (N, H, W, C) maps and on gathered (N, V, C) positions alike. ``visible`` (broadcastable to the
    input, 1 = visible) restricts the statistics to visible positions, as the masked dense FCMAE path needs.
    GRN(x) = x * (1 + gamma * Nx) + beta: a per-sample channel scale and a shift. The L2 norm accumulates in
    fp32 so a half-precision sum of squares cannot overflow.

    In a block GRN feeds a linear layer, and ``into_linear`` folds the scale into that layer's weight (one
    small weight per sample) and the shift into its bias, so GRN's output, the widest activation of the
    network, is never written.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def norm(self, hidden_states: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """The L2 norm of every channel over the (visible) positions of each sample, (N, C) in fp32 or fp64."""
        statistics_input = hidden_states if visible is None else hidden_states * visible
        # one reduction axis of every position: faster than reducing (H, W) as two axes
        positions = statistics_input.reshape(statistics_input.shape[0], -1, statistics_input.shape[-1])
        return _l2_norm_over_positions(positions)

    def scale(
        self, hidden_states: torch.Tensor, visible: torch.Tensor | None = None, norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The per-sample channel scale 1 + gamma * Nx, (N, C) in fp32 or fp64 (from ``norm`` when given)."""
        global_norm = self.norm(hidden_states, visible) if norm is None else norm
        relative_norm = global_norm / (global_norm.mean(dim=-1, keepdim=True) + GRN_EPS)
        return self.weight.reshape(-1) * relative_norm + 1.0

    def forward(
        self, hidden_states: torch.Tensor, visible: torch.Tensor | None = None, norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        scale = self.scale(hidden_states, visible, norm).to(hidden_states.dtype)
        scale = scale.reshape(scale.shape[0], *[1] * (hidden_states.ndim - 2), scale.shape[1])
        return torch.addcmul(self.bias.reshape(-1).to(hidden_states.dtype), hidden_states, scale)

    def into_linear(
        self,
        hidden_states: torch.Tensor,
        linear: nn.Linear,
        visible: torch.Tensor | None = None,
        norm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``linear(self(hidden_states, visible))``. Where a sample has more positions than the linear has
        outputs (the early, wide stages), GRN's output is not materialised: (x * s_n + beta) W^T + b
        = x (W * s_n)^T + (W beta + b), one batched matmul with a per-sample weight (N, out, in). Later stages,
        whose per-sample weights would outweigh the activation, apply GRN first, and so do compiled graphs, where
        Inductor fuses GRN into the GELU kernel and a plain matmul is faster than the batched one, and linears
        that are not a bare ``nn.Linear`` (a LoRA adapter, a quantized layer, a hook), which must be called."""
        batch, channels = hidden_states.shape[0], hidden_states.shape[-1]
        positions = hidden_states.numel() // max(batch * channels, 1)
        if positions <= linear.out_features or torch.compiler.is_compiling() or not _bare(linear):
            return linear(self(hidden_states, visible, norm))
        scale = self.scale(hidden_states, visible, norm)
        weight = linear.weight.unsqueeze(0) * scale.unsqueeze(1)
        bias = torch.addmv(linear.bias, linear.weight, self.bias.reshape(-1))
        dtype = hidden_states.dtype  # the scaled weight is fp32 (the scale is); autocast would cast it anyway
        output = torch.baddbmm(
            bias.to(dtype), hidden_states.reshape(batch, positions, channels), weight.transpose(1, 2).to(dtype)
        )
        return output.view(*hidden_states.shape[:-1], linear.out_features)


class _GeluGrnLinear(torch.autograd.Function):
    """``linear(grn(gelu(h), visible))`` for training that keeps only ``h`` (and GRN's (N, C) norms) for the
    backward. Autograd through the modules would keep GELU's output too, and at the stages that do not fold,
    GRN's: both are recomputed in the backward instead (elementwise, cheap), and GRN's backward is written out
    in a few passes. Same numbers as autograd through the modules (tested in fp64). Eager mode only: Inductor
    makes its own recompute choices.
    """

    @staticmethod
    def forward(ctx, h, gamma, beta, weight, bias, grn: ConvNextV2GRN, linear: nn.Linear, visible):
        activated = F.gelu(h)
        norm = grn.norm(activated, visible)
        ctx.save_for_backward(h, norm, gamma, beta, weight, visible)
        return grn.into_linear(activated, linear, visible, norm)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        h, norm, gamma, beta, weight, visible = ctx.saved_tensors
        needs_h, needs_gamma, needs_beta, needs_weight, needs_bias = ctx.needs_input_grad[:5]
        dtype, channels = h.dtype, h.shape[-1]
        accumulate = _accumulation_dtype(dtype)
        per_channel = (h.shape[0],) + (1,) * (h.ndim - 2) + (channels,)  # (N, C) broadcast over positions
        activated = F.gelu(h)
        mean = norm.mean(dim=-1, keepdim=True) + GRN_EPS
        relative = norm / mean
        scale = gamma.reshape(-1) * relative + 1.0
        scale_as_input = scale.to(dtype).reshape(per_channel)
        grad_flat = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = grad_bias = None
        if needs_weight:
            grn_output = torch.addcmul(beta.reshape(-1).to(dtype), activated, scale_as_input)
            grad_weight = (grad_flat.t() @ grn_output.reshape(-1, channels).to(grad_flat.dtype)).to(weight.dtype)
            del grn_output
        if needs_bias:
            grad_bias = grad_flat.sum(dim=0, dtype=accumulate).to(weight.dtype)
        if not (needs_h or needs_gamma or needs_beta):
            return None, None, None, grad_weight, grad_bias, None, None, None
        grad_grn_output = (grad_flat @ weight.to(grad_flat.dtype)).view(h.shape).to(dtype)
        flat_positions = (h.shape[0], -1, channels)
        grad_beta = grad_grn_output.reshape(-1, channels).sum(dim=0, dtype=accumulate).reshape(beta.shape)
        # d loss / d scale: (N, C)
        grad_scale = (grad_grn_output * activated).reshape(flat_positions).sum(dim=1, dtype=accumulate)
        grad_gamma = (grad_scale * relative).sum(dim=0).reshape(gamma.shape)
        # relative = norm / (mean over channels of norm + eps)
        grad_relative = grad_scale * gamma.reshape(-1)
        grad_norm = grad_relative / mean - (grad_relative * norm).sum(-1, keepdim=True) / (mean * mean * channels)
        # d norm / d x = x / norm at visible positions; 0 where the norm is 0 (as torch's norm defines it)
        grad_over_norm = torch.where(norm > 0, grad_norm / torch.where(norm > 0, norm, 1.0), 0.0)
        statistics_input = activated if visible is None else activated * visible
        grad_activated = torch.addcmul(
            grad_grn_output * scale_as_input, statistics_input, grad_over_norm.to(dtype).reshape(per_channel)
        )
        grad_h = torch.ops.aten.gelu_backward(grad_activated, h)
        return grad_h, grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype), grad_weight, grad_bias, None, None, None


class ConvNextV2LayerNorm(nn.LayerNorm):
    """LayerNorm over channels for (N, H, W, C) (``channels_last``) or (N, C, H, W) (``channels_first``) maps.

    Gathered (N, V, C) positions have their channels last whatever the data format, so they are normalised
    over the last axis in both formats.
    """

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
# FCMAE masks, one object per stage. The blocks ask them how to run the depthwise conv and the GRN
# statistics; everything else in a block is per position and needs no mask at all.
# ----------------------------------------------------------------------------------------------------------


class _DenseStageMask:
    """The paper's masked dense recipe: full maps, zeroed at masked positions around every depthwise conv."""

    is_sparse = False

    def __init__(self, visible: torch.Tensor):
        self.visible = visible  # (N, 1, h, w), 1 = visible

    def _visible(self, like: torch.Tensor) -> torch.Tensor:
        return self.visible.to(like.dtype)

    def from_dense(self, features: torch.Tensor) -> torch.Tensor:
        return features * self._visible(features)

    to_dense = from_dense

    def depthwise_conv(self, conv: nn.Conv2d, hidden_states: torch.Tensor) -> torch.Tensor:
        visible = self._visible(hidden_states)
        return (conv(hidden_states * visible) * visible).permute(0, 2, 3, 1)

    def grn_visible(self, features: torch.Tensor) -> torch.Tensor:
        return self._visible(features).permute(0, 2, 3, 1)


class _SparseStageMask:
    """Visible positions of one stage, gathered per sample into a regular (N, V, C) batch.

    ``index`` (N, V) holds the flat position (row * width + col) of each gathered entry. Entries are ordered
    patch by patch, and inside a patch so that every 2x2 window of the stage is four consecutive entries and
    the windows follow the next stage's order: the stride-2 downsampling conv is then a reshape and a matmul.
    Gathering and scattering work on rows of the (N * h * w, C) matrix of a channels-last map (``index_select``
    and ``index_copy_``: several times faster on CPU than ``gather``/``scatter`` along the position axis, and
    their backward keeps only the index where ``gather``'s keeps the whole full-resolution input).
    """

    is_sparse = True

    def __init__(self, index: torch.Tensor, height: int, width: int):
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

    def depthwise_conv(self, conv: nn.Conv2d, hidden_states: torch.Tensor) -> torch.Tensor:
        # the depthwise conv is cheap: run it densely on the zero-filled map, keep the visible outputs
        if _eager_autograd(hidden_states) and _bare(conv, nn.Conv2d):
            return _SparseDepthwiseConv.apply(hidden_states, conv.weight, conv.bias, self, conv)
        return self.gather(conv(self.to_dense(hidden_states)).permute(0, 2, 3, 1))

    def grn_visible(self, features: torch.Tensor) -> None:
        return None


class _SparseDepthwiseConv(torch.autograd.Function):
    """``mask.gather(conv(mask.to_dense(x)))`` for training, keeping the gathered input (N, V, C) for the
    backward instead of the zero-filled full-resolution map that autograd through conv would keep, and taking
    the bias gradient from the visible outputs (the conv backward computes it from the full map, slowly on
    CPU). The bias is added after the gather: the same numbers."""

    @staticmethod
    def forward(ctx, hidden_states, weight, bias, mask: _SparseStageMask, conv: nn.Conv2d):
        ctx.mask, ctx.conv = mask, conv
        output = F.conv2d(
            mask.to_dense(hidden_states), weight, None, conv.stride, conv.padding, conv.dilation, conv.groups
        )
        ctx.compute_dtype = output.dtype  # autocast's choice, replayed in the backward
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(hidden_states, weight)
        visible = mask.gather(output.permute(0, 2, 3, 1))
        return visible if bias is None else visible + bias.to(visible.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden_states, weight = ctx.saved_tensors
        mask, conv, dtype = ctx.mask, ctx.conv, ctx.compute_dtype
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input, grad_weight = torch.ops.aten.convolution_backward(
            mask.to_dense(grad.to(dtype)),
            mask.to_dense(hidden_states.to(dtype)),
            weight.to(dtype),
            None,
            conv.stride,
            conv.padding,
            conv.dilation,
            False,
            [0, 0],
            conv.groups,
            [needs_input, needs_weight, False],
        )[:2]
        if grad_input is not None:
            grad_input = mask.gather(grad_input.permute(0, 2, 3, 1)).to(hidden_states.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        grad_bias = None
        if needs_bias:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(dim=0, dtype=_accumulation_dtype(grad.dtype))
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None


def _downsample_gathered(norm: nn.Module, conv: nn.Conv2d, hidden_states: torch.Tensor) -> torch.Tensor:
    """The 2x2 stride-2 downsampling conv on gathered positions (see ``_SparseStageMask`` for the order)."""
    hidden_states = norm(hidden_states)
    batch, positions, channels = hidden_states.shape
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 4 * channels)
    return F.linear(hidden_states.reshape(batch, positions // 4, 4 * channels), weight, conv.bias)


def _patch_offsets(cells: int, levels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offsets, inside a patch of (cells * 2**levels)² positions, of each entry in gather order.

    The high part of an entry's number is the raster index among ``cells``² coarse cells; the low
    ``2 * levels`` bits interleave row and column bits (Z-order), so 2x2 windows are consecutive at every level.
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
    """``int(L * (1 - mask_ratio))`` patches stay visible (the official rule); ``ValueError`` when none would."""
    num_kept = int(num_patches * (1 - mask_ratio))
    if num_kept == 0:
        raise ValueError(
            f"mask_ratio={mask_ratio} keeps no patch of the {num_patches} in this image size; "
            "lower mask_ratio or use larger images"
        )
    return num_kept


def draw_mask(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Bool mask (N, L), True = removed: each sample keeps its ``num_kept_patches`` smallest-noise patches."""
    num_kept = num_kept_patches(noise.shape[1], mask_ratio)
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return rank >= num_kept


def build_stage_masks(
    bool_masked_pos: torch.Tensor,
    grid: tuple[int, int],
    config: ConvNextV2Config,
    sparse: bool,
    num_kept: int | None = None,
) -> list[_DenseStageMask | _SparseStageMask]:
    """Per-stage views of a patch mask (N, L), True = removed, on a ``grid`` of (rows, cols) patches.

    ``num_kept``: the kept-patch count of every sample when the caller knows it (a mask from
    ``random_masking``); otherwise the sparse path reads and checks it from the mask, a host sync.
    """
    batch = bool_masked_pos.shape[0]
    grid_rows, grid_cols = grid
    cells = config.mask_patch_size // config.total_stride  # last-stage positions per patch side
    stage_masks = []
    if not sparse:
        visible = (~bool_masked_pos).view(batch, 1, grid_rows, grid_cols).float()
        for stage in range(config.num_stages):
            scale = cells << (config.num_stages - 1 - stage)
            stage_masks.append(_DenseStageMask(visible.repeat_interleave(scale, 2).repeat_interleave(scale, 3)))
        return stage_masks

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
    for stage in range(config.num_stages):
        levels = config.num_stages - 1 - stage
        side = cells << levels
        rows, cols = _patch_offsets(cells, levels, bool_masked_pos.device)
        index = (patch_rows * side + rows) * (grid_cols * side) + patch_cols * side + cols
        stage_masks.append(_SparseStageMask(index.reshape(batch, -1), grid_rows * side, grid_cols * side))
    return stage_masks


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

    def forward(self, pixel_values: torch.Tensor, stage_mask=None) -> torch.Tensor:
        embeddings = self.patch_embeddings(pixel_values)
        if stage_mask is not None:
            embeddings = stage_mask.from_dense(embeddings)
        return self.layernorm(embeddings)


class ConvNextV2Layer(GradientCheckpointingLayer):
    """ConvNeXt V2 block: 7x7 depthwise conv, LayerNorm, Linear C->4C, GELU, GRN, Linear 4C->C, residual.

    Without a mask the residual stream is (N, C, H, W). With an FCMAE stage mask it is whatever the mask
    keeps: full maps for the dense recipe, gathered (N, V, C) positions for the sparse one.
    """

    def __init__(self, config: ConvNextV2Config, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = ConvNextV2LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = ACT2FN[config.hidden_act]
        self.exact_gelu = config.hidden_act == "gelu"
        self.grn = ConvNextV2GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = ConvNextV2DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def activation(self, features: torch.Tensor) -> torch.Tensor:
        # in place where no autograd graph needs the input (inference): one full-size allocation less, which on
        # CPU means page faults saved on the widest activation. Not when a hook or wrapper may have kept
        # pwconv1's output: it would see the activation instead.
        if self.exact_gelu and not features.requires_grad and _bare(self.pwconv1):
            return torch.ops.aten.gelu_(features)
        return self.act(features)

    def recompute_in_backward(self, features: torch.Tensor) -> bool:
        """Whether GELU, GRN and pwconv2 run as one autograd function that keeps only pwconv1's output."""
        return _eager_autograd(features) and self.exact_gelu and _bare(self.pwconv2)

    def forward(self, hidden_states: torch.Tensor, stage_mask=None) -> torch.Tensor:
        if stage_mask is None:
            features = self.dwconv(hidden_states).permute(0, 2, 3, 1)
            visible = None
        else:
            features = stage_mask.depthwise_conv(self.dwconv, hidden_states)
            visible = stage_mask.grn_visible(features)
        features = self.pwconv1(self.layernorm(features))
        if self.recompute_in_backward(features):
            grn, linear = self.grn, self.pwconv2
            features = _GeluGrnLinear.apply(
                features, grn.weight, grn.bias, linear.weight, linear.bias, grn, linear, visible
            )
        else:
            features = self.grn.into_linear(self.activation(features), self.pwconv2, visible)
        features = self.drop_path(features)
        if hidden_states.ndim == 4:
            features = features.permute(0, 3, 1, 2)
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

    def forward(self, hidden_states: torch.Tensor, stage_mask=None) -> torch.Tensor:
        if len(self.downsampling_layer) > 0:
            norm, conv = self.downsampling_layer
            if stage_mask is not None and stage_mask.is_sparse:
                hidden_states = _downsample_gathered(norm, conv, hidden_states)
            else:
                hidden_states = conv(norm(hidden_states))
        for layer in self.layers:
            hidden_states = layer(hidden_states, stage_mask)
        return hidden_states


class ConvNextV2Encoder(nn.Module):
    def __init__(self, config: ConvNextV2Config):
        super().__init__()
        drop_path_rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").split(
            config.depths
        )
        self.stages = nn.ModuleList()
        previous_channels = config.hidden_sizes[0]
        for i in range(config.num_stages):
            self.stages.append(
                ConvNextV2Stage(
                    config,
                    in_channels=previous_channels,
                    out_channels=config.hidden_sizes[i],
                    stride=2 if i > 0 else 1,
                    depth=config.depths[i],
                    drop_path_rates=drop_path_rates[i].tolist(),
                )
            )
            previous_channels = config.hidden_sizes[i]

    def forward(
        self, hidden_states: torch.Tensor, stage_masks: list | None = None, output_hidden_states: bool = False
    ) -> BaseModelOutputWithNoAttention:
        """Run every stage. With ``stage_masks`` the returned hidden states are full maps, zero where masked;
        ``last_hidden_state`` stays in the last stage's own layout (gathered on the sparse path)."""
        stage_masks = stage_masks or [None] * len(self.stages)

        def as_map(stage: int, features: torch.Tensor) -> torch.Tensor:
            return features if stage_masks[stage] is None else stage_masks[stage].to_dense(features)

        all_hidden_states = (as_map(0, hidden_states),) if output_hidden_states else None
        for i, stage in enumerate(self.stages):
            hidden_states = stage(hidden_states, stage_masks[i])
            if output_hidden_states:
                all_hidden_states += (as_map(i, hidden_states),)
        return BaseModelOutputWithNoAttention(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


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
        super().__init__(config, *inputs, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Official init: truncated normal (std ``initializer_range``) for conv and linear weights, zero biases,
        unit LayerNorms, zero GRN, normal(0.02) mask token."""
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

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual; config.json also gets an ``auto_map`` for every class here, and the configuration and
        modeling files are copied beside the weights, so ``trust_remote_code=True`` works without this package."""
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)


class ConvNextV2Model(ConvNextV2PreTrainedModel):
    """The ConvNeXt V2 encoder with global average pooling and the final LayerNorm."""

    def __init__(self, config: ConvNextV2Config):
        super().__init__(config)
        self.embeddings = ConvNextV2Embeddings(self.config)
        self.encoder = ConvNextV2Encoder(self.config)
        self.layernorm = nn.LayerNorm(self.config.hidden_sizes[-1], eps=self.config.layer_norm_eps)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        """
        pixel_values: (N, num_channels, H, W), H and W multiples of 32.
        Returns ``last_hidden_state`` (N, C_last, H/32, W/32), ``pooler_output`` (N, C_last) and, when
        asked, ``hidden_states``: the stem output and each stage's output, (N, C_i, H_i, W_i).
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        check_pixel_values(pixel_values, self.config)
        output_hidden_states = _resolve(output_hidden_states, self.config.output_hidden_states)
        encoder_outputs = self.encoder(self.embeddings(pixel_values), output_hidden_states=output_hidden_states)
        last_hidden_state = encoder_outputs.last_hidden_state
        pooled_output = self.layernorm(last_hidden_state.mean(dim=(-2, -1)))
        output = BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled_output,
            hidden_states=encoder_outputs.hidden_states,
        )
        return output if _resolve(return_dict, self.config.return_dict) else output.to_tuple()


def _resolve(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def image_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: ConvNextV2Config) -> torch.Tensor:
    """Cross-entropy for class indices and for soft labels (N, num_labels) such as MixUp/CutMix targets;
    MSE for ``problem_type="regression"``; BCE for ``problem_type="multi_label_classification"``."""
    problem_type = config.problem_type
    if problem_type == "regression" or (problem_type is None and config.num_labels == 1):
        return F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.dtype).float())
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise ValueError(
                f"soft labels must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        return torch.sum(-labels * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float().view(-1, config.num_labels), labels.view(-1))


class ConvNextV2ForImageClassification(ConvNextV2PreTrainedModel):
    """ConvNeXt V2 with a linear classifier on the pooled features."""

    accepts_loss_kwargs = False

    def __init__(self, config: ConvNextV2Config):
        super().__init__(config)
        self.num_labels = self.config.num_labels
        self.convnextv2 = ConvNextV2Model(self.config)
        self.classifier = (
            nn.Linear(self.config.hidden_sizes[-1], self.num_labels) if self.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        """
        labels: (N,) class indices, (N, num_labels) soft labels (e.g. MixUp/CutMix), or regression targets.
        Returns ``logits`` (N, num_labels) and ``loss`` when labels are given.
        """
        outputs = self.convnextv2(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None if labels is None else image_classification_loss(logits, labels, self.config)
        output = ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if _resolve(return_dict, self.config.return_dict) else output.to_tuple()


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

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        """Returns ``feature_maps``: one (N, C_i, H_i, W_i) map per entry of ``out_features``."""
        check_pixel_values(pixel_values, self.config)
        encoder_outputs = self.encoder(self.embeddings(pixel_values), output_hidden_states=True)
        hidden_states = encoder_outputs.hidden_states
        feature_maps = tuple(
            self.hidden_states_norms[stage](hidden_state)
            for stage, hidden_state in zip(self.stage_names, hidden_states, strict=True)
            if stage in self.out_features
        )
        output_hidden_states = _resolve(output_hidden_states, self.config.output_hidden_states)
        output = BackboneOutput(
            feature_maps=feature_maps, hidden_states=hidden_states if output_hidden_states else None
        )
        return output if _resolve(return_dict, self.config.return_dict) else output.to_tuple()


@dataclass
class ConvNextV2MaskedImageModelingOutput(ModelOutput):
    """
    loss: MSE on removed patches (normalised per patch when ``norm_pix_loss``), a scalar.
    logits: predicted pixels (N, L, mask_patch_size² * num_channels), each patch flattened in
        (row, column, channel) order; ``unpatchify`` turns them back into images.
    mask: (N, L) float, 1 = removed, 0 = kept (patches in raster order).
    hidden_states: the encoder's stem and stage outputs, full maps with zeros at masked positions.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class ConvNextV2ForMaskedImageModeling(ConvNextV2PreTrainedModel):
    """FCMAE: the ConvNeXt V2 encoder sees only the visible patches; a light ConvNeXt V2 decoder fills in a
    learned mask token at removed patches and predicts their pixels.

    The encoder is a full ``ConvNextV2Model`` under ``convnextv2.`` so its weights load straight into the
    classifier for fine-tuning; its final LayerNorm is not used by FCMAE and is kept frozen so that
    distributed training finds no unused trainable parameter.
    """

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

    # --- the recipe, step by step -------------------------------------------------------------------------

    def patchify(self, pixel_values: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p² * C) with patches in raster order, pixels in (row, column, channel) order."""
        p = patch_size or self.config.mask_patch_size
        batch, channels, height, width = pixel_values.shape
        patches = pixel_values.reshape(batch, channels, height // p, p, width // p, p)
        return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)

    def unpatchify(
        self, patches: torch.Tensor, image_size: tuple[int, int] | None = None, patch_size: int | None = None
    ) -> torch.Tensor:
        """(N, L, p² * C) -> (N, C, H, W). ``image_size`` (H, W) is needed for non-square images."""
        p = patch_size or self.config.mask_patch_size
        channels = self.config.num_channels
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
        """``int(L * (1 - mask_ratio))``, the official keep count; at least one patch must stay visible."""
        return num_kept_patches(num_patches, self.config.mask_ratio)

    def random_masking(self, batch_size: int, num_patches: int, noise: torch.Tensor | None = None, device=None):
        """Bool mask (N, L), True = removed: per sample exactly ``num_kept_patches(L)`` patches are kept, those
        with the smallest ``noise`` (uniform random when not given)."""
        if noise is None:
            noise = torch.rand(batch_size, num_patches, device=device)
        elif tuple(noise.shape) != (batch_size, num_patches):
            raise ValueError(
                f"noise must have shape (batch, patches) = {(batch_size, num_patches)}, got {tuple(noise.shape)}"
            )
        return draw_mask(noise, self.config.mask_ratio)

    def forward_decoder(self, latent: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Encoder map (N, C_last, h, w) -> logits (N, L, mask_patch_size² * C)."""
        batch, _, height, width = latent.shape
        cells = self.config.mask_patch_size // self.config.total_stride
        removed = bool_masked_pos.view(batch, 1, height // cells, width // cells)
        removed = removed.repeat_interleave(cells, 2).repeat_interleave(cells, 3)
        hidden_states = self.decoder_embed(latent)
        hidden_states = torch.where(removed, self.mask_token.to(hidden_states.dtype), hidden_states)
        for layer in self.decoder:
            hidden_states = layer(hidden_states)
        prediction = self.decoder_pred(hidden_states)  # (N, stride² * C, h, w), one stride x stride tile each
        stride = self.config.total_stride
        tiles = prediction.permute(0, 2, 3, 1).reshape(
            batch, height * width, stride * stride * self.config.num_channels
        )
        if cells == 1:  # a tile is a patch (the official setting): already in patchify's order
            return tiles
        image = self.unpatchify(tiles, (height * stride, width * stride), patch_size=stride)
        return self.patchify(image)

    def forward_loss(self, pixel_values: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over removed patches of the per-patch MSE against the (normalised) target pixels."""
        target = self.patchify(pixel_values).float()
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = (logits.float() - target).pow(2).mean(dim=-1)
        mask = mask.to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ConvNextV2MaskedImageModelingOutput | tuple:
        """
        pixel_values: (N, C, H, W), H and W multiples of ``mask_patch_size``.
        bool_masked_pos: optional (N, L) bool, True = removed, L = (H / mask_patch_size) * (W / mask_patch_size).
            Without it a random mask is drawn (reproducible through ``noise``, (N, L), smallest kept).
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        config = self.config
        check_pixel_values(pixel_values, config, multiple=config.mask_patch_size)
        batch, _, height, width = pixel_values.shape
        grid = (height // config.mask_patch_size, width // config.mask_patch_size)
        num_patches = grid[0] * grid[1]
        num_kept = None  # known without looking at the mask only when we draw it
        if bool_masked_pos is None:
            bool_masked_pos = self.random_masking(batch, num_patches, noise, pixel_values.device)
            num_kept = self.num_kept_patches(num_patches)
        elif tuple(bool_masked_pos.shape) != (batch, num_patches):
            raise ValueError(
                f"bool_masked_pos must have shape (batch, patches) = {(batch, num_patches)} for {height}x{width} "
                f"images and mask_patch_size={config.mask_patch_size}, got {tuple(bool_masked_pos.shape)}"
            )
        bool_masked_pos = bool_masked_pos.bool()

        sparse = config.fcmae_impl == "sparse"
        stage_masks = build_stage_masks(bool_masked_pos, grid, config, sparse, num_kept)
        output_hidden_states = _resolve(output_hidden_states, config.output_hidden_states)
        embeddings = self.convnextv2.embeddings(pixel_values, stage_masks[0])
        encoder_outputs = self.convnextv2.encoder(embeddings, stage_masks, output_hidden_states=output_hidden_states)
        latent = stage_masks[-1].to_dense(encoder_outputs.last_hidden_state)

        logits = self.forward_decoder(latent, bool_masked_pos)
        mask = bool_masked_pos.to(logits.dtype)
        loss = self.forward_loss(pixel_values, logits, mask)
        output = ConvNextV2MaskedImageModelingOutput(
            loss=loss, logits=logits, mask=mask, hidden_states=encoder_outputs.hidden_states
        )
        return output if _resolve(return_dict, config.return_dict) else output.to_tuple()


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
]
