"""The data of the conversion: the three official layouts and the name rules between them.

- ``FINETUNED``, ``FCMAE_ENCODER``, ``FCMAE_PRETRAINING``: the layouts of the released files and the model class each
  becomes.
- ``SPARSE_TO_DENSE_RULES``: how the MinkowskiEngine names and shapes of the official *pretraining* code
  (``encoder.…`` sparse blocks, ``proj``, ``mask_token``, ``decoder.0``, ``pred``) become the official dense
  layout, with one reshape rule per kind of tensor (``sparse_kernel_to_dense`` is the documented kernel remapping).
- ``KEY_TABLE``: official dense names -> our (= transformers') names, as regular expressions.
- ``OTHER_ARCHITECTURES``: signatures of files that are not official ConvNeXt V2 checkpoints.

``apply_key_rules`` is the engine that applies a rule list to a state dict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..modeling_convnextv2 import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling, ConvNextV2Model

StateDict = dict[str, torch.Tensor]


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


def _describe(names: list[str], origin: dict[str, str] | None = None, limit: int = 8) -> str:
    shown = [f"{name} (from {origin[name]!r})" if origin and name in origin else name for name in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more
