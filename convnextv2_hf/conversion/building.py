"""The model from an original state dict: ``convert_state_dict`` renames (and, for pretraining files, remaps) the
tensors, builds the config from their shapes, and loads the model with every tensor accounted for.

The model is first built on the meta device, so a small hostile file cannot make the conversion allocate gigabytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from ..checkpoints import OfficialCheckpoint, imagenet1k_id2label
from ..configuration_convnextv2 import ConvNextV2Config
from ..modeling_convnextv2 import ConvNextV2Model
from .key_maps import (
    FCMAE_ENCODER,
    FCMAE_PRETRAINING,
    FINAL_NORM_IDENTITY,
    FINETUNED,
    KEY_TABLE,
    SPARSE_TO_DENSE_RULES,
    Layout,
    StateDict,
    _describe,
    apply_key_rules,
)
from .reading import Architecture, OriginalCheckpoint, check_state_dict, detect_layout, infer_architecture

DEFAULT_RESOLUTION = 224


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
