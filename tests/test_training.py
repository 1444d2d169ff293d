"""Trainer plug-ins: layer-wise lr decay, the FCMAE loss under accumulation and DDP, EMA, reconstructions."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from expected_errors import EMA_DECAY_OUT_OF_RANGE, LAYER_DECAY_OUT_OF_RANGE_ANY_VALUE
from helpers import LabelledImages, StopAtStep, free_port, tiny_config, truncate
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.training import (
    EMA_WEIGHTS_NAME,
    EMACallback,
    FCMAECollator,
    FCMAEReconstructionCallback,
    fcmae_loss,
    layer_decay_optimizer,
    layer_decay_param_groups,
    resume_checkpoint,
)

SCRIPTS = Path(__file__).parent / "scripts"


# --- layer decay: the official rules, written on the official parameter names ------------------------------


def official_name(name: str) -> str:
    """Our parameter name -> the official name (the modules of models/convnextv2.py in the official repository)."""
    name = name.removeprefix("convnextv2.")
    if name.startswith("embeddings.patch_embeddings."):
        return "downsample_layers.0.0." + name.split(".")[-1]
    if name.startswith("embeddings.layernorm."):
        return "downsample_layers.0.1." + name.split(".")[-1]
    if ".downsampling_layer." in name:
        _, _, stage, _, index, leaf = name.split(".")
        return f"downsample_layers.{stage}.{index}.{leaf}"
    if name.startswith("encoder.stages."):
        _, _, stage, _, block, *rest = name.split(".")
        return f"stages.{stage}.{block}." + ".".join(rest)
    if name.startswith("layernorm."):
        return "norm." + name.split(".")[-1]
    return name.replace("classifier.", "head.")


def official_single_id(name: str, depths: list[int]) -> int:
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        return sum(depths[: int(parts[1])]) + 1
    if parts[0] == "stages":
        return sum(depths[: int(parts[1])]) + int(parts[2]) + 1
    return sum(depths) + 1


def official_group_id(name: str) -> int:
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        return {0: 0, 1: 2, 2: 3, 3: 12}[int(parts[1])]
    if parts[0] == "stages":
        stage, block = int(parts[1]), int(parts[2])
        return {0: 1, 1: 2, 3: 12}.get(stage, 3 + block // 3)
    return 13


def official_no_weight_decay(name: str, shape: torch.Size) -> bool:
    return len(shape) == 1 or name.endswith(".bias") or name.endswith(("grn.gamma", "grn.beta", ".grn.weight"))


def check_groups_against_rules(model, layer_decay_type, decay=0.8, weight_decay=0.05):
    depths = list(model.config.depths)
    groups = layer_decay_param_groups(model, weight_decay, decay, layer_decay_type)
    seen = {}
    for group in groups:
        for name in group["param_names"]:
            seen[name] = (group["lr_scale"], group["weight_decay"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == set(trainable)
    for name, parameter in trainable.items():
        official = official_name(name)
        if layer_decay_type == "single":
            expected_scale = decay ** (sum(depths) + 1 - official_single_id(official, depths))
        else:
            expected_scale = decay ** (13 - official_group_id(official))
        expected_decay = 0.0 if official_no_weight_decay(name, parameter.shape) else weight_decay
        assert seen[name] == pytest.approx((expected_scale, expected_decay)), (name, official)
    return groups


def test_single_layer_decay_follows_the_official_rules_for_atto():
    model = ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("atto", num_labels=10))
    groups = check_groups_against_rules(model, "single")
    assert groups[0]["lr_scale"] == 1.0 and "classifier.weight" in groups[0]["param_names"]
    scales = sorted({g["lr_scale"] for g in groups}, reverse=True)
    assert len(scales) == 13  # ids 1 .. 13: the stem and each downsampling share the id of the block after them
    grn = [g for g in groups if "convnextv2.encoder.stages.0.layers.0.grn.weight" in g["param_names"]][0]
    assert grn["weight_decay"] == 0.0


def test_group_layer_decay_follows_the_official_rules_for_depths_3_3_27_3():
    config = ConvNextV2Config(depths=[3, 3, 27, 3], hidden_sizes=[8, 8, 8, 8], num_labels=3)
    groups = check_groups_against_rules(ConvNextV2ForImageClassification(config), "group", decay=0.6)
    assert len({g["lr_scale"] for g in groups}) == 14  # ids 0 .. 13


def test_frozen_parameters_are_left_out_without_shifting_scales():
    model = ConvNextV2ForImageClassification(tiny_config())
    expected = {
        n: s for g in layer_decay_param_groups(model, 0.05, 0.7) for n in g["param_names"] for s in [g["lr_scale"]]
    }
    model.convnextv2.embeddings.requires_grad_(False)
    model.convnextv2.encoder.stages[0].requires_grad_(False)
    groups = layer_decay_param_groups(model, 0.05, 0.7)
    got = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert not any(n.startswith(("convnextv2.embeddings", "convnextv2.encoder.stages.0.")) for n in got)
    assert all(got[n] == expected[n] for n in got)
    check_groups_against_rules(model, "single", decay=0.7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_decay": 0.0}, r"layer_decay must be in \(0, 1\]"),
        ({"layer_decay": -0.5}, LAYER_DECAY_OUT_OF_RANGE_ANY_VALUE),
        ({"layer_decay": 0.9, "layer_decay_type": "block"}, "layer_decay_type must be one of"),
        ({"layer_decay": 0.9, "weight_decay": -1.0}, "weight_decay must be >= 0"),
    ],
)
def test_bad_layer_decay_arguments_raise_value_error(kwargs, message):
    kwargs = {"weight_decay": 0.05, **kwargs}
    with pytest.raises(ValueError, match=message):
        layer_decay_param_groups(ConvNextV2ForImageClassification(tiny_config()), **kwargs)


# --- layer decay on models that hold the encoder elsewhere -------------------------------------------------


def scales_and_decays(model, decay, layer_decay_type="single", weight_decay=0.05):
    groups = layer_decay_param_groups(model, weight_decay, decay, layer_decay_type)
    table = {name: (g["lr_scale"], g["weight_decay"]) for g in groups for name in g["param_names"]}
    assert set(table) == {n for n, p in model.named_parameters() if p.requires_grad}
    return table


def test_layer_decay_on_upernet_gives_the_backbone_official_ids_and_the_heads_scale_one():
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextV2Config.from_preset("atto", out_features=["stage1", "stage2", "stage3", "stage4"])
    model = UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone, num_labels=3, hidden_size=16, auxiliary_channels=8)
    )
    assert type(model.backbone).__module__.startswith("convnextv2_hf")
    d = 0.8  # atto depths (2, 2, 6, 2): ids 1 .. 13, scale d ** (13 - id)
    table = scales_and_decays(model, d)
    expected = {
        "backbone.embeddings.patch_embeddings.weight": (d**12, 0.05),  # stem: id 1
        "backbone.embeddings.layernorm.weight": (d**12, 0.0),
        "backbone.encoder.stages.0.layers.1.pwconv1.weight": (d**11, 0.05),  # id 2
        "backbone.encoder.stages.1.downsampling_layer.1.weight": (d**10, 0.05),  # id 3, as the block after it
        "backbone.encoder.stages.2.layers.3.grn.weight": (d**5, 0.0),  # id 2 + 2 + 3 + 1 = 8
        "backbone.encoder.stages.3.downsampling_layer.1.weight": (d**2, 0.05),  # id 11
        "backbone.encoder.stages.3.layers.1.dwconv.weight": (d**1, 0.05),  # id 12
        "backbone.hidden_states_norms.stage2.weight": (1.0, 0.0),  # the backbone's output norms: id 13
        "decode_head.classifier.weight": (1.0, 0.05),
        "decode_head.fpn_bottleneck.batch_norm.weight": (1.0, 0.0),
        "auxiliary_head.convs.0.conv.weight": (1.0, 0.05),
    }
    for name, value in expected.items():
        assert table[name] == pytest.approx(value), name
    heads = [n for n in table if n.startswith(("decode_head.", "auxiliary_head."))]
    assert len(heads) > 40 and all(table[n][0] == 1.0 for n in heads)
    # the backbone's blocks get exactly the scales of the same blocks inside a classifier
    classifier = scales_and_decays(ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("atto")), d)
    for name, value in classifier.items():
        if name.startswith(("convnextv2.embeddings.", "convnextv2.encoder.")):
            assert table["backbone." + name.removeprefix("convnextv2.")] == pytest.approx(value), name
    # the stock Trainer takes the groups (UperNet's own config has no `depths`)
    args = TrainingArguments(output_dir="unused", learning_rate=1e-3, weight_decay=0.05, use_cpu=True, report_to="none")
    _, kwargs = layer_decay_optimizer(model, args, layer_decay=d, layer_decay_type="single")
    assert kwargs["params"][0]["lr"] == pytest.approx(1e-3) and min(g["lr"] for g in kwargs["params"]) == pytest.approx(
        1e-3 * d**12
    )


def test_layer_decay_on_mask2former_finds_the_backbone_under_its_encoder_attribute():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    backbone = ConvNextV2Config(
        depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 64, 128], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    model = Mask2FormerForUniversalSegmentation(
        Mask2FormerConfig(
            backbone_config=backbone, num_labels=3, hidden_dim=32, feature_size=32, mask_feature_size=32,
            encoder_feedforward_dim=64, dim_feedforward=64, num_queries=8, decoder_layers=2, encoder_layers=1,
            num_attention_heads=4,
        )
    )  # fmt: skip
    table = scales_and_decays(model, 0.5)  # depths sum 5: ids 1 .. 6
    # Mask2Former calls the backbone "encoder": the blocks sit at ...encoder.encoder.stages.*
    backbone_prefix = "model.pixel_level_module.encoder."
    assert table[backbone_prefix + "embeddings.patch_embeddings.weight"][0] == pytest.approx(0.5**5)
    assert table[backbone_prefix + "encoder.stages.2.layers.1.dwconv.weight"][0] == pytest.approx(0.5**2)  # id 4
    assert table[backbone_prefix + "encoder.stages.3.layers.0.pwconv1.weight"][0] == pytest.approx(0.5)  # id 5
    others = [n for n in table if not n.startswith((backbone_prefix + "embeddings.", backbone_prefix + "encoder."))]
    assert len(others) > 50 and all(table[n][0] == 1.0 for n in others)  # pixel decoder, transformer, class head


def test_layer_decay_on_a_peft_lora_classifier_follows_the_wrapped_blocks():
    from peft import LoraConfig, get_peft_model

    base = ConvNextV2ForImageClassification(tiny_config())
    plain = scales_and_decays(base, 0.7)
    wrapped = get_peft_model(
        base, LoraConfig(r=2, target_modules=["pwconv1", "pwconv2"], modules_to_save=["classifier"])
    )
    table = scales_and_decays(wrapped, 0.7)
    lora = [n for n in table if ".lora_" in n]
    assert len(lora) == 2 * 2 * sum(base.config.depths)  # A and B of two linears per block, the rest is frozen
    for name in lora:  # each adapter shares the id of the block it sits in
        block = name.removeprefix("base_model.model.").split(".pwconv")[0]
        expected = next(value for n, value in plain.items() if n.startswith(block + ".pwconv"))
        assert table[name][0] == pytest.approx(expected[0]), name
    first = "base_model.model.convnextv2.encoder.stages.0.layers.0.pwconv1.lora_A.default.weight"
    assert table[first][0] == pytest.approx(0.7 ** sum(base.config.depths))  # id 1 of ids 1 .. sum(depths) + 1
    head = [n for n in table if n.startswith("base_model.model.classifier.")]
    assert head and all(table[n][0] == 1.0 for n in head)


def test_layer_decay_on_the_fcmae_model_matches_the_classifier_and_gives_the_decoder_scale_one():
    fcmae = ConvNextV2ForMaskedImageModeling(tiny_config())
    table = scales_and_decays(fcmae, 0.6)
    classifier = scales_and_decays(ConvNextV2ForImageClassification(tiny_config()), 0.6)
    encoder = [n for n in table if n.startswith(("convnextv2.embeddings.", "convnextv2.encoder."))]
    assert encoder and all(table[n] == classifier[n] for n in encoder)
    decoder = [n for n in table if not n.startswith("convnextv2.")]
    assert {"mask_token", "decoder.0.dwconv.weight"} <= set(decoder)
    assert all(table[n][0] == 1.0 for n in decoder)
    assert table["mask_token"][1] == 0.0 and table["decoder.0.grn.weight"][1] == 0.0


def test_layer_decay_on_the_builtin_transformers_classifier_equals_ours():
    import transformers

    ours = ConvNextV2ForImageClassification(tiny_config())
    builtin = transformers.ConvNextV2ForImageClassification(transformers.ConvNextV2Config(**tiny_config().to_dict()))
    assert scales_and_decays(builtin, 0.8, "single") == scales_and_decays(ours, 0.8, "single")


def test_layer_decay_without_an_encoder_or_with_two_raises_value_error():
    with pytest.raises(ValueError, match="Linear holds no ConvNeXt V2 encoder"):
        layer_decay_param_groups(torch.nn.Linear(2, 2), 0.05, 0.9)
    from convnextv2_hf import ConvNextV2Model

    pair = torch.nn.ModuleDict({"teacher": ConvNextV2Model(tiny_config()), "student": ConvNextV2Model(tiny_config())})
    with pytest.raises(ValueError, match=r"holds 2 ConvNeXt V2 encoders \(\['teacher.encoder', 'student.encoder'\]\)"):
        layer_decay_param_groups(pair, 0.05, 0.9)


# --- the Trainer ------------------------------------------------------------------------------------------


class RecordLearningRates(TrainerCallback):
    def __init__(self):
        self.per_step, self.logged = [], []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.per_step.append([group["lr"] for group in optimizer.param_groups])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "learning_rate" in logs:
            self.logged.append(logs["learning_rate"])


def training_args(tmp_path, **overrides):
    fields = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=1e-3,
        warmup_steps=3,
        lr_scheduler_type="cosine",
        weight_decay=0.05,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


def test_stock_trainer_keeps_every_group_ratio_through_warmup_and_decay(tmp_path):
    torch.manual_seed(0)
    model = ConvNextV2ForImageClassification(tiny_config())
    args = training_args(tmp_path)
    recorder = RecordLearningRates()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=LabelledImages(),
        optimizer_cls_and_kwargs=layer_decay_optimizer(model, args, layer_decay=0.7),
        callbacks=[recorder],
    )
    trainer.train()
    scales = [g["lr_scale"] for g in trainer.optimizer.param_groups]
    assert scales[0] == 1.0 and min(scales) == pytest.approx(0.7 ** (sum(model.config.depths)))
    head_lrs = [lrs[0] for lrs in recorder.per_step]
    assert head_lrs[1] > head_lrs[0] and head_lrs[-1] < max(head_lrs)  # warm-up, then cosine decay
    for lrs in recorder.per_step:
        if lrs[0] > 0:
            assert [lr / lrs[0] for lr in lrs] == pytest.approx(scales)
    # the logged learning rate is the head's (scale 1.0): it peaks at args.learning_rate. Logs show the lr a step
    # used, on_step_end the one after the scheduler stepped, hence the shift by one.
    assert max(recorder.logged) == pytest.approx(args.learning_rate)
    assert recorder.logged[1:] == pytest.approx(head_lrs[:-1])


@pytest.mark.slow
def test_fcmae_loss_under_gradient_accumulation_and_ddp_equals_one_process(tmp_path):
    """Real runs: 1 process batch 4; 1 process batch 2 x 2 accumulation; 2 gloo processes (torchrun) batch 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = str(SCRIPTS / "train_fcmae_steps.py")
    runs = {
        "single": [sys.executable, script, "single.st", "4", "1"],
        "accumulated": [sys.executable, script, "accumulated.st", "2", "2"],
        "ddp": [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()),
            *(script, "ddp.st", "2", "1"),
        ],
    }
    for name, command in runs.items():
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (name, result.stderr[-3000:])
    single = load_file(tmp_path / "single.st")
    initial = ConvNextV2ForMaskedImageModeling(
        ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], decoder_hidden_size=16)
    ).state_dict()
    moved = max((single[k] - initial[k]).abs().max().item() for k in initial if "layernorm" not in k)
    assert moved > 1e-3  # the runs did train
    for name in ("accumulated", "ddp"):
        other = load_file(tmp_path / f"{name}.st")
        assert abs(other["train_loss"].item() - single["train_loss"].item()) <= 1e-5, name
        assert max((other[k] - single[k]).abs().max().item() for k in single) <= 1e-5, name


def test_fcmae_loss_is_the_models_own_loss_for_one_batch():
    model = ConvNextV2ForMaskedImageModeling(tiny_config())
    collator = FCMAECollator(model.config, image_size=64)
    batch = collator([{"pixel_values": torch.randn(3, 64, 64)} for _ in range(3)])
    labels = batch.pop("labels")
    outputs = model(**batch)
    assert torch.equal(outputs.mask.bool(), labels == 1)
    num_items = (labels != -100).sum()
    assert abs(fcmae_loss(outputs, labels, num_items).item() - outputs.loss.item()) <= 1e-6
    assert fcmae_loss(outputs, labels, None) is outputs.loss
    assert abs(fcmae_loss(outputs, labels, 2 * num_items).item() - outputs.loss.item() / 2) <= 1e-6


def test_collator_rejects_image_sizes_off_the_patch_grid():
    with pytest.raises(ValueError, match="image size 64x80 is not a multiple of mask_patch_size=32"):
        FCMAECollator(tiny_config(), image_size=(64, 80))


def ema_run(output_dir, stop_at=None, resume=None, seed=0, announce=False, allow_fresh_start=False, **arg_overrides):
    """6 steps (checkpoints at 3 and 6); ``stop_at`` interrupts as a killed job would, right after a checkpoint.
    ``announce`` passes the folder through the documented hook ``ema.resume_from``."""
    torch.manual_seed(seed)
    model = ConvNextV2ForImageClassification(tiny_config())
    fields = dict(max_steps=6, save_strategy="steps", save_steps=3, seed=seed)
    args = training_args(output_dir, **{**fields, **arg_overrides})
    ema = EMACallback(decay=0.5, allow_fresh_start=allow_fresh_start)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=LabelledImages(),
        optimizer_cls_and_kwargs=layer_decay_optimizer(model, args, layer_decay=0.8),
        callbacks=[ema] + ([StopAtStep(stop_at)] if stop_at else []),
    )
    if resume == "no argument":
        trainer.train()
    else:
        trainer.train(resume_from_checkpoint=ema.resume_from(resume) if announce else resume)
    return model, ema, trainer


@pytest.fixture(scope="module")
def uninterrupted_ema_run(tmp_path_factory):
    model, ema, _ = ema_run(tmp_path_factory.mktemp("full"))
    return model.state_dict(), ema.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("way", ["path", "True", "moved path", "args", "args True", "stale args"])
def test_ema_resumes_bit_for_bit_whichever_way_training_resumes(tmp_path, uninterrupted_ema_run, way):
    full_model, full_ema = uninterrupted_ema_run
    interrupted = tmp_path / "run"
    ema_run(interrupted, stop_at=3)
    assert (interrupted / "checkpoint-3" / EMA_WEIGHTS_NAME).exists() and not (interrupted / "checkpoint-6").exists()
    checkpoint = str(interrupted / "checkpoint-3")
    if way == "path":
        resumed_model, resumed_ema, trainer = ema_run(interrupted, resume=checkpoint)
    elif way == "True":
        resumed_model, resumed_ema, trainer = ema_run(interrupted, resume=True)
    elif way in ("args", "args True"):  # what the example scripts do with --resume_from_checkpoint
        value = checkpoint if way == "args" else "True"
        args = training_args(interrupted, resume_from_checkpoint=value)
        assert resume_checkpoint(args) == checkpoint
        resumed_model, resumed_ema, trainer = ema_run(
            interrupted, resume=resume_checkpoint(args), resume_from_checkpoint=value
        )
    else:  # the checkpoint copied elsewhere, resumed into a new output folder (with a stale --resume_from_checkpoint)
        moved = shutil.copytree(checkpoint, tmp_path / "elsewhere" / "copy")
        shutil.rmtree(interrupted)
        stale = {}
        if way == "stale args":  # another run's checkpoint at the same step: its EMA must not be taken
            ema_run(tmp_path / "other", stop_at=3, seed=1)
            stale = {"resume_from_checkpoint": str(tmp_path / "other" / "checkpoint-3")}
        resumed_model, resumed_ema, trainer = ema_run(
            tmp_path / "new_output", resume=str(moved), announce=True, **stale
        )
    assert trainer.state.global_step == 6
    for name, tensor in full_model.items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name
    resumed = resumed_ema.state_dict()
    assert resumed.keys() == full_ema.keys() and resumed["n_averaged"].item() == 6
    for name, tensor in full_ema.items():
        assert torch.equal(resumed[name], tensor), name
    # the average is not the model: it lags behind it
    assert any(not torch.equal(full_ema[n], t) for n, t in full_model.items())


def test_layer_decay_groups_are_rebuilt_before_the_optimizer_state_loads(tmp_path):
    ema_run(tmp_path, stop_at=3)
    model, _, trainer = ema_run(tmp_path, resume=True)
    assert [len(g["params"]) for g in trainer.optimizer.param_groups] == [
        len(g["params"]) for g in layer_decay_param_groups(model, 0.05, 0.8)
    ]


def test_args_resume_without_passing_it_to_train_warns_that_nothing_resumed(tmp_path, caplog):
    ema_run(tmp_path, stop_at=3)
    with caplog.at_level("WARNING", logger="convnextv2_hf.training"):
        _, ema, trainer = ema_run(
            tmp_path, resume="no argument", resume_from_checkpoint=str(tmp_path / "checkpoint-3"), max_steps=1
        )
    assert trainer.state.global_step == 1 and ema.ema.n_averaged.item() == 1  # the Trainer itself did not resume
    assert "the Trainer started at step 0: it resumes only from `trainer.train(resume_from_checkpoint=...)`" in (
        caplog.text
    )


def test_resuming_without_ema_weights_is_refused_unless_a_fresh_start_is_allowed(tmp_path, caplog):
    ema_run(tmp_path, stop_at=3)
    (tmp_path / "checkpoint-3" / EMA_WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match=r"checkpoint-3 holds no EMA weights \(ema_model\.safetensors\)"):
        ema_run(tmp_path, resume=True)
    with caplog.at_level("WARNING", logger="convnextv2_hf.training"):
        _, ema, _ = ema_run(tmp_path, resume=True, allow_fresh_start=True)
    assert "checkpoint-3 holds no EMA weights (ema_model.safetensors); the EMA restarts" in caplog.text
    assert ema.ema.n_averaged.item() == 3


def test_a_truncated_ema_file_stops_the_resume_with_its_name(tmp_path):
    ema_run(tmp_path, stop_at=3)
    truncate(tmp_path / "checkpoint-3" / EMA_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"cannot read the EMA weights .*checkpoint-3/ema_model\.safetensors.*trunc"):
        ema_run(tmp_path, resume=True)
    args = training_args(tmp_path, resume_from_checkpoint="last")
    with pytest.raises(ValueError, match=r"checkpoint-3/ema_model\.safetensors is not a complete safetensors file"):
        resume_checkpoint(args)  # the scripts' check, before any training


@pytest.mark.slow
def test_an_ema_file_from_another_step_or_model_is_refused(tmp_path):
    ema_run(tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-3"
    shutil.copy(tmp_path / "run" / "checkpoint-6" / EMA_WEIGHTS_NAME, checkpoint / EMA_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"ema_model\.safetensors were saved at step 6, not at step 3"):
        ema_run(tmp_path / "run", resume=str(checkpoint))
    other = EMACallback(decay=0.5)
    other._build(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"ema_model\.safetensors do not fit this model"):
        other.load(checkpoint / EMA_WEIGHTS_NAME)


def test_a_truncated_model_file_is_named_before_resuming(tmp_path):
    ema_run(tmp_path, stop_at=3)
    truncate(tmp_path / "checkpoint-3" / "model.safetensors", keep=0.9)
    args = training_args(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    with pytest.raises(ValueError, match=r"checkpoint-3/model\.safetensors is not a complete safetensors file"):
        resume_checkpoint(args)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("True", r"no checkpoint-\* folder in"),
        ("does/not/exist", "not a Trainer checkpoint"),
    ],
)
def test_resume_checkpoint_rejects_what_cannot_be_resumed(tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        resume_checkpoint(training_args(tmp_path / "empty", resume_from_checkpoint=value))
    assert resume_checkpoint(training_args(tmp_path, resume_from_checkpoint=None)) is None


def test_ema_matches_the_closed_form_average():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = EMACallback(decay=0.5)
    ema._build(model)
    values = [1.0, 3.0, 5.0]
    for value in values:
        with torch.no_grad():
            model.weight.fill_(value)
        ema.on_step_end(None, None, None, model=model)
    # AveragedModel starts from the first value, then e <- 0.5 e + 0.5 x
    assert ema.ema.module.weight[0, 0].item() == pytest.approx(0.5 * (0.5 * 1.0 + 0.5 * 3.0) + 0.5 * 5.0)


def test_reconstruction_callback_writes_png_grids(tmp_path):
    import PIL.Image

    model = ConvNextV2ForMaskedImageModeling(tiny_config())
    callback = FCMAEReconstructionCallback(torch.randn(2, 3, 64, 96), every_steps=1)
    path = callback.write(model, tmp_path / "grid.png")
    image = PIL.Image.open(path)
    assert image.size == (3 * 96 + 4 * 2, 2 * 64 + 3 * 2)  # 3 columns (original, masked, reconstruction)


def test_ema_weights_become_the_model_when_asked_for_the_final_save(tmp_path):
    torch.manual_seed(0)
    model = ConvNextV2ForImageClassification(tiny_config())
    args = training_args(tmp_path, max_steps=3)
    ema = EMACallback(decay=0.9, use_for_final_save=True)
    Trainer(model=model, args=args, train_dataset=LabelledImages(), callbacks=[ema]).train()
    for name, tensor in ema.ema.module.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert ema.ema.n_averaged.item() == 3


def test_ema_decay_must_be_a_fraction():
    with pytest.raises(ValueError, match=EMA_DECAY_OUT_OF_RANGE):
        EMACallback(decay=1.0)
