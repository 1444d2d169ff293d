"""Run a folder written by ``convnextv2_hf.export`` in ONNX Runtime or OpenVINO, as ``pipeline("image-classification")``
would run the PyTorch model:

    from convnextv2_hf.deploy import load_exported

    classify = load_exported("exported", runtime="openvino")
    classify("cat.jpg", top_k=2)   # [{'label': 'tabby', 'score': 0.61}, {'label': 'tiger cat', 'score': 0.2}]

The folder is self-describing: the model files, the source's ``config.json`` (labels) and
``preprocessor_config.json``, and ``export_report.json`` (which file holds which precision, and the verification
figures). Images go through the pipeline's own steps (the image source rule of ``convnextv2_hf.pipelines``, the
folder's image processor, softmax or sigmoid as the config says, ``top_k``), so the output is the pipeline's, up
to the runtime's rounding (``export.TOLERANCES``).

The runtimes are an optional extra, imported when first used: ``pip install 'convnextv2-hf[deploy]'``.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import numpy as np

RUNTIMES = ("onnx", "openvino")
PRECISIONS = ("f32", "bf16", "fp16")
# What each precision means in each runtime: the file it reads and, for OpenVINO, the compute precision asked for.
# bf16 is a runtime setting on the f32 file (ONNX Runtime has no such CPU mode); fp16 is fp16-stored weights with
# f32 compute, so it isolates the weight rounding.
FILES = {
    ("onnx", "f32"): "model.onnx",
    ("onnx", "fp16"): "model_fp16.onnx",
    ("openvino", "f32"): "openvino_model.xml",
    ("openvino", "bf16"): "openvino_model.xml",
    ("openvino", "fp16"): "openvino_model_fp16.xml",
}
OPENVINO_COMPUTE = {"f32": "f32", "bf16": "bf16", "fp16": "f32"}
REPORT_NAME = "export_report.json"
REPORT_FORMAT = "convnextv2-hf export"
INSTALL_HINT = "pip install 'convnextv2-hf[deploy]'"
_MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}


def import_optional(module: str, purpose: str):
    """``module`` imported, or an ``ImportError`` that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{purpose} needs the {module!r} package ({error}): {INSTALL_HINT}") from None


@functools.cache
def openvino_core():
    """The process's one ``openvino.Core``. Every ``Core`` starts its own CPU thread pools; with several alive, a
    process that later forks (DataLoader workers) and spawns children (torchrun) was seen to corrupt memory and
    crash with OpenVINO 2026.4, so every model this package compiles shares one."""
    return import_optional("openvino", "running the openvino export").Core()


def check_choice(runtime: str, precision: str) -> None:
    """``ValueError`` naming the runtime or precision that is unknown, or a pair no runtime offers."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown format {runtime!r}; the formats are {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; the precisions are {', '.join(PRECISIONS)}")
    if (runtime, precision) not in FILES:
        offered = [p for r, p in FILES if r == runtime]
        raise ValueError(
            f"{runtime} offers the precisions {', '.join(offered)}, not {precision}: ONNX Runtime has no bf16 mode on "
            "CPU; use the openvino format for bf16"
        )


class RuntimeSession:
    """One exported file compiled in one runtime: ``session(pixel_values)`` gives its outputs by name.

    ``compute_precision`` is what the runtime reports it computes in: OpenVINO's CPU plugin runs f32 where the CPU
    has no native bf16 (no AVX512_BF16 / AMX), even when bf16 is asked for.
    """

    def __init__(self, path: str | Path, runtime: str, precision: str = "f32"):
        check_choice(runtime, precision)
        self.path, self.runtime, self.precision = Path(path), runtime, precision
        module = import_optional(_MODULES[runtime], f"running the {runtime} export")
        if runtime == "onnx":
            self._session = module.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            self.output_names = [output.name for output in self._session.get_outputs()]
            self.compute_precision = "f32"
        else:
            core = openvino_core()
            model = core.read_model(str(self.path))
            hint = {"INFERENCE_PRECISION_HINT": OPENVINO_COMPUTE[precision]}
            self._compiled = core.compile_model(model, "CPU", hint)
            self.output_names = [output.get_any_name() for output in self._compiled.outputs]
            computed = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            self.compute_precision = {"f16": "fp16"}.get(computed, computed)

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if self.runtime == "onnx":
            outputs = self._session.run(None, {"pixel_values": pixel_values})
        else:
            result = self._compiled(pixel_values)
            outputs = [result[output] for output in self._compiled.outputs]
        return dict(zip(self.output_names, outputs, strict=True))


def read_report(folder: str | Path) -> dict:
    """The ``export_report.json`` of an exported folder; ``ValueError`` naming the folder when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: give the output folder of convnextv2_hf.export")
    try:
        report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ValueError(f"{folder} has no readable {REPORT_NAME}: it is not a folder written by convnextv2_hf.export")
    return report


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


class ExportedModel:
    """An exported folder ready to run: ``model(images, top_k=5)`` classifies as transformers' image-classification
    pipeline does (same preprocessing, same ``[{'label': ..., 'score': ...}]`` output, a list of those for a list
    of images); ``model.run(pixel_values)`` gives the raw outputs (logits, or a backbone's feature maps) by name.

    ``runtime`` is "onnx" or "openvino" (default: the first one the folder holds); ``precision`` is "f32", "bf16"
    (OpenVINO) or "fp16" (fp16-stored weights), among those the folder was exported with.
    """

    def __init__(self, folder: str | Path, runtime: str | None = None, precision: str = "f32"):
        import transformers

        from .configuration_convnextv2 import ConvNextV2Config

        self.folder = Path(folder)
        self.report = read_report(self.folder)
        files = {(entry["format"], entry["precision"]): entry["file"] for entry in self.report["files"]}
        runtime = runtime or next(r for r, _ in files)
        check_choice(runtime, precision)
        if (runtime, precision) not in files:
            exported = ", ".join(f"{r} {p}" for r, p in files)
            raise ValueError(f"{self.folder} holds no {runtime} {precision} export (it holds: {exported})")
        self.config = ConvNextV2Config.from_pretrained(self.folder)
        self.image_processor = transformers.AutoImageProcessor.from_pretrained(self.folder)
        self.session = RuntimeSession(self.folder / files[runtime, precision], runtime, precision)

    def run(self, pixel_values) -> dict[str, np.ndarray]:
        """The model's outputs by name for a (batch, 3, height, width) float array or tensor."""
        return self.session(np.asarray(pixel_values, dtype=np.float32))

    def preprocess(self, image) -> np.ndarray:
        """The pipeline's preprocessing of one image (``convnextv2_hf.pipelines``): this package's processors read
        paths, PIL images and bytes themselves (URLs and base64 fetched or decoded to bytes first); any other
        processor gets what transformers' ``load_image`` makes of anything but an array or tensor."""
        from transformers.image_utils import load_image

        from .pipelines import image_source, reads_image_sources

        if reads_image_sources(self.image_processor):
            image = image_source(image)
        elif not (isinstance(image, np.ndarray) or type(image).__module__.startswith("torch")):
            image = load_image(image)
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"].float().numpy()

    def __call__(self, images, top_k: int = 5, function_to_apply: str | None = None, batch_size: int = 8):
        """Labels and scores, best first: a list of ``{'label', 'score'}`` for one image, a list of such lists for a
        list of images. ``top_k`` and ``function_to_apply`` ("softmax", "sigmoid", "none"; default from the config)
        as in the pipeline. Images of the same processed size run ``batch_size`` at a time."""
        if "logits" not in self.session.output_names:
            raise ValueError(f"{self.folder} is a backbone export (feature maps, no labels): use .run(pixel_values)")
        single = not isinstance(images, list)
        inputs = [self.preprocess(image) for image in ([images] if single else images)]
        logits: list[np.ndarray | None] = [None] * len(inputs)
        by_shape: dict[tuple, list[int]] = {}
        for index, pixel_values in enumerate(inputs):
            by_shape.setdefault(pixel_values.shape, []).append(index)
        for indices in by_shape.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = np.concatenate([inputs[index] for index in chunk])
                for index, row in zip(chunk, self.run(batch)["logits"], strict=True):
                    logits[index] = row
        results = [self.postprocess(row, top_k, function_to_apply) for row in logits]
        return results[0] if single else results

    def postprocess(self, logits: np.ndarray, top_k: int = 5, function_to_apply: str | None = None) -> list[dict]:
        """The pipeline's ``postprocess`` on one row of logits."""
        config = self.config
        if function_to_apply is None:
            if config.problem_type == "regression":
                function_to_apply = "none"
            elif config.problem_type == "multi_label_classification" or config.num_labels == 1:
                function_to_apply = "sigmoid"
            else:
                function_to_apply = "softmax"
        functions = {"softmax": softmax, "sigmoid": sigmoid, "none": lambda values: values}
        if function_to_apply.lower() not in functions:
            raise ValueError(f"function_to_apply must be one of {', '.join(functions)}, got {function_to_apply!r}")
        scores = functions[function_to_apply.lower()](logits.astype(np.float32))
        ranked = sorted(
            ({"label": config.id2label[index], "score": score.item()} for index, score in enumerate(scores)),
            key=lambda entry: entry["score"],
            reverse=True,
        )
        return ranked[: min(top_k, config.num_labels)]


def load_exported(folder: str | Path, runtime: str | None = None, precision: str = "f32") -> ExportedModel:
    """``ExportedModel(folder, runtime, precision)``: an exported folder that classifies images in one call."""
    return ExportedModel(folder, runtime, precision)
