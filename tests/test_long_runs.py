"""Long runs (issue 17): non-finite training stops, numeric flags checked when parsed, resumes all or nothing
(interrupted saves, missing state, another task or size), data and outputs kept apart.

Real parts throughout: the stock Trainer on tiny models, the example scripts' ``main``, image folders and
checkpoints on disk, a subprocess killed by a real signal while it writes a checkpoint."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import PIL.Image
import pytest
import torch
from expected_errors import (
    CLASS_WITH_TOO_FEW_IMAGES,
    LEARNING_RATE_NOT_FINITE,
    TRAINING_STOPPED_NON_FINITE,
    VALIDATION_FRACTION_OUT_OF_RANGE,
)
from helpers import REPO, LabelledImages, tiny_config
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.modeling_convnextv2 import NonFiniteWeightsError
from convnextv2_hf.recipes import CheckedTrainingArguments, check_range
from convnextv2_hf.training import (
    EMA_WEIGHTS_NAME,
    EMACallback,
    NonFiniteTrainingError,
    StopOnNonFiniteCallback,
    resume_checkpoint,
)

sys.path.insert(0, str(REPO / "examples"))

import finetune_image_classification  # noqa: E402
import finetune_semantic_segmentation  # noqa: E402
import pretrain_fcmae  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# Small inputs
# ----------------------------------------------------------------------------------------------------------


def arguments(output_dir, cls=TrainingArguments, **overrides):
    fields = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=8, learning_rate=1e-3, use_cpu=True,
        report_to="none", logging_steps=5, save_strategy="steps", save_steps=1, remove_unused_columns=False,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    fields.update(overrides)
    return cls(**fields)


def trainer(output_dir, dataset=None, callbacks=(), args_cls=TrainingArguments, **overrides):
    torch.manual_seed(0)
    model = ConvNextV2ForImageClassification(tiny_config())
    args = arguments(output_dir, args_cls, **overrides)
    return Trainer(model=model, args=args, train_dataset=dataset or LabelledImages(), callbacks=list(callbacks))


def first_non_finite_step(tmp_path, dataset=None, **overrides) -> tuple[int, list[dict]]:
    """The first step whose logged loss or grad_norm is NaN/inf, and the logged losses, from an unguarded run
    logging every step with ``CheckedTrainingArguments``' default of no NaN filter (the Trainer's own numbers,
    independent of the callback's forward hook)."""
    run = trainer(tmp_path / "reference", dataset, args_cls=CheckedTrainingArguments, logging_steps=1,
                  save_strategy="no", **overrides)  # fmt: skip
    run.train()
    logged = [entry for entry in run.state.log_history if "loss" in entry]
    for entry in logged:
        if any(not math.isfinite(float(entry[key])) for key in ("loss", "grad_norm") if key in entry):
            return entry["step"], logged
    raise AssertionError(f"the reference run stayed finite: {run.state.log_history}")


def assert_no_non_finite_weights_under(folder: Path) -> list[Path]:
    files = sorted(folder.rglob("*.safetensors"))
    for path in files:
        for name, tensor in load_file(path).items():
            assert torch.isfinite(tensor).all(), (path, name)
    return files


def image_folder(root: Path, classes=("a", "b"), per_class=3, splits=("train", "validation"), size=64) -> Path:
    for split in splits:
        for index_class, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                color = (40 * i, 80 + 60 * index_class, 120)
                PIL.Image.new("RGB", (size, size), color=color).save(root / split / name / f"{i}.png")
    return root


def script_argv(output_dir: Path, *extra: str) -> list[str]:
    return ["--output_dir", str(output_dir), "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", *extra]


# ----------------------------------------------------------------------------------------------------------
# Non-finite values stop a run
# ----------------------------------------------------------------------------------------------------------


def test_a_diverging_learning_rate_stops_at_its_first_non_finite_step_and_saves_nothing_of_it(tmp_path):
    expected, _ = first_non_finite_step(tmp_path, learning_rate=1e6)
    assert expected < 8
    run = trainer(tmp_path / "out", callbacks=[StopOnNonFiniteCallback()], learning_rate=1e6)  # logging_steps=5
    with pytest.raises(NonFiniteTrainingError, match=rf"training stopped at step {expected}: the (loss|gradient norm)"):
        run.train()
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*"))
    assert saved == list(range(1, expected))  # every earlier step was saved, the bad one and later ones never
    assert len(assert_no_non_finite_weights_under(tmp_path / "out")) == expected - 1
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # the weights in memory are those of the last good step: the optimizer never applied the bad one
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_one_nan_sample_with_ema_stops_at_its_step_and_the_logs_show_nan(tmp_path):
    dataset = LabelledImages(nan_at=5)
    expected, logged = first_non_finite_step(tmp_path, dataset)
    # CheckedTrainingArguments logs the non-finite loss as it is (the stock filter would show the finite mean)
    assert [math.isnan(e["loss"]) for e in logged if e["step"] == expected] == [True]
    ema = EMACallback(decay=0.5)
    run = trainer(tmp_path / "out", dataset, callbacks=[ema, StopOnNonFiniteCallback()])
    with pytest.raises(NonFiniteTrainingError, match=rf"training stopped at step {expected}: the loss is nan"):
        run.train()
    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert len(checkpoints) == expected - 1 and all((c / EMA_WEIGHTS_NAME).exists() for c in checkpoints)
    assert_no_non_finite_weights_under(tmp_path / "out")
    assert all(torch.isfinite(t).all() for t in ema.state_dict().values())  # the average never saw the bad step


def test_a_non_finite_gradient_is_caught_when_the_model_returns_no_loss(tmp_path):
    """With ``compute_loss_func`` (as FCMAE uses) the labels go to the function, the model returns no loss: the
    gradient check still stops the first step."""

    def infinite_loss(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels) * float("inf")

    torch.manual_seed(0)
    model = ConvNextV2ForImageClassification(tiny_config())
    run = Trainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=LabelledImages(),
                  compute_loss_func=infinite_loss, callbacks=[StopOnNonFiniteCallback()])  # fmt: skip
    with pytest.raises(NonFiniteTrainingError, match=r"step 1: the gradient norm is nan \(the model returned no loss"):
        run.train()
    assert not list(tmp_path.glob("checkpoint-*"))


def test_ema_weights_holding_nan_are_never_saved(tmp_path):
    ema = EMACallback(decay=0.5)
    model = ConvNextV2ForImageClassification(tiny_config())
    ema._build(model)
    with torch.no_grad():
        ema.ema.module.classifier.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"EMA weights to save to .*'classifier.weight' \(1 of 160"):
        ema.save(tmp_path / EMA_WEIGHTS_NAME, global_step=1)
    assert not list(tmp_path.iterdir())


def _two_process_check(rank: int, port: str, output_dir: str, results: str) -> None:
    """One process of a real 2-process gloo group: finite gradients on both, an inf loss on rank 1 only."""
    from types import SimpleNamespace

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = ConvNextV2ForImageClassification(tiny_config())
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    callback = StopOnNonFiniteCallback()
    callback._losses = [torch.tensor(float("inf") if rank == 1 else 1.0)]
    args, state = SimpleNamespace(output_dir=output_dir), SimpleNamespace(global_step=6)
    try:
        callback.on_pre_optimizer_step(args, state, None, model=model)
        outcome = "went on"
    except NonFiniteTrainingError as error:
        outcome = str(error)
    Path(results, f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_every_process_stops_at_the_step_one_process_saw_a_non_finite_loss(tmp_path):
    # a finite averaged gradient with an inf loss on one process alone: without agreement, rank 1 would stop and
    # rank 0 would wait for it at the next collective
    from helpers import free_port

    torch.multiprocessing.spawn(
        _two_process_check, args=(free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True
    )
    rank0, rank1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert rank1.startswith("training stopped at step 7: the loss is inf"), rank1
    assert rank0.startswith("training stopped at step 7: another process saw a non-finite loss"), rank0


def finetune_data(tmp_path) -> Path:
    return image_folder(tmp_path / "data", per_class=4)


def pair_folder(root: Path, count: int = 4, size: int = 64) -> Path:
    """Image/mask pairs for the segmentation script (two classes, ids 0 and 1)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        PIL.Image.new("RGB", (size, size), (20 * i, 60, 90)).save(root / "images" / f"{i}.png")
        PIL.Image.new("L", (size, size), i % 2).save(root / "masks" / f"{i}.png")
    return root


SEGMENTATION = ["--num_labels", "2", "--image_size", "64", "--decoder_hidden_size", "16", "--auxiliary_channels", "8"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["finetune", "pretrain", "segmentation"])
def test_the_example_scripts_stop_a_diverging_run_with_an_error_and_no_nan_weights_on_disk(tmp_path, script):
    common = ["--max_steps", "6", "--save_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate", "1e5",
              "--lr_scheduler_type", "constant", "--logging_steps", "100"]  # fmt: skip
    if script == "segmentation":
        main = finetune_semantic_segmentation.main
        argv = script_argv(tmp_path / "out", "--train_dir", str(pair_folder(tmp_path / "pairs")),
                           "--validation_fraction", "0.5", *SEGMENTATION, *common)  # fmt: skip
    elif script == "finetune":
        main = finetune_image_classification.main
        argv = script_argv(tmp_path / "out", "--data_dir", str(finetune_data(tmp_path)), "--image_size", "32",
                           "--ema_decay", "0.5", *common)  # fmt: skip
    else:
        main = pretrain_fcmae.main
        argv = script_argv(tmp_path / "out", "--train_dir", str(finetune_data(tmp_path) / "train"), "--image_size",
                           "64", "--decoder_hidden_size", "16", "--reconstruction_every", "0", *common)  # fmt: skip
    with pytest.raises(NonFiniteTrainingError, match=TRAINING_STOPPED_NON_FINITE):
        main(argv)
    assert_no_non_finite_weights_under(tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_the_finetune_script_exits_non_zero_on_divergence(tmp_path):
    argv = script_argv(tmp_path / "out", "--data_dir", str(finetune_data(tmp_path)), "--image_size", "32",
                       "--max_steps", "4", "--save_strategy", "no", "--learning_rate", "1e5", "--lr_scheduler_type",
                       "constant")  # fmt: skip
    command = [sys.executable, str(REPO / "examples" / "finetune_image_classification.py"), *argv]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "NonFiniteTrainingError: training stopped at step" in result.stderr
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_the_check_is_on_by_default_in_every_example_and_a_flag_turns_it_off(tmp_path):
    data = finetune_data(tmp_path)
    for flags, expected in (([], 1), (["--stop_on_non_finite", "false"], 0)):
        argv = script_argv(tmp_path / "out", "--data_dir", str(data), "--image_size", "32", *flags)
        built = finetune_image_classification.build_trainer(*finetune_image_classification.parse_arguments(argv))
        assert sum(isinstance(c, StopOnNonFiniteCallback) for c in built.callback_handler.callbacks) == expected
        argv = script_argv(tmp_path / "out", "--train_dir", str(data / "train"), "--image_size", "64", *flags)
        built = pretrain_fcmae.build_trainer(*pretrain_fcmae.parse_arguments(argv))
        assert sum(isinstance(c, StopOnNonFiniteCallback) for c in built.callback_handler.callbacks) == expected
    for cls in (CheckedTrainingArguments, finetune_semantic_segmentation.SegmentationTrainingArguments):
        args = cls(output_dir=str(tmp_path / "x"), report_to="none")
        assert args.stop_on_non_finite and not args.logging_nan_inf_filter and not args.allow_fresh_optimizer


# ----------------------------------------------------------------------------------------------------------
# Every numeric flag checked when parsed
# ----------------------------------------------------------------------------------------------------------

# (flag, bad values): NaN and inf for every float flag, and values outside its range
TRAINING_FLAGS = [
    ("learning_rate", ["nan", "inf", "-1", "0"]),
    ("weight_decay", ["nan", "inf", "-0.1"]),
    ("num_train_epochs", ["nan", "inf", "-1"]),
    ("warmup_steps", ["nan", "inf", "-1"]),
    ("max_grad_norm", ["nan", "inf", "-1"]),
    ("adam_beta1", ["nan", "-0.1", "1"]),
    ("adam_beta2", ["inf", "1.5"]),
    ("adam_epsilon", ["nan", "0", "-1e-8"]),
    ("label_smoothing_factor", ["nan", "1", "-0.1"]),
    ("logging_steps", ["nan", "0", "-5"]),
    ("save_steps", ["inf", "0"]),
    ("per_device_train_batch_size", ["0", "-2"]),
    ("per_device_eval_batch_size", ["0"]),
    ("gradient_accumulation_steps", ["0", "-1"]),
]
RECIPE_FLAGS = [
    ("base_learning_rate", ["nan", "inf", "-1", "0"]),
    ("min_lr", ["nan", "inf", "-1"]),
    ("warmup_epochs", ["nan", "inf", "-1"]),
]
FINETUNE_FLAGS = [
    *TRAINING_FLAGS,
    *RECIPE_FLAGS,
    ("layer_decay", ["nan", "inf", "0", "1.5"]),
    ("drop_path_rate", ["nan", "1", "-0.1"]),
    ("ema_decay", ["nan", "inf", "1", "-0.5"]),
    ("mixup", ["nan", "inf", "-1"]),
    ("cutmix", ["nan", "inf", "-1"]),
    ("label_smoothing", ["nan", "1", "-0.1"]),
    ("random_erasing", ["nan", "1.5", "-0.1"]),
    ("head_init_std", ["nan", "inf", "0", "-1"]),
    ("validation_fraction", ["nan", "0", "1", "1.5"]),
    ("image_size", ["0", "-64", "16"]),
    ("rand_augment_magnitude", ["-1", "31"]),
]
PRETRAIN_FLAGS = [
    *TRAINING_FLAGS,
    *RECIPE_FLAGS,
    ("mask_ratio", ["nan", "inf"]),
    ("decoder_hidden_size", ["0", "-16"]),
    ("decoder_depth", ["0"]),
    ("validation_split_fraction", ["nan", "0", "1"]),
    ("image_size", ["0", "-64"]),
    ("shuffle_buffer_size", ["0"]),
    ("reconstruction_every", ["-1"]),
]
SEGMENTATION_FLAGS = [
    *TRAINING_FLAGS,
    ("layer_decay", ["nan", "0", "2"]),
    ("drop_path_rate", ["nan", "1"]),
    ("decoder_hidden_size", ["0"]),
    ("auxiliary_loss_weight", ["nan", "inf", "-1"]),
    ("auxiliary_channels", ["0"]),
    ("validation_fraction", ["nan", "0", "1"]),
    ("min_scale", ["nan", "0", "1.5"]),
    ("image_size", ["16", "-1"]),
]
# flags whose message comes from a check that names them in its own words
MESSAGES = {
    "mixup": r"mixup and cutmix alphas must be|mixup must be",
    "cutmix": r"mixup and cutmix alphas must be|cutmix must be",
    "image_size": r"image_size must be",
}


def cases(flags):
    return [pytest.param(flag, value, id=f"{flag}={value}") for flag, values in flags for value in values]


def expect_refused(tmp_path, run, flag, value):
    pattern = MESSAGES.get(flag, rf"\b{flag} must be")
    with pytest.raises(ValueError, match=pattern) as error:
        run()
    given = [float(number) for number in re.findall(r"(?:got|and) (-?(?:inf|nan|[\d.e+-]+))", str(error.value))]
    assert any(g == float(value) or math.isnan(g) and math.isnan(float(value)) for g in given), str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flag", "value"), cases(FINETUNE_FLAGS))
def test_finetune_refuses_every_bad_numeric_flag_when_parsed(tmp_path, flag, value):
    argv = script_argv(tmp_path / "out", "--data_dir", str(tmp_path / "data"), f"--{flag}={value}")
    expect_refused(tmp_path, lambda: finetune_image_classification.parse_arguments(argv), flag, value)


@pytest.mark.parametrize(("flag", "value"), cases(PRETRAIN_FLAGS))
def test_pretrain_refuses_every_bad_numeric_flag_when_parsed(tmp_path, flag, value):
    argv = script_argv(
        tmp_path / "out", "--train_dir", str(tmp_path / "data"), "--image_size", "64", f"--{flag}={value}"
    )
    expect_refused(tmp_path, lambda: pretrain_fcmae.parse_arguments(argv), flag, value)


@pytest.mark.parametrize(("flag", "value"), cases(SEGMENTATION_FLAGS))
def test_segmentation_refuses_every_bad_numeric_flag_before_anything_is_read(tmp_path, flag, value):
    argv = script_argv(tmp_path / "out", "--train_dir", str(tmp_path / "nowhere"), "--num_labels", "2")
    argv.append(f"--{flag}={value}")
    expect_refused(tmp_path, lambda: finetune_semantic_segmentation.main(argv), flag, value)


def test_the_library_checks_the_training_arguments_it_reads():
    from convnextv2_hf.training import layer_decay_optimizer

    args = TrainingArguments(output_dir="unused", learning_rate=float("inf"), report_to="none")
    with pytest.raises(ValueError, match=LEARNING_RATE_NOT_FINITE):
        layer_decay_optimizer(ConvNextV2ForImageClassification(tiny_config()), args, layer_decay=0.9)
    with pytest.raises(ValueError, match=r"x must be in \(0, 1\], got nan|x must be a finite number"):
        check_range("x", float("nan"), 0, 1, low_open=True)
    with pytest.raises(ValueError, match=r"x must be >= 1, got 0"):
        check_range("x", 0, 1)
    check_range("x", 1.0, 0, 1, low_open=True)  # the closed end is in


# ----------------------------------------------------------------------------------------------------------
# Resume is all or nothing
# ----------------------------------------------------------------------------------------------------------


def saved_run(output_dir: Path, ema: bool = True, steps: int = 4) -> Path:
    """A real run of ``steps`` steps with a checkpoint at each (and EMA weights beside them)."""
    callbacks = [EMACallback(decay=0.5)] if ema else []
    trainer(output_dir, callbacks=callbacks, max_steps=steps).train()
    return output_dir


def resume(output_dir: Path, value, **kwargs):
    return resume_checkpoint(arguments(output_dir, resume_from_checkpoint=value), **kwargs)


@pytest.fixture(scope="module")
def run_with_checkpoints(tmp_path_factory) -> Path:
    return saved_run(tmp_path_factory.mktemp("saved") / "run")


@pytest.fixture
def run(run_with_checkpoints, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(run_with_checkpoints, tmp_path / "run"))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_missing_optimizer_scheduler_or_rng_file_is_named_unless_a_fresh_start_is_allowed(run, name, caplog):
    (run / "checkpoint-4" / name).unlink()
    with pytest.raises(ValueError, match=rf"checkpoint-4/{name} is missing.*--allow_fresh_optimizer"):
        resume(run, str(run / "checkpoint-4"))
    # damage, not an interrupted save (the trainer state is there): `last` names it rather than fall back silently
    with pytest.raises(ValueError, match=rf"checkpoint-4/{name} is missing.*newest complete checkpoint is .*-3"):
        resume(run, "last")
    with caplog.at_level("WARNING", logger="convnextv2_hf.training"):
        assert resume(run, "last", allow_fresh_optimizer=True) == str(run / "checkpoint-4")
    assert f"without {run / 'checkpoint-4' / name}: that state starts afresh" in caplog.text


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"])
def test_a_truncated_state_file_is_named(run, name):
    path = run / "checkpoint-4" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = "is unreadable or not a trainer state" if name.endswith(".json") else "is unreadable .is it truncated"
    with pytest.raises(ValueError, match=rf"checkpoint-4/{name} {message}"):
        resume(run, str(run / "checkpoint-4"), allow_fresh_optimizer=True)  # no flag makes a cut file usable


def interrupt(folder: Path, how: str) -> None:
    """What an interrupted save leaves (see test_a_signal_while_a_checkpoint_is_written_... for the real thing)."""
    if how == "no trainer state":
        (folder / "trainer_state.json").unlink()
    elif how == "partial file":
        (folder / EMA_WEIGHTS_NAME).rename(folder / (EMA_WEIGHTS_NAME + ".partial"))
    else:  # the trainer state written, the EMA weights (written after it) not yet
        (folder / EMA_WEIGHTS_NAME).unlink()


@pytest.mark.parametrize("how", ["no trainer state", "partial file", "no EMA weights yet"])
def test_a_folder_left_by_an_interrupted_save_is_never_taken_as_complete(run, how, caplog):
    interrupt(run / "checkpoint-4", how)
    interrupt(run / "checkpoint-3", how)
    with caplog.at_level("WARNING", logger="convnextv2_hf.training"):
        assert resume(run, "last", ema=True) == str(run / "checkpoint-2")
    assert (
        "skipping the incomplete checkpoint-4" in caplog.text and "skipping the incomplete checkpoint-3" in caplog.text
    )
    with pytest.raises(ValueError, match=r"checkpoint-4.*The newest complete checkpoint beside it is .*checkpoint-2"):
        resume(run, str(run / "checkpoint-4"), ema=True)


def test_last_with_no_complete_checkpoint_lists_why(run):
    for folder in run.glob("checkpoint-*"):
        (folder / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"no complete checkpoint in .*checkpoint-4: .*no trainer_state.json"):
        resume(run, "last")


def test_a_missing_ema_file_is_refused_when_ema_is_on_and_the_callback_refuses_too(run, tmp_path):
    (run / "checkpoint-4" / EMA_WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match=r"checkpoint-4/ema_model.safetensors is missing \(EMA is on"):
        resume(run, str(run / "checkpoint-4"), ema=True)
    assert resume(run, str(run / "checkpoint-4"), ema=False) == str(run / "checkpoint-4")
    with pytest.raises(ValueError, match=r"checkpoint-4 holds no EMA weights"):
        trainer(run, callbacks=[EMACallback(0.5)], max_steps=5).train(resume_from_checkpoint=str(run / "checkpoint-4"))


def test_ema_resumed_from_a_folder_elsewhere_without_the_hook_is_an_error_not_a_silent_restart(run, tmp_path):
    import shutil

    moved = shutil.copytree(run / "checkpoint-4", tmp_path / "elsewhere")
    ema = EMACallback(0.5)
    with pytest.raises(ValueError, match=r"EMACallback found no checkpoint folder .*ema.resume_from\(folder\)"):
        trainer(tmp_path / "new", callbacks=[ema], max_steps=5).train(resume_from_checkpoint=str(moved))
    ema = EMACallback(0.5)
    trainer(tmp_path / "new2", callbacks=[ema], max_steps=5).train(resume_from_checkpoint=ema.resume_from(moved))
    assert ema.ema.n_averaged.item() == 5  # 4 restored + 1 new


def checkpoint_by_hand(folder: Path, model) -> Path:
    """A complete-looking checkpoint of ``model``: weights, trainer state, optimizer, scheduler and RNG files."""
    model.save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({}, folder / name)
    return folder


@pytest.mark.parametrize("script", ["finetune", "pretrain"])
def test_a_checkpoint_of_another_task_is_named_with_both(tmp_path, script):
    data = finetune_data(tmp_path)
    if script == "finetune":  # an FCMAE checkpoint into the fine-tuning script
        other = checkpoint_by_hand(tmp_path / "fcmae" / "checkpoint-3", ConvNextV2ForMaskedImageModeling(
            ConvNextV2Config.from_preset("atto")))  # fmt: skip
        argv = script_argv(tmp_path / "out", "--data_dir", str(data), "--image_size", "32")
        main, message = finetune_image_classification.main, r"holds a ConvNextV2ForMaskedImageModeling .*trains a Conv"
    else:  # a classifier checkpoint into FCMAE pretraining
        other = checkpoint_by_hand(tmp_path / "classifier" / "checkpoint-3", ConvNextV2ForImageClassification(
            ConvNextV2Config.from_preset("atto", num_labels=2)))  # fmt: skip
        argv = script_argv(tmp_path / "out", "--train_dir", str(data / "train"), "--image_size", "64")
        main, message = pretrain_fcmae.main, r"holds a ConvNextV2ForImageClassification .*trains a ConvNextV2ForMasked"
    with pytest.raises(ValueError, match=message):
        main([*argv, "--max_steps", "4", "--resume_from_checkpoint", str(other)])
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_size_is_named_with_both(tmp_path):
    other = checkpoint_by_hand(
        tmp_path / "run" / "checkpoint-3",
        ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("femto", num_labels=2)),
    )
    argv = script_argv(tmp_path / "out", "--data_dir", str(finetune_data(tmp_path)), "--image_size", "32",
                       "--model_size", "atto", "--max_steps", "4", "--resume_from_checkpoint", str(other))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"of another size \(depths \[2, 2, 6, 2\], hidden_sizes \[48, .*than this run's"
    ):
        finetune_image_classification.main(argv)
    assert not (tmp_path / "out").exists()


INTERRUPTED_RUN = """
import os, signal, sys
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
sys.path.insert(0, {tests!r})
from helpers import tiny_config
from convnextv2_hf import ConvNextV2ForImageClassification
from convnextv2_hf.training import EMACallback

how, output = sys.argv[1], sys.argv[2]


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        return {{"pixel_values": torch.full((3, 64, 64), index / 16.0), "labels": torch.tensor(index % 5)}}


class SignalAtStep4(TrainerCallback):
    # SIGTERM from the optimizer's state_dict hook: the Trainer is writing checkpoint-4 (weights done, optimizer.pt
    # not yet); SIGINT from on_save, listed before EMACallback: the trainer state is written, the EMA weights not yet
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        def hook(*_):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)
        if how == "SIGTERM":
            optimizer.optimizer.register_state_dict_post_hook(hook)

    def on_save(self, args, state, control, **kwargs):
        if how == "SIGINT" and state.global_step == 4:
            os.kill(os.getpid(), signal.SIGINT)


torch.manual_seed(0)
model = ConvNextV2ForImageClassification(tiny_config())
args = TrainingArguments(output_dir=output, per_device_train_batch_size=4, max_steps=6, save_strategy="steps",
                         save_steps=1, use_cpu=True, report_to="none", disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=Images(), callbacks=[SignalAtStep4(), EMACallback(0.5)]).train()
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_signal_while_a_checkpoint_is_written_leaves_no_folder_that_looks_complete(tmp_path, how, caplog):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(INTERRUPTED_RUN.format(tests=str(Path(__file__).parent))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script), how, str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=600, env=env)  # fmt: skip
    # killed outright by SIGTERM; SIGINT's KeyboardInterrupt ends Python with the signal too
    assert result.returncode == -getattr(signal, how), result.stderr[-2000:]
    assert (tmp_path / "out" / "checkpoint-4").is_dir() and not (tmp_path / "out" / "checkpoint-5").exists()
    with caplog.at_level("WARNING", logger="convnextv2_hf.training"):
        assert resume(tmp_path / "out", "last", ema=True) == str(tmp_path / "out" / "checkpoint-3")
    assert "skipping the incomplete checkpoint-4" in caplog.text
    with pytest.raises(ValueError, match=r"checkpoint-4.* newest complete checkpoint beside it is .*checkpoint-3"):
        resume(tmp_path / "out", str(tmp_path / "out" / "checkpoint-4"), ema=True)


# ----------------------------------------------------------------------------------------------------------
# Data and outputs kept apart; data folders checked
# ----------------------------------------------------------------------------------------------------------


def overlapping_output(data: Path, relation: str) -> Path:
    return {"equal": data, "inside": data / "out", "holding": data.parent}[relation]


@pytest.mark.parametrize("relation", ["equal", "inside", "holding"])
@pytest.mark.parametrize("script", ["finetune", "pretrain", "segmentation"])
def test_an_output_folder_overlapping_a_data_folder_is_refused_when_parsed(tmp_path, script, relation):
    if script == "segmentation":
        data = pair_folder(tmp_path / "base" / "pairs")
        flag, extra, main = "train_dir", SEGMENTATION, finetune_semantic_segmentation.main
    else:
        data = image_folder(tmp_path / "base" / "data") / "train"
        flag, extra = ("data_dir", ["--image_size", "32"]) if script == "finetune" else ("train_dir", [])
        if script == "finetune":
            data = data.parent
        main = finetune_image_classification.main if script == "finetune" else pretrain_fcmae.main
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    output = overlapping_output(data, relation)
    argv = ["--output_dir", str(output), "--use_cpu", "--report_to", "none", f"--{flag}", str(data), *extra]
    word = {"equal": "is", "inside": "is inside", "holding": "holds"}[relation]
    with pytest.raises(ValueError, match=rf"--output_dir .* {word} the data folder --{flag} .*keep outputs and data"):
        main(argv)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def run_finetune(tmp_path, *extra):
    return finetune_image_classification.main(script_argv(tmp_path / "out", "--image_size", "32", "--max_steps", "1",
                                                          *extra))  # fmt: skip


def test_data_problems_are_named_before_anything_is_written(tmp_path):
    (tmp_path / "file.png").write_bytes(b"x")
    problems = [
        (["--train_dir", str(tmp_path / "file.png")], r"image folder '.*file.png' is a file, not a folder"),
        (["--train_dir", str(image_folder(tmp_path / "one", classes=("a",), splits=("",)))],
         r"the training images of '.*one' form one class \['a'\]: fine-tuning needs at least two"),
        (["--validation_fraction", "1.5", "--train_dir", str(tmp_path / "one")],
         VALIDATION_FRACTION_OUT_OF_RANGE),
    ]  # fmt: skip
    empty = image_folder(tmp_path / "empty", classes=("a", "b"), splits=("train", "validation"))
    (empty / "train" / "c").mkdir()
    problems.append((["--data_dir", str(empty)], r"class folder\(s\) \['c'\] in '.*empty/train' hold no images"))
    few = image_folder(tmp_path / "few", classes=("a", "b"), splits=("",), per_class=3)
    for path in list((few / "b").iterdir())[1:]:
        path.unlink()
    problems.append((["--train_dir", str(few)], CLASS_WITH_TOO_FEW_IMAGES))
    balanced = image_folder(tmp_path / "balanced", classes=("a", "b", "c"), splits=("",), per_class=2)
    fraction_message = r"--validation_fraction 0.1 of 6 training images holds out 1 .*each of the 3 classes"
    problems.append((["--train_dir", str(balanced), "--validation_fraction", "0.1"], fraction_message))
    bad_name = image_folder(tmp_path / "names", splits=("",))
    with open(os.fsencode(bad_name / "a") + b"/bad\xff.png", "wb") as file:
        file.write((bad_name / "a" / "0.png").read_bytes())
    problems.append((["--train_dir", str(bad_name)], r"the file name b'.*bad\\xff.png' .* is not valid UTF-8: rename"))
    for extra, message in problems:
        with pytest.raises(ValueError, match=message):
            run_finetune(tmp_path, *extra)
        assert not (tmp_path / "out").exists(), extra


@pytest.mark.slow
def test_fcmae_ignores_class_folders_but_names_undecodable_file_names(tmp_path):
    data = image_folder(tmp_path / "images", splits=("",))
    (data / "empty").mkdir()  # no labels in pretraining: an empty sub-folder is harmless
    argv = script_argv(tmp_path / "out", "--train_dir", str(data), "--image_size", "64", "--max_steps", "1",
                       "--per_device_train_batch_size", "2", "--save_strategy", "no", "--reconstruction_every",
                       "0", "--decoder_hidden_size", "16")  # fmt: skip
    assert math.isfinite(pretrain_fcmae.main(argv)["train_loss"])
    with open(os.fsencode(data / "a") + b"/\xfe.png", "wb") as file:
        file.write((data / "a" / "0.png").read_bytes())
    with pytest.raises(ValueError, match=r"is not valid UTF-8"):
        pretrain_fcmae.main([*argv[:1], str(tmp_path / "out2"), *argv[2:]])
    assert not (tmp_path / "out2").exists()
