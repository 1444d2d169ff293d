"""The fast paths of ConvNeXt V2: the same numbers as the reference math in ``modeling_convnextv2.py``, faster or in
less memory. Nothing here changes what a model computes; tests pin each path to the reference.

One predicate, ``fast_path_allowed``, says whether a named path may run; ``config.fast_paths`` turns them all off
(``False``), picks the defaults measured for the device and the compute dtype (``True``, see ``DEVICE_DEFAULTS``)
or names exactly the ones to use. The paths, by name (``FAST_PATH_NAMES`` in the configuration):

- ``grn_fold``: at inference, GRN's per-sample scale and shift are folded into the next linear's weight and bias,
  so GRN's output, the widest activation of the network, is never written.
- ``inplace_gelu``: at inference, GELU overwrites its input (one full-size allocation less).
- ``square_sum_norm``: GRN's L2 norm over positions as a square-and-sum, in chunks at inference (CPU).
- ``fused_gelu_grn_linear``: in training, GELU, GRN and pwconv2 as one autograd function that keeps only
  pwconv1's output for the backward (GELU's and GRN's outputs are recomputed there).
- ``chunked_mlp``: at inference on large maps, a block's pwconv1 -> GELU -> GRN -> pwconv2 a few samples at a
  time, so the widest activation is never allocated whole (fresh pages are page-faulted in at 4 KB a time).
- ``onednn_linear``: at inference on CPU, pwconv1 with its bias and GELU as one oneDNN matmul (bias and GELU are
  post-ops of the product, so pwconv1's output is written once, already activated), and pwconv2 with its bias as
  another where GRN is not folded into it. torch's own linear first writes the bias over the whole output and then
  accumulates the product onto it, and GELU is another pass; in fp32 it runs on MKL, which is half as fast as oneDNN
  on the AMD CPUs measured here.
- ``dense_depthwise_conv``: in training on full maps (the classifier, the dense FCMAE recipe), the depthwise conv
  as an autograd function whose backward takes the weight and bias gradients in fp32 the fast way on CPU.
- ``sparse_depthwise_conv``: in sparse FCMAE training, the depthwise conv keeps the gathered visible input for its
  backward instead of the zero-filled full-resolution map.
- ``sparse_downsample_matmul``: in the sparse FCMAE encoder, the 2x2 stride-2 downsampling conv of gathered windows
  as one matmul with the flattened kernel, instead of the conv on each window as a 2x2 image.

The paths know the model only through the small interface declared below (``BlockInterface``, ``GRNInterface``,
``SparseMaskInterface``): attribute and method names, never the model's classes. A GRN layer may be fused only when
its exact class declares ``fast_path_fusable = True`` (a subclass does not inherit the permission).

This file travels to the Hub as remote code beside the modeling file: it imports only torch, transformers and its
sibling configuration file.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUActivation

from .compat_convnextv2 import (
    convolution_backward,
    cpu_has_native_bf16,
    functorch_transforms_active,
    has_forward_hooks,
    onednn_linear,
)
from .configuration_convnextv2 import FAST_PATH_NAMES

GRN_EPS = 1e-6


class GRNInterface(Protocol):
    """What the fast paths use of a GRN layer: GRN(x) = x * scale(norm(x)) + bias."""

    weight: torch.Tensor
    bias: torch.Tensor

    def norm(self, hidden_states: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """The per-sample channel norm over the (visible) positions, (N, C), accumulated in fp32 or wider."""

    def scale(self, norm: torch.Tensor) -> torch.Tensor:
        """The per-sample channel scale from ``norm``, (N, C)."""

    def __call__(
        self,
        hidden_states: torch.Tensor,
        visible: torch.Tensor | None = None,
        norm: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """GRN of ``hidden_states`` (channels last), with ``norm`` when already computed, written into ``out`` when
        given."""


class BlockInterface(Protocol):
    """What the fast paths use of a block: its setting and the layers of pwconv1 -> act -> GRN -> pwconv2."""

    fast_paths: bool | list[str]  # config.fast_paths
    hidden_act: str  # the activation's name ("gelu": exact GELU, which the fused paths implement)
    layernorm: nn.Module  # per position, over channels (channels last)
    pwconv1: nn.Linear
    act: nn.Module
    grn: GRNInterface
    pwconv2: nn.Linear


class SparseMaskInterface(Protocol):
    """What the fast paths use of a sparse FCMAE stage mask: (N, V, C) visible rows <-> (N, C, h, w) maps."""

    def gather(self, channels_last: torch.Tensor) -> torch.Tensor:
        """(N, h, w, C) -> the visible positions (N, V, C)."""

    def to_dense(self, features: torch.Tensor) -> torch.Tensor:
        """(N, V, C) -> (N, C, h, w) with zeros at masked positions."""


# Which paths ``fast_paths=True`` runs, per (device type, compute dtype); the compute dtype is autocast's where
# autocast is on for the device, else the activation's (``compute_dtype``). Each choice is the measured one:
# - cpu fp32: all of them but the GRN fold (see onednn_linear below) (BENCHMARKS.md, ablation on this project's
#   2-core EPYC: eager inference 1.6x with all, each path worth 9-13%; the fused training function saves 37% of a
#   training step's memory at no cost in speed).
# - cpu bf16: all of them, from the ablation in bf16 weights and under bf16 autocast on a quiet AVX512-BF16 EPYC
#   (native bf16, matmul peak 4.3x fp32; BENCHMARKS.md, "Fast paths per dtype"): the square-sum norm is worth
#   18-21% at inference, the fused training function 25% of an autocast step (and half its memory), the sparse
#   downsample matmul 7% of an FCMAE step; none is slower by more than the noise (1-2%). An earlier ablation on an
#   AVX2 EPYC that emulates bf16, on a busy machine, had dropped in-place GELU and the square-sum norm.
#   The dense depthwise conv (2026-12-03, same CPU, quiet, V2-T batch 8, interleaved with it off): a training step
#   1.08x under bf16 autocast, 1.14x with bf16 weights, 1.02x in fp32 (BENCHMARKS.md, "the depthwise conv's
#   backward"); with its weight gradient as a forward conv per sample (2026-12-04): 1.17-1.22x under bf16
#   autocast, 0.98-1.06x in fp32 (BENCHMARKS.md, "the depthwise conv's weight gradient as a forward conv").
#   The MLP in chunks of samples at inference is not on in bf16: in separate processes (the allocator's state is
#   the process's) it gained nothing measurable, 0.9-1.1x either way, because the page faults it removes move to
#   other allocations (BENCHMARKS.md, "fewer fresh pages at inference").
# - cpu fp32 and the MLP in chunks: 1.06-1.21x at batch 8, 224 px (three pairs of processes, faults 150-200 MB a
#   forward down to 0-70 MB).
# - onednn_linear (2026-12-03, the AVX512-BF16 EPYC, V2-T batch 8, 224 px, interleaved in one process): fp32
#   inference 1.50x (17.7 -> 26.3-27.0 img/s: torch's fp32 linear runs on MKL, oneDNN's is twice as fast on this
#   CPU); bf16 weights and autocast 1.02-1.03x. With it, folding GRN into pwconv2 costs fp32 8% (the fold's
#   batched matmul stays on MKL): fp32 drops grn_fold, bf16 keeps it (without it 0.94x).
# - cpu fp16: every path but the MLP in chunks, as before (its ablation has not been run to the end).
# - cuda and anything else: none until measured on that device and dtype. The GRN fold turns one GEMM into a
#   batched matmul with per-sample weights, which a GPU may run slower than a plain GEMM in bf16; the square-sum norm
#   only beats torch's reduction on CPU; in-place GELU saves allocations that a caching allocator makes cheap anyway.
#   `make gpu-check` runs the ablation on a GPU (every path on, then each one taken out) and prints the set its
#   numbers suggest; set the rows here from that table and record it in BENCHMARKS.md ("GPU check").
# A (device, dtype) not listed (fp64 anywhere, an unknown device) runs none: the reference math.
DEVICE_DEFAULTS: dict[tuple[str, torch.dtype], frozenset[str]] = {
    ("cpu", torch.float32): frozenset(FAST_PATH_NAMES) - {"grn_fold"},
    ("cpu", torch.bfloat16): frozenset(FAST_PATH_NAMES) - {"chunked_mlp"},
    ("cpu", torch.float16): frozenset(FAST_PATH_NAMES) - {"chunked_mlp"},
    ("cuda", torch.float32): frozenset(),
    ("cuda", torch.bfloat16): frozenset(),
    ("cuda", torch.float16): frozenset(),
}


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the layers compute in for ``tensor``: autocast's where autocast is on for its device type (the
    residual stream stays fp32 there, the matmuls and what follows them do not), else the tensor's own."""
    device_type = tensor.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): no autocast there
        pass
    return tensor.dtype


def native_bf16_cpu() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AMX-BF16 tiles or AVX512-BF16), where bf16 can pay.
    Elsewhere (this project's AVX2 EPYC, for one) torch emulates bf16, which is slower than fp32."""
    return cpu_has_native_bf16()


def default_fast_paths(tensor: torch.Tensor) -> frozenset[str]:
    """The paths ``fast_paths=True`` runs for ``tensor``: ``DEVICE_DEFAULTS`` for its device type and compute dtype."""
    return DEVICE_DEFAULTS.get((tensor.device.type, compute_dtype(tensor)), frozenset())


def fast_path_allowed(name: str, setting: bool | list[str], tensor: torch.Tensor, *layers: nn.Module) -> bool:
    """Whether the fast path ``name`` may run on ``tensor`` with ``layers``.

    ``setting`` is ``config.fast_paths``. A path never runs while tracing (``torch.jit.trace``), exporting
    (``torch.export``, ONNX), compiling (Inductor plans its own kernels), or under torch.func transforms (``grad``,
    ``vmap``: they need autograd functions written for them); nor on a layer that is not a bare ``nn.Linear`` /
    ``nn.Conv2d``: a subclass (a PEFT LoRA layer, a quantized or parametrized layer) or a layer with hooks must be
    called as a module, as a path that works on its weight would bypass it. Other layers (GRN, the activation) must
    have no hooks, as a fused path never calls them.
    """
    if name not in FAST_PATH_NAMES:
        raise ValueError(f"unknown fast path {name!r}; known: {FAST_PATH_NAMES}")
    if setting is False:
        return False
    # the choice per device and dtype: True runs the set measured for this tensor's device type and compute dtype
    # (none for one not listed); a list runs exactly the paths it names, anywhere (the tests and the ablation use that)
    enabled = default_fast_paths(tensor) if setting is True else setting
    if name not in enabled:
        return False
    if (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or functorch_transforms_active()
    ):
        return False
    return all(is_bare(layer) for layer in layers)


def is_bare(layer: nn.Module) -> bool:
    """A layer that nothing wraps or observes: exactly an ``nn.Linear``, ``nn.Conv2d``, GRN or transformers' GELU (not
    a subclass, not a PEFT/quantized/parametrized replacement), with no hooks."""
    kind = type(layer)
    if kind not in (nn.Linear, nn.Conv2d, GELUActivation) and kind.__dict__.get("fast_path_fusable") is not True:
        return False
    return not has_forward_hooks(layer) and not getattr(layer, "parametrizations", None)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half precision and fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# square_sum_norm
# ----------------------------------------------------------------------------------------------------------


def square_sum_norm(positions: torch.Tensor) -> torch.Tensor:
    """(N, P, C) -> (N, C): the L2 norm over positions, as ``torch.linalg.vector_norm(positions, dim=1)``.

    On CPU in eager mode torch's norm over a non-innermost axis is several times slower than squaring and summing.
    At inference it squares a few samples at a time so the temporary stays small (a fresh allocation above glibc's
    32 MB mmap threshold costs a page fault per 4 KB); under autograd in one piece, as the backward of chunks would
    copy the whole gradient to join them. Both reasons are CPU ones: whether this path runs is chosen per device
    (``DEVICE_DEFAULTS``), and the chunk size was measured on CPU only.

    The sum accumulates in fp32 (fp64 for fp64) whatever the input dtype. A bf16 input is squared in bf16 where no
    graph is kept: each square is rounded once (at most 2^-8 relative, half an ulp of bf16's 8-bit significand;
    bf16 has fp32's range, so it cannot overflow), which keeps the norm within 2^-9 of the exact one (the square root
    halves a relative error), below the rounding of GRN's own bf16 output (2^-8), and
    saves the pass that widens the whole activation to fp32 (BENCHMARKS.md, "bf16 inference and training, fewer
    fresh pages"). fp16 is widened first: its squares overflow above 256.
    """
    if positions.requires_grad:
        accumulate = accumulation_dtype(positions.dtype)
        return _sqrt_zero_gradient_at_zero(positions.to(accumulate).square().sum(dim=1))
    return position_sum(positions, positions, widen=positions.dtype != torch.bfloat16).sqrt()


def position_sum(first: torch.Tensor, second: torch.Tensor | None = None, widen: bool = False) -> torch.Tensor:
    """(N, P, C) -> (N, C): the sum over positions of ``first`` (times ``second``), accumulated in fp32 (fp64 for
    fp64), a few samples at a time, for tensors no graph is kept of. ``widen``: multiply in the accumulation dtype
    (fp16 products overflow above 65504), else in the inputs' dtype, rounded once.

    ``sum(dtype=fp32)`` of a half-precision tensor first writes a widened copy of all of it (and the product before
    that). In one piece, at 224 px, those are 20-40 MB fresh allocations, each page-faulted in, which cost a bf16
    training step more than its matrix products; in chunks, each chunk's copy is a fresh allocation still (0.7 ms of
    page faults for a 5 MB one, 4x the sum itself). So each chunk of about 1M elements is written, widened, into one
    scratch buffer that every chunk reuses, and summed from there: the numbers are the same sums.
    """
    accumulate = accumulation_dtype(first.dtype)
    batch = first.shape[0]
    if batch == 0 or first.numel() == 0:
        return first.new_zeros((batch, first.shape[-1]), dtype=accumulate)
    samples = max(1, min(batch, (1 << 20) // max(first[0].numel(), 1)))
    result = first.new_empty((batch, first.shape[-1]), dtype=accumulate)
    scratch = first.new_empty((samples, *first.shape[1:]), dtype=accumulate)
    # the product in the inputs' dtype, rounded once, has a scratch of its own (a mul with a wider out= would
    # allocate a temporary for it anyway)
    narrow = first.new_empty(scratch.shape) if second is not None and not widen and accumulate != first.dtype else None
    for start in range(0, batch, samples):
        a = first[start : start + samples]
        chunk = scratch[: a.shape[0]]
        if second is None:
            chunk.copy_(a)
        elif widen:  # the product in the accumulation dtype: in place on the widened copy of ``a``
            chunk.copy_(a).mul_(second[start : start + samples])
        elif narrow is None:  # already the accumulation dtype
            torch.mul(a, second[start : start + samples], out=chunk)
        else:
            chunk.copy_(torch.mul(a, second[start : start + samples], out=narrow[: a.shape[0]]))
        torch.sum(chunk, dim=1, out=result[start : start + samples])
    return result


def _sqrt_zero_gradient_at_zero(sum_of_squares: torch.Tensor) -> torch.Tensor:
    """sqrt whose gradient is 0 where its input is 0, as torch's norm defines it. Plain sqrt's gradient there is inf,
    and inf times the square's gradient at 0 is NaN: one channel that is zero at every position of a sample (a dead
    unit, or fp16 GELU outputs that flush to zero) would turn every gradient NaN. (N, C): cheap."""
    if not sum_of_squares.requires_grad:
        return sum_of_squares.sqrt()
    positive = sum_of_squares > 0
    return torch.where(positive, torch.where(positive, sum_of_squares, 1.0).sqrt(), 0.0)


# ----------------------------------------------------------------------------------------------------------
# GELU -> GRN -> pwconv2: in-place GELU, the GRN fold, the fused training function
# ----------------------------------------------------------------------------------------------------------


# the fast paths a block's LayerNorm -> pwconv2 may take (block_mlp): where none of them is on, the caller runs the
# reference
MLP_PATHS = ("grn_fold", "inplace_gelu", "square_sum_norm", "fused_gelu_grn_linear", "chunked_mlp", "onednn_linear")


def block_mlp(layer: BlockInterface, features: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor | None:
    """``layer.pwconv2(layer.grn(layer.act(layer.pwconv1(layer.layernorm(features))), visible))`` with each step by
    a fast path where one may run and by its layer where none may, or ``None`` where no path of the MLP is on for
    ``features`` at all (the caller then runs the reference)."""
    if not any(fast_path_allowed(name, layer.fast_paths, features) for name in MLP_PATHS):
        return None
    chunked = mlp_in_chunks(layer, features, visible)
    return _mlp(layer, features, visible) if chunked is None else chunked


def _mlp(layer: BlockInterface, features: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    normed = layer.layernorm(features)
    activated = linear_gelu(layer, normed)
    if activated is not None:
        return gelu_grn_linear(layer, activated, visible, activated=True)
    hidden = layer.pwconv1(normed)
    fast = gelu_grn_linear(layer, hidden, visible)
    return layer.pwconv2(layer.grn(layer.act(hidden), visible)) if fast is None else fast


def gelu_grn_linear(
    layer: BlockInterface, features: torch.Tensor, visible: torch.Tensor | None, activated: bool = False
) -> torch.Tensor | None:
    """``layer.pwconv2(layer.grn(layer.act(features), visible))`` by whichever fast paths may run here, or ``None``
    when none may (the caller then runs the reference). ``activated``: ``features`` already are ``layer.act``'s
    output (``linear_gelu`` ran); the result is then never ``None``."""
    setting = layer.fast_paths
    # each path is asked for by name, so each is chosen per device (DEVICE_DEFAULTS): on CPU all of them by default,
    # on CUDA none until the GPU ablation shows which ones pay there
    exact_gelu = layer.hidden_act == "gelu"
    grn, linear = layer.grn, layer.pwconv2
    fold = fast_path_allowed("grn_fold", setting, features, grn, linear) and folds(features, linear)
    square_sum = fast_path_allowed("square_sum_norm", setting, features, grn)
    if features.requires_grad and not activated:
        if exact_gelu and fast_path_allowed("fused_gelu_grn_linear", setting, features, layer.act, grn, linear):
            return GeluGrnLinear.apply(
                features, grn.weight, grn.bias, linear.weight, linear.bias, grn, linear, visible, fold, square_sum
            )
        inplace = False
    else:
        inplace = exact_gelu and fast_path_allowed("inplace_gelu", setting, features, layer.pwconv1, layer.act)
    onednn = not fold and onednn_allowed(layer, linear, features)  # pwconv2 by oneDNN where GRN is not folded
    if not (fold or square_sum or inplace or onednn or activated):
        return None
    # in place only where no autograd graph needs GELU's input, and pwconv1 has no hook that may have kept it
    if not activated:
        features = torch.ops.aten.gelu_(features) if inplace else layer.act(features)
    norm = grn_norm(layer.grn, features, visible, square_sum)
    if fold:
        return grn_into_linear(layer.grn, features, layer.pwconv2, visible, norm)
    grn_output = layer.grn(features, visible, norm=norm)
    fast = linear_by_onednn(linear, grn_output, gelu=False) if onednn else None
    return linear(grn_output) if fast is None else fast


def onednn_allowed(layer: BlockInterface, linear: nn.Linear, tensor: torch.Tensor, *others: nn.Module) -> bool:
    """Whether ``onednn_linear`` may run ``linear`` on ``tensor``: at inference (no graph to keep), on a bare linear
    (and bare ``others``)."""
    if tensor.requires_grad or (torch.is_grad_enabled() and any(p.requires_grad for p in linear.parameters())):
        return False
    return fast_path_allowed("onednn_linear", layer.fast_paths, tensor, linear, *others)


def linear_gelu(layer: BlockInterface, normed: torch.Tensor) -> torch.Tensor | None:
    """``layer.act(layer.pwconv1(normed))`` as one oneDNN matmul with the bias and GELU as post-ops (inference, CPU,
    exact GELU), or ``None`` where the path may not run."""
    if layer.hidden_act != "gelu" or not onednn_allowed(layer, layer.pwconv1, normed, layer.act):
        return None
    return linear_by_onednn(layer.pwconv1, normed, gelu=True)


def linear_by_onednn(linear: nn.Linear, inputs: torch.Tensor, gelu: bool) -> torch.Tensor | None:
    """``linear(inputs)`` (then GELU) by ``onednn_linear`` in the compute dtype (autocast's where it is on, as
    ``F.linear`` would cast), or ``None`` where oneDNN cannot run it."""
    dtype = compute_dtype(inputs)
    bias = None if linear.bias is None else linear.bias.to(dtype)
    return onednn_linear(inputs.to(dtype), linear.weight.to(dtype), bias, gelu)


# the hidden activation (pwconv1's output) of a batch above which inference runs the block's MLP in chunks of samples,
# and the size of a chunk, in elements (measured on CPU: BENCHMARKS.md, "fewer fresh pages at inference")
MLP_CHUNK_FROM = 1 << 23
MLP_CHUNK_ELEMENTS = 1 << 21


def mlp_in_chunks(layer: BlockInterface, features: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor | None:
    """``pwconv2(grn(act(pwconv1(layernorm(features))), visible))`` at inference, a few samples at a time (each
    through the paths of ``block_mlp``), or ``None`` where the path may not run. Every step is per sample (GRN's
    statistics are a sample's own; the rest is per position), so the numbers are the same.

    The hidden activation is the widest tensor of the network (at 224 px, batch 8, stage 1: 19 MB in bf16, 39 MB in
    fp32). Allocated whole, it is a fresh mapping each block, page-faulted in at 4 KB a time (150-200 MB of faults
    per fp32 forward); a chunk's is a few MB that the allocator hands back for the next chunk."""
    if features.requires_grad or visible is not None and visible.requires_grad:
        return None
    batch, linear = features.shape[0], layer.pwconv1
    hidden = features.numel() // max(features.shape[-1], 1) * linear.out_features  # pwconv1's output, in elements
    if batch < 2 or hidden < MLP_CHUNK_FROM:
        return None
    layers = (layer.layernorm, linear, layer.act, layer.grn, layer.pwconv2)
    if not fast_path_allowed("chunked_mlp", layer.fast_paths, features, *layers):
        return None
    return run_mlp_in_chunks(layer, features, visible, max(1, MLP_CHUNK_ELEMENTS // (hidden // batch)))


def run_mlp_in_chunks(
    layer: BlockInterface, features: torch.Tensor, visible: torch.Tensor | None, samples: int
) -> torch.Tensor:
    outputs = []
    for start in range(0, features.shape[0], samples):
        part = None if visible is None else visible[start : start + samples]
        outputs.append(_mlp(layer, features[start : start + samples], part))
    return torch.cat(outputs)


def grn_norm(
    grn: GRNInterface, hidden_states: torch.Tensor, visible: torch.Tensor | None, square_sum: bool
) -> torch.Tensor:
    """GRN's per-sample channel norm (N, C): ``grn.norm``, or the same numbers by the square-sum path."""
    if not square_sum:
        return grn.norm(hidden_states, visible)
    statistics_input = hidden_states if visible is None else hidden_states * visible
    return square_sum_norm(statistics_input.flatten(1, -2))  # (N, positions, C) -> (N, C)


def folds(hidden_states: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether folding GRN into ``linear`` saves work: where a sample has more positions than the linear has outputs
    (the early, wide stages). Later stages, whose per-sample weights would outweigh the activation, apply GRN.
    Whether to fold at all is chosen per device (``fast_path_allowed``, ``DEVICE_DEFAULTS``): this picks the stages."""
    batch, channels = hidden_states.shape[0], hidden_states.shape[-1]
    positions = hidden_states.numel() // max(batch * channels, 1)
    return positions > linear.out_features


def grn_into_linear(
    grn: GRNInterface, hidden_states: torch.Tensor, linear: nn.Linear, visible: torch.Tensor | None, norm: torch.Tensor
) -> torch.Tensor:
    """``linear(grn(hidden_states, visible))`` without writing GRN's output: GRN(x) = x * s_n + beta, so
    (x * s_n + beta) W^T + b = x (W * s_n)^T + (W beta + b), one batched matmul with a per-sample weight (N, out, in).
    """
    batch, channels = hidden_states.shape[0], hidden_states.shape[-1]
    positions = hidden_states.numel() // max(batch * channels, 1)
    scale = grn.scale(norm)
    weight = linear.weight.unsqueeze(0) * scale.unsqueeze(1)
    bias = torch.addmv(linear.bias, linear.weight, grn.bias.reshape(-1))
    dtype = hidden_states.dtype  # the scaled weight is fp32 (the scale is); autocast would cast it anyway
    output = torch.baddbmm(
        bias.to(dtype), hidden_states.reshape(batch, positions, channels), weight.transpose(1, 2).to(dtype)
    )
    return output.view(*hidden_states.shape[:-1], linear.out_features)


def _gelu_grn_linear(grn, activated, linear, visible, norm, fold: bool, inplace: bool = False) -> torch.Tensor:
    """``linear(grn(activated, visible))`` from GRN's norm; ``inplace``: GRN's output is written over ``activated``
    (only where nothing else reads it: no autograd graph, a tensor of the caller's own)."""
    if fold:
        return grn_into_linear(grn, activated, linear, visible, norm)
    return linear(grn(activated, visible, norm=norm, out=activated if inplace else None))


def autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """(device type, autocast on, its dtype) now: what a recomputation in the backward must replay."""
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def differentiable_backward(ctx, recompute, inputs: tuple, grad_output: torch.Tensor) -> tuple:
    """The gradients of ``recompute(*inputs)`` (the forward's own math, under the forward's autocast state) with a
    graph of their own, for ``autograd.grad(..., create_graph=True)`` (a gradient penalty, a Hessian-vector
    product). The fast backward of a training path is written out by hand and cannot be differentiated again; this
    runs instead whenever the engine asks for a differentiable backward (grad mode on inside ``backward``), so
    gradients of gradients match ``fast_paths=False``. ``inputs`` are the Function's first inputs, in order."""
    wanted = [i for i, tensor in enumerate(inputs) if ctx.needs_input_grad[i] and tensor is not None]
    device_type, enabled, dtype = ctx.autocast
    with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
        output = recompute(*inputs)
    grads = torch.autograd.grad(output, [inputs[i] for i in wanted], grad_output, create_graph=True, allow_unused=True)
    result: list[torch.Tensor | None] = [None] * len(inputs)
    for i, grad in zip(wanted, grads, strict=True):
        result[i] = grad
    return tuple(result)


def _linear_weight_grad(grad_flat: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A linear's weight gradient, ``grad^T @ inputs`` (inputs flattened to rows), in the weight's dtype."""
    rows = inputs.reshape(-1, inputs.shape[-1]).to(grad_flat.dtype)
    return (grad_flat.t() @ rows).to(weight.dtype)


class GeluGrnLinear(torch.autograd.Function):
    """``linear(grn(gelu(h), visible))`` for training that keeps only ``h`` (and GRN's (N, C) norms) for the
    backward. Autograd through the modules would keep GELU's output too, and GRN's where it is not folded: both are
    recomputed in the backward instead (elementwise, cheap), and GRN's backward is written out in a few passes.
    Same numbers as autograd through the modules (tested in fp64)."""

    @staticmethod
    def forward(ctx, h, gamma, beta, weight, bias, grn, linear, visible, fold: bool, square_sum: bool):
        ctx.grn, ctx.linear, ctx.fold, ctx.square_sum = grn, linear, fold, square_sum
        ctx.autocast = autocast_state(h.device.type)
        activated = F.gelu(h)
        norm = grn_norm(grn, activated, visible, square_sum)
        ctx.save_for_backward(h, norm, gamma, beta, weight, visible)
        # GELU's output is this function's own (no graph is recorded here): GRN's output may overwrite it
        return _gelu_grn_linear(grn, activated, linear, visible, norm, fold, inplace=True)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: the backward itself must be differentiable
            h, _, gamma, beta, weight, visible = ctx.saved_tensors

            def recompute(h, gamma, beta, weight, bias):
                # the forward's own math through autograd; gamma ... bias are the modules' own parameters
                activated = F.gelu(h)
                norm = grn_norm(ctx.grn, activated, visible, ctx.square_sum)
                return _gelu_grn_linear(ctx.grn, activated, ctx.linear, visible, norm, ctx.fold)

            inputs = (h, gamma, beta, weight, ctx.linear.bias)
            return differentiable_backward(ctx, recompute, inputs, grad_output) + (None,) * 5
        h, norm, gamma, beta, weight, visible = ctx.saved_tensors
        needs_h, needs_gamma, needs_beta, needs_weight, needs_bias = ctx.needs_input_grad[:5]
        no_grad_for_the_rest = (None,) * 5
        dtype, channels = h.dtype, h.shape[-1]
        accumulate = accumulation_dtype(dtype)
        per_channel = (h.shape[0],) + (1,) * (h.ndim - 2) + (channels,)  # (N, C) broadcast over positions
        activated = F.gelu(h)
        mean = norm.mean(dim=-1, keepdim=True) + GRN_EPS
        relative = norm / mean
        scale = gamma.reshape(-1) * relative + 1.0
        scale_as_input = scale.to(dtype).reshape(per_channel)
        grad_flat = grad_output.reshape(-1, grad_output.shape[-1])
        # the output gradient summed over every position, in fp32: the bias gradient, and through the weight GRN's
        # beta gradient below
        output_sum = grad_flat.sum(dim=0, dtype=accumulate) if (needs_bias or needs_beta) else None
        grad_bias = output_sum.to(weight.dtype) if needs_bias else None
        if not (needs_h or needs_gamma or needs_beta):
            grad_weight = None
            if needs_weight:
                grad_weight = _linear_weight_grad(grad_flat, ctx.grn(activated, visible, norm=norm), weight)
            return (None, None, None, grad_weight, grad_bias) + no_grad_for_the_rest
        # Two activation-sized tensors are allocated (GELU's recomputed output and the gradient of GRN's output);
        # every later step writes over one of them once it is no longer read. Each fresh allocation of that size
        # is page-faulted in at 4 KB a time, which cost a bf16 step more than the elementwise math itself.
        grad_grn_output = (grad_flat @ weight.to(grad_flat.dtype)).view(h.shape).to(dtype)
        grad_positions = grad_grn_output.flatten(1, -2)  # (N, positions, C)
        # beta's gradient is the sum over positions of GRN's output gradient, grad @ W: the summed grad times W (no
        # pass over the widest activation; nor the rounding of each position's gradient before the sum)
        grad_beta = (output_sum @ weight.to(accumulate)).reshape(beta.shape).to(beta.dtype) if needs_beta else None
        # d loss / d scale: (N, C)
        grad_scale = position_sum(grad_positions, activated.flatten(1, -2))
        grad_gamma = (grad_scale * relative).sum(dim=0).reshape(gamma.shape)
        # relative = norm / (mean over channels of norm + eps)
        grad_relative = grad_scale * gamma.reshape(-1)
        grad_norm = grad_relative / mean - (grad_relative * norm).sum(-1, keepdim=True) / (mean * mean * channels)
        # d norm / d x = x / norm at visible positions; 0 where the norm is 0 (as torch's norm defines it)
        grad_over_norm = torch.where(norm > 0, grad_norm / torch.where(norm > 0, norm, 1.0), 0.0)
        statistics_input = activated if visible is None else activated * visible
        # d loss / d GELU's output = grad * scale + statistics_input * grad_over_norm, over the gradient of GRN's
        # output (read for the last time above); the same roundings as the out-of-place ops
        grad_activated = grad_grn_output.mul_(scale_as_input).addcmul_(
            statistics_input, grad_over_norm.to(dtype).reshape(per_channel)
        )
        del statistics_input
        grad_weight = None
        if needs_weight:  # GRN's output over GELU's (read for the last time above)
            grn_output = ctx.grn(activated, visible, norm=norm, out=activated)
            grad_weight = _linear_weight_grad(grad_flat, grn_output, weight)
        grad_h = torch.ops.aten.gelu_backward.grad_input(grad_activated, h, grad_input=activated)
        grads = (grad_h, grad_gamma.to(gamma.dtype), grad_beta, grad_weight, grad_bias)
        return grads + no_grad_for_the_rest


# ----------------------------------------------------------------------------------------------------------
# dense_depthwise_conv (and the gradients both depthwise paths share)
# ----------------------------------------------------------------------------------------------------------


def is_depthwise(conv: nn.Conv2d) -> bool:
    """A depthwise conv whose output has its input's size (stride 1, no dilation, an odd kernel padded by half on
    each side: the block's 7x7 conv), what the depthwise paths' backwards are written for."""
    return (
        conv.groups == conv.in_channels == conv.out_channels
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and all(size == 2 * pad + 1 for size, pad in zip(conv.kernel_size, conv.padding, strict=True))
    )


def depthwise_conv_grads(
    grad: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d, needs: tuple[bool, bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(input, weight, bias) gradients of a depthwise conv (``is_depthwise``) whose ``inputs``, ``weight`` and
    ``grad`` (N, C, H, W) are in the compute dtype: the input gradient in that dtype, the weight gradient by
    ``depthwise_weight_grad`` and the bias gradient as a chunked sum over positions (``position_sum``), both
    accumulated in fp32 (fp64 for fp64). The conv backward's own bias gradient took 1-2 ms a block on CPU, where
    the sum takes a tenth of that."""
    needs_input, needs_weight, needs_bias = needs
    grad_input = grad_weight = grad_bias = None
    if needs_input:
        grad_input = convolution_backward(grad, inputs, weight, conv, [True, False])[0]
    if needs_weight:
        grad_weight = depthwise_weight_grad(grad, inputs, conv)
    if needs_bias:
        per_sample = position_sum(grad.permute(0, 2, 3, 1).reshape(grad.shape[0], -1, grad.shape[1]))
        grad_bias = per_sample.sum(dim=0)
    return grad_input, grad_weight, grad_bias


def depthwise_weight_grad(grad: torch.Tensor, inputs: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The weight gradient of the depthwise conv ``conv`` (``is_depthwise``) from its output gradient and input
    (N, C, H, W), computed in fp32 (fp64 for fp64) whatever their dtype.

    For each sample and channel, the gradient of the k x k kernel is the correlation of the zero-padded input with
    that sample's output gradient: itself a depthwise conv, with the gradient map as its kernel and an output of
    the kernel's size. oneDNN's forward depthwise conv runs that 3-13x faster than its own weight-gradient kernel
    on CPU (BENCHMARKS.md, "the depthwise conv's weight gradient as a forward conv"): one conv per sample (the
    sample's channels_last map is a view, no copy), summed over samples in the accumulation dtype; where a map is no
    larger than the kernel (the last stage at 224 px: 7x7 maps), all samples as one conv of N x C groups.
    Half-precision maps are widened first, so that each sample's sums are fp32 before they are added (a bf16 conv
    would round them to bf16)."""
    accumulate = accumulation_dtype(grad.dtype)
    grad, inputs = grad.to(accumulate), inputs.to(accumulate)
    batch, channels, height, width = grad.shape
    kernel_height, kernel_width = conv.kernel_size
    if batch == 0:
        return grad.new_zeros(conv.weight.shape)
    if height * width <= kernel_height * kernel_width:
        stacked = inputs.contiguous().view(1, batch * channels, height, width)
        kernels = grad.contiguous().view(batch * channels, 1, height, width)
        per_sample = F.conv2d(stacked, kernels, padding=conv.padding, groups=batch * channels)
        return per_sample.view(batch, *conv.weight.shape).sum(dim=0)
    total = None
    for sample in range(batch):
        kernels = grad[sample].unsqueeze(1).contiguous()  # (C, 1, H, W): this sample's gradient, a kernel a channel
        partial = F.conv2d(inputs[sample : sample + 1], kernels, padding=conv.padding, groups=channels)
        total = partial if total is None else total.add_(partial)
    return total.view(conv.weight.shape)


def _dense_depthwise_conv(hidden_states, weight, bias, conv: nn.Conv2d) -> torch.Tensor:
    return F.conv2d(hidden_states, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class DenseDepthwiseConv(torch.autograd.Function):
    """``conv(x)`` for training (the block's depthwise conv) with the backward of ``depthwise_conv_grads``. Its
    inputs are already in the compute dtype (``dense_depthwise_conv`` casts them, as autocast would, with autograd
    recording the casts); it keeps what autograd through the conv keeps: the input and the weight."""

    @staticmethod
    def forward(ctx, hidden_states, weight, bias, conv: nn.Conv2d):
        ctx.conv = conv
        ctx.autocast = autocast_state(hidden_states.device.type)
        ctx.save_for_backward(hidden_states, weight, bias)
        return _dense_depthwise_conv(hidden_states, weight, bias, conv)

    @staticmethod
    def backward(ctx, grad):
        conv = ctx.conv
        if torch.is_grad_enabled():  # create_graph=True: the backward itself must be differentiable

            def recompute(hidden_states, weight, bias):
                return _dense_depthwise_conv(hidden_states, weight, bias, conv)

            return differentiable_backward(ctx, recompute, ctx.saved_tensors, grad) + (None,)
        hidden_states, weight, bias = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:2]) + (bias is not None and ctx.needs_input_grad[2],)
        grad_input, grad_weight, grad_bias = depthwise_conv_grads(
            grad.to(hidden_states.dtype), hidden_states, weight, conv, needs
        )
        # autograd rounds the fp32 sums to the inputs' dtype (bf16 under autocast, as the conv's own backward does)
        return grad_input, grad_weight, grad_bias, None


def dense_depthwise_conv(conv: nn.Conv2d, hidden_states: torch.Tensor, setting) -> torch.Tensor | None:
    """The block's depthwise conv on a full map by ``DenseDepthwiseConv`` where it may run (training), else ``None``
    (the caller runs the module)."""
    if not (torch.is_grad_enabled() and (hidden_states.requires_grad or conv.weight.requires_grad)):
        return None
    if hidden_states.numel() == 0:  # an empty batch: the module's own (empty) result
        return None
    if not (is_depthwise(conv) and fast_path_allowed("dense_depthwise_conv", setting, hidden_states, conv)):
        return None
    dtype = compute_dtype(hidden_states)  # autocast's cast of the conv's inputs, made here so autograd records it
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return DenseDepthwiseConv.apply(hidden_states.to(dtype), conv.weight.to(dtype), bias, conv)


# ----------------------------------------------------------------------------------------------------------
# sparse_depthwise_conv
# ----------------------------------------------------------------------------------------------------------


def _sparse_depthwise_conv(hidden_states, weight, bias, mask, conv: nn.Conv2d) -> torch.Tensor:
    output = F.conv2d(mask.to_dense(hidden_states), weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    visible = mask.gather(output.permute(0, 2, 3, 1))
    return visible if bias is None else visible + bias.to(visible.dtype)


class SparseDepthwiseConv(torch.autograd.Function):
    """``mask.gather(conv(mask.to_dense(x)))`` for training, keeping the gathered input (N, V, C) for the backward
    instead of the zero-filled full-resolution map that autograd through conv would keep, and taking the bias
    gradient from the visible outputs (the conv backward computes it from the full map, slowly on CPU). The bias is
    added after the gather: the same numbers. ``mask`` is the stage's sparse FCMAE mask (``gather``/``to_dense``)."""

    @staticmethod
    def forward(ctx, hidden_states, weight, bias, mask, conv: nn.Conv2d):
        ctx.mask, ctx.conv = mask, conv
        ctx.autocast = autocast_state(hidden_states.device.type)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(hidden_states, weight, bias)
        visible = _sparse_depthwise_conv(hidden_states, weight, bias, mask, conv)
        ctx.compute_dtype = visible.dtype  # autocast's choice, replayed in the backward
        return visible

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the backward itself must be differentiable

            def recompute(hidden_states, weight, bias):
                return _sparse_depthwise_conv(hidden_states, weight, bias, ctx.mask, ctx.conv)

            return differentiable_backward(ctx, recompute, ctx.saved_tensors, grad) + (None, None)
        hidden_states, weight, _ = ctx.saved_tensors
        mask, conv, dtype = ctx.mask, ctx.conv, ctx.compute_dtype
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = None
        dense_grad = mask.to_dense(grad.to(dtype)) if needs_input or needs_weight else None
        if needs_input:  # the transposed conv: the conv backward's input gradient, without the input map
            grad_input = F.conv_transpose2d(dense_grad, weight.to(dtype), padding=conv.padding, groups=conv.groups)
            grad_input = mask.gather(grad_input.permute(0, 2, 3, 1)).to(hidden_states.dtype)
        if needs_weight:  # from the input the forward convolved (in the compute dtype), widened to fp32 there
            dense_input = mask.to_dense(hidden_states.to(dtype))
            grad_weight = depthwise_weight_grad(dense_grad, dense_input, conv).to(weight.dtype)
        grad_bias = None
        if needs_bias:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(dim=0, dtype=accumulation_dtype(grad.dtype))
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None


def sparse_depthwise_conv(
    mask: SparseMaskInterface, conv: nn.Conv2d, hidden_states: torch.Tensor, setting
) -> torch.Tensor | None:
    """The sparse stage's depthwise conv by ``SparseDepthwiseConv`` where it may run (training), else ``None``."""
    if (
        hidden_states.requires_grad
        and hidden_states.numel() > 0
        and is_depthwise(conv)
        and fast_path_allowed("sparse_depthwise_conv", setting, hidden_states, conv)
    ):
        return SparseDepthwiseConv.apply(hidden_states, conv.weight, conv.bias, mask, conv)
    return None


def sparse_downsample_matmul(windows: torch.Tensor, conv: nn.Conv2d, setting) -> torch.Tensor | None:
    """The sparse stage's 2x2 stride-2 downsampling conv on gathered windows (N, W, 4C), each window's positions in
    (row, column) order with its channels last, as one matmul with the flattened kernel; ``None`` where the path may
    not run (the caller then runs the conv on each window as a 2x2 image, the same numbers)."""
    if not fast_path_allowed("sparse_downsample_matmul", setting, windows, conv):
        return None
    return downsample_as_matmul(windows, conv)


def downsample_as_matmul(windows: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (out, row, col, in) flattened
    return F.linear(windows, weight, conv.bias)


__all__ = [
    "BlockInterface",
    "block_mlp",
    "dense_depthwise_conv",
    "DEVICE_DEFAULTS",
    "GRNInterface",
    "SparseMaskInterface",
    "compute_dtype",
    "default_fast_paths",
    "fast_path_allowed",
    "gelu_grn_linear",
    "native_bf16_cpu",
    "sparse_depthwise_conv",
    "sparse_downsample_matmul",
    "square_sum_norm",
]
