# Copyright 2026 The convnextv2-hf authors. Licensed under the MIT License.
"""ConvNeXt V2 configuration with the FCMAE (masked image modeling) fields.

This file travels to the Hub as remote code: it imports only ``transformers``, ``huggingface_hub`` and the standard
library.

Every value is checked wherever it can enter: at construction, in ``from_dict``/``from_pretrained`` keyword
overrides (merged into the construction, so related fields are checked together), and on attribute assignment. A bad
value is a ``ValueError`` that names the field and the value.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import ConvNextV2Config as _BuiltinConvNextV2Config

# depths and widths of the eight official sizes (paper, Table 1 / official README)
PRESETS: dict[str, dict[str, list[int]]] = {
    "atto": {"depths": [2, 2, 6, 2], "hidden_sizes": [40, 80, 160, 320]},
    "femto": {"depths": [2, 2, 6, 2], "hidden_sizes": [48, 96, 192, 384]},
    "pico": {"depths": [2, 2, 6, 2], "hidden_sizes": [64, 128, 256, 512]},
    "nano": {"depths": [2, 2, 8, 2], "hidden_sizes": [80, 160, 320, 640]},
    "tiny": {"depths": [3, 3, 9, 3], "hidden_sizes": [96, 192, 384, 768]},
    "base": {"depths": [3, 3, 27, 3], "hidden_sizes": [128, 256, 512, 1024]},
    "large": {"depths": [3, 3, 27, 3], "hidden_sizes": [192, 384, 768, 1536]},
    "huge": {"depths": [3, 3, 27, 3], "hidden_sizes": [352, 704, 1408, 2816]},
}

FCMAE_IMPLEMENTATIONS = ("sparse", "dense")

# Bounds on the model a config builds, checked before anything is allocated (``check_model_size`` in the modeling
# file): a hand-edited config.json (depths [2, 2, 20000, 2]) is refused at once instead of allocating until the
# machine runs out of memory. ``allow_large_model=True`` lifts them. 10 billion parameters is about 15x
# ConvNeXt V2-Huge (658 million in the classifier), 40 GB in float32; 1,000 blocks is 28x the deepest official
# model (36), and every block costs about 30 KB of Python objects whatever its width.
MAX_PARAMETERS = 10_000_000_000
MAX_BLOCKS = 1_000

# The fast paths of ``fast_paths_convnextv2.py``, by name. Each computes the same numbers as the reference math in
# ``modeling_convnextv2.py`` (tests pin each one to it).
FAST_PATH_NAMES = (
    "grn_fold",  # GRN's scale and shift folded into the next linear's weight and bias (inference)
    "inplace_gelu",  # GELU written over its input when no autograd graph needs it (inference)
    "square_sum_norm",  # GRN's L2 norm as a chunked square-and-sum on CPU (eager)
    "fused_gelu_grn_linear",  # GELU, GRN and pwconv2 as one autograd function keeping only pwconv1's output
    "sparse_depthwise_conv",  # sparse FCMAE depthwise conv keeping the gathered input for its backward
    "sparse_downsample_matmul",  # sparse FCMAE 2x2 stride-2 downsampling as one matmul on gathered windows
    "dense_depthwise_conv",  # the block's depthwise conv in training, its weight and bias gradients taken in fp32
    "chunked_mlp",  # at inference, a block's pwconv1 -> GELU -> GRN -> pwconv2 a few samples at a time (large maps)
    "onednn_linear",  # at inference on CPU, pwconv1 + bias + GELU as one oneDNN matmul, pwconv2 + bias as another
)

_BUILT = "_convnextv2_built"  # in a config's __dict__ once __post_init__ has checked the whole structure

# Keyword arguments that transformers' PreTrainedConfig (and its backbone mixin) accepts beside the dataclass fields.
PRETRAINED_CONFIG_KWARGS = (
    "num_labels",
    "out_features",
    "out_indices",
    "output_attentions",
    "attn_implementation",
    "name_or_path",
)


# ---- one rule per field: each returns what is wrong with the value, or None --------------------------------------


def _is_int(value: Any) -> bool:
    # numbers.Integral: NumPy's integer scalars too (sizes read off an array); True is an int to Python, not a size
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """NumPy scalars (alone or in a list or tuple) as Python ints and floats, which JSON and transformers take."""
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _positive_int(value: Any) -> str | None:
    return None if _is_int(value) and value > 0 else "must be a positive int"


def _non_negative_int(value: Any) -> str | None:
    return None if _is_int(value) and value >= 0 else "must be an int >= 0"


def _square_size(value: Any) -> str | None:
    """An int, or the (height, width) pair transformers also accepts, as long as both sides are equal."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    return None if _is_int(value) and value > 0 else "must be a positive int (or a pair of two equal ones)"


def _image_size(value: Any) -> str | None:
    sides = list(value) if isinstance(value, (list, tuple)) and len(value) == 2 else [value]
    return None if all(_is_int(side) and side > 0 for side in sides) else "must be a positive int or (height, width)"


def _stage_sizes(value: Any) -> str | None:
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) and v > 0 for v in value)
    return None if ok else "must be a non-empty list of positive ints, one per stage"


def _mask_ratio(value: Any) -> str | None:
    # 0 removes no patch: FCMAE then has nothing to predict and its loss is 0/0. NaN fails the comparison too.
    ok = _is_number(value) and 0 < value < 1
    return None if ok else "must be a number with 0 < mask_ratio < 1 (the fraction of patches removed)"


def _drop_path_rate(value: Any) -> str | None:
    return None if _is_number(value) and 0 <= value < 1 else "must be a number in [0, 1)"


def _positive_finite(value: Any) -> str | None:
    return None if _is_number(value) and 0 < value < math.inf else "must be a finite number > 0"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def _hidden_act(value: Any) -> str | None:
    from transformers.activations import ACT2FN  # imported here: it imports torch, reading a config does not need it

    if isinstance(value, str) and value in ACT2FN:
        return None
    return f"must be the name of an activation in transformers.activations.ACT2FN, one of {sorted(ACT2FN)}"


def _fcmae_impl(value: Any) -> str | None:
    ok = isinstance(value, str) and value in FCMAE_IMPLEMENTATIONS
    return None if ok else f"must be one of {FCMAE_IMPLEMENTATIONS}"


def _num_labels(value: Any) -> str | None:
    # transformers would turn a negative count into no label at all (a model without a head), silently
    return None if _is_int(value) and value >= 0 else "must be an int >= 0 (0: no classification head)"


PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


def _problem_type(value: Any) -> str | None:
    # transformers keeps any string, and the loss would then silently be single-label cross-entropy
    return None if value in PROBLEM_TYPES else f"must be one of {PROBLEM_TYPES}"


def _dtype(value: Any) -> str | None:
    # transformers turns a string into ``getattr(torch, value)``: an AttributeError from inside torch for a typo
    try:
        import torch
    except ImportError:  # a config can be read without torch; transformers then keeps the string
        return None if value is None or isinstance(value, str) else "must be None or a dtype name"
    if value is None or isinstance(value, torch.dtype) or value == "auto":  # from_dict sets pipeline()'s "auto"
        return None
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return None
    return "must be None, 'auto', a torch.dtype or the name of one ('float32', 'bfloat16', 'float16', ...)"


def _fast_paths(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        unknown = [name for name in value if name not in FAST_PATH_NAMES]
        if not unknown:
            return None
        return f"must be True, False or a list of names from {FAST_PATH_NAMES} (unknown: {unknown})"
    return f"must be True, False or a list of names from {FAST_PATH_NAMES}"


def _is_label_id(key: Any) -> bool:
    # JSON keys are strings: transformers turns id2label's "0" into 0 after reading a file
    return _is_int(key) or (isinstance(key, str) and key.isdecimal())


def _id2label(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"must be a dict from class index to label name, got a {type(value).__name__}"
    for key, label in value.items():
        if not _is_label_id(key):
            return f"keys must be class indices (ints, or decimal strings in a file), not {key!r}"
        if not isinstance(label, str):
            return f"values must be label names (str), but {key!r} maps to {label!r}"
    return None


def _label2id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"must be a dict from label name to class index, got a {type(value).__name__}"
    for label, index in value.items():
        if not isinstance(label, str):
            return f"keys must be label names (str), not {label!r}"
        if not _is_int(index):
            return f"values must be class indices (ints), but {label!r} maps to {index!r}"
    return None


def labels_problem(id2label: dict | None, label2id: dict | None) -> str | None:
    """What is wrong between ``id2label`` (int keys, as transformers stores them) and ``label2id``, or None.

    id2label must name the classes 0 .. num_labels - 1, and every entry of label2id must point at a class of that
    name. Names may repeat in id2label (ImageNet-1k has two "crane" classes): label2id then keeps one of them."""
    if id2label is None:
        return None
    by_id = {int(key): label for key, label in id2label.items()}
    if len(by_id) != len(id2label):
        return f"id2label names a class twice (as an int and as a string key): {sorted(id2label, key=str)[:10]}"
    id2label = by_id
    ids = sorted(id2label)
    if ids != list(range(len(ids))):
        shown = ids if len(ids) <= 10 else ids[:5] + ["..."] + ids[-2:]
        return f"id2label must name the classes 0 .. {len(ids) - 1} (one per logit), got the keys {shown}"
    if label2id is None:
        return None
    for label, index in label2id.items():
        if id2label.get(index) != label:
            return (
                f"label2id and id2label disagree: label2id[{label!r}] = {index!r} but id2label[{index!r}] = "
                f"{id2label.get(index)!r}; give label2id = {{name: index for index, name in id2label.items()}}"
            )
    missing = sorted({label for label in id2label.values() if label not in label2id})
    if missing:
        return f"label2id lacks the labels {missing[:5]} of id2label; give both maps for the same classes"
    return None


def _default_label2id(label2id: dict | None) -> bool:
    """transformers' placeholder map {"LABEL_0": 0, ...}, which many saved configs keep beside real id2label names."""
    return label2id is not None and all(label == f"LABEL_{index}" for label, index in label2id.items())


FIELD_RULES: dict[str, Callable[[Any], str | None]] = {
    "num_channels": _positive_int,
    "patch_size": _square_size,
    "num_stages": _positive_int,
    "depths": _stage_sizes,
    "hidden_sizes": _stage_sizes,
    "hidden_act": _hidden_act,
    "initializer_range": _positive_finite,
    "layer_norm_eps": _positive_finite,
    "drop_path_rate": _drop_path_rate,
    "image_size": _image_size,
    "mask_ratio": _mask_ratio,
    "mask_patch_size": _positive_int,
    "decoder_hidden_size": _positive_int,
    "decoder_depth": _non_negative_int,
    "norm_pix_loss": _bool,
    "fcmae_impl": _fcmae_impl,
    "fast_paths": _fast_paths,
    "num_labels": _num_labels,
    "problem_type": _problem_type,
    "dtype": _dtype,
    "id2label": _id2label,
    "label2id": _label2id,
    "allow_large_model": _bool,
}

# transformers types these as plain ``float``, and its strict type check refuses an int such as 1
_FLOAT_FIELDS = ("initializer_range", "layer_norm_eps")

# fields tied to each other (stage count, total stride); the rules over them need the whole config
STRUCTURE_FIELDS = frozenset({"depths", "hidden_sizes", "num_stages", "patch_size", "mask_patch_size"})


def check_field(name: str, value: Any) -> Any:
    """``value`` as it will be stored (ints become floats for float fields); ``ValueError`` naming field and value."""
    rule = FIELD_RULES.get(name)
    if rule is None:
        return value
    problem = rule(value)
    if problem is not None:
        shown = repr(value)
        shown = shown if len(shown) <= 300 else shown[:300] + " ..."  # an id2label of 1,000 classes, say
        raise ValueError(f"{name} {problem}, got {name}={shown}")
    if name in _FLOAT_FIELDS:
        return float(value)
    return _plain(value)


def _total_stride(patch_size: int | list[int] | tuple[int, int], num_stages: int) -> int:
    patch = patch_size if isinstance(patch_size, int) else patch_size[0]
    return patch * 2 ** (num_stages - 1)


def structure_problem(get: Callable[[str], Any]) -> str | None:
    """What is wrong between the fields of ``STRUCTURE_FIELDS`` (each read with ``get``), or None."""
    depths, widths, num_stages = list(get("depths")), list(get("hidden_sizes")), get("num_stages")
    if len(depths) != len(widths):
        return (
            f"depths and hidden_sizes must have the same length, got depths={depths} ({len(depths)} stages) "
            f"and hidden_sizes={widths} ({len(widths)} stages)"
        )
    if num_stages != len(depths):
        return (
            f"num_stages={num_stages} does not match the {len(depths)} stages given by depths={depths}; "
            f"pass num_stages={len(depths)}"
        )
    stride = _total_stride(get("patch_size"), num_stages)
    mask_patch_size = get("mask_patch_size")
    if mask_patch_size % stride != 0:
        return (
            f"mask_patch_size must be a positive multiple of the total stride {stride} (patch_size * 2 ** "
            f"(num_stages - 1): one masked patch covers whole positions of the last stage), "
            f"got mask_patch_size={mask_patch_size}"
        )
    return None


class LocalPathNotFoundError(ValueError, FileNotFoundError):
    """A local path that does not exist: a ``ValueError`` naming it, and the ``OSError`` (``FileNotFoundError``) that
    transformers raises for a missing checkpoint, so code that catches either keeps working."""


def check_local_path(path) -> None:
    """``LocalPathNotFoundError`` when ``path`` can only be a local path (absolute, ``./``, ``~`` or more than one
    ``/``) and does not exist; transformers would take it for a Hub repository id and fail with an unrelated message.
    ``None`` (a model built from ``config=`` and ``state_dict=``) and other non-paths are left to transformers."""
    if not isinstance(path, (str, os.PathLike)):
        return
    text = os.fspath(path)
    windows_path = os.sep != "/" and os.sep in text
    looks_local = os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or windows_path
    if looks_local and "://" not in text and not os.path.exists(os.path.expanduser(text)):
        raise LocalPathNotFoundError(f"{text!r} does not exist (a local path; a Hub repository id is 'namespace/name')")


class ConvNextV2Config(_BuiltinConvNextV2Config):
    r"""Configuration of every ConvNeXt V2 model in this package.

    A drop-in subclass of transformers' ``ConvNextV2Config``: same class name and ``model_type`` (the Auto
    classes match configs by class name), so checkpoints saved by either load with either. The defaults build
    ConvNeXt V2-Tiny, as in [facebook/convnextv2-tiny-1k-224](https://huggingface.co/facebook/convnextv2-tiny-1k-224)
    (transformers reads its docstring examples' checkpoint from this line). It adds:

    layer_norm_eps (`float`, defaults to 1e-6):
        Epsilon of the final LayerNorm, > 0. The official models use 1e-6; transformers' default is 1e-12.
        Configs loaded from a file keep whatever value the file holds.
    mask_ratio (`float`, defaults to 0.6):
        Fraction of ``mask_patch_size`` patches removed per image during FCMAE pretraining, 0 < mask_ratio < 1.
    mask_patch_size (`int`, defaults to 32):
        Side of a masked patch in pixels; a positive multiple of the total stride (32 for the official layout).
    decoder_hidden_size (`int`, defaults to 512):
        Width of the FCMAE decoder.
    decoder_depth (`int`, defaults to 1):
        Number of ConvNeXt V2 blocks in the FCMAE decoder.
    norm_pix_loss (`bool`, defaults to True):
        Normalise each target patch by its own mean and standard deviation before the MSE.
    fcmae_impl (`str`, defaults to "sparse"):
        How the masked encoder runs. ``"sparse"``: the pointwise part of every block runs only on the
        visible positions, gathered per sample (fast, the default). ``"dense"``: the paper's masked dense
        recipe, kept as the numerical reference. Both give the same result.
    fast_paths (`bool` or `list[str]`, defaults to True):
        Which of the speed-ups in ``fast_paths_convnextv2.py`` may run. ``True``: those chosen for the input's
        device (see ``DEVICE_DEFAULTS`` there); ``False``: none, the reference math everywhere; a list of names
        from ``FAST_PATH_NAMES``: exactly those, on any device. Whatever the setting, no fast path runs while
        tracing, exporting, compiling, under torch.func transforms, or on a wrapped or hooked layer. The numbers
        are the same either way.
    allow_large_model (`bool`, defaults to False):
        Build models beyond ``MAX_PARAMETERS`` (10 billion) parameters or ``MAX_BLOCKS`` (1,000) blocks, the
        bounds that make a hand-edited config fail at once instead of allocating until memory runs out (see
        ``estimated_parameters`` in the modeling file). Pass it where the config is made, or to
        ``from_pretrained(..., allow_large_model=True)``. It is never saved, and a config file cannot set it:
        ``config.json`` is read without it.

    ``id2label`` and ``label2id`` are checked too: ids are the classes 0 .. num_labels - 1, names are strings, and
    every entry of label2id points at a class of that name, and ``num_labels`` given beside them must count the same
    classes (transformers' placeholder label2id ``{"LABEL_0": 0, ...}`` beside real names is rebuilt from id2label;
    a label2id given alone names the classes; ``from_pretrained(..., num_labels=n)`` for a new head drops the saved
    names of another count, as transformers does).

    Every value is checked (``FIELD_RULES``, ``structure_problem``) at construction, in ``from_dict`` and
    ``from_pretrained`` overrides, and on assignment: ``config.mask_ratio = 1.5`` raises ``ValueError``. Fields
    tied to each other (``patch_size`` and ``mask_patch_size``, say) change together with ``config.update({...})``.
    Unknown keys, as in configs saved by other tools, are kept as plain attributes.
    """

    # Not ``@strict`` itself: its assignment hook would run transformers' type checks (which raise a
    # StrictDataclassFieldValidationError, not a ValueError) before ours. The built-in class's checks still run,
    # after ours, from ``super().__setattr__``.

    model_type = "convnextv2"

    layer_norm_eps: float = 1e-6
    mask_ratio: float | int = 0.6
    mask_patch_size: int = 32
    decoder_hidden_size: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = True
    fcmae_impl: str = "sparse"
    fast_paths: bool | list[str] = True
    allow_large_model: bool = False

    def __post_init__(self, **kwargs):
        problem = labels_problem(self.id2label, None)  # before transformers turns "0" and 0 into one key
        if problem is not None:
            raise ValueError(problem)
        named_by = "id2label"
        if self.id2label is None and self.label2id is not None:
            # transformers would replace this label2id with placeholders for 2 classes: name the classes from it
            self.id2label, named_by = {index: label for label, index in self.label2id.items()}, "label2id"
        num_labels = kwargs.get("num_labels")
        if num_labels is not None and self.id2label is not None and num_labels != len(self.id2label):
            # transformers warns, then replaces the names given with num_labels placeholders
            raise ValueError(
                f"num_labels={num_labels!r} does not match the {len(self.id2label)} classes named by {named_by}; give "
                "one of them, or both for the same classes"
            )
        super().__post_init__(**kwargs)
        if _default_label2id(self.label2id) and any(
            label != f"LABEL_{index}" for index, label in (self.id2label or {}).items()
        ):
            self.label2id = {label: index for index, label in self.id2label.items()}
        self._check_values()
        # from now on each assignment of a structure field is checked against the others (``__setattr__``); a flag of
        # our own, not transformers' private one, and never saved (``to_dict``)
        self.__dict__[_BUILT] = True

    def __setattr__(self, key: str, value: Any) -> None:
        name = type(self).attribute_map.get(key, key)  # num_hidden_layers -> num_stages
        value = check_field(name, value)
        # While the dataclass __init__ fills the fields one by one their partners may not be set yet; the whole
        # structure is checked at the end of __post_init__, and on each assignment once the config is built.
        if name in STRUCTURE_FIELDS and self.__dict__.get(_BUILT, False):
            problem = structure_problem(lambda field: value if field == name else getattr(self, field))
            if problem is not None:
                raise ValueError(
                    f"setting {key}={value!r}: {problem}. Change related fields together with "
                    "config.update({...}), or build a new config"
                )
        self._store(name, value)

    def _store(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except StrictDataclassError as error:  # transformers' own type checks of its fields
            raise ValueError(f"{name}={value!r} is not valid: {error}") from error

    @property
    def total_stride(self) -> int:
        """Ratio between the input size and the last stage's resolution (32 for the official layout)."""
        return _total_stride(self.patch_size, self.num_stages)

    def _check_values(self) -> None:
        for name in FIELD_RULES:
            check_field(name, getattr(self, name))
        problem = structure_problem(lambda field: getattr(self, field)) or labels_problem(self.id2label, self.label2id)
        if problem is not None:
            raise ValueError(problem)

    def update(self, config_dict: dict[str, Any]) -> None:
        """Set several attributes at once, all checked together first: nothing changes if any value is wrong.

        >>> config = ConvNextV2Config()
        >>> config.update({"patch_size": 2, "mask_patch_size": 16})  # total stride 16: fine as a pair, not one by one
        >>> config.total_stride
        16
        """
        names = {key: type(self).attribute_map.get(key, key) for key in config_dict}
        values = {names[key]: check_field(names[key], value) for key, value in config_dict.items()}
        if STRUCTURE_FIELDS & values.keys():
            problem = structure_problem(lambda field: values[field] if field in values else getattr(self, field))
            if problem is not None:
                raise ValueError(f"update({config_dict!r}): {problem}")
        if {"id2label", "label2id"} & values.keys():
            problem = labels_problem(values.get("id2label", self.id2label), values.get("label2id", self.label2id))
            if problem is not None:
                raise ValueError(f"update(...): {problem}")
        for name, value in values.items():
            self._store(name, value)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As transformers' ``from_dict``, but overrides are checked with the file's values, and a config of another
        architecture is an error, not a warning.

        transformers builds the config from the file, then sets each keyword override one by one; here overrides
        that are fields join the construction, so ``from_pretrained(path, patch_size=2, mask_patch_size=16)``
        works in either order and a bad value raises ``ValueError`` before any model is built.
        """
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            architectures = config_dict.get("architectures") or []
            raise ValueError(
                f"this is a checkpoint of another architecture (model_type={model_type!r}"
                f"{', architectures=' + str(architectures) if architectures else ''}); ConvNeXt V2 models need "
                f"model_type={cls.model_type!r}"
            )
        field_names = {field.name for field in fields(cls)} | set(cls.attribute_map)
        # dtype / torch_dtype (e.g. pipeline()'s "auto") are transformers' to resolve, as it does for every config
        field_names -= {"dtype", "torch_dtype"}
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in field_names}
        if overrides:
            config_dict = {**config_dict, **overrides}
        saved_labels = config_dict.get("id2label")
        new_count = kwargs.get("num_labels")
        if new_count is not None and not {"id2label", "label2id"} & overrides.keys() and saved_labels is not None:
            if isinstance(saved_labels, dict) and len(saved_labels) != new_count:  # a new head: the saved names go
                config_dict = {key: value for key, value in config_dict.items() if key not in ("id2label", "label2id")}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """As transformers' ``get_config_dict``, but a folder without ``config.json`` is a ``ValueError``:
        transformers gives an empty dict there, so ``from_pretrained`` would build a default ConvNeXt V2-Tiny. A
        path that can only be local (absolute, ``./``, ``~`` or more than one ``/``) and does not exist is a
        ``ValueError`` too, where transformers would take it for a Hub repository id."""
        check_local_path(pretrained_model_name_or_path)
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not config_dict:
            name = kwargs.get("_configuration_file") or "config.json"
            raise ValueError(
                f"{os.fspath(pretrained_model_name_or_path)!r} has no {name}: it is not a saved ConvNeXt V2 model or "
                "config (save_pretrained writes one)"
            )
        return config_dict, kwargs

    @classmethod
    def _dict_from_json_file(cls, json_file) -> dict[str, Any]:  # a transformers hook: compat_convnextv2 checks it
        # transformers turns invalid JSON into an OSError naming no cause, and a JSON list into an AttributeError
        try:
            config_dict = super()._dict_from_json_file(json_file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{os.fspath(json_file)} is not a valid JSON file: {error}") from None
        if not isinstance(config_dict, dict):
            raise ValueError(
                f"{os.fspath(json_file)} holds a JSON {type(config_dict).__name__}, not an object of config values"
            )
        config_dict.pop("allow_large_model", None)  # a file cannot lift the bounds on the model it describes
        return config_dict

    def to_dict(self) -> dict[str, Any]:
        """As transformers' ``to_dict``, without ``allow_large_model``: the opt-in belongs to this session only."""
        output = super().to_dict()
        output.pop("allow_large_model", None)
        output.pop(_BUILT, None)
        return output

    @classmethod
    def known_kwargs(cls) -> list[str]:
        """Every keyword argument the constructor uses: public fields, ``attribute_map`` aliases, transformers' own."""
        names = {field.name for field in fields(cls) if not field.name.startswith("_")}
        return sorted(names | set(cls.attribute_map) | set(PRETRAINED_CONFIG_KWARGS))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ConvNextV2Config:
        """Config of one of the eight official sizes (``atto`` ... ``huge``), with any field overridden.

        Unlike the constructor (which keeps unknown keys, as transformers does, so any saved config loads), a
        misspelt override is a ``ValueError`` naming the closest known argument.

        >>> ConvNextV2Config.from_preset("tiny", num_labels=10, drop_path_rate=0.1).hidden_sizes
        [96, 192, 384, 768]
        """
        key = name.lower().removeprefix("convnextv2-").removeprefix("convnextv2_")
        if key not in PRESETS:
            raise ValueError(
                f"unknown ConvNeXt V2 preset {name!r}; choose one of {sorted(PRESETS, key=list(PRESETS).index)}"
            )
        known = cls.known_kwargs()
        unknown = [argument for argument in overrides if argument not in known]
        if unknown:
            hints = []
            for argument in unknown:
                match = difflib.get_close_matches(argument, known, n=1, cutoff=0.6)
                hint = f"did you mean {match[0]!r}?" if match else "no known argument is close"
                hints.append(f"{argument!r} ({hint})")
            raise ValueError(
                f"unknown keyword argument{'s' if len(unknown) > 1 else ''} for ConvNextV2Config.from_preset: "
                f"{', '.join(hints)}. Known arguments: ConvNextV2Config.known_kwargs()"
            )
        preset = PRESETS[key]
        values = {"depths": list(preset["depths"]), "hidden_sizes": list(preset["hidden_sizes"]), "num_stages": 4}
        if "depths" in overrides and "num_stages" not in overrides and "num_hidden_layers" not in overrides:
            values["num_stages"] = len(overrides["depths"])  # a preset with other stages: count them from depths
        values.update(overrides)
        return cls(**values)


ConvNextV2Config.register_for_auto_class()

__all__ = ["FAST_PATH_NAMES", "FCMAE_IMPLEMENTATIONS", "MAX_BLOCKS", "MAX_PARAMETERS", "PRESETS", "ConvNextV2Config"]
