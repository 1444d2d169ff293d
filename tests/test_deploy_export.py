"""Export for deployment (``convnextv2_hf.export``) and the runner (``convnextv2_hf.deploy``): real ONNX Runtime and
OpenVINO on real exported files from tiny saved folders, verified on scikit-image's photos.

One classifier export with every format and precision (module fixture, ~25 s on 2 cores) serves most tests; bad
input fails before anything is exported. Tolerances: f32 runtimes within 1e-5 of eager logits (measured ~5e-7),
fp16-stored weights within 2e-3 of eager scores (measured ~1e-4).
"""

import json
import os
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from expected_errors import ONNX_HAS_NO_BF16, UNKNOWN_EXPORT_FORMAT
from helpers import randomize_, tiny_config
from skimage import data as skimage_data

from convnextv2_hf import (
    ConvNextV2Backbone,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2ImageProcessor,
    ConvNextV2Model,
)
from convnextv2_hf import export as export_module
from convnextv2_hf.deploy import FILES, PRECISIONS, RUNTIMES, load_exported
from convnextv2_hf.export import TOLERANCES, ExportVerificationError, export_model, main

LABELS = {0: "astronaut", 1: "coffee", 2: "cat", 3: "rocket", 4: "teapot"}
PAIRS = list(FILES)


def save_folder(folder: Path, model) -> Path:
    model.save_pretrained(folder)
    ConvNextV2ImageProcessor(size={"shortest_edge": 64}).save_pretrained(folder)
    return folder


def photos() -> list[PIL.Image.Image]:
    return [
        PIL.Image.fromarray(photo)
        for photo in (skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea())
    ]


def listing(folder: Path) -> list[str]:
    """Everything under ``folder``'s parent: a failed export must add nothing there (no output, no .partial)."""
    return sorted(str(path.relative_to(folder.parent)) for path in folder.parent.rglob("*"))


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory) -> Path:
    model = randomize_(ConvNextV2ForImageClassification(tiny_config(id2label=LABELS))).eval()
    return save_folder(tmp_path_factory.mktemp("classifier") / "model", model)


@pytest.fixture(scope="module")
def exported(classifier_folder, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("exported") / "out"
    return output, export_model(classifier_folder, output, RUNTIMES, PRECISIONS)


@pytest.mark.slow
def test_every_format_and_precision_is_written_with_its_verification_figures(exported, classifier_folder):
    output, report = exported
    assert json.loads((output / "export_report.json").read_text()) == report
    entries = {(entry["format"], entry["precision"]): entry for entry in report["verification"]}
    assert list(entries) == PAIRS
    for (runtime, precision), entry in entries.items():
        assert (output / entry["file"]).is_file() and entry["file"] == FILES[runtime, precision]
        assert entry["passed"] and entry["max_abs_error"] <= entry["allowed_error"], entry
        assert entry["tolerance"] == TOLERANCES[precision]
        # 3 photos at 64 x 64 and 2 at 64 x 96: every result computed in f32 agrees with eager on all five. Where the
        # CPU has native bf16 OpenVINO computes bf16 in bf16, and this random tiny model's top-2 margins (~1e-3) lie
        # below bf16's rounding: a photo may flip there (measured 4/5 on an AVX512-BF16 EPYC); what bounds bf16 is
        # the error check above, and the agreement is reported
        if entry["compute_precision"] == "bf16":
            assert re.fullmatch(r"[0-5]/5", entry["top1_agreement"]), entry
        else:
            assert entry["top1_agreement"] == "5/5", entry
        assert entry["input_shapes"] == [[3, 3, 64, 64], [2, 3, 64, 96]]
    assert entries["onnx", "f32"]["max_abs_error"] < 1e-5 and entries["openvino", "f32"]["max_abs_error"] < 1e-5
    for runtime in RUNTIMES:  # the fp16 files really hold rounded weights: their error is above f32's
        assert entries[runtime, "fp16"]["max_abs_error"] > 10 * entries[runtime, "f32"]["max_abs_error"]
    # bf16 runs in bf16 only where the CPU has it (report, don't fail): OpenVINO says which
    native_bf16 = "BF16" in report["cpu"]["openvino_capabilities"]
    assert entries["openvino", "bf16"]["compute_precision"] == ("bf16" if native_bf16 else "f32")
    for name in ("config.json", "preprocessor_config.json"):  # the folder is self-describing
        assert (output / name).read_bytes() == (classifier_folder / name).read_bytes()
    assert json.loads((output / "config.json").read_text())["id2label"]["2"] == "cat"
    assert not list(output.parent.glob(".*partial"))
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o777 & ~umask  # as a mkdir makes it, not mkdtemp's owner-only 0o700


@pytest.mark.slow
def test_exported_files_have_dynamic_batch_height_and_width_and_fp16_weights(exported):
    import onnx
    import openvino

    output, _ = exported
    for name in ("model.onnx", "model_fp16.onnx"):
        proto = onnx.load(str(output / name))
        dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", 3, "height", "width"], name
    weights = onnx.load(str(output / "model_fp16.onnx")).graph.initializer
    halves = [t for t in weights if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) >= 80 and all(t.data_type != onnx.TensorProto.FLOAT or len(t.dims) <= 1 for t in weights)
    model = openvino.Core().read_model(str(output / "openvino_model.xml"))
    assert str(model.inputs[0].get_partial_shape()) == "[?,3,?,?]"
    full, half = (output / "openvino_model.bin").stat().st_size, (output / "openvino_model_fp16.bin").stat().st_size
    assert 0.45 < half / full < 0.55, (half, full)


@pytest.fixture(scope="module")
def translucent_png(tmp_path_factory) -> str:
    """A half-transparent photo as a file: the package's image rule composites it on white, where transformers'
    ``load_image`` drops alpha, so the runner matches the pipeline only if it prepares images by the same rule."""
    rgba = np.concatenate([skimage_data.coffee(), np.full((400, 600, 1), 100, np.uint8)], axis=-1)
    path = tmp_path_factory.mktemp("images") / "translucent.png"
    PIL.Image.fromarray(rgba, "RGBA").save(path)
    return str(path)


@pytest.fixture(scope="module")
def pipeline_results(classifier_folder, translucent_png):
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(classifier_folder), device="cpu")
    every_label = {r["label"]: r["score"] for r in classify(photos()[1], top_k=50)}
    scores = [{r["label"]: r["score"] for r in one} for one in classify([*photos(), translucent_png], top_k=50)]
    outputs = classify([*photos(), translucent_png], top_k=3), classify(photos()[0]), classify(photos()[1], top_k=50)
    return outputs, (scores, [scores[0]], [every_label])


def assert_ranked_like(got: list[dict], expected: list[dict], scores: dict[str, float], tolerance: float, exact: bool):
    """``got`` has the pipeline's format and the labels of ``expected`` in its order. Computed in bf16, two labels
    whose pipeline scores lie within twice the tolerance (a near-tie) may trade places, in the order or across the top-k
    cut; every score must still be its label's pipeline score to the tolerance."""
    assert all(set(r) == {"label", "score"} and isinstance(r["score"], float) for r in got)
    assert len(got) == len(expected)
    assert max(abs(r["score"] - scores[r["label"]]) for r in got) <= tolerance
    if exact:
        assert [r["label"] for r in got] == [r["label"] for r in expected]
        return
    assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
    for rank, r in enumerate(got):  # at each rank, the label is one the pipeline ranks there up to a near-tie
        assert abs(scores[r["label"]] - expected[rank]["score"]) <= 2 * tolerance, (rank, got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("runtime, precision", PAIRS, ids=[f"{r}-{p}" for r, p in PAIRS])
def test_runner_gives_the_pipeline_output(exported, pipeline_results, translucent_png, runtime, precision):
    from transformers.image_utils import load_image

    output, _ = exported
    (expected_batch, expected_single, expected_all), every_score = pipeline_results
    classify = load_exported(output, runtime, precision)
    in_f32 = precision == "f32" or classify.session.compute_precision == "f32"
    tolerance = 2e-3 if precision == "fp16" else 1e-5 if in_f32 else 1e-2
    for got, expected, scores in zip(
        (
            classify([*photos(), translucent_png], top_k=3),  # a list gives a list of lists
            [classify(photos()[0])],  # one image gives one list; top_k defaults to 5
            [classify(photos()[1], top_k=50)],  # top_k beyond the labels: every label
        ),
        (expected_batch, [expected_single], [expected_all]),
        every_score,
        strict=True,
    ):
        assert len(got) == len(expected)
        for got_one, expected_one, scores_one in zip(got, expected, scores, strict=True):
            assert_ranked_like(got_one, expected_one, scores_one, tolerance, exact=tolerance <= 1e-5)
    # the translucent file tells the two image rules apart: load_image's pixels are not the pipeline's
    dropped_alpha = classify.image_processor(load_image(translucent_png), return_tensors="pt")["pixel_values"]
    assert np.abs(dropped_alpha.numpy() - classify.preprocess(translucent_png)).max() > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runner_runs_other_batch_sizes_and_image_sizes(exported, classifier_folder, runtime):
    output, _ = exported
    model = ConvNextV2ForImageClassification.from_pretrained(classifier_folder).eval()
    classify = load_exported(output, runtime)
    generator = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 64, 64), (4, 3, 96, 80), (2, 3, 130, 64)]:
        pixels = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = model(pixels).logits.numpy()
        got = classify.run(pixels)["logits"]
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4 * max(1, np.abs(expected).max())


@pytest.mark.slow
def test_backbone_folder_exports_its_feature_maps(tmp_path):
    model = randomize_(ConvNextV2Backbone(tiny_config(out_features=["stage1", "stage3"]))).eval()
    folder = save_folder(tmp_path / "backbone", model)
    report = export_model(folder, tmp_path / "out", ["onnx", "openvino"], ["f32"])
    assert report["outputs"] == ["stage1", "stage3"] and report["model_class"] == "ConvNextV2Backbone"
    assert all(entry["passed"] and entry["top1_agreement"] is None for entry in report["verification"])
    pixels = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixels).feature_maps
    for runtime in RUNTIMES:
        exported_model = load_exported(tmp_path / "out", runtime)
        got = exported_model.run(pixels)
        assert list(got) == ["stage1", "stage3"]
        for name, reference in zip(got, expected, strict=True):
            assert np.abs(got[name] - reference.numpy()).max() <= 1e-4 * max(1, reference.abs().max().item())
        with pytest.raises(ValueError, match=r"is a backbone export \(feature maps, no labels\): use .run"):
            exported_model(photos()[0])


@pytest.mark.slow
def test_exported_graph_is_the_reference_math_whatever_fast_paths_say(classifier_folder):
    """fast_path_allowed refuses every fast path under torch.export (what torch.onnx.export(dynamo=True) traces
    with): the graph of the default model (fast_paths=True, all CPU paths on) is the fast_paths=False graph."""
    model = ConvNextV2ForImageClassification.from_pretrained(classifier_folder).eval()
    assert model.config.fast_paths is True
    graphs = []
    for setting in (True, False):
        model.config.fast_paths = setting
        program = torch.export.export(export_module._Outputs(model), (torch.randn(2, 3, 64, 64),))
        graphs.append([str(node.target) for node in program.graph.nodes if node.op == "call_function"])
    assert graphs[0] == graphs[1] and "aten.bmm.default" not in graphs[0]
    model.config.fast_paths = True
    with export_module._fast_paths_off(model):  # the export turns them off anyway, and restores the setting
        assert model.config.fast_paths is False
    assert model.config.fast_paths is True


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError naming it, and nothing left behind
# ----------------------------------------------------------------------------------------------------------


def _fcmae(tmp_path):
    return save_folder(tmp_path / "fcmae", ConvNextV2ForMaskedImageModeling(tiny_config()))


def _encoder(tmp_path):
    return save_folder(tmp_path / "encoder", ConvNextV2Model(tiny_config()))


def _random_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("holiday pictures")
    return tmp_path / "photos"


def _no_processor(tmp_path):
    ConvNextV2ForImageClassification(tiny_config()).save_pretrained(tmp_path / "bare")
    return tmp_path / "bare"


def _a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    return tmp_path / "model.safetensors"


BAD_MODEL_DIRS = [
    ("fcmae", _fcmae, r"fcmae holds a ConvNextV2ForMaskedImageModeling \(FCMAE pretraining: fine-tune it"),
    ("encoder", _encoder, r"encoder holds a ConvNextV2Model; the export takes a classifier"),
    ("random-folder", _random_folder, r"photos' has no config.json"),
    ("missing", lambda tmp_path: tmp_path / "nowhere", r"the model folder .*nowhere does not exist"),
    ("file", _a_file, r"model.safetensors is a file: give the folder that save_pretrained wrote"),
    ("no-processor", _no_processor, r"bare has no preprocessor_config.json: save the image processor"),
]


@pytest.mark.parametrize("make, pattern", [c[1:] for c in BAD_MODEL_DIRS], ids=[c[0] for c in BAD_MODEL_DIRS])
def test_a_folder_that_is_no_classifier_or_backbone_is_refused(tmp_path, make, pattern):
    model_dir = make(tmp_path)
    before = listing(tmp_path / "out")
    with pytest.raises(ValueError, match=pattern):
        export_model(model_dir, tmp_path / "out", ["onnx"])
    assert listing(tmp_path / "out") == before


BAD_REQUESTS = [
    ("unknown-format", {"formats": ["tflite"]}, r"unknown format 'tflite'; the formats are onnx, openvino"),
    ("unknown-precision", {"precisions": ["int8"]}, r"unknown precision 'int8'; the precisions are f32, bf16, fp16"),
    ("onnx-bf16", {"formats": ["onnx"], "precisions": ["bf16"]}, ONNX_HAS_NO_BF16),
    ("format-string", {"formats": "onnx"}, r"formats and precisions are lists of names"),
    ("no-format", {"formats": []}, r"nothing to export"),
    ("negative-tolerance", {"tolerance": -1e-3}, r"tolerance must be a finite number >= 0, got -0.001"),
    ("nan-tolerance", {"tolerance": float("nan")}, r"tolerance must be a finite number >= 0, got nan"),
    ("empty-images", {"images": []}, r"images must be a non-empty list"),
]


@pytest.mark.parametrize("options, pattern", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_choices_are_refused(classifier_folder, tmp_path, options, pattern):
    options = {"formats": ["onnx"], **options}
    with pytest.raises(ValueError, match=pattern):
        export_model(classifier_folder, tmp_path / "out", **options)
    assert listing(tmp_path / "out") == []


def _existing_file(tmp_path):
    (tmp_path / "out").write_text("keep me")
    return tmp_path / "out"


def _full_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    return tmp_path / "out"


def _under_a_file(tmp_path):
    (tmp_path / "notes").write_text("a file")
    return tmp_path / "notes" / "out"


def _link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")
    return tmp_path / "out"


BAD_OUTPUTS = [
    ("existing-file", _existing_file, r"the output folder .*out is an existing file, not a folder"),
    ("folder-not-empty", _full_folder, r"the output folder .*out already exists and is not empty"),
    ("under-a-file", _under_a_file, r"cannot create the output folder .*notes/out: .*notes is a file"),
    ("symbolic-link", _link, r"the output folder .*out is a symbolic link"),
]


@pytest.mark.parametrize("make, pattern", [c[1:] for c in BAD_OUTPUTS], ids=[c[0] for c in BAD_OUTPUTS])
def test_an_output_that_exists_or_is_a_file_is_refused_and_kept(classifier_folder, tmp_path, make, pattern):
    output = make(tmp_path)
    before = {str(p): p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))}
    with pytest.raises(ValueError, match=pattern):
        export_model(classifier_folder, output, ["onnx"])
    assert {str(p): p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))} == before


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="Linux's /sys refuses new folders (EPERM), even to root")
def test_an_unwritable_output_is_a_clear_error(classifier_folder):
    with pytest.raises(ValueError, match=r"could not write the output folder /sys/convnextv2-export: .*nothing was"):
        export_model(classifier_folder, "/sys/convnextv2-export", ["onnx"])


def test_a_missing_runtime_names_the_extra(classifier_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` does when it is not installed
    with pytest.raises(ImportError, match=r"needs the 'openvino' package .*pip install 'convnextv2-hf\[deploy\]'"):
        export_model(classifier_folder, tmp_path / "out", ["openvino"])
    assert listing(tmp_path / "out") == []


@pytest.mark.slow
def test_an_interrupted_export_leaves_nothing(classifier_folder, tmp_path, monkeypatch):
    """Ctrl-C while the files are written (a stand-in export that writes one file and is interrupted: the real
    one takes seconds): the .partial folder and the parent folders the export created are removed."""

    def interrupted(model, folder, pairs):
        (folder / "model.onnx").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "export_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(classifier_folder, tmp_path / "new" / "deeper" / "out", ["onnx"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_command_line_fails_beyond_the_tolerance_and_writes_nothing(classifier_folder, tmp_path, capsys, monkeypatch):
    """--tolerance 0 (a flag, no monkeypatching of tolerances) on fp16 weights, whose rounding error cannot be 0:
    exit status 1, the figures printed, no output folder and no parent folder the export created. A spy around the
    real export_model keeps the error's report."""
    caught = []

    def spy(*args, **kwargs):
        try:
            return export_model(*args, **kwargs)
        except ExportVerificationError as error:
            caught.append(error)
            raise

    monkeypatch.setattr(export_module, "export_model", spy)
    output = tmp_path / "new" / "out"
    status = main([str(classifier_folder), str(output), "--format", "onnx", "--precision", "fp16", "--tolerance", "0"])
    error = capsys.readouterr().err
    assert status == 1, error
    assert "error: 1 exported result(s) differ from eager PyTorch beyond the tolerance; nothing was written" in error
    assert "onnx fp16 (model_fp16.onnx): largest error" in error and "<-- beyond the tolerance" in error
    (entry,) = caught[0].report["verification"]
    assert not entry["passed"] and entry["max_abs_error"] > 0 and entry["allowed_error"] == 0
    assert list(tmp_path.iterdir()) == []


def test_command_line_bad_input_exits_2_with_an_error_line(classifier_folder, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as caught:  # argparse
        main([str(classifier_folder), str(tmp_path / "a"), "--format", "tflite"])
    assert caught.value.code == 2 and UNKNOWN_EXPORT_FORMAT in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main([str(classifier_folder), str(tmp_path / "a"), "--tolerance", "-1"])
    assert caught.value.code == 2 and "tolerance must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    # `python -m convnextv2_hf.export` (run as __main__ in this process: a new interpreter costs ~10 s of imports):
    # a folder that is no classifier exits 2 with an error line
    fcmae = _fcmae(tmp_path)
    monkeypatch.setattr(sys, "argv", ["export", str(fcmae), str(tmp_path / "b"), "--format", "onnx"])
    with pytest.raises(SystemExit) as caught, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'convnextv2_hf.export' found in sys.modules", RuntimeWarning)  # imported
        runpy.run_module("convnextv2_hf.export", run_name="__main__")
    error = capsys.readouterr().err
    assert caught.value.code == 2 and "error: " in error and "holds a ConvNextV2ForMaskedImageModeling" in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fcmae"]


@pytest.mark.slow
def test_runner_refuses_a_folder_that_is_not_an_export(classifier_folder, exported):
    with pytest.raises(ValueError, match=r"has no readable export_report.json: it is not a folder written by"):
        load_exported(classifier_folder)
    output, _ = exported
    with pytest.raises(ValueError, match=ONNX_HAS_NO_BF16):
        load_exported(output, "onnx", "bf16")


@pytest.mark.slow
def test_a_process_that_ran_openvino_can_still_fork_workers_and_spawn_children(classifier_folder, tmp_path):
    """Found by the full suite: with one ``openvino.Core`` per compiled model (three for the three precisions), a
    process that then forked DataLoader workers and waited on a child process died of a segmentation fault
    (OpenVINO 2026.4). The package keeps one Core per process; the scenario runs in a child interpreter so that a
    crash fails this test (exit status -11) instead of killing the test run."""
    script = f"""
import subprocess, sys, torch
from convnextv2_hf.deploy import load_exported
from convnextv2_hf.export import export_model
export_model({str(classifier_folder)!r}, {str(tmp_path / "out")!r}, ["openvino"], ["f32", "bf16", "fp16"])
for precision in ("f32", "bf16", "fp16"):
    load_exported({str(tmp_path / "out")!r}, "openvino", precision)
dataset = torch.utils.data.TensorDataset(torch.randn(8, 3))
assert sum(len(batch[0]) for batch in torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)) == 8
for _ in range(3):
    assert subprocess.run([sys.executable, "-c", "import time; time.sleep(1)"]).returncode == 0
print("survived")
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    report = (result.returncode, result.stderr[-2000:])
    assert result.returncode == 0 and result.stdout.strip().endswith("survived"), report
