"""Verification of a converted model against timm's ConvNeXt V2 loaded through timm's own checkpoint filter from the
same original tensors (``verify_against_timm``), and the top-5 on a real photo (``top5_on_photo``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..image_processing_convnextv2 import processor_for_resolution
from ..modeling_convnextv2 import draw_mask
from .building import ConvertedCheckpoint
from .key_maps import FCMAE_ENCODER, FINETUNED, StateDict
from .reading import Architecture

VERIFICATION_TOLERANCE = 1e-4  # max abs difference, fp32


class VerificationError(ValueError):
    """The converted model does not reproduce the reference within the tolerance."""


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
