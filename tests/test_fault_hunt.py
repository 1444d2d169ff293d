"""Fault hunt (issue 11): a catalogue of bad inputs and faults a hostile new user would try, across config, models,
image processors, conversion, training (with the example scripts) and loading.

Each case is one small function and an expected outcome:

- ``error=REGEX``: a *clear error*: a ``ValueError`` (or a subclass the package documents), or a command line
  that exits non-zero with an ``error:`` line (argparse's exit 2 included), whose message matches ``REGEX``,
  which names the problem;
- ``error=None``: *correct behaviour*: the function's own assertions (the stated check) hold.

A case that writes files calls ``ctx.watch(path)`` first: the path must be unchanged afterwards (no partial
output). ``classify`` sorts what actually happens into one of ``OUTCOMES``; the test asserts the expected one.
Cases mishandled in files that other work is changing right now carry ``xfail(strict=True)`` with the reason;
``tests/scripts/fault_hunt_report.py`` prints the counts per area and outcome.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for folder in (TESTS, REPO / "examples", REPO / "conversion_scripts"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from expected_errors import (  # noqa: E402
    CHECKPOINT_MODEL_TOO_LARGE,
    CLASS_WITH_TOO_FEW_IMAGES,
    CODE_RUNNING_PICKLE_REFUSED,
    COMPLEX_TENSOR,
    CONFIG_OF_ANOTHER_ARCHITECTURE,
    CROP_PCT_OUT_OF_RANGE,
    DEPTHS_AND_WIDTHS_LENGTHS_DIFFER,
    DISK_FULL_WHILE_WRITING,
    EMA_DECAY_ARGUMENT_OUT_OF_RANGE,
    EMA_DECAY_OUT_OF_RANGE,
    EMPTY_BATCH_OF_IMAGES,
    EVERY_IMAGE_OF_BATCH_SKIPPED,
    FOLDER_HOLDS_NO_IMAGES,
    ID2LABEL_KEY_NOT_AN_INDEX,
    ID2LABEL_VALUE_NOT_A_NAME,
    IMAGE_MEAN_WRONG_LENGTH,
    IMAGE_STD_NOT_POSITIVE,
    IMAGES_NOT_IN_CLASS_FOLDERS,
    INTEGER_KEY,
    INTEGER_TENSOR,
    LABEL_MAPS_DISAGREE,
    LABEL_SMOOTHING_OUT_OF_RANGE,
    LABELS_OUT_OF_RANGE,
    LAYER_DECAY_OUT_OF_RANGE,
    LAYER_DECAY_TYPE_UNKNOWN,
    LEARNING_RATE_NOT_FINITE,
    LIST_NOT_A_TENSOR,
    MASK_AND_NOISE_BOTH_GIVEN,
    MASK_RATIO_OUT_OF_RANGE,
    MASK_REMOVES_EVERY_PATCH,
    MISSING_TENSOR,
    MODEL_BEYOND_THE_BOUNDS,
    NOISE_NOT_FINITE,
    NOISE_SHAPE,
    NOT_A_PYTORCH_CHECKPOINT,
    NUM_LABELS_AGAINST_ID2LABEL,
    ONNX_HAS_NO_BF16,
    OUTPUT_IS_A_FILE,
    OUTPUT_IS_A_SYMLINK,
    PIXELS_OF_INTEGER_DTYPE,
    RESCALE_FACTOR_NOT_POSITIVE,
    SHAPES_OF_ANOTHER_SIZE_THAN_NAMED,
    SHORTEST_EDGE_NOT_POSITIVE,
    SIZE_NOT_SHORTEST_EDGE,
    STREAMING_NEEDS_MAX_STEPS,
    TRAINING_STOPPED_NON_FINITE,
    UNEXPECTED_TENSOR,
    UNKNOWN_EXPORT_FORMAT,
    UNKNOWN_PRESET,
    UNKNOWN_RECIPE,
    VALIDATION_FRACTION_OUT_OF_RANGE,
    WRONG_NUMBER_OF_CHANNELS,
    ZERO_D_TENSOR,
)
from helpers import (  # noqa: E402
    CUSTOM,
    load_script,
    malformed_state,
    official_dense,
    official_pretraining,
    save_official,
    tiny_config,
    truncate,
    write_bad_input,
    write_expanded,
    write_huge_widths,
    write_lying_header,
)

from convnextv2_hf import (  # noqa: E402
    ConvNextV2Backbone,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2ImageProcessor,
    ConvNextV2ImageProcessorPil,
    ConvNextV2Model,
)

OUTCOMES = ("clear error", "correct behaviour", "unclear error", "silent wrong result", "partial output")
AREAS = ("config", "model", "processor", "conversion", "training", "loading")
ERROR_LINE = re.compile(r"(^|: )error: ", re.MULTILINE)


# ----------------------------------------------------------------------------------------------------------
# The harness
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str  # "area/short-name"
    run: Callable[[Context], object]
    error: str | None  # regex of a clear error's message; None: correct behaviour expected
    accept: tuple[type[BaseException], ...] = (ValueError,)
    xfail: str | None = None  # mishandled today in a file another agent owns: what happens, what would fix it
    dependency: str | None = None  # left to a dependency: which, and what the package does about it
    outcome: str | None = None  # a dependency case's outcome today, when it is neither of the two good ones

    @property
    def area(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def expected(self) -> str:
        if self.outcome is not None:
            return self.outcome
        return "correct behaviour" if self.error is None else "clear error"


CASES: list[Case] = []


def add(case_id: str, run: Callable, error: str | None = None, **options) -> None:
    if any(case.id == case_id for case in CASES):
        raise ValueError(f"duplicate case id {case_id}")
    CASES.append(Case(case_id, run, error, **options))


def case(case_id: str, error: str | None = None, **options):
    """Decorator form of ``add``."""

    def register(function):
        add(case_id, function, error, **options)
        return function

    return register


class CheckFailed(Exception):
    """A correct-behaviour case's check does not hold: a silent wrong result."""


class CliFailure(Exception):
    """A command line (``main(argv)`` run in-process) that ended with a non-zero status."""

    def __init__(self, status, output: str):
        super().__init__(f"exit status {status}: {output}")
        self.status, self.output = status, output


def run_cli(main: Callable, argv: list[str]):
    """``main(argv)`` with stdout/stderr captured; ``CliFailure`` for a non-zero exit (argparse's SystemExit
    included). Exceptions other than SystemExit propagate: a traceback is what the user would see."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
    if isinstance(status, int) and status != 0 or isinstance(status, str):
        raise CliFailure(status, output.getvalue())
    return status


def _snapshot(path: Path):
    """What is at ``path``: None (nothing), bytes (a file), the link target, or a dict of a folder's contents."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}
    return None


@dataclass
class Context:
    """What a case gets: its own folder, and ``watch`` for paths that must be unchanged afterwards."""

    root: Path
    watched: dict[Path, object] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def watch(self, path: Path) -> Path:
        self.watched[Path(path)] = _snapshot(Path(path))
        return Path(path)

    def changed(self) -> list[str]:
        return [str(path) for path, before in self.watched.items() if _snapshot(path) != before]


@dataclass
class Result:
    outcome: str
    detail: str


def _raised_in(error: BaseException) -> str:
    """file:line where ``error`` was raised (for the report: package code or a dependency)."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    if traceback is None:
        return "?"
    filename = traceback.tb_frame.f_code.co_filename
    for prefix in (str(REPO) + os.sep, os.sep.join(["", "site-packages", ""])):
        if prefix in filename:
            filename = filename.split(prefix, 1)[1]
    return f"{filename}:{traceback.tb_lineno}"


def _one_line(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify(case: Case, root: Path) -> Result:
    """Run ``case`` in the folder ``root`` (the working directory is restored) and sort what happens."""
    context = Context(Path(root))
    cwd = os.getcwd()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cases that check a warning record their own
            case.run(context)
    except CheckFailed as error:
        result = Result("silent wrong result", f"check failed: {_one_line(error)}")
    except CliFailure as failure:
        clear = case.error is not None and ERROR_LINE.search(failure.output) and re.search(case.error, failure.output)
        outcome = "clear error" if clear else "unclear error"
        result = Result(outcome, f"exit {failure.status}: {_one_line(failure.output[-400:])}")
    except Exception as error:  # noqa: BLE001 - the point is to see what a user would see
        message = f"{type(error).__name__} at {_raised_in(error)}: {_one_line(error)}"
        clear = case.error is not None and isinstance(error, case.accept) and re.search(case.error, str(error))
        result = Result("clear error" if clear else "unclear error", message)
    else:
        if case.error is None:
            result = Result("correct behaviour", "the check holds")
        else:
            result = Result("silent wrong result", "no error: the bad input was accepted")
    finally:
        os.chdir(cwd)
    changed = context.changed()
    if changed:
        result = Result("partial output", f"changed: {changed}; {result.outcome}: {result.detail}")
    return result


# ----------------------------------------------------------------------------------------------------------
# Small inputs
# ----------------------------------------------------------------------------------------------------------


def pixels(batch: int = 2, size: int = 64, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def classifier(**overrides) -> ConvNextV2ForImageClassification:
    torch.manual_seed(0)
    return ConvNextV2ForImageClassification(tiny_config(**overrides)).eval()


def fcmae(**overrides) -> ConvNextV2ForMaskedImageModeling:
    torch.manual_seed(0)
    return ConvNextV2ForMaskedImageModeling(tiny_config(**overrides)).eval()


def png(path: Path, size=(32, 32), color=(200, 30, 90), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new(mode, size, color).save(path)
    return path


def image_folder(root: Path, classes=("a", "b"), per_class: int = 2, splits=("train", "validation")) -> Path:
    for split in splits:
        for name in classes:
            for index in range(per_class):
                png(root / split / name / f"{index}.png", color=(60 * index, 80, 120 + 40 * classes.index(name)))
    return root


def flip_bit(path: Path, offset_from_end: int = 64) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def saved_classifier(folder: Path, **overrides) -> Path:
    classifier(**overrides).save_pretrained(folder)
    return folder


def expect_check(condition: bool, message: str) -> None:
    """A case's stated check; ``CheckFailed`` (never a library's own AssertionError) when it does not hold."""
    if not condition:
        raise CheckFailed(message)


# ----------------------------------------------------------------------------------------------------------
# config: every value checked at construction, in from_dict / from_pretrained overrides and on assignment
# ----------------------------------------------------------------------------------------------------------

BAD_CONFIG_VALUES = [
    ("mask-ratio-zero", {"mask_ratio": 0}, r"mask_ratio.*0 < mask_ratio < 1.*mask_ratio=0"),
    ("mask-ratio-one", {"mask_ratio": 1.0}, MASK_RATIO_OUT_OF_RANGE),
    ("mask-ratio-negative", {"mask_ratio": -0.5}, MASK_RATIO_OUT_OF_RANGE),
    ("mask-ratio-nan", {"mask_ratio": float("nan")}, r"0 < mask_ratio < 1.*nan"),
    ("mask-ratio-string", {"mask_ratio": "0.6"}, r"mask_ratio must be a number"),
    ("mask-ratio-bool", {"mask_ratio": True}, r"mask_ratio must be a number"),
    ("mask-patch-size-not-multiple", {"mask_patch_size": 48}, r"mask_patch_size must be a positive multiple of .*32"),
    ("mask-patch-size-zero", {"mask_patch_size": 0}, r"mask_patch_size must be a positive int"),
    ("mask-patch-size-float", {"mask_patch_size": 32.0}, r"mask_patch_size must be a positive int"),
    ("depths-widths-lengths", {"hidden_sizes": [8, 16, 24]}, DEPTHS_AND_WIDTHS_LENGTHS_DIFFER),
    ("depths-empty", {"depths": [], "hidden_sizes": []}, r"(depths|hidden_sizes) must be a non-empty list"),
    ("depths-negative", {"depths": [2, -1, 2, 1]}, r"depths must be a non-empty list of positive ints"),
    ("depths-bool", {"depths": [2, True, 2, 1]}, r"depths must be a non-empty list of positive ints"),
    ("hidden-sizes-float", {"hidden_sizes": [8, 16, 24.5, 32]}, r"hidden_sizes must be .*positive ints"),
    ("num-stages-mismatch", {"num_stages": 3}, r"num_stages=3 does not match the 4 stages"),
    ("patch-size-zero", {"patch_size": 0}, r"patch_size must be a positive int"),
    ("patch-size-not-square", {"patch_size": (4, 2)}, r"patch_size must be .*two equal"),
    ("num-channels-zero", {"num_channels": 0}, r"num_channels must be a positive int"),
    ("drop-path-one", {"drop_path_rate": 1.0}, r"drop_path_rate must be a number in \[0, 1\)"),
    ("drop-path-negative", {"drop_path_rate": -0.1}, r"drop_path_rate must be a number in \[0, 1\)"),
    ("hidden-act-unknown", {"hidden_act": "swishy"}, r"hidden_act must be the name of an activation"),
    ("layer-norm-eps-zero", {"layer_norm_eps": 0.0}, r"layer_norm_eps must be a finite number > 0"),
    ("layer-norm-eps-inf", {"layer_norm_eps": float("inf")}, r"layer_norm_eps must be a finite number > 0"),
    ("layer-norm-eps-string", {"layer_norm_eps": "1e-6"}, r"layer_norm_eps must be a finite number > 0"),
    ("initializer-range-negative", {"initializer_range": -0.02}, r"initializer_range must be a finite number > 0"),
    ("fcmae-impl-unknown", {"fcmae_impl": "bogus"}, r"fcmae_impl must be one of \('sparse', 'dense'\)"),
    ("norm-pix-loss-string", {"norm_pix_loss": "yes"}, r"norm_pix_loss must be True or False"),
    ("norm-pix-loss-int", {"norm_pix_loss": 1}, r"norm_pix_loss must be True or False"),
    ("decoder-depth-negative", {"decoder_depth": -1}, r"decoder_depth must be an int >= 0"),
    ("decoder-hidden-size-zero", {"decoder_hidden_size": 0}, r"decoder_hidden_size must be a positive int"),
    ("image-size-negative", {"image_size": -224}, r"image_size must be a positive int"),
    ("fast-paths-unknown-name", {"fast_paths": ["turbo"]}, r"fast_paths must be .*unknown: \['turbo'\]"),
    ("mask-ratio-tensor", {"mask_ratio": torch.tensor(0.5)}, r"mask_ratio must be a number"),
    ("num-labels-negative", {"num_labels": -1}, r"num_labels must be an int >= 0"),
    (
        "problem-type-unknown",
        {"problem_type": "multilabel"},
        r"problem_type must be one of .*multi_label_classification",
    ),
    ("dtype-unknown", {"dtype": "float23"}, r"dtype must be None, .auto., a torch.dtype or the name of one"),
    ("torch-dtype-unknown", {"torch_dtype": "fp16"}, r"dtype must be None, .auto., a torch.dtype or the name of one"),
    ("out-features-unknown", {"out_features": ["stage9"]}, r"out_features must be a subset of stage_names"),
    ("out-indices-out-of-range", {"out_indices": [7]}, r"out_indices must be valid indices"),
]
for _name, _overrides, _pattern in BAD_CONFIG_VALUES:
    add(f"config/{_name}", lambda ctx, o=_overrides: tiny_config(**o), _pattern)

# the same values through the other entry points: from_dict / from_pretrained keyword overrides, assignment
OTHER_ENTRY_POINTS = {
    "mask-ratio-zero": ("mask_ratio", 0, MASK_RATIO_OUT_OF_RANGE),
    "mask-ratio-negative": ("mask_ratio", -0.5, MASK_RATIO_OUT_OF_RANGE),
    "mask-patch-size-not-multiple": ("mask_patch_size", 48, r"mask_patch_size must be a positive multiple"),
    "fcmae-impl-unknown": ("fcmae_impl", "bogus", r"fcmae_impl must be one of"),
    "drop-path-one": ("drop_path_rate", 1.0, r"drop_path_rate must be a number in \[0, 1\)"),
    "norm-pix-loss-string": ("norm_pix_loss", "no", r"norm_pix_loss must be True or False"),
}


def _from_dict(ctx, key, value):
    ConvNextV2Config.from_dict(tiny_config().to_dict(), **{key: value})


def _from_pretrained(ctx, key, value):
    tiny_config().save_pretrained(ctx.path("config"))
    ConvNextV2Config.from_pretrained(ctx.path("config"), **{key: value})


def _model_from_pretrained(ctx, key, value):
    folder = ctx.path("model")
    fcmae().save_pretrained(folder)
    ConvNextV2ForMaskedImageModeling.from_pretrained(folder, **{key: value})


def _assignment(ctx, key, value):
    setattr(tiny_config(), key, value)


for _name, (_key, _value, _pattern) in OTHER_ENTRY_POINTS.items():
    add(f"config/from-dict-{_name}", lambda ctx, k=_key, v=_value: _from_dict(ctx, k, v), _pattern)
    add(f"config/from-pretrained-{_name}", lambda ctx, k=_key, v=_value: _from_pretrained(ctx, k, v), _pattern)
    add(f"config/assign-{_name}", lambda ctx, k=_key, v=_value: _assignment(ctx, k, v), _pattern)
add(
    "config/model-from-pretrained-mask-ratio-negative",
    lambda ctx: _model_from_pretrained(ctx, "mask_ratio", -0.5),
    MASK_RATIO_OUT_OF_RANGE,
)
add(
    "config/model-from-pretrained-fcmae-impl-unknown",
    lambda ctx: _model_from_pretrained(ctx, "fcmae_impl", "bogus"),
    r"fcmae_impl must be one of",
)
add("config/assign-alias-num-hidden-layers", lambda ctx: setattr(tiny_config(), "num_hidden_layers", 3), r"num_stages")
add(
    "config/assign-hidden-sizes-shorter",
    lambda ctx: setattr(tiny_config(), "hidden_sizes", [8, 16]),
    r"setting hidden_sizes=\[8, 16\]: depths and hidden_sizes must have the same length",
)


@case("config/update-with-one-bad-value-changes-nothing")
def _update_is_atomic(ctx):
    """update() checks every value first: one bad value raises and leaves the others unset."""
    config = tiny_config()
    with contextlib.suppress(ValueError):
        config.update({"mask_ratio": 0.3, "fcmae_impl": "bogus"})
        raise CheckFailed("update accepted fcmae_impl='bogus'")
    expect_check(config.mask_ratio == 0.6 and config.fcmae_impl == "sparse", f"half-applied: {config.mask_ratio}")


@case("config/update-related-fields-together")
def _update_related(ctx):
    """patch_size=2 alone breaks mask_patch_size=32's stride rule only until mask_patch_size follows it."""
    config = tiny_config()
    config.update({"patch_size": 2, "mask_patch_size": 16})
    expect_check(config.total_stride == 16 and config.mask_patch_size == 16, f"stride {config.total_stride}")


@case("config/from-pretrained-related-overrides-in-any-order")
def _related_overrides(ctx):
    tiny_config().save_pretrained(ctx.path("config"))
    config = ConvNextV2Config.from_pretrained(ctx.path("config"), mask_patch_size=16, patch_size=2)
    expect_check((config.patch_size, config.mask_patch_size) == (2, 16), "overrides not applied together")


add(
    "config/from-preset-typo",
    lambda ctx: ConvNextV2Config.from_preset("atto", mask_ration=0.5),
    r"did you mean 'mask_ratio'",
)
add(
    "config/from-preset-several-typos",
    lambda ctx: ConvNextV2Config.from_preset("atto", num_label=3, dropout=0.1),
    r"unknown keyword arguments .*'num_label' \(did you mean 'num_labels'\?\)",
)
add(
    "config/from-preset-unknown-size",
    lambda ctx: ConvNextV2Config.from_preset("gigantic"),
    UNKNOWN_PRESET,
)
add(
    "config/from-preset-bad-value",
    lambda ctx: ConvNextV2Config.from_preset("atto", mask_ratio=0),
    MASK_RATIO_OUT_OF_RANGE,
)


@case("config/from-preset-name-forms")
def _preset_names(ctx):
    """'ConvNeXtV2-Atto', 'convnextv2_atto' and 'atto' name the same preset."""
    widths = {
        tuple(ConvNextV2Config.from_preset(n).hidden_sizes) for n in ("ConvNeXtV2-Atto", "convnextv2_atto", "atto")
    }
    expect_check(widths == {(40, 80, 160, 320)}, f"{widths}")


@case("config/from-preset-fewer-stages")
def _preset_stages(ctx):
    config = ConvNextV2Config.from_preset("atto", depths=[1, 1], hidden_sizes=[8, 16], mask_patch_size=8)
    expect_check(config.num_stages == 2 and config.total_stride == 8, f"num_stages {config.num_stages}")


@case("config/unknown-key-is-kept", error=None)
def _unknown_key(ctx):
    """Unknown keys (configs of other tools) are kept as plain attributes, as transformers does."""
    config = ConvNextV2Config(**tiny_config().to_dict(), my_tool_setting=3)
    expect_check(config.my_tool_setting == 3, "unknown key dropped")


@case("config/another-architecture-config-json", error=r"another architecture \(model_type='vit'")
def _vit_config(ctx):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(ctx.path("vit"))
    ConvNextV2Config.from_pretrained(ctx.path("vit"))


add(
    "config/from-pretrained-missing-folder",
    lambda ctx: ConvNextV2Config.from_pretrained(ctx.path("no-such-folder")),
    r"no-such-folder' does not exist \(a local path; a Hub repository id is 'namespace/name'\)",
)
add(
    "config/from-pretrained-missing-relative-folder",
    lambda ctx: ConvNextV2Config.from_pretrained("./runs/no-such-folder"),
    r"'./runs/no-such-folder' does not exist",
)
add(
    "config/from-pretrained-folder-without-config",
    lambda ctx: (ctx.path("empty").mkdir(), ConvNextV2Config.from_pretrained(ctx.path("empty"))),
    r"empty' has no config.json",
)


@case("config/hand-edited-config-json", error=r"0 < mask_ratio < 1.*mask_ratio=0")
def _hand_edited(ctx):
    tiny_config().save_pretrained(ctx.path("config"))
    path = ctx.path("config", "config.json")
    content = json.loads(path.read_text())
    path.write_text(json.dumps({**content, "mask_ratio": 0}))
    ConvNextV2Config.from_pretrained(ctx.path("config"))


@case("config/numpy-scalars-are-numbers")
def _numpy_scalars(ctx):
    """Values computed with NumPy (a mask-ratio sweep, widths read off an array) are numbers, stored as Python ones
    so the config still saves as JSON."""
    config = tiny_config(mask_ratio=np.float32(0.75), hidden_sizes=list(np.array([8, 16, 24, 32])))
    config.save_pretrained(ctx.path("config"))
    saved = json.loads(ctx.path("config", "config.json").read_text())
    expect_check(saved["mask_ratio"] == 0.75 and saved["hidden_sizes"] == [8, 16, 24, 32], f"{saved['mask_ratio']}")


@case("config/round-trip-unchanged")
def _round_trip(ctx):
    config = tiny_config(mask_ratio=0.75, fcmae_impl="dense", fast_paths=["grn_fold"], norm_pix_loss=False)
    config.save_pretrained(ctx.path("config"))
    again = ConvNextV2Config.from_pretrained(ctx.path("config"))
    keys = ("mask_ratio", "fcmae_impl", "fast_paths", "norm_pix_loss", "depths", "hidden_sizes", "layer_norm_eps")
    expect_check(all(getattr(again, k) == getattr(config, k) for k in keys), "a value changed on the round trip")


# label maps (issue 17): types, class indices 0 .. n-1, and the two maps agreeing
BAD_LABEL_MAPS = [
    ("id2label-value-int", {"id2label": {"0": 5}}, ID2LABEL_VALUE_NOT_A_NAME),
    ("id2label-key-not-an-index", {"id2label": {"cat": "a"}}, ID2LABEL_KEY_NOT_AN_INDEX),
    ("id2label-keys-with-a-gap", {"id2label": {0: "a", 5: "b"}}, r"id2label must name the classes 0 .. 1"),
    ("label2id-value-string", {"label2id": {"cat": "x"}}, r"label2id values must be class indices .*'cat' maps to 'x'"),
    (
        "label-maps-disagree",
        {"id2label": {0: "a", 1: "b"}, "label2id": {"a": 1, "b": 0}},
        LABEL_MAPS_DISAGREE,
    ),
    (
        "num-labels-against-id2label",
        {"num_labels": 5, "id2label": {0: "a", 1: "b"}},
        NUM_LABELS_AGAINST_ID2LABEL,
    ),
]
for _name, _fields, _pattern in BAD_LABEL_MAPS:
    add(f"config/{_name}", lambda ctx, f=_fields: ConvNextV2Config(**f), _pattern)


@case("config/label-maps-in-config-json", error=r"label2id and id2label disagree: label2id\['a'\] = 1")
def _labels_in_file(ctx):
    folder = saved_classifier(ctx.path("model"), num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    _edit_config(label2id={"a": 1, "b": 0})(folder)
    ConvNextV2ForImageClassification.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------
# model: pixel_values, labels, bool_masked_pos / noise, FCMAE sizes, dtypes and devices
# ----------------------------------------------------------------------------------------------------------

BAD_PIXEL_VALUES = [
    ("pixels-3d", lambda: torch.randn(3, 64, 64), r"pixel_values must be a 4-D tensor .*got \(3, 64, 64\)"),
    ("pixels-5d", lambda: torch.randn(1, 1, 3, 64, 64), r"pixel_values must be a 4-D tensor"),
    (
        "pixels-uint8",
        lambda: torch.zeros(2, 3, 64, 64, dtype=torch.uint8),
        PIXELS_OF_INTEGER_DTYPE,
    ),
    (
        "pixels-int64",
        lambda: torch.zeros(2, 3, 64, 64, dtype=torch.int64),
        r"floating-point tensor, got dtype torch.int64",
    ),
    (
        "pixels-bool",
        lambda: torch.zeros(2, 3, 64, 64, dtype=torch.bool),
        r"floating-point tensor, got dtype torch.bool",
    ),
    ("pixels-one-channel", lambda: torch.randn(2, 1, 64, 64), WRONG_NUMBER_OF_CHANNELS),
    ("pixels-channels-last-layout", lambda: torch.randn(2, 64, 64, 3), r"has 64 channels but the model expects"),
    ("pixels-16px", lambda: torch.randn(2, 3, 16, 16), r"at least 32 .*got 16x16"),
    ("pixels-numpy", lambda: np.zeros((2, 3, 64, 64), np.float32), r"pixel_values must be a 4-D tensor .*ndarray"),
    ("pixels-list", lambda: [[0.0] * 64] * 64, r"pixel_values must be a 4-D tensor .*list"),
    ("pixels-none", lambda: None, r"You have to specify pixel_values"),
]
for _name, _make, _pattern in BAD_PIXEL_VALUES:
    add(f"model/classifier-{_name}", lambda ctx, m=_make: classifier()(m()), _pattern)
add("model/fcmae-pixels-one-channel", lambda ctx: fcmae()(torch.randn(2, 1, 64, 64)), r"has 1 channels")
add(
    "model/backbone-pixels-uint8",
    lambda ctx: ConvNextV2Backbone(tiny_config())(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)),
    r"floating-point",
)
add(
    "model/fcmae-size-not-multiple", lambda ctx: fcmae()(pixels(size=48)), r"multiples of mask_patch_size=32, got 48x48"
)
add(
    "model/fcmae-one-patch-image",
    lambda ctx: fcmae()(pixels(size=32)),
    r"mask_ratio=0.6 keeps no patch of the 1 patches of this image size",
)
add(
    "model/fcmae-tiny-mask-ratio-removes-nothing",
    lambda ctx: fcmae(mask_ratio=1e-17)(pixels()),
    r"mask_ratio=1e-17 removes no patch of the 4 patches",
)


@case("model/classifier-odd-size-works")
def _odd_size(ctx):
    """Any size >= 32 runs, as the built-in does (each stage floors the map): 33x47 gives a 1x1 last map."""
    output = ConvNextV2Model(tiny_config()).eval()(torch.randn(1, 3, 33, 47))
    expect_check(tuple(output.last_hidden_state.shape) == (1, 32, 1, 1), f"{tuple(output.last_hidden_state.shape)}")


@case("model/classifier-nan-input-stays-in-its-sample")
def _nan_input(ctx):
    """A NaN image gives NaN logits for that sample only (no silent finite garbage, no effect on the others)."""
    batch = pixels()
    batch[0, 0, 5, 5] = float("nan")
    logits = classifier()(batch).logits
    expect_check(bool(logits[0].isnan().all()) and bool(logits[1].isfinite().all()), f"{logits}")


@case("model/classifier-channels-last-and-strided-input")
def _memory_layout(ctx):
    model, batch = classifier(), pixels()
    expected = model(batch).logits
    for variant in (batch.to(memory_format=torch.channels_last), torch.cat([batch, batch], -1)[..., ::2]):
        expect_check(torch.allclose(model(variant).logits, model(variant.contiguous()).logits, atol=1e-5), "layout")
    expect_check(torch.allclose(model(batch.to(memory_format=torch.channels_last)).logits, expected, atol=1e-5), "cl")


@case("model/classifier-float64-input-to-float32-model")
def _float64_input(ctx):
    """The built-in classifier raises torch's dtype error for float64 input too; ours must give the built-in's
    behaviour or a clear message, never a bias-type error."""
    try:
        logits = classifier()(pixels().double()).logits
    except (RuntimeError, ValueError) as error:
        expect_check("bias" not in str(error) and "dtype" in str(error), f"{type(error).__name__}: {error}")
        raise
    expect_check(logits.isfinite().all(), "non-finite logits")


@case("model/classifier-bfloat16-input-to-float32-model")
def _bf16_input(ctx):
    try:
        logits = classifier()(pixels().bfloat16()).logits
    except (RuntimeError, ValueError) as error:
        expect_check("bias" not in str(error) and "dtype" in str(error), f"{type(error).__name__}: {error}")
        raise
    expect_check(logits.isfinite().all(), "non-finite logits")


@case("model/bfloat16-model-float32-input")
def _bf16_model(ctx):
    try:
        logits = classifier().to(torch.bfloat16)(pixels()).logits
    except (RuntimeError, ValueError) as error:
        expect_check("bias" not in str(error) and "dtype" in str(error), f"{type(error).__name__}: {error}")
        raise
    expect_check(logits.isfinite().all(), "non-finite logits")


@case(
    "model/meta-device-model-cpu-input",
    error=r"device meta is not on the expected device cpu",
    outcome="unclear error",
    dependency="torch: a RuntimeError naming both devices (as the built-in model gives); the package leaves device "
    "placement to torch and accelerate's hooks",
)
def _meta_model(ctx):
    """A model left on the meta device (weights never loaded) with a CPU input: an error naming the devices."""
    with torch.device("meta"):
        model = ConvNextV2ForImageClassification(tiny_config())
    model(pixels())


BAD_LABELS = [
    ("labels-2d-integers", lambda: torch.zeros(2, 2, dtype=torch.long), r"class-index labels must have shape \(2,\)"),
    ("labels-too-few", lambda: torch.tensor([1]), r"class-index labels must have shape \(2,\), got \(1,\)"),
    ("labels-too-many", lambda: torch.tensor([1, 2, 3]), r"must have shape \(2,\), got \(3,\)"),
    ("labels-out-of-range", lambda: torch.tensor([0, 5]), r"must lie in \[0, 4\] \(num_labels=5\).*to 5"),
    ("labels-negative", lambda: torch.tensor([-1, 2]), LABELS_OUT_OF_RANGE),
    ("labels-bool", lambda: torch.tensor([True, False]), r"must be an integer tensor, got dtype torch.bool"),
    ("labels-float-indices", lambda: torch.tensor([1.0, 2.0]), r"soft labels must have the logits' shape \(2, 5\)"),
    ("labels-list", lambda: [1, 2], r"labels must be a tensor, got list"),
    ("labels-numpy", lambda: np.array([1, 2]), r"labels must be a tensor, got ndarray"),
    ("soft-labels-negative", lambda: torch.tensor([[1.2, -0.2, 0, 0, 0]] * 2), r"finite and non-negative"),
    ("soft-labels-row-sum", lambda: torch.full((2, 5), 0.5), r"must sum to 1 in every row .*2.5"),
    ("soft-labels-nan", lambda: torch.tensor([[float("nan"), 1, 0, 0, 0]] * 2), r"finite and non-negative"),
    ("soft-labels-wrong-width", lambda: torch.full((2, 4), 0.25), r"soft labels must have the logits' shape \(2, 5\)"),
    ("soft-labels-complex", lambda: torch.zeros(2, 5, dtype=torch.complex64), r"labels.*complex"),
]
for _name, _make, _pattern in BAD_LABELS:
    add(f"model/{_name}", lambda ctx, m=_make: classifier()(pixels(), labels=m()), _pattern)
add(
    "model/multi-label-out-of-range",
    lambda ctx: classifier(problem_type="multi_label_classification")(pixels(), labels=torch.full((2, 5), 2.0)),
    r"multi-label labels must lie in \[0, 1\]",
)
add(
    "model/multi-label-wrong-shape",
    lambda ctx: classifier(problem_type="multi_label_classification")(pixels(), labels=torch.ones(2, 3)),
    r"multi-label labels must have the logits' shape \(2, 5\)",
)
add(
    "model/regression-wrong-count",
    lambda ctx: classifier(num_labels=1)(pixels(), labels=torch.ones(3)),
    r"regression labels must hold 2 values, got shape \(3,\)",
)
add(
    "model/labels-on-a-headless-model",
    lambda ctx: classifier(num_labels=0)(pixels(), labels=torch.tensor([0, 1])),
    r"num_labels=0|no classification head",
)


@case(
    "model/ignore-index-labels-like-the-built-in",
)
def _ignore_index(ctx):
    """-100 marks a label to ignore in transformers' cross-entropy (the built-in model ignores it): the loss is that
    of the other samples."""
    model, batch = classifier(), pixels()
    loss = model(batch, labels=torch.tensor([-100, 3])).loss
    alone = model(batch[1:], labels=torch.tensor([3])).loss
    expect_check(torch.allclose(loss, alone, atol=1e-6), f"{loss} vs {alone}")


@case("model/soft-labels-valid-distribution")
def _soft_labels(ctx):
    model, batch = classifier(), pixels()
    one_hot = torch.nn.functional.one_hot(torch.tensor([1, 3]), 5).float()
    soft, hard = model(batch, labels=one_hot).loss, model(batch, labels=torch.tensor([1, 3])).loss
    expect_check(torch.allclose(soft, hard, atol=1e-6), f"{soft} vs {hard}")


BAD_MASKS = [
    ("bool-masked-pos-half", lambda: torch.full((2, 4), 0.5), r"bool_masked_pos must be bool or hold only 0 and 1"),
    ("bool-masked-pos-twos", lambda: torch.full((2, 4), 2), r"bool_masked_pos must be bool or hold only 0 and 1"),
    (
        "bool-masked-pos-shape",
        lambda: torch.zeros(2, 16, dtype=torch.bool),
        r"must have shape \(batch, patches\) = \(2, 4\)",
    ),
    (
        "bool-masked-pos-flat",
        lambda: torch.zeros(8, dtype=torch.bool),
        r"must have shape \(batch, patches\) = \(2, 4\)",
    ),
    ("bool-masked-pos-all-removed", lambda: torch.ones(2, 4, dtype=torch.bool), MASK_REMOVES_EVERY_PATCH),
    ("bool-masked-pos-list", lambda: [[True, False, True, False]] * 2, r"bool_masked_pos must be a tensor, got list"),
    (
        "bool-masked-pos-uneven-sparse",
        lambda: torch.tensor([[True, False, False, False], [True, True, False, False]]),
        r"the sparse FCMAE path needs the same number of removed patches .*fcmae_impl='dense'",
    ),
]
for _name, _make, _pattern in BAD_MASKS:
    add(f"model/{_name}", lambda ctx, m=_make: fcmae()(pixels(), bool_masked_pos=m()), _pattern)
add(
    "model/noise-wrong-shape",
    lambda ctx: fcmae()(pixels(), noise=torch.rand(2, 5)),
    NOISE_SHAPE,
)
add(
    "model/fcmae-labels-other-mask",
    lambda ctx: fcmae()(pixels(), noise=torch.rand(2, 4), labels=torch.full((2, 4), -100)),
    r"labels \(-100 at kept patches\) do not mark the removed patches",
)


@case("model/fcmae-num-items-zero", error=r"num_items_in_batch \(0\) must be one number counting")
def _num_items_zero(ctx):
    noise = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    model = fcmae()
    labels = torch.where(model.random_masking(2, 4, noise), 1, -100)
    model(pixels(), noise=noise, labels=labels, num_items_in_batch=0)


add(
    "model/fcmae-batch-zero",
    lambda ctx: fcmae()(torch.randn(0, 3, 64, 64)),
    r"batch|empty",
)
add(
    "model/patchify-size-not-multiple",
    lambda ctx: fcmae().patchify(torch.randn(1, 3, 48, 48)),
    r"multiple|48",
)
add(
    "model/patchify-3d-input",
    lambda ctx: fcmae().patchify(torch.randn(3, 64, 64)),
    r"\(N, C, H, W\)|4-D",
)
add(
    "model/unpatchify-wrong-patch-width",
    lambda ctx: fcmae().unpatchify(torch.randn(1, 4, 100)),
    r"3072|p\^2|patch",
)
add(
    "model/forward-loss-shape-mismatch",
    lambda ctx: fcmae().forward_loss(pixels(), torch.randn(2, 4, 100), torch.ones(2, 4)),
    r"logits.*\(2, 4, 3072\)",
)
add(
    "model/draw-mask-1d-noise",
    lambda ctx: __import__("convnextv2_hf").modeling_convnextv2.draw_mask(torch.rand(4), 0.5),
    r"noise must .*\(N, L\)|2-D",
)
add(
    "model/noise-numpy",
    lambda ctx: fcmae()(pixels(), noise=np.random.rand(2, 4)),
    r"noise must be a tensor",
)


@case("model/bool-masked-pos-zero-one-integers")
def _zero_one_mask(ctx):
    model, mask = fcmae(), torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]])
    loss_int, loss_bool = model(pixels(), bool_masked_pos=mask).loss, model(pixels(), bool_masked_pos=mask.bool()).loss
    expect_check(torch.equal(loss_int, loss_bool), f"{loss_int} vs {loss_bool}")


@case("model/bool-masked-pos-nothing-removed-gives-finite-loss")
def _nothing_removed(ctx):
    """No removed patch: nothing to predict; the loss is 0 with zero gradients, never 0/0 = NaN."""
    model = fcmae(fcmae_impl="dense").train()
    loss = model(pixels(), bool_masked_pos=torch.zeros(2, 4, dtype=torch.bool)).loss
    loss.backward()
    grads_finite = all(p.grad is None or bool(p.grad.isfinite().all()) for p in model.parameters())
    expect_check(float(loss) == 0.0 and grads_finite, f"loss {loss}")


@case("model/fcmae-constant-image-norm-pix-loss-finite")
def _constant_image(ctx):
    """A flat grey image has zero per-patch variance: norm_pix_loss must not divide by zero."""
    loss = fcmae()(torch.full((2, 3, 64, 64), 0.5)).loss
    expect_check(bool(loss.isfinite()), f"loss {loss}")


@case("model/fcmae-dense-and-sparse-agree-on-uneven-free-mask")
def _dense_sparse(ctx):
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    sparse = fcmae(fcmae_impl="sparse")(pixels(), bool_masked_pos=mask).loss
    dense = fcmae(fcmae_impl="dense")(pixels(), bool_masked_pos=mask).loss
    expect_check(torch.allclose(sparse, dense, atol=1e-5), f"{sparse} vs {dense}")


@case(
    "model/hidden-states-index-out-of-range",
    dependency="transformers: output capturing drops indices out of range ('they select nothing', "
    "resolve_hidden_states_indices); the package follows it, as the built-in model does",
)
def _hidden_index(ctx):
    states = classifier()(pixels(), output_hidden_states=[7, -9]).hidden_states
    expect_check(len(states) == 5 and all(state is None for state in states), f"{states}")


add(
    "model/hidden-states-index-not-an-int",
    lambda ctx: classifier()(pixels(), output_hidden_states=["stage1"]),
    r"'<=' not supported between instances of 'int' and 'str'",
    outcome="unclear error",
    dependency="transformers: resolve_hidden_states_indices compares the indices with ints (TypeError); the "
    "package passes the selection on unchanged, as the built-in model does",
)
add(
    "model/fcmae-noise-nan",
    lambda ctx: fcmae()(pixels(), noise=torch.tensor([[0.1, float("nan"), 0.3, 0.2], [0.4, 0.3, 0.2, 0.1]])),
    NOISE_NOT_FINITE,
)
add(
    "model/fcmae-noise-inf",
    lambda ctx: fcmae()(pixels(), noise=torch.tensor([[float("inf")] * 4, [0.4, 0.3, 0.2, 0.1]])),
    r"noise holds 4 NaN or infinite values",
)
add(
    "model/fcmae-noise-and-bool-masked-pos",
    lambda ctx: fcmae()(pixels(), noise=torch.rand(2, 4), bool_masked_pos=torch.tensor([[1, 1, 0, 0]] * 2)),
    MASK_AND_NOISE_BOTH_GIVEN,
)
add(
    "model/config-far-beyond-huge",
    lambda ctx: ConvNextV2ForImageClassification(ConvNextV2Config(depths=[2, 2, 20000, 2])),
    r"builds a ConvNextV2ForImageClassification of [\d,]+ parameters .* beyond the bounds .*allow_large_model=True",
)


def _nan_model(ctx):
    model = classifier()
    with torch.no_grad():
        model.classifier.bias[0] = float("nan")
    return model


@case("model/save-nan-weights", error=r"weights to save to .*out \(nothing was written\).*'classifier.bias'")
def _save_nan(ctx):
    _nan_model(ctx).save_pretrained(ctx.watch(ctx.path("out")))


@case("model/trainer-saves-nan-weights", error=r"'classifier.bias' \(1 of 5 values\)")
def _trainer_nan(ctx):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(ctx.path("run")), report_to="none", use_cpu=True)
    # the Trainer makes the (empty) output folder itself before it calls save_pretrained: no weights appear in it
    ctx.watch(ctx.path("final", "model.safetensors"))
    Trainer(model=_nan_model(ctx), args=args).save_model(str(ctx.path("final")))


# ----------------------------------------------------------------------------------------------------------
# processor: settings and images
# ----------------------------------------------------------------------------------------------------------

PROCESSORS = {"torchvision": ConvNextV2ImageProcessor, "pil": ConvNextV2ImageProcessorPil}


def processed(images, backend: str = "torchvision", **settings) -> torch.Tensor:
    processor = PROCESSORS[backend](size={"shortest_edge": 32}, **settings)
    return processor(images, return_tensors="pt")["pixel_values"]


BAD_PROCESSOR_SETTINGS = [
    ("crop-pct-zero", {"crop_pct": 0.0}, r"crop_pct must be a number in \(0, 1\]"),
    ("crop-pct-above-one", {"crop_pct": 1.5}, r"crop_pct must be a number in \(0, 1\]"),
    ("crop-pct-string", {"crop_pct": "0.9"}, r"crop_pct must be a number in \(0, 1\]"),
    ("size-zero", {"size": {"shortest_edge": 0}}, SHORTEST_EDGE_NOT_POSITIVE),
    ("size-negative-int", {"size": -5}, r"size\['shortest_edge'\] must be a positive integer, got -5"),
    ("size-height-width", {"size": {"height": 224, "width": 224}}, SIZE_NOT_SHORTEST_EDGE),
    ("size-float", {"size": {"shortest_edge": 22.5}}, r"size\['shortest_edge'\] must be a positive integer"),
    ("mean-two-values", {"image_mean": [0.5, 0.5]}, IMAGE_MEAN_WRONG_LENGTH),
    ("mean-string", {"image_mean": "imagenet"}, r"image_mean must be one number or 3"),
    ("std-zero", {"image_std": [0.2, 0.0, 0.2]}, IMAGE_STD_NOT_POSITIVE),
    ("std-negative", {"image_std": -1.0}, IMAGE_STD_NOT_POSITIVE),
    ("std-nan", {"image_std": [float("nan")] * 3}, r"image_std must hold finite numbers"),
    ("rescale-factor-zero", {"rescale_factor": 0}, RESCALE_FACTOR_NOT_POSITIVE),
    ("resample-unknown-number", {"resample": 99}, r"resample must be a PILImageResampling filter.*got 99"),
    ("resample-name", {"resample": "bicubic"}, r"resample must be a PILImageResampling filter.*got 'bicubic'"),
]
for _name, _settings, _pattern in BAD_PROCESSOR_SETTINGS:
    add(f"processor/{_name}", lambda ctx, s=_settings: ConvNextV2ImageProcessor(**s), _pattern)
add(
    "processor/pil-crop-pct-zero",
    lambda ctx: ConvNextV2ImageProcessorPil(crop_pct=0),
    r"crop_pct must be a number in \(0, 1\]",
)
add(
    "processor/from-dict-crop-pct",
    lambda ctx: ConvNextV2ImageProcessor.from_dict({**ConvNextV2ImageProcessor().to_dict(), "crop_pct": 2.0}),
    r"crop_pct must be a number in \(0, 1\].*got 2.0",
)


def _saved_processor(ctx) -> Path:
    folder = ctx.path("processor")
    tiny_config().save_pretrained(folder)
    ConvNextV2ImageProcessor().save_pretrained(folder)
    return folder


add(
    "processor/from-pretrained-override-std-zero",
    lambda ctx: ConvNextV2ImageProcessor.from_pretrained(_saved_processor(ctx), image_std=0.0),
    IMAGE_STD_NOT_POSITIVE,
)


@case("processor/edited-preprocessor-config-json", error=r"crop_pct must be a number in \(0, 1\].*got -1")
def _edited_processor_json(ctx):
    from transformers import AutoImageProcessor

    folder = _saved_processor(ctx)
    path = folder / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "crop_pct": -1}))
    AutoImageProcessor.from_pretrained(folder)


CALL_SETTINGS = [
    ("call-crop-pct-zero", {"crop_pct": 0}, CROP_PCT_OUT_OF_RANGE),
    ("call-size-zero", {"size": {"shortest_edge": 0}}, r"size\['shortest_edge'\] must be a positive integer"),
    ("call-std-zero-ints", {"image_std": [0, 1, 1]}, IMAGE_STD_NOT_POSITIVE),
    ("call-rescale-factor-negative", {"rescale_factor": -1}, RESCALE_FACTOR_NOT_POSITIVE),
    ("call-resample-unknown", {"resample": 42}, r"resample must be a PILImageResampling filter"),
    ("call-do-rescale-string", {"do_rescale": "yes"}, r"invalid image processor argument: .*do_rescale"),
    ("call-return-tensors-unknown", {"return_tensors": "tf"}, r"tf is not a valid TensorType"),
    ("call-device-unknown", {"device": "tpu"}, r"device must be a torch device such as 'cpu', 'cuda'.*got 'tpu'"),
]
for _name, _settings, _pattern in CALL_SETTINGS:
    for _backend in PROCESSORS:
        add(
            f"processor/{_name}-{_backend}",
            lambda ctx, s=_settings, b=_backend: PROCESSORS[b]()(PIL.Image.new("RGB", (40, 40)), **s),
            _pattern,
        )


@case("processor/call-whole-number-settings")
def _whole_numbers(ctx):
    """crop_pct=1, rescale_factor=1 and integer means are numbers: transformers' float-typed call arguments would
    refuse them with a type error."""
    image = np.full((40, 40, 3), 0.25, np.float32)
    values = processed(image, crop_pct=1, rescale_factor=1, image_mean=[0, 0, 0], image_std=[1, 1, 1])
    again = ConvNextV2ImageProcessor(size={"shortest_edge": 32})(
        image, crop_pct=1, rescale_factor=1, image_mean=[0, 0, 0], image_std=[1, 1, 1], return_tensors="pt"
    )["pixel_values"]
    expect_check(torch.allclose(values, torch.full_like(values, 0.25)) and torch.equal(values, again), "values")


def _grey_16_bit(value: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.full((40, 40), value, np.uint16))


@case("processor/sixteen-bit-pil-scaled")
def _sixteen_bit(ctx):
    """An I;16 image of value 257 * 128 is the 8-bit value 128, not white (PIL's clip) or black."""
    image = _grey_16_bit(257 * 128)
    expect_check(image.mode in ("I;16", "I"), f"mode {image.mode}")
    for backend in PROCESSORS:
        values = processed(image, backend, do_normalize=False)
        expect_check(
            torch.allclose(values, torch.full_like(values, 128 / 255), atol=1e-6), f"{backend}: {values.mean()}"
        )


@case("processor/float-pil-in-unit-range-scaled")
def _float_pil(ctx):
    image = PIL.Image.fromarray(np.full((40, 40), 0.5, np.float32))
    values = processed(image, do_normalize=False)
    expect_check(abs(float(values.mean()) - 128 / 255) < 1e-6, f"{values.mean()}")


@case("processor/float-array-in-unit-range-warns")
def _rescaled_warning(ctx):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        processed(np.full((40, 40, 3), 0.5, np.float32))
    messages = [str(warning.message) for warning in caught]
    expect_check(any("look rescaled already" in message for message in messages), f"{messages}")


@case("processor/uint16-array-scaled")
def _uint16_array(ctx):
    values = processed(np.full((40, 40, 3), 257 * 64, np.uint16), do_normalize=False)
    expect_check(torch.allclose(values, torch.full_like(values, 64 / 255), atol=1e-6), f"{values.mean()}")


@case("processor/grey-2d-array")
def _grey_array(ctx):
    """An (H, W) array is one grey image (the module's documented input), for both backends."""
    for backend in PROCESSORS:
        for image in (np.full((40, 40), 100, np.uint8), torch.full((40, 40), 100, dtype=torch.uint8)):
            values = processed(image, backend, do_normalize=False)
            expect_check(values.shape == (1, 3, 32, 32), f"{backend}: {tuple(values.shape)}")
            expect_check(torch.allclose(values, torch.full_like(values, 100 / 255), atol=1e-6), f"{values.mean()}")


@case("processor/bool-mask-array")
def _bool_array(ctx):
    values = processed(np.ones((40, 40), bool), do_normalize=False)
    expect_check(torch.allclose(values, torch.ones_like(values)), f"{values.mean()}")


@case("processor/encoded-bytes")
def _png_bytes(ctx):
    """The bytes of a PNG file are one image (as ``datasets`` stores undecoded images), not a batch of ints."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (40, 40), (255, 0, 0)).save(buffer, format="PNG")
    values = processed(buffer.getvalue(), do_normalize=False)
    expect_check(values.shape == (1, 3, 32, 32) and float(values[0, 0].mean()) == 1.0, f"{tuple(values.shape)}")


@case("processor/every-pil-mode")
def _pil_modes(ctx):
    """Palette, CMYK, 1-bit, grey+alpha, YCbCr, HSV, RGBA images all become 3 channels of the right value."""
    for mode in ("P", "CMYK", "1", "LA", "YCbCr", "HSV", "RGBA", "L"):
        values = processed(PIL.Image.new(mode, (40, 40)), do_normalize=False)
        expect_check(values.shape == (1, 3, 32, 32) and bool(values.isfinite().all()), f"mode {mode}")


@case("processor/extreme-aspect-and-tiny-images")
def _aspect(ctx):
    for size in ((1, 1), (1, 900), (900, 2)):
        for backend in PROCESSORS:
            values = processed(PIL.Image.new("RGB", size, (10, 20, 30)), backend)
            expect_check(values.shape == (1, 3, 32, 32), f"{size} {backend}: {tuple(values.shape)}")


def _corrupt_png(path: Path) -> Path:
    return truncate(png(path, size=(64, 64), color=(1, 2, 3)), 0.3)


BAD_IMAGES = [
    ("none-in-batch", lambda ctx: [PIL.Image.new("RGB", (40, 40)), None], r"image 1 of 2: is not an image .*got None"),
    ("empty-batch", lambda ctx: [], EMPTY_BATCH_OF_IMAGES),
    ("zero-size-pil", lambda ctx: PIL.Image.new("RGB", (0, 10)), r"image 0 of 1: has no pixels"),
    ("zero-size-array", lambda ctx: np.zeros((0, 10, 3), np.uint8), r"image 0 of 1: has no pixels"),
    ("two-channel-array", lambda ctx: np.zeros((40, 40, 2), np.uint8), r"no channel axis of 1, 3 or 4"),
    ("five-channel-tensor-batch", lambda ctx: torch.zeros(2, 5, 40, 40), r"image 0 of 2: shape \(5, 40, 40\)"),
    ("1d-array", lambda ctx: np.zeros(40, np.uint8), r"is not an image: \(H, W\), \(H, W, C\) or \(C, H, W\)"),
    ("nan-array", lambda ctx: np.full((40, 40, 3), np.nan, np.float32), r"holds NaN or infinite values"),
    ("int-array-above-255", lambda ctx: torch.full((40, 40), 300, dtype=torch.int32), r"must lie in 0..255 .*300"),
    ("negative-int-array", lambda ctx: np.full((40, 40, 3), -1, np.int16), r"must lie in 0..255"),
    ("complex-array", lambda ctx: np.zeros((40, 40, 3), np.complex64), r"dtype complex64 are not an image"),
    (
        "float-pil-negative",
        lambda ctx: PIL.Image.fromarray(np.full((9, 9), -1.0, np.float32)),
        r"mode 'F' values must lie in",
    ),
    (
        "float-pil-nan",
        lambda ctx: PIL.Image.fromarray(np.full((9, 9), np.nan, np.float32)),
        r"mode 'F' image holds NaN",
    ),
    ("missing-path", lambda ctx: [str(ctx.path("nowhere.png"))], r"image 0 of 1: no such image file: .*nowhere.png"),
    ("text-file-path", lambda ctx: [_text_file(ctx)], r"image 0 of 1: cannot open .*notes.png' as an image"),
    (
        "truncated-png-path",
        lambda ctx: [_corrupt_png(ctx.path("cut.png"))],
        r"image 0 of 1: cannot decode the image data",
    ),
    (
        "truncated-png-in-batch",
        lambda ctx: [PIL.Image.new("RGB", (40, 40)), PIL.Image.open(_corrupt_png(ctx.path("cut.png")))],
        r"image 1 of 2: cannot decode the image data",
    ),
    ("garbage-bytes", lambda ctx: b"definitely not a PNG", r"image 0 of 1: cannot read 20 bytes as an image file"),
    ("nested-list", lambda ctx: [[PIL.Image.new("RGB", (40, 40))]], r"image 0 of 1: is not an image .*got list"),
    (
        "dict-example",
        lambda ctx: {"image": PIL.Image.new("RGB", (40, 40))},
        r"image 0 of 1: is not an image .*got dict",
    ),
]


def _text_file(ctx) -> str:
    path = ctx.path("notes.png")
    path.write_text("these are my notes, not a picture")
    return str(path)


for _name, _make, _pattern in BAD_IMAGES:
    for _backend in PROCESSORS:
        add(f"processor/{_name}-{_backend}", lambda ctx, m=_make, b=_backend: processed(m(ctx), b), _pattern)

add(
    "processor/uneven-sizes-without-resize",
    lambda ctx: processed([PIL.Image.new("RGB", (40, 40)), PIL.Image.new("RGB", (50, 40))], do_resize=False),
    r"stack expects each tensor to be equal size",
    dependency="transformers: BatchFeature cannot stack images of different sizes (a ValueError naming it); with "
    "do_resize=False the package passes the sizes through",
)


@case("processor/pil-saved-reloads-as-pil")
def _pil_round_trip(ctx):
    from transformers import AutoImageProcessor

    folder = ctx.path("saved")
    tiny_config().save_pretrained(folder)
    ConvNextV2ImageProcessorPil(size={"shortest_edge": 64}, crop_pct=0.9).save_pretrained(folder)
    loaded = AutoImageProcessor.from_pretrained(folder)
    expect_check(type(loaded) is ConvNextV2ImageProcessorPil and loaded.crop_pct == 0.9, f"{type(loaded).__name__}")


# one image, one set of pixels (issue 18): bounded decoding, and the same pixels through the pipelines


def _bomb_png(ctx) -> Path:
    """The 12000 x 12000 1-bit PNG of 18 KB that took about 1 GB to decode for a 64 px crop."""
    path = ctx.path("bomb.png")
    PIL.Image.new("1", (12000, 12000)).save(path)
    return path


_OVER_LIMIT = r"bomb.png' is 12000 x 12000 = 144,000,000 pixels, over the limit of 89,478,485 pixels"
for _backend in PROCESSORS:
    add(f"processor/decompression-bomb-png-path-{_backend}", lambda ctx, b=_backend: processed(str(_bomb_png(ctx)), b),
        r"image 0 of 1: '.*" + _OVER_LIMIT)  # fmt: skip


@case("processor/decompression-bomb-opened-lazily", error=r"image 0 of 1: '.*" + _OVER_LIMIT)
def _bomb_lazily(ctx):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns at open; the processor must refuse it before decoding
        image = PIL.Image.open(_bomb_png(ctx))
    try:
        processed(image)
    finally:
        expect_check(bool(image.tile), "the pixels were decoded before the size was checked")
        image.close()


def _tiny_classifier_folder(ctx) -> Path:
    folder = ctx.path("classifier")
    saved_classifier(folder)
    ConvNextV2ImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
    return folder


def _pipeline_pixels(task: str, folder: Path, image) -> torch.Tensor:
    from transformers import pipeline

    pipe = pipeline(task, model=str(folder), device="cpu")
    seen = []
    pipe.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["pixel_values"]), with_kwargs=True)
    pipe(image)
    return seen[0]


@case("processor/pipeline-sixteen-bit-png-path")
def _pipeline_sixteen_bit(ctx):
    """transformers' load_image (the stock pipelines' first step) clips a 16-bit PNG to white; ours hands the path to
    the processor, so both pipelines give the processor's pixels."""
    path = ctx.path("scan.png")
    PIL.Image.fromarray(np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (40, 1))).save(path)
    folder = _tiny_classifier_folder(ctx)
    expected = ConvNextV2ImageProcessor(size={"shortest_edge": 32})(str(path), return_tensors="pt")["pixel_values"]
    for task in ("image-classification", "image-feature-extraction"):
        got = _pipeline_pixels(task, folder, str(path))
        expect_check(torch.equal(got, expected), f"{task}: {float((got - expected).abs().max())}")


@case("processor/exif-rotated-photo-upright-everywhere")
def _exif_upright(ctx):
    """A phone JPEG whose EXIF says "turn 90 degrees": the processor (path, PIL image, bytes) and the pipeline all
    see it upright (64 x 96, not 96 x 64)."""
    path = ctx.path("phone.jpg")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    scene = np.random.RandomState(0).randint(0, 256, (64, 96, 3), dtype=np.uint8)
    PIL.Image.fromarray(scene).save(path, exif=exif, quality=95)
    with PIL.Image.open(path) as stored:
        upright = PIL.Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(stored), k=-1)))
    expected = ConvNextV2ImageProcessor(size={"shortest_edge": 32})(upright, return_tensors="pt")["pixel_values"]
    for image in (str(path), PIL.Image.open(path), path.read_bytes()):
        got = processed(image)
        expect_check(torch.equal(got, expected), f"{type(image).__name__}: {float((got - expected).abs().max())}")
    got = _pipeline_pixels("image-classification", _tiny_classifier_folder(ctx), str(path))
    expect_check(torch.equal(got, expected), f"pipeline: {float((got - expected).abs().max())}")


@case("processor/rgba-array-and-image-composited-alike")
def _rgba_alike(ctx):
    """Half-transparent RGBA gives the same pixels as a PIL image, a numpy array and a tensor, in both backends."""
    rgba = np.random.RandomState(0).randint(0, 256, (40, 48, 4), dtype=np.uint8)
    for backend in PROCESSORS:
        as_image = processed(PIL.Image.fromarray(rgba, "RGBA"), backend)
        for array in (rgba, torch.from_numpy(rgba).permute(2, 0, 1)):
            got = processed(array, backend)
            difference = float((got - as_image).abs().max())
            expect_check(torch.equal(got, as_image), f"{backend} {type(array).__name__}: {difference}")


@case("processor/float-arrays-are-their-8-bit-pixels")
def _float_arrays_exact(ctx):
    """Sharp RGBA noise as float32 in 0..255 and as [0, 1] with do_rescale=False: the pixels of the same values as
    uint8, in both backends (resampled as floats they differed by 16 levels; float RGBA above 1 was refused)."""
    rgba = np.random.RandomState(0).randint(0, 256, (40, 48, 4), dtype=np.uint8)
    for backend in PROCESSORS:
        as_uint8 = processed(rgba, backend)
        for floats, settings in ((rgba.astype(np.float32), {}), (rgba / 255.0, {"do_rescale": False})):
            got = processed(floats, backend, **settings)
            difference = float((got - as_uint8).abs().max())
            expect_check(difference < 1e-5, f"{backend} {settings}: {difference}")


# ----------------------------------------------------------------------------------------------------------
# conversion: hostile, truncated and bit-flipped files; dangerous output folders; bad command lines
# ----------------------------------------------------------------------------------------------------------


# the synthetic official checkpoints and the hostile files are those of the conversion tests, from helpers


def converter_cli():
    return load_script("convert_convnextv2_to_hf")


def official_file(path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_official(path, official_dense(CUSTOM, num_classes=10, **options))


def convert_cli(ctx, source: Path, *extra: str, output: str = "out", verify: bool = False):
    """The converter's command line on ``source``; the folder is watched: a failure must leave it as it was."""
    ctx.watch(ctx.root)
    arguments = ["--checkpoint", str(source), "--output-dir", str(ctx.path(output)), *extra]
    return run_cli(converter_cli().main, arguments + ([] if verify else ["--no-verify"]))


def _bad_file(kind: str):
    def run(ctx):
        source = write_bad_input(kind, ctx.path("checkpoint.pt"))
        convert_cli(ctx, source)

    return run


CONVERSION_BAD_FILES = {
    "code-running-pickle": ("code-running pickle", CODE_RUNNING_PICKLE_REFUSED),
    "text-file": ("not a checkpoint", NOT_A_PYTORCH_CHECKPOINT),
    "truncated-file": ("truncated file", r"not a readable PyTorch checkpoint \(truncated"),
    "convnext-v1": ("ConvNeXt V1", r"this is a ConvNeXt V1 checkpoint"),
    "vision-transformer": ("ViT", r"this is a Vision Transformer checkpoint"),
    "missing-tensor": ("missing tensor", MISSING_TENSOR),
    "extra-tensor": ("extra tensor", UNEXPECTED_TENSOR),
    "wrong-shape": ("wrong shape", r"wrong shape: classifier.bias .*\(11,\), expected \(10,\)"),
    "no-state-dict": ("no state dict", r"holds no state dict"),
    "named-atto-but-custom-shapes": (
        "other size than named",
        SHAPES_OF_ANOTHER_SIZE_THAN_NAMED,
    ),
}
for _name, (_kind, _pattern) in CONVERSION_BAD_FILES.items():
    add(f"conversion/{_name}", _bad_file(_kind), _pattern)


def _malformed(kind: str):
    def run(ctx):
        convert_cli(ctx, save_official(ctx.path("bad.pt"), malformed_state(kind)))

    return run


CONVERSION_MALFORMED = {
    "zero-d-tensor": ("0-d tensor", ZERO_D_TENSOR),
    "integer-key": ("integer key", INTEGER_KEY),
    "complex-tensor": ("complex tensor", COMPLEX_TENSOR),
    "nan-tensor": ("NaN", r"tensor 'stages.1.1.pwconv1.weight' holds 1 NaN"),
    "infinite-tensor": ("infinity", r"holds 0 NaN and 1 infinite"),
    "integer-tensor": ("integer tensor", INTEGER_TENSOR),
    "list-not-tensor": ("not a tensor", LIST_NOT_A_TENSOR),
}
for _name, (_kind, _pattern) in CONVERSION_MALFORMED.items():
    add(f"conversion/{_name}", _malformed(_kind), _pattern)


def _hostile(writer: Callable[..., Path], pattern_args=()):
    def run(ctx):
        convert_cli(ctx, writer(ctx.path("hostile.pt"), *pattern_args))

    return run


add(
    "conversion/stride-zero-huge-view",
    _hostile(write_expanded),
    r"declares shape \(100000, 100000\) .*but the file stores only",
)
add(
    "conversion/huge-declared-widths",
    _hostile(write_huge_widths),
    CHECKPOINT_MODEL_TOO_LARGE,
)
add(
    "conversion/lying-pickle-header",
    _hostile(write_lying_header, ("downsample_layers.0.0.weight", (4096, 3, 4, 4))),
    r"declares shape \(4096, 3, 4, 4\)|not a readable PyTorch checkpoint",
)


@case(
    "conversion/block-numbering-gap",
    error=r"blocks of stage 0 must be numbered 0, 1, ...; found blocks 0, 7 \(no block 1\)",
)
def _block_gap(ctx):
    state = official_dense(CUSTOM, num_classes=10)
    state.update(
        {
            key.replace("stages.0.0.", "stages.0.7."): value
            for key, value in state.items()
            if key.startswith("stages.0.0.")
        }
    )
    convert_cli(ctx, save_official(ctx.path("gap.pt"), state))


@case("conversion/empty-state-dict", error=r"holds an empty state dict|holds no state dict")
def _empty_state(ctx):
    torch.save({"model": {}}, ctx.path("empty.pt"))
    convert_cli(ctx, ctx.path("empty.pt"))


@case("conversion/empty-file", error=NOT_A_PYTORCH_CHECKPOINT)
def _empty_file(ctx):
    ctx.path("empty.pt").write_bytes(b"")
    convert_cli(ctx, ctx.path("empty.pt"))


@case("conversion/transformers-state-dict", error=r"already a transformers ConvNeXt V2 state dict")
def _hf_state(ctx):
    torch.save({"model": classifier().state_dict()}, ctx.path("hf.pt"))
    convert_cli(ctx, ctx.path("hf.pt"))


@case("conversion/timm-state-dict", error=r"a timm ConvNeXt state dict")
def _timm_state(ctx):
    import timm

    model = timm.create_model("convnextv2_atto", num_classes=3, depths=[1, 1, 1, 1], dims=[8, 16, 24, 32])
    torch.save(model.state_dict(), ctx.path("timm.pth"))
    convert_cli(ctx, ctx.path("timm.pth"))


@case(
    "conversion/safetensors-given-as-checkpoint", error=r"already a transformers ConvNeXt V2 state dict \(load it with"
)
def _safetensors_source(ctx):
    saved_classifier(ctx.path("model"))
    convert_cli(ctx, ctx.path("model", "model.safetensors"))


add(
    "conversion/folder-given-as-checkpoint",
    lambda ctx: convert_cli(ctx, ctx.root),
    r"neither a file, a URL nor an official",
)
add(
    "conversion/missing-file",
    lambda ctx: convert_cli(ctx, ctx.path("nowhere.pt")),
    r"checkpoint not found: .*nowhere.pt",
)
add(
    "conversion/official-name-offline",
    lambda ctx: convert_cli(ctx, "convnextv2_atto_1k_224_ema", "--cache-dir", str(ctx.path("cache"))),
    r"is not in .*cache and HF_HUB_OFFLINE is set",
)


@case("conversion/pretraining-pred-wrong-size", error=r"'pred' predicts 3000 values per position")
def _bad_pred(ctx):
    encoder = official_dense(CUSTOM, final_norm=False)
    state = official_pretraining(encoder, decoder_width=16, decoder_depth=1)
    state["pred.weight"], state["pred.bias"] = torch.zeros(3000, 16, 1, 1), torch.zeros(3000)
    convert_cli(ctx, save_official(ctx.path("fcmae.pt"), state))


def _pretraining_file(ctx, **stored_args) -> Path:
    import argparse

    encoder = official_dense(CUSTOM, final_norm=False)
    state = official_pretraining(encoder, decoder_width=16, decoder_depth=1)
    return save_official(ctx.path("fcmae.pt"), state, args=argparse.Namespace(**stored_args))


add(
    "conversion/pretraining-args-mask-ratio-zero",
    lambda ctx: convert_cli(ctx, _pretraining_file(ctx, mask_ratio=0.0)),
    r"0 < mask_ratio < 1.*\(from the checkpoint's stored training args \{'mask_ratio': 0.0\}\)",
)
add(
    "conversion/pretraining-args-input-size-off-stride",
    lambda ctx: convert_cli(ctx, _pretraining_file(ctx, input_size=48)),
    r"resolution 48 does not fit this model: images must be a multiple of its total stride 32",
)
add(
    "conversion/resolution-below-stride",
    lambda ctx: convert_cli(ctx, official_file(ctx.path("c.pt")), "--resolution", "16"),
    r"resolution 16 does not fit this model: images must be at least its total stride 32",
)
add(
    "conversion/zero-class-head",
    lambda ctx: convert_cli(
        ctx,
        save_official(
            ctx.path("c.pt"),
            {
                **official_dense(CUSTOM, num_classes=10),
                "head.weight": torch.zeros(0, 48),
                "head.bias": torch.zeros(0),
            },
        ),
    ),
    r"has 2 tensor\(s\) the model has no place for: classifier.weight",
)


@case("conversion/half-precision-checkpoint-converts-and-verifies")
def _half_precision(ctx):
    """fp16 and bf16 files convert to fp32 weights equal to the file's values and verify against timm."""
    state = official_dense(CUSTOM, num_classes=10)
    for dtype in (torch.float16, torch.bfloat16):
        source = save_official(ctx.path(f"{dtype}.pt"), {k: v.to(dtype) for k, v in state.items()})
        output = ctx.path(f"out-{dtype}")
        args = ["--checkpoint", str(source), "--output-dir", str(output), "--verify-image-size", "64"]
        run_cli(converter_cli().main, args)
        head = _load(output).classifier.weight
        expect_check(head.dtype == torch.float32, f"{head.dtype}")
        expect_check(torch.equal(head, state["head.weight"].to(dtype).float()), f"{dtype}: head differs")


@case("conversion/bit-flip-with-sha256", error=r"has SHA-256 [0-9a-f]{64}, not the expected [0-9a-f]{64}")
def _bit_flip_sha(ctx):
    import hashlib

    source = official_file(ctx.path("custom.pt"))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    flip_bit(source, source.stat().st_size // 2)
    convert_cli(ctx, source, "--sha256", digest)


@case("conversion/bit-flip-records-the-file-hash")
def _bit_flip_provenance(ctx):
    """A flipped bit still converts (timm reads the same bytes), but the folder records the hash of what was read."""
    import hashlib

    from convnextv2_hf.conversion import read_conversion_marker

    source = flip_bit(official_file(ctx.path("custom.pt")), 5000)
    convert_cli(ctx, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    marker = read_conversion_marker(ctx.path("out"))
    expect_check(marker["source_sha256"] == digest, f"marker {marker.get('source_sha256')}")
    expect_check(digest in ctx.path("out", "README.md").read_text(), "the card lacks the SHA-256")
    ctx.watched.clear()  # this case writes on purpose


add(
    "conversion/sha256-malformed",
    lambda ctx: convert_cli(ctx, official_file(ctx.path("c.pt")), "--sha256", "abc123"),
    r"argument --sha256: 'abc123' is not a SHA-256",
)
add(
    "conversion/resolution-zero",
    lambda ctx: convert_cli(ctx, official_file(ctx.path("c.pt")), "--resolution", "0"),
    r"argument --resolution: must be positive, got 0",
)
add(
    "conversion/resolution-text",
    lambda ctx: convert_cli(ctx, official_file(ctx.path("c.pt")), "--resolution", "big"),
    r"argument --resolution: 'big' is not an integer",
)
add(
    "conversion/verify-image-size-below-stride",
    lambda ctx: convert_cli(ctx, official_file(ctx.path("c.pt")), "--verify-image-size", "16", verify=True),
    r"verification input must be at least 32 px",
)
add(
    "conversion/model-name-unknown",
    lambda ctx: convert_cli(ctx, official_file(ctx.path("c.pt")), "--model-name", "convnextv2_gigantic"),
    r"unknown model name 'convnextv2_gigantic'",
)
add(
    "conversion/model-name-other-size",
    lambda ctx: convert_cli(ctx, official_file(ctx.path("c.pt")), "--model-name", "femto"),
    r"are those of 'custom', not of the expected model 'femto'",
)
add(
    "conversion/push-without-repo-id",
    lambda ctx: convert_cli(ctx, official_file(ctx.path("c.pt")), "--push-to-hub"),
    r"--push-to-hub needs --repo-id",
)
add(
    "conversion/repo-id-invalid",
    lambda ctx: convert_cli(ctx, official_file(ctx.path("c.pt")), "--repo-id", "my models/convnext v2"),
    r"argument --repo-id: 'my models/convnext v2' is not a Hub repository id",
)
add(
    "conversion/repo-id-three-parts-with-push",
    lambda ctx: convert_cli(ctx, official_file(ctx.path("c.pt")), "--repo-id", "me/models/atto", "--push-to-hub"),
    r"argument --repo-id: 'me/models/atto' is not a Hub repository id",
)
add(
    "conversion/convert-all-namespace-with-slash",
    lambda ctx: convert_all_cli(["--dry-run", "--namespace", "me/models", "--filter", "atto"]),
    r"argument --namespace: 'me/models' is not a Hub namespace",
)


@case("conversion/model-cards-namespace-invalid", error=r"argument --namespace: 'my org' is not a Hub namespace")
def _cards_namespace(ctx):
    ctx.watch(ctx.path("cards"))
    run_cli(
        load_script("generate_model_cards").main,
        ["--output-dir", str(ctx.path("cards")), "--namespace", "my org"],
    )


@case("conversion/model-cards-output-is-a-file", error=r"could not write the model cards into .*cards.txt")
def _cards_file(ctx):
    ctx.path("cards.txt").write_text("x")
    ctx.watch(ctx.root)
    run_cli(load_script("generate_model_cards").main, ["--output-dir", str(ctx.path("cards.txt"))])


add(
    "conversion/missing-checkpoint-argument",
    lambda ctx: (ctx.watch(ctx.root), run_cli(converter_cli().main, ["--output-dir", str(ctx.path("o"))])),
    r"the following arguments are required: --checkpoint",
)
add(
    "conversion/unknown-option",
    lambda ctx: convert_cli(ctx, official_file(ctx.path("c.pt")), "--overwrite-everything"),
    r"unrecognized arguments: --overwrite-everything",
)


@case(
    "conversion/output-dot-overwrite-keeps-every-file",
    error=r"refusing to write the output folder \.: it is .*current directory",
)
def _output_dot(ctx):
    """The reported disaster: ``--output-dir . --overwrite`` in the folder holding the checkpoint and other work."""
    work = ctx.path("work")
    source = official_file(work / "custom.pt")
    (work / "notes.txt").write_text("unrelated work")
    os.chdir(work)
    ctx.watch(ctx.root)
    run_cli(converter_cli().main, ["--checkpoint", "custom.pt", "--output-dir", ".", "--overwrite", "--no-verify"])
    expect_check(source.exists(), "the source was deleted")


@case(
    "conversion/output-empty-string-overwrite",
    error=r"refusing to write the output folder \.: it is the current directory",
)
def _output_empty(ctx):
    """``--output-dir ""`` is the current directory to pathlib."""
    official_file(ctx.path("c.pt"))
    os.chdir(ctx.root)
    ctx.watch(ctx.root)
    run_cli(converter_cli().main, ["--checkpoint", "c.pt", "--output-dir", "", "--overwrite", "--no-verify"])


@case("conversion/output-holds-symlinked-source", error=r"it holds the source checkpoint .*link.pt")
def _symlinked_source(ctx):
    source = official_file(ctx.path("src", "c.pt"))
    ctx.path("link.pt").symlink_to(source)
    convert_cli(ctx, ctx.path("link.pt"), "--overwrite", output="src")


@case("conversion/output-ancestor-of-source-overwrite", error=r"it holds the source checkpoint")
def _output_ancestor(ctx):
    source = official_file(ctx.path("data", "ckpt", "custom.pt"))
    convert_cli(ctx, source, "--overwrite", output="data")


@case("conversion/output-home-overwrite", error=r"it is your home folder")
def _output_home(ctx):
    """$HOME points at a scratch folder here, so a failing check could only ever empty that."""
    home = ctx.path("home")
    official_file(home / "c.pt")
    previous = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        convert_cli(ctx, home / "c.pt", "--overwrite", output="home")
    finally:
        if previous is None:
            os.environ.pop("HOME")
        else:
            os.environ["HOME"] = previous


add(
    "conversion/output-filesystem-root-check",
    lambda ctx: __import__("convnextv2_hf.conversion").conversion.check_output_dir("/", overwrite=True),
    r"it is the filesystem root",
)


@case(
    "conversion/output-foreign-folder-overwrite",
    error=r"refusing to replace .*: it is not empty and no conversion wrote it",
)
def _foreign_folder(ctx):
    (ctx.path("out")).mkdir()
    ctx.path("out", "thesis.tex").write_text("years of work")
    convert_cli(ctx, official_file(ctx.path("c.pt")), "--overwrite")


@case("conversion/output-exists-without-overwrite", error=r"out already exists \(pass --overwrite to replace it\)")
def _exists(ctx):
    ctx.path("out").mkdir()
    ctx.path("out", "x.txt").write_text("x")
    convert_cli(ctx, official_file(ctx.path("c.pt")))


@case("conversion/output-is-a-file", error=OUTPUT_IS_A_FILE)
def _output_file(ctx):
    ctx.path("out").write_text("a file")
    convert_cli(ctx, official_file(ctx.path("c.pt")))


@case("conversion/output-is-a-symlink", error=OUTPUT_IS_A_SYMLINK)
def _output_link(ctx):
    ctx.path("real").mkdir()
    ctx.path("out").symlink_to(ctx.path("real"))
    convert_cli(ctx, official_file(ctx.path("c.pt")), "--overwrite")


@case("conversion/output-under-a-file", error=r"file.txt is a file, not a folder")
def _output_under_file(ctx):
    ctx.path("file.txt").write_text("x")
    convert_cli(ctx, official_file(ctx.path("c.pt")), output="file.txt/out")


@case(
    "conversion/overwrite-converted-folder-with-foreign-file",
    error=r"now also holds files the conversion did not write \(mine.txt\)",
)
def _converted_plus_foreign(ctx):
    source = official_file(ctx.path("c.pt"))
    run_cli(converter_cli().main, ["--checkpoint", str(source), "--output-dir", str(ctx.path("out")), "--no-verify"])
    ctx.path("out", "mine.txt").write_text("mine")
    convert_cli(ctx, source, "--overwrite")


@case("conversion/overwrite-replaces-its-own-folder")
def _overwrite_own(ctx):
    from convnextv2_hf.conversion import read_conversion_marker

    first, second = official_file(ctx.path("a.pt")), official_file(ctx.path("b.pt"), seed=3)
    run_cli(converter_cli().main, ["--checkpoint", str(first), "--output-dir", str(ctx.path("out")), "--no-verify"])
    run_cli(
        converter_cli().main,
        ["--checkpoint", str(second), "--output-dir", str(ctx.path("out")), "--no-verify", "--overwrite"],
    )
    marker = read_conversion_marker(ctx.path("out"))
    leftovers = [p.name for p in ctx.root.iterdir() if p.name.endswith(".partial")]
    expect_check(
        marker["source_path"] == str(second.resolve()) and not leftovers, f"{marker['source_path']} {leftovers}"
    )


@case("conversion/interrupt-while-writing-keeps-previous-output")
def _interrupt(ctx):
    """Ctrl-C while the new folder is being written: no .partial folder, the previous output unchanged."""
    from unittest import mock

    from convnextv2_hf import conversion

    source = official_file(ctx.path("c.pt"))
    conversion.convert_checkpoint(source, ctx.path("out"), verify=False, log=lambda line: None)
    ctx.watch(ctx.root)
    with mock.patch.object(conversion.output.ModelCard, "save", side_effect=KeyboardInterrupt):
        try:
            conversion.convert_checkpoint(source, ctx.path("out"), verify=False, overwrite=True, log=lambda line: None)
        except KeyboardInterrupt:
            pass
        else:
            raise CheckFailed("the interrupt was swallowed")


@case("conversion/disk-full-while-writing", error=DISK_FULL_WHILE_WRITING)
def _disk_full(ctx):
    import errno
    from unittest import mock

    import transformers.modeling_utils

    from convnextv2_hf import conversion

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    source = official_file(ctx.path("c.pt"))
    ctx.watch(ctx.root)
    with mock.patch.object(transformers.modeling_utils, "safe_save_file", full_disk):
        conversion.convert_checkpoint(source, ctx.path("out"), verify=False, log=lambda line: None)


@case("conversion/stale-partial-of-a-killed-run-removed")
def _stale_partial(ctx):
    """A .partial folder whose writer process is gone is removed by the next run; one without a marker stays."""
    import socket

    from convnextv2_hf import conversion

    dead = ctx.path(".out.dead.partial")
    dead.mkdir()
    marker = {"format": "convnextv2-hf conversion", "writer": {"pid": 2**22 + 12345, "host": socket.gethostname()}}
    (dead / conversion.CONVERSION_MARKER).write_text(json.dumps(marker))
    foreign = ctx.path(".out.mine.partial")
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    conversion.convert_checkpoint(official_file(ctx.path("c.pt")), ctx.path("out"), verify=False, log=lambda line: None)
    expect_check(not dead.exists() and (foreign / "keep.txt").exists(), f"{sorted(p.name for p in ctx.root.iterdir())}")


def convert_all_cli(argv: list[str]):
    return run_cli(load_script("convert_all").main, argv)


add(
    "conversion/convert-all-filter-matches-nothing",
    lambda ctx: convert_all_cli(["--filter", "gigantic"]),
    r"no official checkpoint matches --filter \['gigantic'\]",
)


@case("conversion/convert-all-output-root-is-a-file", error=r"--output-root .*root.txt is an existing file")
def _convert_all_root(ctx):
    ctx.path("root.txt").write_text("")
    convert_all_cli(["--output-root", str(ctx.path("root.txt")), "--filter", "atto"])


@case("conversion/convert-all-goes-on-past-failures")
def _convert_all_failures(ctx):
    """Offline with an empty cache every checkpoint fails; the run goes on, prints the table and exits 1."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        status = load_script("convert_all").main(
            ["--output-root", str(ctx.path("converted")), "--filter", "atto", "--cache-dir", str(ctx.path("cache"))]
        )
    text = output.getvalue()
    rows = re.findall(r"^convnextv2_atto_\S+\s+FAILED", text, re.MULTILINE)
    expect_check(status == 1 and len(rows) == 2 and "0 done, 2 failed" in text, f"status {status}: {text[-500:]}")


def export_cli(ctx, model_dir: Path, *extra: str, output: str = "exported"):
    """``python -m convnextv2_hf.export`` in-process; the folder is watched: a refusal must leave it as it was."""
    from convnextv2_hf import export

    ctx.watch(ctx.root)
    return run_cli(export.main, [str(model_dir), str(ctx.path(output)), *extra])


def saved_with_processor(folder: Path, model) -> Path:
    model.save_pretrained(folder)
    ConvNextV2ImageProcessor().save_pretrained(folder)
    return folder


add(
    "conversion/export-fcmae-folder",
    lambda ctx: export_cli(ctx, saved_with_processor(ctx.path("fcmae"), fcmae())),
    r"holds a ConvNextV2ForMaskedImageModeling \(FCMAE pretraining: fine-tune it into a classifier first\)",
)
add(
    "conversion/export-folder-without-processor",
    lambda ctx: export_cli(ctx, saved_classifier(ctx.path("model"))),
    r"model has no preprocessor_config.json: save the image processor",
)
add(
    "conversion/export-unknown-format",
    lambda ctx: export_cli(ctx, saved_with_processor(ctx.path("model"), classifier()), "--format", "tflite"),
    UNKNOWN_EXPORT_FORMAT,
)
add(
    "conversion/export-onnx-bf16",
    lambda ctx: export_cli(
        ctx, saved_with_processor(ctx.path("model"), classifier()), "--format", "onnx", "--precision", "bf16"
    ),
    ONNX_HAS_NO_BF16,
)


@case("conversion/export-output-is-a-file", error=r"the output folder .*exported is an existing file, not a folder")
def _export_output_file(ctx):
    model_dir = saved_with_processor(ctx.path("model"), classifier())
    ctx.path("exported").write_text("a file")
    export_cli(ctx, model_dir)


# ----------------------------------------------------------------------------------------------------------
# training: library plug-ins, image folders, checkpoints, and the example scripts' command lines
# ----------------------------------------------------------------------------------------------------------


def _examples():
    """The example scripts as modules (their ``main(argv)`` runs in-process)."""
    import evaluate_classifier
    import finetune_image_classification
    import pretrain_fcmae

    return pretrain_fcmae, finetune_image_classification, evaluate_classifier


def trainer_argv(ctx, *extra: str) -> list[str]:
    return ["--output_dir", str(ctx.path("out")), "--use_cpu", "--report_to", "none", "--max_steps", "1", *extra]


def pretrain(ctx, *extra: str, parse_only: bool = False):
    """pretrain_fcmae.py on a small image folder; ``out`` is watched (a refused run must not create it)."""
    data = image_folder(ctx.path("data"))
    argv = trainer_argv(ctx, "--train_dir", str(data / "train"), "--per_device_train_batch_size", "2", *extra)
    ctx.watch(ctx.path("out"))
    module = _examples()[0]
    return module.parse_arguments(argv) if parse_only else run_cli(module.main, argv)


def finetune(ctx, *extra: str, parse_only: bool = False, data: str = "split"):
    folder = image_folder(ctx.path("data"), splits=("train", "validation") if data == "split" else ("",), per_class=4)
    argv = trainer_argv(
        ctx, "--train_dir" if data == "flat" else "--data_dir", str(folder), "--image_size", "32", *extra
    )
    ctx.watch(ctx.path("out"))
    module = _examples()[1]
    return module.parse_arguments(argv) if parse_only else run_cli(module.main, argv)


PRETRAIN_ARGUMENTS = [
    ("pretrain-mask-ratio-zero", ["--mask_ratio", "0"], r"0 < mask_ratio < 1.*mask_ratio=0"),
    ("pretrain-mask-ratio-above-one", ["--mask_ratio", "1.5"], MASK_RATIO_OUT_OF_RANGE),
    ("pretrain-fcmae-impl-unknown", ["--fcmae_impl", "bogus"], r"fcmae_impl must be one of"),
    ("pretrain-model-size-typo", ["--model_size", "attto"], r"unknown model size 'attto'"),
    (
        "pretrain-image-size-not-multiple",
        ["--image_size", "48"],
        r"image size 48x48 is not a multiple of mask_patch_size=32",
    ),
    ("pretrain-image-size-text", ["--image_size", "big"], r"argument --image_size.*invalid int value: 'big'"),
    ("pretrain-recipe-unknown", ["--recipe", "fcmae-9000"], r"unknown recipe 'fcmae-9000'"),
    ("pretrain-streaming-without-max-steps", ["--streaming", "--max_steps", "-1"], STREAMING_NEEDS_MAX_STEPS),
    (
        "pretrain-validation-fraction-one",
        ["--validation_split_fraction", "1.0"],
        r"validation_split_fraction must be in \(0, 1\)",
    ),
    ("pretrain-unknown-flag", ["--mask_ration", "0.5"], r"unrecognized arguments|mask_ration"),
]
for _name, _extra, _pattern in PRETRAIN_ARGUMENTS:
    add(f"training/{_name}", lambda ctx, e=_extra: pretrain(ctx, *e), _pattern)
add(
    "training/pretrain-train-dir-missing",
    lambda ctx: (
        ctx.watch(ctx.path("out")),
        run_cli(_examples()[0].main, trainer_argv(ctx, "--train_dir", str(ctx.path("nowhere")))),
    ),
    r"image folder '.*nowhere' does not exist",
)
add(
    "training/pretrain-one-patch-images",
    lambda ctx: pretrain(ctx, "--image_size", "32"),
    r"mask_ratio=0.6 keeps no patch of the 1 patches",
)
add(
    "training/pretrain-resume-from-missing-checkpoint",
    lambda ctx: pretrain(ctx, "--image_size", "64", "--resume_from_checkpoint", str(ctx.path("no-checkpoint"))),
    r"no-checkpoint: not a Trainer checkpoint \(no trainer_state.json there\)",
)
add(
    "training/finetune-resume-from-truncated-checkpoint",
    lambda ctx: finetune(ctx, "--resume_from_checkpoint", str(_truncated_checkpoint(ctx))),
    r"checkpoint-3/model.safetensors is not a complete safetensors file",
)
add(
    "training/finetune-resume-last-without-checkpoints",
    lambda ctx: finetune(ctx, "--resume_from_checkpoint", "last"),
    r"--resume_from_checkpoint last: no checkpoint-\* folder",
)

FINETUNE_ARGUMENTS = [
    ("finetune-layer-decay-two", ["--layer_decay", "2"], r"layer_decay must be in \(0, 1\], got 2"),
    ("finetune-layer-decay-zero", ["--layer_decay", "0"], LAYER_DECAY_OUT_OF_RANGE),
    ("finetune-layer-decay-type", ["--layer_decay_type", "blocks"], LAYER_DECAY_TYPE_UNKNOWN),
    ("finetune-drop-path-one", ["--drop_path_rate", "1"], r"drop_path_rate must be in \[0, 1\), got 1"),
    ("finetune-ema-decay-one", ["--ema_decay", "1"], EMA_DECAY_ARGUMENT_OUT_OF_RANGE),
    ("finetune-label-smoothing-one", ["--label_smoothing", "1"], LABEL_SMOOTHING_OUT_OF_RANGE),
    ("finetune-mixup-negative", ["--mixup", "-1"], r"mixup and cutmix alphas must be >= 0"),
    ("finetune-random-erasing-two", ["--random_erasing", "2"], r"random_erasing must be in \[0, 1\]"),
    ("finetune-min-lr-without-cosine", ["--min_lr", "5"], r"--min_lr needs --lr_scheduler_type cosine_with_min_lr"),
    ("finetune-recipe-unknown", ["--recipe", "small"], UNKNOWN_RECIPE),
    ("finetune-image-column-unknown", ["--image_column", "img"], r"has no 'img' column"),
    ("finetune-image-size-zero", ["--image_size", "0"], r"image_size must be >= 32, got 0"),
    ("finetune-model-size-typo", ["--model_size", "tinyy"], r"unknown model size 'tinyy'"),
    (
        "finetune-two-data-sources",
        ["--dataset_name", "x"],
        r"give exactly one of --train_dir, --data_dir and --dataset_name",
    ),
    ("finetune-layer-decay-text", ["--layer_decay", "high"], r"argument --layer_decay.*invalid float value: 'high'"),
]
for _name, _extra, _pattern in FINETUNE_ARGUMENTS:
    add(f"training/{_name}", lambda ctx, e=_extra: finetune(ctx, *e), _pattern)
add(
    "training/finetune-validation-fraction-above-one",
    lambda ctx: finetune(ctx, "--validation_fraction", "1.5", data="flat"),
    VALIDATION_FRACTION_OUT_OF_RANGE,
)
add(
    "training/finetune-dataset-name-missing",
    lambda ctx: (
        ctx.watch(ctx.path("out")),
        run_cli(_examples()[1].main, trainer_argv(ctx, "--dataset_name", str(ctx.path("no-dataset")))),
    ),
    r"Couldn't find any data file at .*no-dataset",
    outcome="unclear error",
    dependency="datasets: load_dataset of a path that does not exist is a FileNotFoundError naming it, raised before "
    "anything is written; the scripts pass --dataset_name on unchecked",
)
add(
    "training/finetune-data-dir-without-images",
    lambda ctx: (ctx.path("empty", "train", "a").mkdir(parents=True), ctx.watch(ctx.path("out")),
                 run_cli(_examples()[1].main, trainer_argv(ctx, "--data_dir", str(ctx.path("empty"))))),
    FOLDER_HOLDS_NO_IMAGES,
)  # fmt: skip

add(
    "training/finetune-learning-rate-negative",
    lambda ctx: finetune(ctx, "--learning_rate", "-1", parse_only=True),
    r"learning_rate must be (positive|> 0)",
)
add(
    "training/finetune-base-learning-rate-negative",
    lambda ctx: finetune(ctx, "--base_learning_rate", "-1", parse_only=True),
    r"base_learning_rate must be (positive|> 0)",
)
add(
    "training/finetune-batch-size-zero",
    lambda ctx: finetune(ctx, "--per_device_train_batch_size", "0", parse_only=True),
    r"per_device_train_batch_size must be",
)
add(
    "training/finetune-head-init-std-negative",
    lambda ctx: finetune(ctx, "--head_init_std", "-1", parse_only=True),
    r"head_init_std must be (positive|> 0)",
)
add(
    "training/pretrain-learning-rate-negative",
    lambda ctx: pretrain(ctx, "--image_size", "64", "--learning_rate", "-0.0001"),
    r"learning_rate must be > 0, got -0.0001",
)
add(
    "training/pretrain-gradient-accumulation-zero",
    lambda ctx: pretrain(ctx, "--image_size", "64", "--gradient_accumulation_steps", "0"),
    r"gradient_accumulation_steps must be >= 1, got 0",
)


@case("training/pretrain-one-patch-images-from-a-model-folder", error=r"keeps no patch of the 1 patches")
def _one_patch_model_folder(ctx):
    """The image size is checked against a loaded model's patch size and mask ratio before the Trainer starts."""
    fcmae().save_pretrained(ctx.path("model"))
    pretrain(ctx, "--image_size", "32", "--model_name_or_path", str(ctx.path("model")))


def finetune_separate_folders(ctx, validation_classes: tuple[str, ...]):
    """finetune_image_classification.py with --train_dir (classes a, b) and its own --validation_dir."""
    train = image_folder(ctx.path("train"), splits=("",), per_class=4)
    validation = image_folder(ctx.path("validation"), classes=validation_classes, splits=("",))
    ctx.watch(ctx.path("out"))
    argv = trainer_argv(ctx, "--train_dir", str(train), "--validation_dir", str(validation), "--image_size", "32")
    return run_cli(_examples()[1].main, argv)


add(
    "training/finetune-validation-dir-of-one-class",
    lambda ctx: finetune_separate_folders(ctx, ("b",)),
    r"the validation classes \['b'\] are not the training classes \['a', 'b'\]",
)
add(
    "training/finetune-validation-dir-other-classes",
    lambda ctx: finetune_separate_folders(ctx, ("a", "c")),
    r"the validation classes \['a', 'c'\] are not the training classes \['a', 'b'\]",
)


def segmentation_cli(ctx, *extra: str):
    """finetune_semantic_segmentation.py; ``out`` is watched."""
    import finetune_semantic_segmentation

    ctx.watch(ctx.path("out"))
    argv = trainer_argv(ctx, "--train_dir", str(ctx.path("nowhere")), "--num_labels", "2", *extra)
    return run_cli(finetune_semantic_segmentation.main, argv)


add(
    "training/segmentation-learning-rate-negative",
    lambda ctx: segmentation_cli(ctx, "--learning_rate", "-1"),
    r"learning_rate must be > 0, got -1",
)
add(
    "training/segmentation-batch-size-zero",
    lambda ctx: segmentation_cli(ctx, "--per_device_train_batch_size", "0"),
    r"per_device_train_batch_size must be >= 1, got 0",
)


def _train_transform(image):
    return torch.zeros(3, 8, 8)


@case("training/corrupt-image-in-training-folder", error=r"cannot read image .*b/1.png: .*--skip_corrupt_images")
def _corrupt_training_image(ctx):
    from convnextv2_hf.transforms import image_folder_dataset

    data = image_folder(ctx.path("data"), splits=("",))
    truncate(ctx.path("data", "b", "1.png"), 0.3)
    dataset = image_folder_dataset(data, _train_transform)["train"]
    [dataset[index] for index in range(len(dataset))]


@case("training/corrupt-image-skipped-when-asked")
def _skip_corrupt(ctx):
    from convnextv2_hf.transforms import image_folder_dataset

    data = image_folder(ctx.path("data"), splits=("",))
    ctx.path("data", "a", "0.png").write_text("not a picture")
    dataset = image_folder_dataset(data, _train_transform, skip_corrupt_images=True)["train"]
    logger = logging.getLogger("convnextv2_hf.transforms")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        values = [dataset[index]["pixel_values"] for index in range(len(dataset))]
    finally:
        logger.removeHandler(handler)
    expect_check(sum(v is None for v in values) == 1 and len(values) == 4, f"{[v is None for v in values]}")
    expect_check(any("a/0.png" in message for message in records), f"no warning naming the file: {records}")


@case("training/skip-corrupt-images-without-a-transform", error=r"skip_corrupt_images=True needs a transform")
def _skip_without_transform(ctx):
    from convnextv2_hf.transforms import image_folder_dataset

    # without a transform nothing would skip: the image feature raises on the file when it is read
    image_folder_dataset(image_folder(ctx.path("data"), splits=("",)), skip_corrupt_images=True)


@case("training/streamed-image-folder-with-a-transform", error=r"no transform is applied to here")
def _streamed_with_transform(ctx):
    from convnextv2_hf.transforms import image_folder_dataset

    image_folder_dataset(image_folder(ctx.path("data"), splits=("",)), _train_transform, streaming=True)


add(
    "training/image-folder-missing",
    lambda ctx: __import__("convnextv2_hf.transforms").transforms.image_folder_dataset(ctx.path("x")),
    r"image folder '.*x' does not exist",
)


@case("training/image-folder-without-images", error=r"holds no images \(.png")
def _no_images(ctx):
    from convnextv2_hf.transforms import image_folder_dataset

    ctx.path("docs", "a").mkdir(parents=True)
    ctx.path("docs", "a", "readme.txt").write_text("x")
    image_folder_dataset(ctx.path("docs"))


@case("training/image-column-unknown", error=r"image column 'img' not in the dataset's columns")
def _image_column(ctx):
    from convnextv2_hf.transforms import image_folder_dataset, with_image_transform

    with_image_transform(
        image_folder_dataset(image_folder(ctx.path("d"), splits=("",)))["train"], _train_transform, "img"
    )


add(
    "training/fcmae-collator-size-not-multiple",
    lambda ctx: __import__("convnextv2_hf.training").training.FCMAECollator(tiny_config(), 48),
    r"image size 48x48 is not a multiple of mask_patch_size=32",
)


@case("training/fcmae-collator-every-image-skipped", error=EVERY_IMAGE_OF_BATCH_SKIPPED)
def _all_skipped(ctx):
    from convnextv2_hf.training import FCMAECollator

    FCMAECollator(tiny_config(), 64)([{"pixel_values": None}, {"pixel_values": None}])


@case("training/fcmae-collator-seed-without-index", error=r"derives masks from each example's 'index'")
def _no_index(ctx):
    from convnextv2_hf.training import FCMAECollator

    FCMAECollator(tiny_config(), 64, seed=0)([{"pixel_values": torch.zeros(3, 64, 64)}])


@case("training/fcmae-loss-labels-other-mask", error=r"labels count \d+ removed patches but the model removed \d+")
def _loss_mismatch(ctx):
    from convnextv2_hf.training import fcmae_loss

    outputs = fcmae()(pixels(), noise=torch.rand(2, 4, generator=torch.Generator().manual_seed(0)))
    fcmae_loss(outputs, labels=torch.ones(2, 4, dtype=torch.long), num_items_in_batch=8)


add(
    "training/mixup-one-label",
    lambda ctx: __import__("convnextv2_hf.transforms").transforms.MixUpCutMixCollator(num_labels=1),
    r"MixUp/CutMix needs at least 2 labels",
)
add(
    "training/mixup-label-smoothing-one",
    lambda ctx: __import__("convnextv2_hf.transforms").transforms.MixUpCutMixCollator(5, label_smoothing=1.0),
    LABEL_SMOOTHING_OUT_OF_RANGE,
)


@case("training/mixup-every-image-skipped", error=r"every image of this batch of 1 was skipped")
def _mix_skipped(ctx):
    from convnextv2_hf.transforms import MixUpCutMixCollator

    MixUpCutMixCollator(5)([{"pixel_values": None, "labels": 1, "mixable": True}])


@case("training/layer-decay-two", error=r"layer_decay must be in \(0, 1\], got layer_decay=2")
def _layer_decay(ctx):
    from convnextv2_hf.training import layer_decay_param_groups

    layer_decay_param_groups(classifier(), 0.05, 2.0)


@case("training/layer-decay-no-encoder", error=r"ConvNeXt V2 encoder")
def _no_encoder(ctx):
    from convnextv2_hf.training import layer_decay_param_groups

    layer_decay_param_groups(torch.nn.Linear(3, 3), 0.05, 0.9)


@case("training/layer-decay-group-type-on-custom-depths", error=r"layer_decay_type='group' is defined for 4 stages")
def _group_type(ctx):
    from convnextv2_hf.training import layer_decay_param_groups

    layer_decay_param_groups(
        classifier(depths=[1, 1], hidden_sizes=[8, 16], num_stages=2, mask_patch_size=8), 0.05, 0.9, "group"
    )


add(
    "training/ema-decay-one",
    lambda ctx: __import__("convnextv2_hf.training").training.EMACallback(1.0),
    r"EMA decay must be in \(0, 1\), got 1.0",
)
add(
    "training/ema-decay-zero",
    lambda ctx: __import__("convnextv2_hf.training").training.EMACallback(0.0),
    EMA_DECAY_OUT_OF_RANGE,
)


def _ema_file(ctx, model=None) -> Path:
    from convnextv2_hf.training import EMACallback

    callback = EMACallback(0.9)
    callback._build(model or classifier())
    callback.save(ctx.path("ema_model.safetensors"), global_step=3)
    return ctx.path("ema_model.safetensors")


def _load_ema(path: Path, model=None, step=None):
    from convnextv2_hf.training import EMACallback

    callback = EMACallback(0.9)
    callback._build(model or classifier())
    callback.load(path, expected_step=step)


add(
    "training/ema-file-truncated",
    lambda ctx: _load_ema(truncate(_ema_file(ctx))),
    r"cannot read the EMA weights .*ema_model.safetensors: .*truncated",
)
add(
    "training/ema-file-bit-flipped-header",
    lambda ctx: _load_ema(flip_bit(_ema_file(ctx), _ema_file(ctx).stat().st_size - 20)),
    r"cannot read the EMA weights .*ema_model.safetensors",
)
add("training/ema-file-other-step", lambda ctx: _load_ema(_ema_file(ctx), step=5), r"saved at step 3, not at step 5")
add(
    "training/ema-file-other-model",
    lambda ctx: _load_ema(_ema_file(ctx), model=classifier(num_labels=7)),
    r"the EMA weights .* do not fit this model",
)


@case("training/ema-file-from-another-tool", error=r"holds no 'n_averaged' entry")
def _foreign_ema(ctx):
    from safetensors.torch import save_file

    save_file(classifier().state_dict(), str(ctx.path("ema_model.safetensors")))
    _load_ema(ctx.path("ema_model.safetensors"))


def _checkpoint_folder(ctx, name: str = "checkpoint-3", model=None) -> Path:
    """A checkpoint as the Trainer writes it: weights, trainer state, optimizer, scheduler and RNG states."""
    folder = ctx.path("out", name)
    (model or classifier()).save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    for state_file in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({}, folder / state_file)
    return folder


def _truncated_checkpoint(ctx) -> Path:
    folder = saved_classifier(ctx.path("old-run", "checkpoint-3"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    truncate(folder / "model.safetensors")
    return folder


def _resume(ctx, value) -> str | None:
    from transformers import TrainingArguments

    from convnextv2_hf.training import resume_checkpoint

    args = TrainingArguments(output_dir=str(ctx.path("out")), resume_from_checkpoint=value, report_to="none")
    return resume_checkpoint(args)


add(
    "training/resume-missing-folder",
    lambda ctx: _resume(ctx, str(ctx.path("nowhere"))),
    r"nowhere: not a Trainer checkpoint \(no trainer_state.json",
)
add(
    "training/resume-last-without-checkpoints",
    lambda ctx: _resume(ctx, "last"),
    r"--resume_from_checkpoint last: no checkpoint-\* folder",
)


@case(
    "training/resume-truncated-model-safetensors",
    error=r"checkpoint-3/model.safetensors is not a complete safetensors file",
)
def _resume_truncated(ctx):
    truncate(_checkpoint_folder(ctx) / "model.safetensors")
    _resume(ctx, "true")


@case(
    "training/resume-truncated-ema-safetensors",
    error=r"checkpoint-3/ema_model.safetensors is not a complete safetensors file",
)
def _resume_truncated_ema(ctx):
    folder = _checkpoint_folder(ctx)
    truncate(_ema_file(ctx)).rename(folder / "ema_model.safetensors")
    _resume(ctx, str(folder))


@case("training/resume-picks-the-newest-checkpoint")
def _resume_newest(ctx):
    _checkpoint_folder(ctx, "checkpoint-3")
    newest = _checkpoint_folder(ctx, "checkpoint-10")
    expect_check(_resume(ctx, "True") == str(newest), "not the newest checkpoint")


def evaluate(ctx, *extra: str, model_kind: str = "classifier", data: Path | None = None):
    """evaluate_classifier.py with a two-class model (a, b) and its processor."""
    from convnextv2_hf import ConvNextV2ImageProcessor as Processor

    model = ctx.path("model")
    if model_kind == "classifier":
        saved_classifier(model, num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    else:
        fcmae().save_pretrained(model)
    Processor(size={"shortest_edge": 32}).save_pretrained(model)
    data = image_folder(ctx.path("data")) / "validation" if data is None else data
    return run_cli(_examples()[2].main, ["--model_name_or_path", str(model), "--data_dir", str(data), *extra])


@case("training/evaluate-folder-without-class-folders", error=IMAGES_NOT_IN_CLASS_FOLDERS)
def _flat(ctx):
    for index in range(2):
        png(ctx.path("flat", f"{index}.png"))
    evaluate(ctx, data=ctx.path("flat"))


add(
    "training/evaluate-split-missing",
    lambda ctx: evaluate(ctx, "--split", "test", data=image_folder(ctx.path("d"))),
    r"has no 'test' split; its splits are \['train', 'validation'\]",
)
add(
    "training/evaluate-split-on-a-class-folder",
    lambda ctx: evaluate(ctx, "--split", "validation"),
    r"--split validation: .* has no split sub-folders",
)
add(
    "training/evaluate-data-dir-missing",
    lambda ctx: evaluate(ctx, data=ctx.path("nowhere")),
    r"--data_dir '.*nowhere' is not a folder",
)
add(
    "training/evaluate-unknown-class-folder",
    lambda ctx: evaluate(ctx, data=image_folder(ctx.path("d"), classes=("a", "cat"), splits=("",))),
    r"classes \['cat'\] are not labels of the model",
)
add(
    "training/evaluate-image-size-below-stride",
    lambda ctx: evaluate(ctx, "--image_size", "16"),
    r"height and width must be at least 32",
)


@case(
    "training/evaluate-truncated-model-safetensors", error=r"model/model.safetensors is not a complete safetensors file"
)
def _eval_truncated(ctx):
    from convnextv2_hf import ConvNextV2ImageProcessor as Processor

    model = saved_classifier(ctx.path("model"), num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    Processor(size={"shortest_edge": 32}).save_pretrained(model)
    truncate(model / "model.safetensors")
    data = image_folder(ctx.path("data")) / "validation"
    run_cli(_examples()[2].main, ["--model_name_or_path", str(model), "--data_dir", str(data)])


add(
    "training/evaluate-batch-size-zero",
    lambda ctx: evaluate(ctx, "--batch_size", "0"),
    r"batch_size must be",
)
add(
    "training/evaluate-batch-size-negative",
    lambda ctx: evaluate(ctx, "--batch_size", "-1"),
    r"batch_size must be",
)
add(
    "training/evaluate-corrupt-image",
    lambda ctx: evaluate(ctx, data=_folder_with_corrupt_image(ctx)),
    r"b/1.png",
)
add(
    "training/evaluate-text-file-as-image",
    lambda ctx: evaluate(ctx, data=_folder_with_text_image(ctx)),
    r"cannot read image .*b/0.png",
)


@case(
    "training/evaluate-one-class-folder",
)
def _one_class(ctx):
    data = image_folder(ctx.path("one"), classes=("b",), splits=("",))
    results = evaluate(ctx, data=data)
    expect_check(results["num_images"] == 2, f"{results}")


add(
    "training/evaluate-model-folder-missing",
    lambda ctx: run_cli(
        _examples()[2].main,
        [
            "--model_name_or_path",
            str(ctx.path("no-model")),
            "--data_dir",
            str(image_folder(ctx.path("d")) / "validation"),
        ],
    ),
    r"no-model' does not exist \(a local path",
)
add(
    "training/evaluate-model-without-processor",
    lambda ctx: run_cli(
        _examples()[2].main,
        [
            "--model_name_or_path",
            str(saved_classifier(ctx.path("m"), num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})),
            "--data_dir",
            str(image_folder(ctx.path("d")) / "validation"),
        ],
    ),
    r"preprocessor_config.json|--image_size",
)
add(
    "training/evaluate-device-unknown",
    lambda ctx: evaluate(ctx, "--device", "tpu"),
    r"--device|tpu",
)
add(
    "training/evaluate-fcmae-model-as-classifier",
    lambda ctx: evaluate(ctx, model_kind="fcmae", data=image_folder(ctx.path("d"), splits=("",))),
    r"classes \['a', 'b'\] are not labels of the model",
)


def _folder_with_corrupt_image(ctx) -> Path:
    data = image_folder(ctx.path("bad"), splits=("",))
    truncate(png(data / "b" / "1.png", size=(64, 64)), 0.3)
    return data


def _folder_with_text_image(ctx) -> Path:
    data = image_folder(ctx.path("bad"), splits=("",))
    (data / "b" / "0.png").write_text("hello")
    return data


# --- issue 17: non-finite training, numeric flags, all-or-nothing resume, data kept apart from outputs --------

NUMERIC_FLAGS = [
    ("pretrain", "learning-rate-inf", ["--learning_rate", "inf"], LEARNING_RATE_NOT_FINITE),
    ("pretrain", "weight-decay-nan", ["--weight_decay", "nan"], r"weight_decay must be a finite number, got nan"),
    ("pretrain", "warmup-epochs-negative", ["--warmup_epochs", "-1"], r"warmup_epochs must be >= 0, got -1"),
    ("pretrain", "image-size-negative", ["--image_size", "-64"], r"image_size must be >= 1, got -64"),
    ("pretrain", "reconstruction-every-negative", ["--reconstruction_every", "-1"], r"reconstruction_every must be"),
    ("pretrain", "adam-beta2-one", ["--adam_beta2", "1"], r"adam_beta2 must be in \[0, 1\), got 1"),
    ("finetune", "weight-decay-nan", ["--weight_decay", "nan"], r"weight_decay must be a finite number, got nan"),
    ("finetune", "learning-rate-inf", ["--learning_rate", "inf"], LEARNING_RATE_NOT_FINITE),
    ("finetune", "max-grad-norm-negative", ["--max_grad_norm", "-1"], r"max_grad_norm must be >= 0, got -1"),
    ("finetune", "warmup-steps-nan", ["--warmup_steps", "nan"], r"warmup_steps must be a finite number, got nan"),
    ("finetune", "epochs-inf", ["--num_train_epochs", "inf"], r"num_train_epochs must be a finite number, got inf"),
    ("finetune", "mixup-nan", ["--mixup", "nan"], r"mixup must be a finite number, got nan"),
    ("finetune", "ema-decay-nan", ["--ema_decay", "nan"], r"ema_decay must be a finite number, got nan"),
    ("finetune", "layer-decay-inf", ["--layer_decay", "inf"], r"layer_decay must be a finite number, got inf"),
    ("finetune", "validation-fraction-zero", ["--validation_fraction", "0"], r"validation_fraction must be in"),
    ("finetune", "rand-augment-magnitude-31", ["--rand_augment_magnitude", "31"], r"rand_augment_magnitude must be in"),
    ("finetune", "label-smoothing-factor-one", ["--label_smoothing_factor", "1"], r"label_smoothing_factor must be in"),
]
for _script, _name, _extra, _pattern in NUMERIC_FLAGS:
    _run = pretrain if _script == "pretrain" else finetune
    add(f"training/{_script}-{_name}", lambda ctx, e=_extra, r=_run: r(ctx, *e, parse_only=True), _pattern)
add(
    "training/segmentation-auxiliary-loss-weight-inf",
    lambda ctx: segmentation_cli(ctx, "--auxiliary_loss_weight", "inf"),
    r"auxiliary_loss_weight must be a finite number, got inf",
)


def _no_non_finite_weights_under(folder: Path) -> None:
    from safetensors.torch import load_file

    for path in sorted(folder.rglob("*.safetensors")):
        bad = [name for name, tensor in load_file(path).items() if not torch.isfinite(tensor).all()]
        expect_check(not bad, f"{path} holds non-finite weights {bad[:3]}")


def _guarded_run(ctx, dataset, learning_rate: float, ema: bool) -> None:
    """A real Trainer with StopOnNonFiniteCallback (and EMA), a checkpoint every step; whatever it raises is
    re-raised after checking that nothing non-finite reached the disk."""
    from transformers import Trainer, TrainingArguments

    from convnextv2_hf.training import EMACallback, StopOnNonFiniteCallback

    args = TrainingArguments(output_dir=str(ctx.path("out")), per_device_train_batch_size=2, max_steps=8,
                             learning_rate=learning_rate, use_cpu=True, report_to="none", save_steps=1,
                             logging_steps=5, remove_unused_columns=False, disable_tqdm=True)  # fmt: skip
    callbacks = [StopOnNonFiniteCallback()] + ([EMACallback(0.5)] if ema else [])
    torch.manual_seed(0)
    run = Trainer(model=classifier().train(), args=args, train_dataset=dataset, callbacks=callbacks)
    try:
        run.train()
    finally:
        _no_non_finite_weights_under(ctx.path("out"))


def _labelled(nan_at: int | None = None) -> list[dict]:
    images = pixels(16, 64)
    if nan_at is not None:
        images[nan_at, 0, 3, 3] = float("nan")
    return [{"pixel_values": images[i], "labels": torch.tensor(i % 5)} for i in range(16)]


add(
    "training/diverging-learning-rate-stops-the-run",
    lambda ctx: _guarded_run(ctx, _labelled(), 1e6, ema=False),
    r"training stopped at step \d+: the (loss is (nan|inf)|gradient norm is)",
)
add(
    "training/one-nan-sample-with-ema-stops-the-run",
    lambda ctx: _guarded_run(ctx, _labelled(nan_at=5), 1e-3, ema=True),
    r"training stopped at step \d+: the loss is nan",
)


@case("training/finetune-script-diverges", error=TRAINING_STOPPED_NON_FINITE)
def _script_diverges(ctx):
    data = image_folder(ctx.path("data"), per_class=4)
    argv = trainer_argv(ctx, "--data_dir", str(data), "--image_size", "32", "--learning_rate", "1e5",
                        "--lr_scheduler_type", "constant", "--save_steps", "1", "--max_steps", "5")  # fmt: skip
    try:
        run_cli(_examples()[1].main, argv)
    finally:
        _no_non_finite_weights_under(ctx.path("out"))


@case("training/ema-save-non-finite", error=r"EMA weights to save to .*'classifier.bias'")
def _ema_non_finite(ctx):
    from convnextv2_hf.training import EMACallback

    ctx.watch(ctx.path("ema_model.safetensors"))
    callback = EMACallback(0.9)
    callback._build(classifier())
    with torch.no_grad():
        callback.ema.module.classifier.bias[1] = float("nan")
    callback.save(ctx.path("ema_model.safetensors"), global_step=3)


def _damaged_checkpoint(ctx, damage: Callable[[Path], object], value: str | None = None, **options) -> str | None:
    folder = _checkpoint_folder(ctx)
    damage(folder)
    from transformers import TrainingArguments

    from convnextv2_hf.training import resume_checkpoint

    args = TrainingArguments(output_dir=str(ctx.path("out")), resume_from_checkpoint=value or str(folder),
                             report_to="none")  # fmt: skip
    return resume_checkpoint(args, **options)


add(
    "training/resume-optimizer-missing",
    lambda ctx: _damaged_checkpoint(ctx, lambda f: (f / "optimizer.pt").unlink()),
    r"checkpoint-3/optimizer.pt is missing; --allow_fresh_optimizer resumes without it",
)
add(
    "training/resume-scheduler-missing-last",
    lambda ctx: _damaged_checkpoint(ctx, lambda f: (f / "scheduler.pt").unlink(), "last"),
    r"checkpoint-3/scheduler.pt is missing",
)
add(
    "training/resume-scheduler-truncated",
    lambda ctx: _damaged_checkpoint(ctx, lambda f: truncate(f / "scheduler.pt")),
    r"checkpoint-3/scheduler.pt is unreadable \(is it truncated\?\)",
)
add(
    "training/resume-rng-state-missing",
    lambda ctx: _damaged_checkpoint(ctx, lambda f: (f / "rng_state.pth").unlink()),
    r"checkpoint-3/rng_state.pth is missing \(this run has 1 process",
)
add(
    "training/resume-trainer-state-truncated",
    lambda ctx: _damaged_checkpoint(ctx, lambda f: truncate(f / "trainer_state.json")),
    r"checkpoint-3/trainer_state.json is unreadable or not a trainer state",
)
add(
    "training/resume-ema-missing-with-ema-on",
    lambda ctx: _damaged_checkpoint(ctx, lambda f: None, ema=True),
    r"checkpoint-3/ema_model.safetensors is missing \(EMA is on",
)


@case("training/resume-fresh-optimizer-when-allowed")
def _fresh_allowed(ctx):
    folder = _damaged_checkpoint(ctx, lambda f: (f / "optimizer.pt").unlink(), allow_fresh_optimizer=True)
    expect_check(folder == str(ctx.path("out", "checkpoint-3")), f"{folder}")


def _interrupted_newest(ctx, how: str) -> Path:
    """checkpoint-3 complete, checkpoint-5 as an interrupted save leaves it."""
    _checkpoint_folder(ctx)
    newest = _checkpoint_folder(ctx, "checkpoint-5")
    if how == "no trainer state":
        (newest / "trainer_state.json").unlink()
    else:
        (newest / "ema_model.safetensors.partial").write_bytes(b"\0" * 10)
    return newest


@case("training/resume-last-skips-an-interrupted-save")
def _last_skips(ctx):
    for how in ("no trainer state", "partial file"):
        _interrupted_newest(ctx, how)
        chosen = _resume(ctx, "last")
        expect_check(chosen == str(ctx.path("out", "checkpoint-3")), f"{how}: {chosen}")


add(
    "training/resume-interrupted-save-names-the-complete-one",
    lambda ctx: _resume(ctx, str(_interrupted_newest(ctx, "no trainer state"))),
    r"checkpoint-5: not a Trainer checkpoint .*newest complete checkpoint beside it is .*checkpoint-3",
)
add(
    "training/resume-partial-file-names-it",
    lambda ctx: _resume(ctx, str(_interrupted_newest(ctx, "partial file"))),
    r"ema_model.safetensors.partial is left from an interrupted save",
)


def _foreign_checkpoint(ctx, model) -> Path:
    folder = ctx.path("old", "checkpoint-3")
    model.save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    for state_file in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({}, folder / state_file)
    return folder


add(
    "training/finetune-resume-from-an-fcmae-checkpoint",
    lambda ctx: finetune(ctx, "--resume_from_checkpoint", str(_foreign_checkpoint(ctx, fcmae()))),
    r"holds a ConvNextV2ForMaskedImageModeling .* but this run trains a ConvNextV2ForImageClassification",
)
add(
    "training/pretrain-resume-from-a-classifier-checkpoint",
    lambda ctx: pretrain(
        ctx, "--image_size", "64", "--resume_from_checkpoint", str(_foreign_checkpoint(ctx, classifier()))
    ),
    r"holds a ConvNextV2ForImageClassification .* but this run trains a ConvNextV2ForMaskedImageModeling",
)
add(
    "training/finetune-resume-from-another-size",
    lambda ctx: finetune(
        ctx, "--model_size", "atto", "--resume_from_checkpoint", str(_foreign_checkpoint(ctx, classifier(num_labels=2)))
    ),
    r"holds a ConvNextV2ForImageClassification of another size \(depths \[2, 1, 2, 1\].*than this run's",
)


@case("training/ema-resume-from-a-moved-folder-without-the-hook", error=r"EMACallback found no checkpoint folder")
def _ema_moved(ctx):
    from transformers import Trainer, TrainingArguments

    from convnextv2_hf.training import EMACallback

    def run(output, resume=None, steps=2):
        args = TrainingArguments(output_dir=str(output), per_device_train_batch_size=4, max_steps=steps,
                                 use_cpu=True, report_to="none", save_steps=2, disable_tqdm=True)  # fmt: skip
        torch.manual_seed(0)
        Trainer(model=classifier().train(), args=args, train_dataset=_labelled(), callbacks=[EMACallback(0.5)]).train(
            resume_from_checkpoint=resume
        )

    run(ctx.path("first"))
    moved = ctx.path("first", "checkpoint-2").rename(ctx.path("moved"))
    run(ctx.path("second"), str(moved), steps=3)


def _overlap(ctx, script: str, relation: str):
    data = image_folder(ctx.path("base", "data"), per_class=4)
    data_flag, data_path = ("--data_dir", data) if script == "finetune" else ("--train_dir", data / "train")
    output = {"equal": data_path, "inside": data_path / "out", "holding": ctx.path("base")}[relation]
    ctx.watch(ctx.path("base"))
    argv = ["--output_dir", str(output), "--use_cpu", "--report_to", "none", data_flag, str(data_path),
            "--image_size", "32" if script == "finetune" else "64"]  # fmt: skip
    return run_cli(_examples()[0 if script == "pretrain" else 1].main, argv)


for _script, _relation, _word in (("finetune", "inside", "is inside"), ("finetune", "equal", "is"),
                                  ("pretrain", "holding", "holds"), ("pretrain", "inside", "is inside")):  # fmt: skip
    add(
        f"training/{_script}-output-dir-{_relation}-data",
        lambda ctx, s=_script, r=_relation: _overlap(ctx, s, r),
        rf"--output_dir .* {_word} the data folder .*keep outputs and data apart",
    )


@case("training/segmentation-output-dir-inside-data", error=r"--output_dir .* is inside the data folder --train_dir")
def _segmentation_overlap(ctx):
    import finetune_semantic_segmentation

    for name in ("images", "masks"):
        ctx.path("pairs", name).mkdir(parents=True)
    png(ctx.path("pairs", "images", "0.png"))
    png(ctx.path("pairs", "masks", "0.png"), mode="L", color=1)
    ctx.watch(ctx.path("pairs"))
    argv = ["--output_dir", str(ctx.path("pairs", "out")), "--use_cpu", "--report_to", "none", "--train_dir",
            str(ctx.path("pairs")), "--num_labels", "2"]  # fmt: skip
    run_cli(finetune_semantic_segmentation.main, argv)


def _finetune_on(ctx, folder: Path, *extra: str):
    ctx.watch(ctx.path("out"))
    argv = trainer_argv(ctx, "--train_dir", str(folder), "--image_size", "32", *extra)
    return run_cli(_examples()[1].main, argv)


add(
    "training/finetune-train-dir-is-a-file",
    lambda ctx: _finetune_on(ctx, png(ctx.path("one.png"))),
    r"image folder '.*one.png' is a file, not a folder of images",
)
add(
    "training/finetune-one-class",
    lambda ctx: _finetune_on(ctx, image_folder(ctx.path("d"), classes=("a",), splits=("",), per_class=4)),
    r"form one class \['a'\]: fine-tuning needs at least two",
)


@case("training/finetune-empty-class-folder", error=r"class folder\(s\) \['c'\] in .* hold no images")
def _empty_class(ctx):
    data = image_folder(ctx.path("d"), splits=("",), per_class=4)
    (data / "c").mkdir()
    _finetune_on(ctx, data)


@case("training/finetune-stratified-split-too-few", error=CLASS_WITH_TOO_FEW_IMAGES)
def _too_few(ctx):
    data = image_folder(ctx.path("d"), splits=("",), per_class=3)
    for path in sorted((data / "b").iterdir())[1:]:
        path.unlink()
    _finetune_on(ctx, data)


@case("training/finetune-file-name-not-utf8", error=r"the file name b'.*\\xff.png' .* is not valid UTF-8")
def _bad_file_name(ctx):
    data = image_folder(ctx.path("d"), splits=("",), per_class=2)
    with open(os.fsencode(data / "a") + b"/\xff.png", "wb") as file:
        file.write((data / "a" / "0.png").read_bytes())
    _finetune_on(ctx, data)


@case("training/top-k-metric-output-tuple-and-padded-labels")
def _top_k_tuple(ctx):
    """What a Trainer hands compute_metrics for a model that also returns hidden states: (logits, hidden states) and
    labels padded with -100. The padded rows are left out, not counted wrong."""
    from transformers import EvalPrediction

    from convnextv2_hf.metrics import top_k_compute_metrics

    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]], np.float32)
    prediction = EvalPrediction(predictions=(logits, np.zeros((3, 4, 2, 2))), label_ids=np.array([1, -100, 0]))
    scores = top_k_compute_metrics(k=2)(prediction)
    expect_check(scores == {"accuracy": 0.5, "top2_accuracy": 0.5}, f"{scores}")


@case("training/top-k-metric-nan-scores", error=r"1 of 2 rows of scores hold NaN or infinite values")
def _top_k_nan(ctx):
    from convnextv2_hf.metrics import load_top_k_accuracy

    load_top_k_accuracy().compute(predictions=[[np.nan, 0.0], [0.0, 1.0]], references=[0, 1], k=1)


# ----------------------------------------------------------------------------------------------------------
# loading: from_pretrained of damaged, foreign or mismatched folders
# ----------------------------------------------------------------------------------------------------------


def damaged_folder(ctx, damage: Callable[[Path], object], **overrides) -> Path:
    folder = saved_classifier(ctx.path("model"), **overrides)
    damage(folder)
    return folder


def _edit_config(**values):
    def edit(folder: Path) -> None:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))

    return edit


def _load(folder: Path, model_class=ConvNextV2ForImageClassification, **kwargs):
    return model_class.from_pretrained(folder, **kwargs)


LOADING_DAMAGE = [
    (
        "truncated-safetensors",
        lambda f: truncate(f / "model.safetensors"),
        r"model/model.safetensors is not a complete safetensors file",
    ),
    (
        "empty-safetensors",
        lambda f: (f / "model.safetensors").write_bytes(b""),
        r"model/model.safetensors is not a complete safetensors file",
    ),
    (
        "bit-flipped-safetensors-header",
        lambda f: flip_bit(f / "model.safetensors", (f / "model.safetensors").stat().st_size - 20),
        r"model.safetensors is not a complete safetensors file",
    ),
    (
        "missing-config",
        lambda f: (f / "config.json").unlink(),
        r"model' has no config.json: it is not a saved ConvNeXt V2 model",
    ),
    ("config-not-json", lambda f: (f / "config.json").write_text("{not json"), r"config.json is not a valid JSON file"),
    (
        "config-json-list",
        lambda f: (f / "config.json").write_text("[1, 2]"),
        r"config.json holds a JSON list, not an object",
    ),
    ("config-of-vit", _edit_config(model_type="vit"), r"another architecture \(model_type='vit'"),
    ("config-of-convnext-v1", _edit_config(model_type="convnext"), CONFIG_OF_ANOTHER_ARCHITECTURE),
    (
        "config-bad-value",
        _edit_config(drop_path_rate=1.5),
        r"drop_path_rate must be a number in \[0, 1\), got drop_path_rate=1.5",
    ),
    (
        "config-stages-mismatch",
        _edit_config(hidden_sizes=[8, 16, 24]),
        DEPTHS_AND_WIDTHS_LENGTHS_DIFFER,
    ),
]
for _name, _damage, _pattern in LOADING_DAMAGE:
    add(f"loading/{_name}", lambda ctx, d=_damage: _load(damaged_folder(ctx, d)), _pattern)
add(
    "loading/auto-class-truncated-safetensors",
    lambda ctx: __import__("transformers").AutoModelForImageClassification.from_pretrained(
        damaged_folder(ctx, lambda f: truncate(f / "model.safetensors"))
    ),
    r"model/model.safetensors is not a complete safetensors file",
)
add(
    "loading/fcmae-class-missing-config",
    lambda ctx: _load(damaged_folder(ctx, lambda f: (f / "config.json").unlink()), ConvNextV2ForMaskedImageModeling),
    r"has no config.json",
)
add(
    "loading/override-bad-value",
    lambda ctx: _load(saved_classifier(ctx.path("model")), mask_ratio=2.0),
    MASK_RATIO_OUT_OF_RANGE,
)
add(
    "loading/missing-weights-file",
    lambda ctx: _load(damaged_folder(ctx, lambda f: (f / "model.safetensors").unlink())),
    r"no file named model.safetensors, or pytorch_model.bin, found in directory",
    outcome="unclear error",
    dependency="transformers: an OSError naming the folder and the files it looked for",
)
add(
    "loading/missing-folder",
    lambda ctx: _load(ctx.path("no-such-model")),
    r"no-such-model' does not exist \(a local path",
)
add(
    "loading/num-labels-override-mismatch",
    lambda ctx: _load(saved_classifier(ctx.path("model")), num_labels=3),
    r"ignore_mismatched_sizes",
    outcome="unclear error",
    dependency="transformers: a RuntimeError telling to pass ignore_mismatched_sizes=True, after a load report "
    "listing classifier.weight (5, 32) vs (3, 32)",
)
add(
    "loading/config-widths-edited",
    lambda ctx: _load(damaged_folder(ctx, _edit_config(hidden_sizes=[8, 16, 24, 40]))),
    r"ignore_mismatched_sizes",
    outcome="unclear error",
    dependency="transformers: RuntimeError after a load report listing every tensor whose shape differs",
)
add(
    "loading/dtype-unknown",
    lambda ctx: _load(saved_classifier(ctx.path("model")), dtype="float23"),
    r"`dtype` provided as a `str` can only be `'auto'`, or a string representation of a valid `torch.dtype`",
)


@case("loading/ignore-mismatched-sizes-new-head")
def _new_head(ctx):
    model = _load(saved_classifier(ctx.path("model")), num_labels=3, ignore_mismatched_sizes=True)
    original = classifier()
    same = torch.equal(
        model.convnextv2.embeddings.patch_embeddings.weight, original.convnextv2.embeddings.patch_embeddings.weight
    )
    expect_check(model.classifier.weight.shape == (3, 32) and same, f"{tuple(model.classifier.weight.shape)}")


@case(
    "loading/config-deeper-than-weights",
    dependency="transformers: blocks the weights lack are initialised afresh, listed in a load report and in "
    "output_loading_info's missing_keys",
)
def _deeper(ctx):
    folder = damaged_folder(ctx, _edit_config(depths=[2, 2, 2, 2]))
    _, info = _load(folder, output_loading_info=True)
    expect_check(
        any("stages.1.layers.1." in key for key in info["missing_keys"]), f"{sorted(info['missing_keys'])[:3]}"
    )


@case(
    "loading/bit-flip-in-tensor-data",
    outcome="silent wrong result",
    dependency="safetensors: the format stores no checksum, so a flipped bit in tensor data loads as a different "
    "weight; the package records the source SHA-256 of converted folders (marker and card), and the Hub checks "
    "file hashes on download",
)
def _bit_flip_data(ctx):
    folder = saved_classifier(ctx.path("model"))
    flip_bit(folder / "model.safetensors", 200)
    loaded, original = _load(folder).state_dict(), classifier().state_dict()
    expect_check(all(torch.equal(loaded[key], original[key]) for key in original), "a weight changed")


@case("loading/stock-transformers-folder")
def _stock(ctx):
    import transformers

    stock_config = transformers.ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_labels=3)
    torch.manual_seed(0)
    stock = transformers.ConvNextV2ForImageClassification(stock_config).eval()
    stock.save_pretrained(ctx.path("stock"))
    ours = _load(ctx.path("stock")).eval()
    with torch.no_grad():
        expected, got = stock(pixels()).logits, ours(pixels()).logits
    expect_check(type(ours) is ConvNextV2ForImageClassification and torch.allclose(expected, got, atol=1e-5), "logits")


@case("loading/fcmae-folder-into-classifier")
def _fcmae_into_classifier(ctx):
    """Fine-tuning starts from an FCMAE folder: the encoder loads, the head is new and listed as missing."""
    fcmae().save_pretrained(ctx.path("fcmae"))
    model, info = _load(ctx.path("fcmae"), output_loading_info=True)
    encoder = fcmae().convnextv2.embeddings.patch_embeddings.weight
    loaded = torch.equal(model.convnextv2.embeddings.patch_embeddings.weight, encoder)
    expect_check(loaded and {"classifier.weight", "classifier.bias"} <= set(info["missing_keys"]), f"{info}")


def _rewrite_tensors(path: Path, change: Callable) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    save_file({name: change(name, tensor) for name, tensor in state.items()}, str(path), metadata={"format": "pt"})


add(
    "loading/int8-weights",
    lambda ctx: _load(
        damaged_folder(ctx, lambda f: _rewrite_tensors(f / "model.safetensors", lambda n, t: (t * 100).to(torch.int8)))
    ),
    r"model.safetensors stores the tensor '.*' as I8; model weights must be floating point",
)
add(
    "loading/bool-tensor-in-weights",
    lambda ctx: _load(
        damaged_folder(
            ctx,
            lambda f: _rewrite_tensors(f / "model.safetensors", lambda n, t: t.bool() if n == "classifier.bias" else t),
        )
    ),
    r"stores the tensor 'classifier.bias' as BOOL",
)


@case("loading/float16-weights-cast-to-float32")
def _fp16_weights(ctx):
    folder = damaged_folder(ctx, lambda f: _rewrite_tensors(f / "model.safetensors", lambda n, t: t.half()))
    loaded = _load(folder, dtype=torch.float32).state_dict()
    original = classifier().state_dict()
    expect_check(
        all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.half().float()) for k, v in original.items()),
        "fp16 weights not cast to float32 exactly",
    )


def _sharded(ctx) -> tuple[Path, dict, str]:
    folder = ctx.path("model")
    classifier().save_pretrained(folder, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder, index, sorted(set(index["weight_map"].values()))[0]


def _point_index(folder: Path, index: dict, old: str, new: str) -> None:
    index["weight_map"] = {key: (new if value == old else value) for key, value in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@case(
    "loading/shard-index-names-parent-folder", error=r"names the shard '../outside/shard.safetensors', which is outside"
)
def _index_parent(ctx):
    folder, index, first = _sharded(ctx)
    ctx.path("outside").mkdir()
    (folder / first).rename(ctx.path("outside", "shard.safetensors"))
    _point_index(folder, index, first, "../outside/shard.safetensors")
    _load(folder)


@case("loading/shard-index-names-absolute-path", error=r"names the shard '/.*shard.safetensors', which is outside")
def _index_absolute(ctx):
    folder, index, first = _sharded(ctx)
    (folder / first).rename(ctx.path("shard.safetensors"))
    _point_index(folder, index, first, str(ctx.path("shard.safetensors")))
    _load(folder)


@case(
    "loading/shard-symlink-leaves-folder", error=r"names the shard 'model-00001-of-\d+.safetensors', which is outside"
)
def _index_symlink(ctx):
    folder, index, first = _sharded(ctx)
    (folder / first).rename(ctx.path("elsewhere.safetensors"))
    (folder / first).symlink_to(ctx.path("elsewhere.safetensors"))
    _load(folder)


@case("loading/shard-missing", error=r"names the shard 'model-00001-of-\d+.safetensors', which is not a file in")
def _index_missing(ctx):
    folder, _, first = _sharded(ctx)
    (folder / first).unlink()
    _load(folder)


@case("loading/shard-index-not-json", error=r"model.safetensors.index.json is not a valid JSON file")
def _index_not_json(ctx):
    folder, _, _ = _sharded(ctx)
    (folder / "model.safetensors.index.json").write_text("{oops")
    _load(folder)


@case(
    "loading/shard-index-without-weight-map",
    error=r"index.json is not a checkpoint index: it needs a non-empty 'weight_map'",
)
def _index_no_map(ctx):
    folder, _, _ = _sharded(ctx)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    _load(folder)


add(
    "loading/config-depths-20000",
    lambda ctx: _load(damaged_folder(ctx, _edit_config(depths=[2, 2, 20000, 2], hidden_sizes=[96, 192, 384, 768]))),
    r"builds a ConvNextV2ForImageClassification of [\d,]+ parameters \([\d,.]+ GB in float32\) .*allow_large_model",
)


@case("loading/config-json-cannot-allow-large-model", error=MODEL_BEYOND_THE_BOUNDS)
def _file_opt_in(ctx):
    _load(
        damaged_folder(
            ctx, _edit_config(depths=[2, 2, 20000, 2], hidden_sizes=[96, 192, 384, 768], allow_large_model=True)
        )
    )


add(
    "loading/processor-config-not-json",
    lambda ctx: __import__("transformers").AutoImageProcessor.from_pretrained(
        damaged_folder(ctx, lambda f: (f / "preprocessor_config.json").write_text("{oops"))
    ),
    r"preprocessor_config.json' is not a valid JSON file",
    outcome="unclear error",
    dependency="transformers: AutoImageProcessor reads the JSON before it knows the class, an OSError naming the file",
)


# ----------------------------------------------------------------------------------------------------------
# The test: one id per case
# ----------------------------------------------------------------------------------------------------------


def _param(case_: Case):
    marks = [pytest.mark.xfail(strict=True, reason=case_.xfail)] if case_.xfail else []
    return pytest.param(case_, id=case_.id, marks=marks)


@pytest.mark.parametrize("fault", [_param(c) for c in CASES])
def test_fault(fault: Case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a case that writes relative paths writes here
    result = classify(fault, tmp_path)
    assert result.outcome == fault.expected, (
        f"{fault.id}: {result.outcome} ({result.detail}), expected {fault.expected}"
    )


def test_catalogue_covers_every_area_with_enough_cases():
    by_area = {area: [c for c in CASES if c.area == area] for area in AREAS}
    assert all(len(cases) >= 10 for cases in by_area.values()), {a: len(c) for a, c in by_area.items()}
    assert len(CASES) >= 120 and {c.area for c in CASES} == set(AREAS)
    for c in CASES:  # a dependency's unclear error or silent result must say what the package does about it
        assert c.outcome is None or c.dependency, c.id
