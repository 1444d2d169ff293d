"""`make gpu-check` (benchmarks/gpu_check.py): its CPU smoke run end to end, so the GPU command cannot rot; the deadline
handling of its phases; and how it reads targets and the ablation from benchmark rows."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

PHASES = ["tests", "benchmark eager", "benchmark compiled"]


def run_check(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_make_gpu_check_cpu_smoke_writes_every_section_and_prints_the_tables(tmp_path):
    output = tmp_path / "check.json"
    settings = ["DEVICE=cpu", "SMOKE=1", f"GPU_CHECK_PYTHON={sys.executable}", f"GPU_CHECK_OUTPUT={output}"]
    if shutil.which("make"):
        command = ["make", "--no-print-directory", "gpu-check", *settings]
    else:  # what the target runs
        command = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--python", sys.executable]
        command += ["--output", str(output)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())

    assert report["smoke"] is True and report["device_type"] == "cpu" and report["device"]
    assert report["python"] == sys.executable and report["torch"] == torch.__version__
    assert [phase["name"] for phase in report["phases"]] == PHASES
    assert report["budgets_s"] == gpu_check.SMOKE_BUDGETS
    # the tests ran and passed: the fast paths against the reference, sparse against dense, bf16/fp16 gradients
    tests = report["tests"]
    assert tests["status"] == "passed" and tests["failed"] == tests["errors"] == 0
    assert tests["passed"] >= 9 and "--device" in tests["command"] and "device" in tests["command"]
    # every eager group measured, at the smoke sizes, with ratios against their anchors
    rows = {row["name"]: row for row in report["rows"]}
    expected = {"infer builtin eager", "infer ours eager", "train ours eager", "fcmae dense eager"}
    expected |= {"fcmae sparse eager", "fcmae vitmae-tiny eager", "ablate infer ours", "ablate train ours"}
    expected |= {"ablate fcmae ours", "ablate fcmae ours, without sparse_depthwise_conv"}
    assert expected <= set(rows)
    assert all(row["img_per_s"] > 0 and row["batch"] == 2 for row in rows.values())
    sparse = rows["fcmae sparse eager"]
    assert sparse["ratio"] == pytest.approx(sparse["img_per_s"] / rows["fcmae dense eager"]["img_per_s"])
    # the compiled phase is off in the smoke run, and says so
    assert report["phases"][2]["status"] == "skipped: budget 0 s"
    assert {"name": "phase benchmark compiled", "reason": "budget 0 s"} in report["skipped"]
    # every target of issue 13, read off the rows; the compiled ones unmeasured
    targets = {target["target"]: target for target in report["targets"]}
    assert list(targets) == [target[0] for target in gpu_check.TARGETS]
    assert targets["sparse FCMAE, eager"]["value"] == sparse["ratio"]
    assert targets["sparse FCMAE memory"]["value"] == sparse["memory_ratio"]
    assert targets["eager inference"]["status"] == ("met" if rows["infer ours eager"]["ratio"] >= 2.0 else "not met")
    for label, target in targets.items():
        expected_status = {"not measured"} if "compiled" in label else {"met", "not met"}
        assert target["status"] in expected_status, label
    # the ablation's verdict for every fast path, from the rows of every path on against each one taken out
    paths = report["ablation"]["paths"]
    assert list(paths) == gpu_check.FAST_PATHS
    assert all(entry["verdict"] != "not measured" for entry in paths.values())
    without = rows["ablate infer ours, without grn_fold"]
    assert paths["grn_fold"]["effects"]["infer speed"] == pytest.approx(1 / without["ratio"])
    # the printed tables: rows, targets with their status, ablation and the suggested defaults, all last
    stdout = result.stdout
    assert f"{tests['passed']} passed" in stdout
    summary = stdout[stdout.index("== gpu-check on") :]
    assert "fcmae sparse eager" in summary and "target (issue 13)" in summary
    for label, target in targets.items():
        assert any(line.startswith(label) and target["status"] in line for line in summary.splitlines()), label
    assert "suggested DEVICE_DEFAULTS['cpu'] from this run" in summary
    # issue 19: bf16-weights inference, and the ablation per precision with a suggested row per (device, dtype)
    assert {"infer builtin bf16-weights eager", "infer ours bf16-weights eager"} <= set(rows)
    assert not any("onnxruntime" in name or "openvino" in name for name in rows)  # CPU anchors, not this check's
    by_precision = report["ablation_by_precision"]
    assert "bf16-autocast" in by_precision["precisions"]
    if "ablate infer ours, without grn_fold [bf16]" in rows:  # the second precision, unless the budget ran out
        assert "bf16" in by_precision["precisions"]
    else:
        assert any("[bf16]" in item["name"] or "ablate bf16" in item["name"] for item in report["skipped"])
    suggested = by_precision["suggested_by_dtype"]["bfloat16"]
    assert set(suggested) <= set(by_precision["precisions"]["bf16-autocast"]["suggested_defaults"])
    assert f"suggested DEVICE_DEFAULTS[('cpu', torch.bfloat16)]: {suggested}" in summary
    assert f"wrote {output}" in summary.splitlines()[-1]


@pytest.mark.slow
def test_a_second_call_runs_only_the_groups_and_precisions_it_names(tmp_path):
    # what a later GPU session runs for what the first call's budgets cut: the ablation alone, in fp32 first
    output = tmp_path / "check.json"
    result = run_check(
        "--device", "cpu", "--smoke", "--python", sys.executable, "--output", str(output), "--tests-budget", "0",
        "--compiled-budget", "30", "--groups", "ablate", "--ablate-precisions", "fp32",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert [phase["status"] for phase in report["phases"]][::2] == [
        "skipped: budget 0 s", "skipped: none of its groups asked for (--groups)"
    ]  # fmt: skip
    names = {row["name"] for row in report["rows"]}
    assert names and all(name.startswith("ablate ") and name.endswith(" [fp32]") for name in names), names
    assert "ablate infer ours, without grn_fold [fp32]" in names
    fp32 = report["ablation_by_precision"]["precisions"]["fp32"]["paths"]
    assert fp32["grn_fold"]["verdict"] != "not measured" and "float32" in report["ablation_by_precision"][
        "suggested_by_dtype"]  # fmt: skip


def test_no_python_that_can_run_the_check_is_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "python"
    result = run_check("--device", "cpu", "--python", str(missing), "--output", str(tmp_path / "x.json"))
    assert result.returncode == 3
    assert str(missing) in result.stderr and "GPU_CHECK_PYTHON" in result.stderr and "INSTALL=1" in result.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_asked_for_without_a_gpu_names_the_reason(tmp_path):
    result = run_check("--device", "cuda", "--python", sys.executable, "--output", str(tmp_path / "x.json"))
    assert result.returncode == 3
    assert "sees no CUDA device" in result.stderr and sys.executable in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "meta"], "runs on cpu or cuda"),
        (["--device", "cuda:x"], "runs on cpu or cuda"),
        (["--tests-budget", "-5"], "budget of phase 'tests' must be >= 0"),
        (["--ablate-precisions", "int8"], "invalid choice: 'int8'"),
        (["--groups", "compile"], "invalid choice: 'compile'"),
        (["--ablate-precisions", "fp32", "bf16", "fp32"], "names a precision twice: fp32 bf16 fp32"),
    ],
)
def test_bad_arguments_are_usage_errors(args, message):
    result = run_check(*args, timeout=60)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.slow
def test_a_phase_is_interrupted_at_its_deadline_and_killed_after_the_grace(tmp_path):
    # pytest interrupted: it reports the tests that ran; the test it was in is neither passed nor failed
    (tmp_path / "test_slow.py").write_text(
        "import time\n\ndef test_quick():\n    assert True\n\ndef test_slow():\n    time.sleep(60)\n"
    )
    junit = tmp_path / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(junit)]
    started = time.monotonic()
    phase = gpu_check.run_phase(command + [str(tmp_path / "test_slow.py")], started + 6, 20, interrupt_first=True)
    assert phase["outcome"] == "interrupted at its deadline" and phase["returncode"] == 2
    assert time.monotonic() - started < 20
    assert gpu_check.parse_junit(junit) == {"passed": 1, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    # a program that ignores the interrupt is killed when the grace is over
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('started', flush=True); "
    stubborn += "time.sleep(60)"
    started = time.monotonic()
    phase = gpu_check.run_phase([sys.executable, "-c", stubborn], started + 2, 1, interrupt_first=True)
    assert phase["outcome"] == "killed at its deadline and 1 s of grace" and phase["returncode"] < 0
    assert 3 <= time.monotonic() - started < 10 and "started" in phase["output_tail"]


def test_targets_are_read_from_the_rows_and_compared_with_their_bounds():
    def row(name, img_per_s, ratio=None, memory_ratio=None):
        return {"name": name, "img_per_s": img_per_s, "ratio": ratio, "memory_ratio": memory_ratio}

    rows = {
        r["name"]: r
        for r in [
            row("infer ours eager", 100, ratio=2.1),
            row("infer ours compile", 100, ratio=1.1),
            row("fcmae sparse eager", 50, ratio=2.3, memory_ratio=0.46),
            row("fcmae vitmae-base eager", 40),
        ]
    }
    targets = {target["target"]: target for target in gpu_check.evaluate_targets(rows, "base")}
    assert targets["eager inference"]["status"] == "met" and targets["eager inference"]["shown"] == "2.10x"
    assert targets["compiled inference"]["status"] == "not met"
    assert targets["training step"]["status"] == "not measured" and targets["training step"]["value"] is None
    assert targets["sparse FCMAE, eager"]["status"] == "met"  # the bound itself counts as met
    assert targets["sparse FCMAE memory"]["status"] == "not met" and targets["sparse FCMAE memory"]["shown"] == "46%"
    assert targets["FCMAE step per image, eager"]["value"] == pytest.approx(1.25)
    assert targets["FCMAE step per image, eager"]["status"] == "met"


def test_the_ablation_switches_a_path_on_where_it_helps_and_hurts_nowhere():
    def without(group, path, ratio, memory_ratio=1.0):
        name = f"ablate {group} ours, without {path}"
        return name, {"name": name, "ratio": ratio, "memory_ratio": memory_ratio}

    rows = dict(
        [
            without("infer", "grn_fold", 0.8),  # 1.25x faster with it
            without("train", "grn_fold", 1.0),
            without("infer", "inplace_gelu", 1.1),  # slower with it
            without("infer", "square_sum_norm", 0.8),
            without("train", "square_sum_norm", 1.2),  # faster at inference, slower in training
            without("train", "fused_gelu_grn_linear", 0.99, memory_ratio=1.5),  # same speed, a third less memory
            without("fcmae", "fused_gelu_grn_linear", 1.01, memory_ratio=1.3),
        ]
    )
    ablation = gpu_check.ablation_verdicts(rows)
    verdicts = {path: entry["verdict"] for path, entry in ablation["paths"].items()}
    assert verdicts == {
        "grn_fold": "on: faster",
        "inplace_gelu": "off: slower",
        "square_sum_norm": "mixed: decide by hand",
        "fused_gelu_grn_linear": "on: less memory at the same speed",
        "sparse_depthwise_conv": "not measured",
        "sparse_downsample_matmul": "not measured",
        "dense_depthwise_conv": "not measured",
        "chunked_mlp": "not measured",
        "onednn_linear": "not measured",
    }
    assert ablation["suggested_defaults"] == ["grn_fold", "fused_gelu_grn_linear"]
    assert ablation["paths"]["fused_gelu_grn_linear"]["effects"]["train memory"] == pytest.approx(1 / 1.5)


def test_the_report_is_written_atomically(tmp_path):
    report = {"output": str(tmp_path / "sub" / "check.json"), "rows": [1, 2]}
    gpu_check.save(report)
    assert json.loads((tmp_path / "sub" / "check.json").read_text()) == report
    assert os.listdir(tmp_path / "sub") == ["check.json"]


def test_the_per_dtype_suggestion_keeps_a_path_only_where_every_precision_of_the_dtype_wants_it():
    def without(group, path, ratio, suffix=""):
        name = f"ablate {group} ours, without {path}{suffix}"
        return name, {"name": name, "ratio": ratio, "memory_ratio": 1.0}

    rows = dict(
        [
            without("infer", "grn_fold", 0.8),  # bf16 autocast: faster with it
            without("infer", "square_sum_norm", 0.8),
            without("infer", "grn_fold", 0.8, " [bf16]"),  # bf16 weights: the fold pays, the square-sum does not
            without("infer", "square_sum_norm", 1.2, " [bf16]"),
            without("infer", "grn_fold", 1.3, " [fp32]"),  # fp32: the fold is slower
        ]
    )
    ablation = gpu_check.ablation_by_precision(rows, ["bf16-autocast", "bf16", "fp16", "fp32"])
    assert list(ablation["precisions"]) == ["bf16-autocast", "bf16", "fp32"]  # fp16 not measured: no entry
    assert ablation["precisions"]["bf16-autocast"]["suggested_defaults"] == ["grn_fold", "square_sum_norm"]
    assert ablation["suggested_by_dtype"] == {"bfloat16": ["grn_fold"], "float32": []}


def test_the_ablation_precisions_can_be_named_and_rows_are_read_as_benchmark_names_them():
    assert gpu_check.parse_args([]).ablate_precisions == gpu_check.GPU_ABLATE_PRECISIONS
    assert gpu_check.parse_args(["--smoke"]).ablate_precisions == gpu_check.SMOKE_ABLATE_PRECISIONS
    assert gpu_check.parse_args(["--ablate-precisions", "fp32", "fp16"]).ablate_precisions == ["fp32", "fp16"]
    # a second call for what a budget cut (fp32 alone): benchmark.py names its rows " [fp32]" as it is not the run's
    # own precision (bf16 autocast under --preset gpu), first or not
    name = "ablate infer ours, without grn_fold [fp32]"
    rows = {name: {"name": name, "ratio": 1.3, "memory_ratio": 1.0}}
    ablation = gpu_check.ablation_by_precision(rows, ["fp32"])
    assert ablation["precisions"]["fp32"]["paths"]["grn_fold"]["verdict"] == "off: slower"
    assert gpu_check.row_suffix("bf16", 0) == "" and gpu_check.row_suffix("bf16", 1) == " [bf16]"
    # gpu_check.py starts on the standard library alone, so it states the run's own precisions rather than import
    # benchmark.py: they must stay those of benchmark.py's GPU preset
    import benchmark

    dtype = benchmark.PRESETS["gpu"]["dtype"]
    assert gpu_check.RUN_PRECISIONS == (dtype, f"{dtype}-autocast")


def test_the_ablation_knows_every_fast_path_and_where_it_runs():
    # a path added to the configuration is ablated on a GPU too, in the groups where it runs
    from convnextv2_hf.configuration_convnextv2 import FAST_PATH_NAMES

    assert sorted(gpu_check.FAST_PATHS) == sorted(FAST_PATH_NAMES)
    assert set(gpu_check.ABLATION_GROUPS) == set(FAST_PATH_NAMES)
    assert all(set(groups) <= {"infer", "train", "fcmae"} and groups for groups in gpu_check.ABLATION_GROUPS.values())
