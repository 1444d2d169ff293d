import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_end_to_end_and_writes_loadable_checkpoints(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output-dir", str(tmp_path), "--steps", "6"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[4] reloaded ConvNextV2ForImageClassification; held-out accuracy" in result.stdout
    for folder in ("fcmae", "classifier"):
        assert (tmp_path / folder / "model.safetensors").stat().st_size > 1_000_000
        assert (tmp_path / folder / "modeling_convnextv2.py").exists()
