"""Helpers used by several test files, defined once here: small configs and perturbed weights, the built-in
transformers config of one of ours, tensor comparisons, a labelled random dataset, damaged files, a Trainer
callback, and the synthetic official checkpoints (and hostile files) of the conversion tests.

Test files import them with ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path`` for the test files
and ``conftest.py``; the scripts under ``tests/scripts/`` add it themselves). No test imports another test module.
``conftest.py`` holds the pytest hooks and fixtures only; the error texts the tests expect are in
``expected_errors.py``.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import pickle
import re
import socket
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from expected_errors import INJECTED_CARD_FAILURE
from transformers import TrainerCallback
from transformers.models import convnextv2 as builtin

from convnextv2_hf import ConvNextV2Config
from convnextv2_hf.configuration_convnextv2 import FAST_PATH_NAMES

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# Configs and weights
# ----------------------------------------------------------------------------------------------------------


def tiny_config(**overrides) -> ConvNextV2Config:
    """A 4-stage config small enough for CPU tests but with every structural feature (depth > 1 per stage)."""
    fields = dict(depths=[2, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], decoder_hidden_size=16, num_labels=5)
    fields.update(overrides)
    return ConvNextV2Config(**fields)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter (GRN and LayerNorm included, which start at constants) so parity tests exercise them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def builtin_config(config: ConvNextV2Config) -> transformers.ConvNextV2Config:
    """transformers' built-in ConvNextV2Config with the fields of ``config`` it knows, and the same out_features."""
    fields = {k: v for k, v in config.to_dict().items() if k in builtin.ConvNextV2Config.__dataclass_fields__}
    for key in ("_out_features", "_out_indices", "out_features", "out_indices", "stage_names"):
        fields.pop(key, None)
    return builtin.ConvNextV2Config(**fields, out_features=config.out_features)


# the device's defaults (True) and every fast path by name: on CUDA the defaults run none of them (DEVICE_DEFAULTS)
WITH_FAST_PATHS = pytest.mark.parametrize("fast_paths", [True, list(FAST_PATH_NAMES)], ids=["defaults", "all"])


class LabelledImages(torch.utils.data.Dataset):
    """``count`` random images of ``size`` x ``size`` (drawn from ``seed``) labelled 0, 1, ... modulo ``num_labels``;
    ``nan_at`` puts NaN into one image's pixels."""

    def __init__(self, count=16, num_labels=5, size=64, seed=1, nan_at=None):
        self.pixels = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
        if nan_at is not None:
            self.pixels[nan_at, 0, 5, 5] = float("nan")
        self.labels = torch.arange(count) % num_labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


# ----------------------------------------------------------------------------------------------------------
# Comparing tensors
# ----------------------------------------------------------------------------------------------------------


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference, in fp32."""
    return (a.float() - b.float()).abs().max().item()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| (L2 over the whole tensor, in fp32)."""
    expected = expected.float()
    return ((got.float() - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def close(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> bool:
    """``got`` within ``tolerance`` of ``expected``, relative to the larger of 1 and ``expected``'s largest value (fp32
    rounding grows with the values; stage-4 hidden states and gradients are not all below 1)."""
    return max_diff(got, expected) <= tolerance * max(1.0, expected.abs().max().item())


# ----------------------------------------------------------------------------------------------------------
# Processes, files, training runs
# ----------------------------------------------------------------------------------------------------------


def free_port() -> str:
    """A free TCP port on 127.0.0.1 for torchrun's --master_port: the default 29500 collides when two multi-process
    tests run at once (two test sessions, or a run beside another job)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut ``path`` to the first ``keep`` of its bytes (a file whose write was interrupted)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


class StopAtStep(TrainerCallback):
    """Interrupts training after ``step`` (as a killed job would, right after a checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


# ----------------------------------------------------------------------------------------------------------
# Synthetic official checkpoints (the conversion tests, the packaging test and the fault hunt)
#
# Random weights written in each official layout (key names and shapes as in the official code,
# github.com/facebookresearch/ConvNeXt-V2: models/convnextv2.py, models/convnextv2_sparse.py and models/fcmae.py).
# The sparse (pretraining) layout is written from dense tensors with the inverse of the documented kernel
# remapping, so converting it back must reproduce the dense model.
# ----------------------------------------------------------------------------------------------------------

CUSTOM = ([1, 2, 1, 1], [16, 24, 32, 48])  # depths, widths: no official size has these shapes


class _Random:
    """Weights at the official init scale (std 0.02 around 0, norms around 1), so outputs stay O(1)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, offset: float = 0.0, scale: float = 0.03) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator) * scale + offset


def official_block(prefix: str, dim: int, rand: _Random) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}dwconv.weight": rand(dim, 1, 7, 7),
        f"{prefix}dwconv.bias": rand(dim),
        f"{prefix}norm.weight": rand(dim, offset=1.0),
        f"{prefix}norm.bias": rand(dim),
        f"{prefix}pwconv1.weight": rand(4 * dim, dim),
        f"{prefix}pwconv1.bias": rand(4 * dim),
        f"{prefix}grn.gamma": rand(1, 1, 1, 4 * dim, scale=0.3),
        f"{prefix}grn.beta": rand(1, 1, 1, 4 * dim),
        f"{prefix}pwconv2.weight": rand(dim, 4 * dim),
        f"{prefix}pwconv2.bias": rand(dim),
    }


def official_dense(shapes, *, num_classes: int | None = None, final_norm: bool = True, seed: int = 0) -> dict:
    """The official dense layout: fine-tuned (final norm + head) or FCMAE encoder (neither)."""
    depths, widths = shapes
    rand = _Random(seed)
    state = {
        "downsample_layers.0.0.weight": rand(widths[0], 3, 4, 4, scale=0.1),
        "downsample_layers.0.0.bias": rand(widths[0]),
        "downsample_layers.0.1.weight": rand(widths[0], offset=1.0),
        "downsample_layers.0.1.bias": rand(widths[0]),
    }
    for stage in range(1, len(depths)):
        state[f"downsample_layers.{stage}.0.weight"] = rand(widths[stage - 1], offset=1.0)
        state[f"downsample_layers.{stage}.0.bias"] = rand(widths[stage - 1])
        state[f"downsample_layers.{stage}.1.weight"] = rand(widths[stage], widths[stage - 1], 2, 2)
        state[f"downsample_layers.{stage}.1.bias"] = rand(widths[stage])
    for stage, (depth, width) in enumerate(zip(depths, widths, strict=True)):
        for block in range(depth):
            state.update(official_block(f"stages.{stage}.{block}.", width, rand))
    if final_norm:
        state.update({"norm.weight": rand(widths[-1], offset=1.0), "norm.bias": rand(widths[-1])})
    if num_classes:
        state.update({"head.weight": rand(num_classes, widths[-1]), "head.bias": rand(num_classes)})
    return state


def dense_to_sparse_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of the documented remapping: (out, in, k, k) -> (k*k, in, out), window in the other axis order."""
    out_channels, in_channels, k, _ = weight.shape
    return weight.transpose(2, 3).reshape(out_channels, in_channels, k * k).permute(2, 1, 0)


def official_pretraining(encoder: dict, *, decoder_width: int, decoder_depth: int, seed: int = 1) -> dict:
    """A checkpoint of the official pretraining code: the MinkowskiEngine encoder (from dense ``encoder``
    tensors) plus the dense decoder ``proj``, ``mask_token``, ``decoder.k``, ``pred``."""
    state = {}
    for name, tensor in encoder.items():
        module, param = name.rsplit(".", 1)
        if name.startswith("downsample_layers.0."):  # the stem stays a dense conv and LayerNorm
            state[f"encoder.{name}"] = tensor
        elif module.endswith(".norm") or re.fullmatch(r"downsample_layers\.\d+\.0", module):
            state[f"encoder.{module}.ln.{param}"] = tensor
        elif module.endswith(("pwconv1", "pwconv2")):
            state[f"encoder.{module}.linear.{param}"] = tensor
        elif module.endswith(".grn") or param == "bias":
            state[f"encoder.{name}"] = tensor.reshape(1, -1)
        else:
            kernel = dense_to_sparse_kernel(tensor)
            state[f"encoder.{module}.kernel"] = kernel[:, 0, :] if module.endswith("dwconv") else kernel
    rand = _Random(seed)
    last_width = encoder["downsample_layers.3.1.weight"].shape[0]
    state.update(
        {
            "proj.weight": rand(decoder_width, last_width, 1, 1),
            "proj.bias": rand(decoder_width),
            "mask_token": rand(1, decoder_width, 1, 1),
            "pred.weight": rand(32 * 32 * 3, decoder_width, 1, 1),
            "pred.bias": rand(32 * 32 * 3),
        }
    )
    for block in range(decoder_depth):
        state.update(official_block(f"decoder.{block}.", decoder_width, rand))
    return state


def save_official(path: Path, state_dict: dict, **extra) -> Path:
    torch.save({"model": state_dict, **extra}, path)
    return path


def broken_card_save(*args, **kwargs):
    """Patched over ``ModelCard.save``: stands for any failure while a conversion writes its staging folder."""
    raise RuntimeError(INJECTED_CARD_FAILURE)


def load_script(name: str):
    """A script of ``conversion_scripts/`` as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "conversion_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------
# Bad, malformed and hostile checkpoints
# ----------------------------------------------------------------------------------------------------------


class CodeRunningPickle:
    """Unpickling this would create ``path`` (stands for any code a malicious checkpoint runs)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_bad_input(kind: str, path: Path) -> Path:
    """A file at ``path`` that is not a convertible checkpoint, of the given ``kind``; returns its path."""
    if kind == "code-running pickle":
        torch.save(
            {"model": official_dense(CUSTOM, num_classes=10), "x": CodeRunningPickle(path.with_suffix(".ran"))}, path
        )
    elif kind == "not a checkpoint":
        path.write_text("just some text\n")
    elif kind == "truncated file":
        save_official(path, official_dense(CUSTOM, num_classes=10))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "ConvNeXt V1":
        state = {k: v for k, v in official_dense(CUSTOM, num_classes=10).items() if ".grn." not in k}
        state.update({f"stages.{s}.0.gamma": torch.ones(w) for s, w in enumerate(CUSTOM[1])})
        save_official(path, state)
    elif kind == "ViT":
        save_official(
            path,
            {
                "cls_token": torch.zeros(1, 1, 8),
                "pos_embed": torch.zeros(1, 5, 8),
                "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
            },
        )
    elif kind == "missing tensor":
        state = official_dense(CUSTOM, num_classes=10)
        del state["stages.1.0.pwconv2.weight"]
        save_official(path, state)
    elif kind == "extra tensor":
        save_official(path, {**official_dense(CUSTOM, num_classes=10), "stages.1.0.extra.weight": torch.zeros(3)})
    elif kind == "wrong shape":
        save_official(path, {**official_dense(CUSTOM, num_classes=10), "head.bias": torch.zeros(11)})
    elif kind == "no state dict":
        torch.save({"epoch": 3}, path)
    elif kind == "other size than named":
        save_official(path, official_dense(CUSTOM, num_classes=10))
        path = path.rename(path.with_name("convnextv2_atto_1k_224_ema.pt"))
    return path


def malformed_state(kind: str) -> dict:
    """The official fine-tuned layout of ``CUSTOM`` with one malformed key or tensor of the given ``kind``."""
    state = official_dense(CUSTOM, num_classes=10)
    if kind == "0-d tensor":
        state["head.bias"] = torch.tensor(0.5)
    elif kind == "integer key":
        state[7] = torch.zeros(3)
    elif kind == "tuple key":
        state[("stages", 0)] = torch.zeros(3)
    elif kind == "complex tensor":
        state["head.weight"] = state["head.weight"].to(torch.complex64)
    elif kind == "NaN":
        state["stages.1.1.pwconv1.weight"][3, 2] = float("nan")
    elif kind == "infinity":
        state["stages.2.0.grn.beta"][..., 0] = float("-inf")
    elif kind == "integer tensor":
        state["head.bias"] = torch.arange(10)
    elif kind == "not a tensor":
        state["stages.0.0.norm.weight"] = [1.0] * 16
    return state


# Hostile files: small on disk, huge as declared; conversion must check shapes before it allocates memory


class _DeclaredStorage:
    """Pickled as a storage record whose declared element count is ``numel``, whatever the file stores."""

    def __init__(self, numel: int):
        self.numel = numel


class _DeclaredTensor:
    def __init__(self, storage: _DeclaredStorage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(int(torch.tensor(self.shape[i + 1 :], dtype=torch.int64).prod()) for i in range(len(self.shape)))
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, self.shape, stride, False, collections.OrderedDict()),
        )


class _HeaderPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _DeclaredStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def write_lying_header(path: Path, name: str, shape: tuple[int, ...]) -> Path:
    """A torch.save zip whose pickle declares ``name`` as a ``shape`` float tensor while storing 16 bytes."""
    numel = int(torch.tensor(shape, dtype=torch.int64).prod())
    header = io.BytesIO()
    _HeaderPickler(header, protocol=2).dump({"model": {name: _DeclaredTensor(_DeclaredStorage(numel), shape)}})
    template = path.with_suffix(".template")
    torch.save({"model": {name: torch.zeros(4)}}, template)
    with zipfile.ZipFile(template) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as lying:
        for record in original.infolist():
            content = header.getvalue() if record.filename.endswith("/data.pkl") else original.read(record)
            lying.writestr(record.filename.replace(template.stem + "/", path.stem + "/"), content)
    template.unlink()
    return path


def write_expanded(path: Path) -> Path:
    """A valid-looking checkpoint whose pwconv1 is a stride-0 view: 4 bytes stored, 100000 x 100000 declared."""
    state = official_dense(CUSTOM, num_classes=10)
    state["stages.0.0.pwconv1.weight"] = torch.zeros(1).expand(100_000, 100_000)
    return save_official(path, state)


def write_huge_widths(path: Path, width: int = 16384) -> Path:
    """Real tensors (16 MB) that consistently declare stages 16384 wide, with the rest missing: a model built
    from these widths would need about 34 GB."""
    state = {"downsample_layers.0.0.weight": torch.zeros(width, 3, 4, 4), "stages.0.0.grn.gamma": torch.zeros(1, 4)}
    for stage in range(4):
        state[f"stages.{stage}.0.dwconv.weight"] = torch.zeros(width, 1, 7, 7)
    return save_official(path, state)
