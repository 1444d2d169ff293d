"""The example scripts: the main job end to end (shortened), argument checks, evaluation."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
from expected_errors import (
    FOLDER_HOLDS_NO_IMAGES,
    LAYER_DECAY_OUT_OF_RANGE,
    LAYER_DECAY_OUT_OF_RANGE_ANY_VALUE,
    SKIPPING_UNREADABLE_IMAGE,
    UNKNOWN_MODEL_SIZE,
    UNKNOWN_RECIPE,
)
from helpers import REPO, free_port

sys.path.insert(0, str(REPO / "examples"))

import evaluate_classifier  # noqa: E402
import finetune_image_classification  # noqa: E402
import pretrain_fcmae  # noqa: E402


@pytest.fixture(scope="module")
def main_job_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("main_job")
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "main_job.py"), "--output_dir", str(output), "--quick"],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout


@pytest.mark.slow
def test_main_job_writes_a_hub_ready_folder_and_reports_both_accuracies(main_job_output):
    output, stdout = main_job_output
    assert "[3] held-out accuracy: FCMAE-pretrained" in stdout and "from random initialisation" in stdout
    assert "reloaded with pipeline('image-classification')" in stdout
    folder = output / "classifier"
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "modeling_convnextv2.py"):
        assert (folder / name).exists(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(10)}
    assert "model-index" in (folder / "README.md").read_text() or "---" in (folder / "README.md").read_text()
    summary = json.loads((output / "summary.json").read_text())
    assert 0.0 <= summary["held_out_accuracy_fcmae_pretrained"] <= 1.0
    assert list((output / "fcmae").glob("model.safetensors"))


def test_evaluate_script_agrees_with_the_trainer_evaluation(main_job_output):
    # the main job trains and evaluates under bf16 autocast where the CPU has native bf16 (summary.json says so):
    # the script then evaluates the same way, at the Trainer's evaluation batch size (128), and must agree exactly
    output, _ = main_job_output
    summary = json.loads((output / "summary.json").read_text())
    precision = ["--bf16_autocast", "true", "--batch_size", "128"] if summary["bf16_autocast"] else []
    results = evaluate_classifier.main(
        ["--model_name_or_path", str(output / "classifier"), "--data_dir", str(output / "digits" / "validation"),
         *precision]
    )  # fmt: skip
    assert results["num_images"] == 360
    assert results["accuracy"] == pytest.approx(summary["held_out_accuracy_fcmae_pretrained"], abs=1e-6)
    assert results["top5_accuracy"] >= results["accuracy"]


def digit_folder(root: Path, classes=("a", "b"), per_class=2, splits=("train", "validation")) -> Path:
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                PIL.Image.new("RGB", (64, 64), color=(40 * i, 80, 120)).save(root / split / name / f"{i}.png")
    return root


def finetune_args(tmp_path, *extra):
    return ["--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none", "--max_steps", "1", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model_size", "gigantic"], UNKNOWN_MODEL_SIZE),
        (["--layer_decay", "0"], LAYER_DECAY_OUT_OF_RANGE),
        (["--layer_decay", "-0.5"], LAYER_DECAY_OUT_OF_RANGE_ANY_VALUE),
        (["--recipe", "small"], UNKNOWN_RECIPE),
    ],
)
def test_finetune_rejects_bad_arguments_before_training(tmp_path, extra, message):
    data = digit_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=message):
        finetune_image_classification.main(finetune_args(tmp_path, "--data_dir", str(data), *extra))
    assert not (tmp_path / "out").exists()


def test_finetune_rejects_a_folder_without_images(tmp_path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=FOLDER_HOLDS_NO_IMAGES):
        finetune_image_classification.main(finetune_args(tmp_path, "--data_dir", str(tmp_path / "empty")))
    assert not (tmp_path / "out").exists()


def test_finetune_rejects_a_class_missing_from_the_validation_split(tmp_path):
    data = digit_folder(tmp_path / "data", classes=("a", "b", "c"), splits=("train",))
    digit_folder(tmp_path / "data", classes=("a", "b"), splits=("validation",))
    with pytest.raises(ValueError, match=r"class\(es\) \['c'\] have no image in the validation split"):
        finetune_image_classification.main(finetune_args(tmp_path, "--data_dir", str(data)))
    assert not (tmp_path / "out").exists()


def test_pretrain_rejects_bad_arguments(tmp_path):
    data = digit_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=UNKNOWN_MODEL_SIZE):
        pretrain_fcmae.main(finetune_args(tmp_path, "--train_dir", str(data / "train"), "--model_size", "gigantic"))
    with pytest.raises(ValueError, match="exactly one of --train_dir and --dataset_name"):
        pretrain_fcmae.main(finetune_args(tmp_path))


@pytest.mark.slow
def test_finetune_script_runs_unchanged_under_torchrun_with_two_processes(tmp_path):
    data = digit_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=4)
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
        str(REPO / "examples" / "finetune_image_classification.py"),
        "--data_dir", str(data), "--model_size", "atto", "--image_size", "64", "--output_dir", str(output),
        "--use_cpu", "--report_to", "none", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4", "--recipe", "tiny", "--ema_decay", "0.9", "--save_strategy", "no",
        "--ddp_find_unused_parameters", "false",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output / "eval_results.json").read_text())
    # 12 training images, 2 processes x 2 per device: 3 steps per epoch (6 with one process), 2 steps done
    assert metrics["epoch"] == pytest.approx(2 / 3, abs=1e-3)
    assert {"eval_accuracy", "eval_ema_accuracy", "eval_top5_accuracy"} <= set(metrics)
    assert (output / "model.safetensors").exists() and (output / "preprocessor_config.json").exists()
    # the recipe's effective values, total batch of both processes included, in the log and the card
    assert "learning_rate = 1.25e-05  (base_learning_rate 0.0008 x total batch 4 / 256)" in result.stdout
    card = (output / "README.md").read_text()
    for line in ("lr_scheduler_type: cosine_with_min_lr", "recipe: tiny", "layer_decay: 0.9", "ema_decay: 0.9",
                 "total_train_batch_size: 4", "num_devices: 2"):  # fmt: skip
        assert f"- {line}\n" in card, line


def test_finetune_names_a_truncated_training_image_or_skips_it_when_asked(tmp_path, caplog):
    data = digit_folder(tmp_path / "data", classes=("a", "b"), per_class=3)
    bad = data / "train" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    argv = finetune_args(tmp_path, "--data_dir", str(data), "--image_size", "32", "--per_device_train_batch_size",
                         "6", "--save_strategy", "no")  # fmt: skip
    with pytest.raises(ValueError, match=f"cannot read image {bad}: .*--skip_corrupt_images"):
        finetune_image_classification.main(argv)
    with caplog.at_level("WARNING"):
        metrics = finetune_image_classification.main([*argv, "--skip_corrupt_images"])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert any(f"{SKIPPING_UNREADABLE_IMAGE} {bad}" in record.getMessage() for record in caplog.records)


def readme_python_snippets() -> list[tuple[int, str]]:
    """(line, code) of every ```python block of README.md."""
    text = (REPO / "README.md").read_text()
    return [
        (text[: match.start()].count("\n") + 1, match.group(1))
        for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S)
    ]


@pytest.mark.slow
def test_every_python_snippet_of_the_readme_runs_as_written(main_job_output, tmp_path):
    """The README's snippets use what `make demo` writes (outputs/main_job/): each runs, as written, in a fresh
    interpreter from a folder where outputs/main_job is the main job's output of this module."""
    output, _ = main_job_output
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "main_job").symlink_to(output)
    snippets = readme_python_snippets()
    assert len(snippets) >= 5
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for line, code in snippets:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
        )
        assert result.returncode == 0, f"README.md line {line}:\n{code}\n{result.stderr[-3000:]}"
