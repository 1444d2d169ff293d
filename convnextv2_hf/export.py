"""Export a saved ConvNeXt V2 classifier or backbone folder to ONNX and OpenVINO, verified against eager PyTorch.

    python -m convnextv2_hf.export MODEL_DIR OUTPUT_DIR --format onnx openvino --precision f32 bf16 fp16

or ``export_model(model_dir, output_dir, formats, precisions)``. The output folder holds, for what was asked:

- ``model.onnx`` (f32) and ``model_fp16.onnx`` (weights stored as fp16, cast to f32 where used: half the file,
  f32 compute), from ``torch.onnx.export(dynamo=True)`` with dynamic batch, height and width;
- ``openvino_model.xml``/``.bin`` (f32 weights; precision ``bf16`` runs this file with OpenVINO's
  ``INFERENCE_PRECISION_HINT="bf16"``) and ``openvino_model_fp16.xml``/``.bin`` (``save_model(compress_to_fp16=True)``),
  converted from the same ONNX graph;
- the source's ``config.json`` (labels) and ``preprocessor_config.json``, so ``deploy.load_exported`` (and anyone
  else) prepares images as the pipeline does;
- ``export_report.json``: the files, the CPU, and the verification figures.

Verification runs every exported result on real photos (scikit-image's, or ``--images``) prepared by the folder's
image processor, at the processor's size (all images) and at a non-square size (one image fewer: a second batch
size), against the eager PyTorch model as the pipeline runs it. It prints the largest absolute error of the outputs
(logits, or a backbone's feature maps) and the top-1 agreement; the export fails (``ExportVerificationError``, exit
status 1) when the largest error exceeds ``TOLERANCES[precision] * max(1, largest reference value)``. Within it, the
top-1 class can differ only on images whose two best logits lie within twice that bound of each other.

Bad input (a folder that is no classifier or backbone, an unknown format or precision, an output that exists, is a
file or cannot be written) is a ``ValueError`` naming it (exit status 2); nothing is written until everything has
been verified, in a ``.partial`` sibling folder that is renamed into place, and removed on any failure.
The runtimes are an optional extra: ``pip install 'convnextv2-hf[deploy]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .configuration_convnextv2 import ConvNextV2Config
from .conversion.output import ConversionInterrupted, describe_write_error, signals_deferred, signals_raise
from .deploy import (
    FILES,
    OPENVINO_COMPUTE,
    PRECISIONS,
    REPORT_FORMAT,
    REPORT_NAME,
    RUNTIMES,
    RuntimeSession,
    check_choice,
    import_optional,
    openvino_core,
)
from .modeling_convnextv2 import ConvNextV2Backbone, ConvNextV2ForImageClassification

# Largest output error allowed, as a fraction of max(1, the largest reference value). f32: rounding differences
# between kernels (measured ~1e-6); fp16 weights: a 2**-11 relative rounding of every weight; bf16 compute: 8
# mantissa bits in every product and activation.
TOLERANCES = {"f32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
EXPORTABLE = {cls.__name__: cls for cls in (ConvNextV2ForImageClassification, ConvNextV2Backbone)}
SOURCE_FILES = ("config.json", "preprocessor_config.json")
_PARTIAL_SUFFIX = ".partial"


class ExportVerificationError(ValueError):
    """An exported result differs from eager PyTorch beyond its tolerance; ``report`` holds every figure."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# ----------------------------------------------------------------------------------------------------------
# Checks, before anything is built or written
# ----------------------------------------------------------------------------------------------------------


def check_request(formats: Sequence[str], precisions: Sequence[str]) -> list[tuple[str, str]]:
    """The (format, precision) pairs to export; ``ValueError`` naming an unknown or impossible choice."""
    if isinstance(formats, str) or isinstance(precisions, str):
        raise ValueError("formats and precisions are lists of names, e.g. formats=['onnx'], precisions=['f32']")
    if not formats or not precisions:
        raise ValueError(f"nothing to export: formats={list(formats)}, precisions={list(precisions)}")
    for name in formats:
        check_choice(name, "f32")
    for precision in precisions:
        check_choice("openvino", precision)
    pairs = [(f, p) for f in dict.fromkeys(formats) for p in dict.fromkeys(precisions) if (f, p) in FILES]
    for precision in precisions:
        if not any(p == precision for _, p in pairs):
            check_choice(formats[0], precision)  # the message says which format offers it
    return pairs


def check_model_dir(model_dir: str | Path) -> tuple[Path, type[nn.Module]]:
    """The folder and the class to load it with; ``ValueError`` unless it is a saved ConvNeXt V2 classifier or
    backbone with its image processor."""
    path = Path(model_dir)
    if not path.exists():
        raise ValueError(f"the model folder {model_dir} does not exist")
    if not path.is_dir():
        raise ValueError(f"{model_dir} is a file: give the folder that save_pretrained wrote")
    config = ConvNextV2Config.from_pretrained(str(path))  # a clear error without config.json or of another model
    architecture = (config.architectures or ["(no architecture named in config.json)"])[0]
    if architecture not in EXPORTABLE:
        fcmae = "MaskedImageModeling" in architecture
        hint = " (FCMAE pretraining: fine-tune it into a classifier first)" if fcmae else ""
        raise ValueError(
            f"{model_dir} holds a {architecture}{hint}; the export takes a classifier "
            f"(ConvNextV2ForImageClassification) or a backbone (ConvNextV2Backbone)"
        )
    if not (path / "preprocessor_config.json").is_file():
        raise ValueError(
            f"{model_dir} has no preprocessor_config.json: save the image processor into the folder "
            "(processor.save_pretrained(folder)); the export carries it so that images are prepared as in training"
        )
    return path, EXPORTABLE[architecture]


def check_output_dir(output_dir: str | Path) -> Path:
    """The absolute output path; ``ValueError`` for a link, a file, a folder that is not empty, or a path under a
    file. The export never replaces anything: an existing empty folder is the most it takes."""
    path = Path(output_dir)
    if path.is_symlink():
        raise ValueError(f"the output folder {output_dir} is a symbolic link: give the real path of a new folder")
    if path.exists() and not path.is_dir():
        raise ValueError(f"the output folder {output_dir} is an existing file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"the output folder {output_dir} already exists and is not empty: choose a new folder")
    path = path.absolute()
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"cannot create the output folder {output_dir}: {blocking} is a file, not a folder")
    return path


def check_tolerance(tolerance: float | None) -> dict[str, float]:
    if tolerance is None:
        return dict(TOLERANCES)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    return dict.fromkeys(TOLERANCES, float(tolerance))


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


class _Outputs(nn.Module):
    """Pixels in, a tuple of tensors out (the logits, or the backbone's feature maps): what the exporters record."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(pixel_values)
        return (output.logits,) if isinstance(self.model, ConvNextV2ForImageClassification) else output.feature_maps


def output_names(model: nn.Module) -> list[str]:
    return ["logits"] if isinstance(model, ConvNextV2ForImageClassification) else list(model.config.out_features)


@contextlib.contextmanager
def _fast_paths_off(model: nn.Module) -> Iterator[None]:
    """The reference math only while exporting. ``fast_path_allowed`` already refuses every fast path under
    ``torch.export``; this does not depend on that detection (OpenVINO or a later exporter may trace otherwise)."""
    setting = model.config.fast_paths
    model.config.fast_paths = False
    try:
        yield
    finally:
        model.config.fast_paths = setting


def export_onnx(model: nn.Module, path: Path):
    """``torch.onnx.export(dynamo=True)`` of ``model`` in eval mode, dynamic batch, height and width; the program."""
    import_optional("onnxscript", "the ONNX export")
    config = model.config
    side = 2 * config.patch_size * 2 ** (config.num_stages - 1)  # two positions in the last stage: nothing is size 1
    example = torch.randn(2, config.num_channels, side, side)
    dims = {0: "batch", 2: "height", 3: "width"}
    with _fast_paths_off(model), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # the exporter's notes on decompositions and deprecations
        program = torch.onnx.export(
            _Outputs(model.eval()),
            (example,),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=output_names(model),
            dynamic_shapes={"pixel_values": dims},
            verbose=False,
        )
    program.save(path)
    return program


def fp16_weights(proto):
    """The ONNX graph with its float32 weights stored as float16 and a ``Cast`` back to float32 where they are used:
    half the file, f32 compute (the ONNX counterpart of OpenVINO's ``compress_to_fp16``). Scalars (epsilons) and
    tensors beyond fp16's range keep float32."""
    onnx = import_optional("onnx", "the fp16 ONNX export")
    from onnx import helper, numpy_helper

    casts = []
    for tensor in proto.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(tensor)
        if values.size < 2 or np.abs(values).max() > np.finfo(np.float16).max:
            continue
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float16), f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=onnx.TensorProto.FLOAT))
    nodes = casts + list(proto.graph.node)  # the casts first: the graph stays in topological order
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    return proto


def save_onnx(proto, path: Path) -> None:
    onnx = import_optional("onnx", "the ONNX export")
    large = proto.ByteSize() > 2**31 - 2**26  # protobuf's 2 GB limit: the weights go to a file beside
    onnx.save_model(proto, str(path), save_as_external_data=large, location=f"{path.name}.data")


def export_files(model: nn.Module, folder: Path, pairs: list[tuple[str, str]]) -> None:
    """Write the file of every (format, precision) pair into ``folder``. OpenVINO converts the ONNX graph, which is
    written for that even when ONNX itself was not asked for (and removed then)."""
    formats = {f for f, _ in pairs}
    onnx_path = folder / FILES["onnx", "f32"]
    program = export_onnx(model, onnx_path)
    if ("onnx", "fp16") in pairs:
        save_onnx(fp16_weights(program.model_proto), folder / FILES["onnx", "fp16"])
    if "openvino" in formats:
        ov = import_optional("openvino", "the OpenVINO export")
        converted = ov.convert_model(str(onnx_path))
        if ("openvino", "f32") in pairs or ("openvino", "bf16") in pairs:
            ov.save_model(converted, str(folder / FILES["openvino", "f32"]), compress_to_fp16=False)
        if ("openvino", "fp16") in pairs:
            ov.save_model(converted, str(folder / FILES["openvino", "fp16"]), compress_to_fp16=True)
    if ("onnx", "f32") not in pairs:
        for path in folder.glob(f"{onnx_path.name}*"):  # the file and its external data, if any
            path.unlink()


# ----------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------


def sample_images(images: Sequence | None = None) -> list:
    """``images`` (paths, PIL images or arrays), or three of scikit-image's photographs (astronaut, coffee, a cat)."""
    if images is not None:
        if isinstance(images, (str, Path)) or not len(images):
            raise ValueError(f"images must be a non-empty list of images or paths, got {images!r}")
        return list(images)
    data = import_optional("skimage.data", "verifying the export on sample photos")
    return [np.array(photo) for photo in (data.astronaut(), data.coffee(), data.chelsea())]  # writable copies


def sample_batches(processor, images: list) -> list[torch.Tensor]:
    """The images as the folder's processor prepares them (S x S), and all but one of them at S x 3S/2 (the
    processor's rescale and normalisation on bicubic-resized photos): two batch sizes, two heights and widths."""
    import PIL.Image
    from transformers.image_utils import load_image

    pil = [image if isinstance(image, np.ndarray) else np.array(load_image(image)) for image in images]
    first = processor(images=pil, return_tensors="pt")["pixel_values"].float()
    side = first.shape[-1]
    wide = [
        np.array(PIL.Image.fromarray(image).convert("RGB").resize((side * 3 // 2, side), PIL.Image.BICUBIC))
        for image in pil[: max(1, len(pil) - 1)]
    ]
    second = processor(images=wide, do_resize=False, return_tensors="pt")["pixel_values"].float()
    return [first, second]


def verify(session: RuntimeSession, batches: list[torch.Tensor], references: list[dict], tolerance: float) -> dict:
    """Figures of one exported result against the eager outputs ``references`` (per batch, by output name)."""
    error = scale = 0.0
    agree = images = 0
    for batch, expected in zip(batches, references, strict=True):
        got = session(batch.numpy())
        for name, reference in expected.items():
            if got[name].shape != reference.shape:
                raise ExportVerificationError(
                    f"{session.runtime} {session.precision}: output {name} has shape {got[name].shape} at input "
                    f"{tuple(batch.shape)}, eager PyTorch {reference.shape}",
                    {},
                )
            error = max(error, float(np.abs(got[name].astype(np.float64) - reference).max()))
            scale = max(scale, float(np.abs(reference).max()))
        if "logits" in expected:
            agree += int((got["logits"].argmax(-1) == expected["logits"].argmax(-1)).sum())
            images += len(batch)
    bound = tolerance * max(1.0, scale)
    return {
        "format": session.runtime,
        "precision": session.precision,
        "file": session.path.name,
        "compute_precision": session.compute_precision,
        "input_shapes": [list(batch.shape) for batch in batches],
        "max_abs_error": error,
        "reference_max_abs": scale,
        "tolerance": tolerance,
        "allowed_error": bound,
        "top1_agreement": None if not images else f"{agree}/{images}",
        "passed": bool(error <= bound),  # NaN fails
    }


def describe(entry: dict) -> str:
    """One line of the verification figures of an exported result."""
    agreement = f", top-1 agreement {entry['top1_agreement']}" if entry["top1_agreement"] else ""
    line = (
        f"{entry['format']} {entry['precision']} ({entry['file']}): largest error {entry['max_abs_error']:.3g} "
        f"(allowed {entry['allowed_error']:.3g} = {entry['tolerance']:g} x max(1, {entry['reference_max_abs']:.3g}))"
        f"{agreement}"
    )
    if entry["precision"] == "bf16" and entry["compute_precision"] != "bf16":
        line += f"; OpenVINO computes in {entry['compute_precision']} here: this CPU has no native bf16"
    return line + ("" if entry["passed"] else "  <-- beyond the tolerance")


def cpu_facts(formats: set[str]) -> dict:
    facts = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if "openvino" in formats:
        core = openvino_core()
        facts["openvino_device"] = core.get_property("CPU", "FULL_DEVICE_NAME")
        facts["openvino_capabilities"] = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return facts


# ----------------------------------------------------------------------------------------------------------
# The output folder and the entry points
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A ``.partial`` sibling of ``target`` to write into, renamed to ``target`` when the block succeeds; on any
    failure (Ctrl-C, SIGTERM and SIGHUP included) it is removed, with the parent folders this created."""
    created = [parent for parent in [target.parent, *target.parent.parents] if not parent.exists()]
    staging = None
    try:
        with signals_raise():
            try:
                for parent in reversed(created):
                    parent.mkdir()
                # mkdir, not mkdtemp: the folder gets the umask's permissions (mkdtemp's are owner-only)
                staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}{_PARTIAL_SUFFIX}"
                staging.mkdir()
                yield staging
                staging.rename(target)  # replaces nothing but an empty folder (check_output_dir)
                staging = None
            except BaseException:
                with signals_deferred():
                    if staging is not None:
                        shutil.rmtree(staging, ignore_errors=True)
                    for parent in created:
                        with contextlib.suppress(OSError):
                            parent.rmdir()
                raise
    except OSError as error:
        raise ValueError(describe_write_error(error, target)) from None


def export_model(
    model_dir: str | Path,
    output_dir: str | Path,
    formats: Sequence[str] = RUNTIMES,
    precisions: Sequence[str] = ("f32",),
    *,
    images: Sequence | None = None,
    tolerance: float | None = None,
) -> dict:
    """Export the classifier or backbone saved in ``model_dir`` into the new folder ``output_dir`` in each of
    ``formats`` ("onnx", "openvino") and ``precisions`` ("f32"; "bf16": OpenVINO's bf16 compute; "fp16": fp16-stored
    weights), verify every result against eager PyTorch on ``images`` (default: scikit-image's photos) and return
    the report (also written to ``export_report.json``). ``tolerance`` replaces ``TOLERANCES`` for every precision.

    Raises ``ValueError`` for bad input and ``ExportVerificationError`` (a ``ValueError``) when a result is beyond
    its tolerance; either way nothing is left at ``output_dir``. ``ImportError`` names the extra to install.
    """
    pairs = check_request(formats, precisions)
    tolerances = check_tolerance(tolerance)
    model_dir, model_class = check_model_dir(model_dir)
    target = check_output_dir(output_dir)
    for name in {f for f, _ in pairs}:  # before any work: a missing runtime is found in a second, not after the export
        import_optional({"onnx": "onnxruntime", "openvino": "openvino"}[name], f"the {name} export")
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(str(model_dir))
    batches = sample_batches(processor, sample_images(images))
    model = model_class.from_pretrained(str(model_dir)).eval()
    names = output_names(model)
    with torch.no_grad():  # the pipeline's eager model, fast paths as configured
        references = [dict(zip(names, (t.numpy() for t in _Outputs(model)(batch)), strict=True)) for batch in batches]
    with staged_folder(target) as staging:
        export_files(model, staging, pairs)
        verification = []
        for runtime, precision in pairs:
            session = RuntimeSession(staging / FILES[runtime, precision], runtime, precision)
            verification.append(verify(session, batches, references, tolerances[precision]))
        report = {
            "format": REPORT_FORMAT,
            "package_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": str(model_dir),
            "model_class": model_class.__name__,
            "inputs": {"pixel_values": ["batch", model.config.num_channels, "height", "width"]},
            "outputs": names,
            "files": [{"format": f, "precision": p, "file": FILES[f, p]} for f, p in pairs],
            "openvino_compute_hint": {p: OPENVINO_COMPUTE[p] for f, p in pairs if f == "openvino"},
            "tolerance_rule": "max |exported - eager| <= tolerance * max(1, max |eager|), over all outputs",
            "cpu": cpu_facts({f for f, _ in pairs}),
            "verification": verification,
        }
        failed = [entry for entry in verification if not entry["passed"]]
        if failed:
            lines = "\n".join(describe(entry) for entry in verification)
            raise ExportVerificationError(
                f"{len(failed)} exported result(s) differ from eager PyTorch beyond the tolerance; nothing was "
                f"written to {output_dir}:\n{lines}",
                report,
            )
        for name in SOURCE_FILES:
            shutil.copyfile(model_dir / name, staging / name)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _tolerance_argument(text: str) -> float:
    try:
        return check_tolerance(float(text))["f32"]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    """The command line; exit status 0 (exported and verified), 1 (beyond the tolerance), 2 (bad input)."""
    parser = argparse.ArgumentParser(prog="python -m convnextv2_hf.export", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="a saved ConvNextV2ForImageClassification or ConvNextV2Backbone folder")
    parser.add_argument("output_dir", help="a new folder (written in a .partial sibling, renamed when verified)")
    parser.add_argument("--format", nargs="+", choices=RUNTIMES, default=list(RUNTIMES), dest="formats")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["f32"], dest="precisions")
    parser.add_argument(
        "--tolerance", type=_tolerance_argument, help=f"allowed error for every precision (default: {TOLERANCES})"
    )
    parser.add_argument("--images", nargs="+", help="image files to verify on (default: scikit-image's photos)")
    args = parser.parse_args(argv)
    try:
        report = export_model(
            args.model_dir, args.output_dir, args.formats, args.precisions, images=args.images, tolerance=args.tolerance
        )
    except ExportVerificationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # the staging folder is already gone
        signum = interrupt.signum if isinstance(interrupt, ConversionInterrupted) else 2
        print(f"error: {str(interrupt) or 'interrupted'}; no output folder was written", file=sys.stderr)
        return 128 + signum
    for entry in report["verification"]:
        print(describe(entry))
    print(f"exported {args.model_dir} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
