"""The benchmark script runs end to end at tiny sizes (so it cannot rot); its ratios are output, not asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
