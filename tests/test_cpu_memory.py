"""Keeping freed memory on CPU (``convnextv2_hf.cpu_memory``, ``training.KeepFreedMemoryCallback``): page faults
counted in fresh processes, the callback in a real Trainer run and in every example, bad settings named."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO
from test_long_runs import finetune_data, script_argv, trainer

import convnextv2_hf.cpu_memory as cpu_memory
from convnextv2_hf.recipes import CheckedTrainingArguments
from convnextv2_hf.training import KeepFreedMemoryCallback, StopOnNonFiniteCallback, run_callbacks

sys.path.insert(0, str(REPO / "examples"))
import finetune_image_classification  # noqa: E402
import finetune_semantic_segmentation  # noqa: E402
import main_job  # noqa: E402
import pretrain_fcmae  # noqa: E402

GLIBC = cpu_memory.glibc_version() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc's allocator (the C library here is not glibc)")

# the faults of writing a freshly allocated block, repeated: 40 MB lies above glibc's largest dynamic mmap threshold
# (32 MiB), so by default every allocation of it is mapped afresh and faulted in, 4 KiB a page
FAULT_PROBE = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)  # the fills in this thread only

def faulted_mb(size=40_000_000, count=7):
    # the median over repeats: the first one or two after the switch still grow the heap to hold the block
    faults = []
    for _ in range(count):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(size, dtype=torch.uint8)
        block.fill_(1)
        del block
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() / 1e6)
    return sorted(faults)[count // 2]

figures = {"default": faulted_mb()}
RUN
figures["after"] = faulted_mb()
figures["after_19mb"] = faulted_mb(19_267_584)  # a bf16 V2-T activation of batch 8 at 224 px
print(json.dumps(figures))
"""


def fault_probe(run: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", FAULT_PROBE.replace("RUN", run)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_glibc
def test_kept_freed_memory_is_reused_without_page_faults():
    figures = fault_probe(
        "from convnextv2_hf.cpu_memory import keep_freed_memory, freed_memory_kept\n"
        "assert keep_freed_memory() and keep_freed_memory() and freed_memory_kept()"
    )
    # measured here: 40.0 MB faulted in each time before; after, 40 MB once or twice, then 0.0 (both sizes)
    assert figures["default"] > 0.9 * 40, figures
    assert figures["after"] < 0.05 * 40, figures
    assert figures["after_19mb"] < 0.05 * 19.27, figures


TRAINER_RUN = r"""
import sys, tempfile
sys.path.insert(0, "tests")
from test_long_runs import trainer
from convnextv2_hf.cpu_memory import freed_memory_kept
from convnextv2_hf.recipes import CheckedTrainingArguments
from convnextv2_hf.training import run_callbacks
args = CheckedTrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", keep_freed_memory=SETTING)
run = trainer(args.output_dir, callbacks=run_callbacks(args), args_cls=CheckedTrainingArguments, max_steps=2,
              save_strategy="no", keep_freed_memory=SETTING)
assert not freed_memory_kept()  # nothing changes before training starts
run.train()
assert freed_memory_kept() == (SETTING != "off"), SETTING
"""


@needs_glibc
@pytest.mark.parametrize("setting", ["auto", "off"])
def test_a_cpu_trainer_run_keeps_freed_memory_unless_turned_off(setting):
    figures = fault_probe(TRAINER_RUN.replace("SETTING", repr(setting)))
    if setting == "off":
        assert figures["after"] > 0.9 * 40, figures
    else:
        assert figures["after"] < 0.05 * 40 and figures["after_19mb"] < 0.05 * 19.27, figures


def test_every_example_adds_the_callback_unless_turned_off(tmp_path):
    data = finetune_data(tmp_path)
    for flags, expected in (([], 1), (["--keep_freed_memory", "on"], 1), (["--keep_freed_memory", "off"], 0)):
        argv = script_argv(tmp_path / "out", "--data_dir", str(data), "--image_size", "32", *flags)
        built = finetune_image_classification.build_trainer(*finetune_image_classification.parse_arguments(argv))
        callbacks = built.callback_handler.callbacks
        assert sum(isinstance(c, KeepFreedMemoryCallback) for c in callbacks) == expected
        assert sum(isinstance(c, StopOnNonFiniteCallback) for c in callbacks) == 1
        argv = script_argv(tmp_path / "out", "--train_dir", str(data / "train"), "--image_size", "64", *flags)
        built = pretrain_fcmae.build_trainer(*pretrain_fcmae.parse_arguments(argv))
        assert sum(isinstance(c, KeepFreedMemoryCallback) for c in built.callback_handler.callbacks) == expected
    for cls in (CheckedTrainingArguments, finetune_semantic_segmentation.SegmentationTrainingArguments):
        args = cls(output_dir=str(tmp_path / "x"), report_to="none")
        assert args.keep_freed_memory == "auto"
        assert [type(c) for c in run_callbacks(args)] == [StopOnNonFiniteCallback, KeepFreedMemoryCallback]
        args = cls(output_dir=str(tmp_path / "x"), report_to="none", keep_freed_memory="off", stop_on_non_finite=False)
        assert run_callbacks(args) == []


@pytest.mark.parametrize("bad", ["sometimes", "", "ON", None, True])
def test_a_bad_setting_is_named(tmp_path, bad):
    with pytest.raises(ValueError, match="keep_freed_memory must be one of"):
        CheckedTrainingArguments(output_dir=str(tmp_path / "x"), report_to="none", keep_freed_memory=bad)
    with pytest.raises(ValueError, match="keep_freed_memory must be one of"):
        KeepFreedMemoryCallback(bad)
    assert not (tmp_path / "x").exists()


def test_a_bad_setting_on_the_command_line_stops_the_script_before_it_writes(tmp_path, capsys):
    argv = script_argv(tmp_path / "out", "--data_dir", str(tmp_path), "--keep_freed_memory", "sometimes")
    with pytest.raises(SystemExit) as stopped:
        finetune_image_classification.parse_arguments(argv)
    assert stopped.value.code == 2 and "--keep_freed_memory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_glibc_nothing_changes_and_on_says_so(tmp_path, monkeypatch, caplog):
    # a stand-in for another C library (musl, macOS): none can run here, so the glibc check answers "no"
    monkeypatch.setattr(cpu_memory, "glibc_version", lambda: None)
    monkeypatch.setattr(cpu_memory, "_kept", False)
    assert cpu_memory.keep_freed_memory() is False and not cpu_memory.freed_memory_kept()
    monkeypatch.setattr("convnextv2_hf.training.glibc_version", lambda: None)
    monkeypatch.setattr("convnextv2_hf.training.keep_freed_memory", cpu_memory.keep_freed_memory)
    for setting, warned in (("on", True), ("auto", False)):
        callback = KeepFreedMemoryCallback(setting)
        run = trainer(tmp_path / setting, callbacks=[callback], max_steps=1, save_strategy="no")
        caplog.clear()
        with caplog.at_level("WARNING"):
            run.train()
        assert callback.kept is False
        assert ("the C library is not glibc" in caplog.text) == warned, caplog.text


def test_the_main_job_passes_its_setting_to_both_scripts(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(main_job.MainJobArguments)
    assert parser.parse_args_into_dataclasses(args=[])[0].keep_freed_memory == "auto"
    assert parser.parse_args_into_dataclasses(args=["--keep_freed_memory", "off"])[0].keep_freed_memory == "off"
    for setting in ("auto", "off"):
        argv = main_job.common_arguments(tmp_path / "out", 1, 8, keep_freed_memory=setting)
        assert argv[argv.index("--keep_freed_memory") + 1] == setting
        argv += ["--data_dir", str(finetune_data(tmp_path))]
        assert finetune_image_classification.parse_arguments(argv)[2].keep_freed_memory == setting
    with pytest.raises(SystemExit):  # argparse's choices: exit status 2, the flag named, nothing written
        main_job.main(["--output_dir", str(tmp_path / "job"), "--keep_freed_memory", "sometimes"])
    assert not (tmp_path / "job").exists()
