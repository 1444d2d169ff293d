"""The benchmark script runs end to end at tiny sizes (so it cannot rot); its ratios are output, not asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_every_group_and_writes_ratios(tmp_path):
    output = tmp_path / "results.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--model", "atto", "--fcmae-model", "atto",
        "--image-size", "64", "--batch", "2", "--train-batch", "2", "--fcmae-batch", "2", "--warmup", "0",
        "--repeats", "1", "--output", str(output), "--only", "infer", "train", "fcmae", "ablate",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(output.read_text())["rows"]}
    expected = {
        "infer builtin eager", "infer ours eager", "infer timm eager", "train builtin eager", "train ours eager",
        "fcmae dense eager", "fcmae sparse eager",
    }  # fmt: skip
    # the ablation checks that each variant computes the same logits before it times them
    # through the config switch: every classifier fast path off in turn, then all of them
    expected |= {"ablate infer ours", "ablate infer ours, without grn_fold", "ablate train ours, without inplace_gelu"}
    expected |= {"ablate infer ours, no fast path", "ablate train ours, without fused_gelu_grn_linear"}
    expected |= {"fcmae vitmae-base eager"}
    assert expected <= set(rows)
    assert all(row["img_per_s"] > 0 for row in rows.values())
    sparse = rows["fcmae sparse eager"]
    assert sparse["ratio"] > 0 and sparse["anchor"] == "fcmae dense eager"
    # peak memory is measured on CPU too (profiler allocation events), and the sparse path needs less of it
    assert all(row["peak_gb"] > 0 for row in rows.values())
    assert 0 < sparse["memory_ratio"] < 1
    assert "ratio" in result.stdout and "fcmae sparse eager" in result.stdout
    assert "fcmae sparse eager against fcmae vitmae-base eager" in result.stdout


def load_benchmark_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import benchmark

    return benchmark


def test_a_preset_sets_defaults_that_flags_override():
    benchmark = load_benchmark_module()
    args = benchmark.parse_args(["--preset", "gpu", "--device", "cpu", "--batch", "4"])
    assert (args.device, args.batch, args.train_batch) == ("cpu", 4, 128)
    assert (args.fcmae_model, args.fcmae_batch, args.vitmae) == ("base", 128, "base")
    assert args.dtype == "bf16" and args.modes == ["eager", "compile"] and args.timm == "eager"
    assert benchmark.parse_args(["--compile"]).modes == ["eager", "compile"]
    assert benchmark.parse_args([]).modes == ["eager"]


def test_time_budget_skips_what_would_start_after_it_and_still_writes_the_json(tmp_path):
    output = tmp_path / "results.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--model", "atto", "--image-size", "64",
        "--batch", "2", "--repeats", "1", "--warmup", "0", "--only", "infer", "train", "--time-budget", "0",
        "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())
    assert document["complete"] is True and document["rows"] == []
    assert [skipped["name"] for skipped in document["skipped"]] == ["infer", "train"]
    assert all("time budget of 0 s spent" in skipped["reason"] for skipped in document["skipped"])
    assert "skipped infer: time budget of 0 s spent" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "meta"], "only cpu and cuda are measured"),
        (["--device", "nope"], "is not a device"),
        (["--only", "infer", "speed"], "unknown group(s) ['speed']"),
    ],
)
def test_bad_arguments_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark_module().parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
