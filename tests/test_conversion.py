"""Conversion of official checkpoints: the table, the three layouts, verification against timm, bad inputs,
model cards, convert-all and pushing to a local fake Hub.

Checkpoints are synthetic: random weights written in each official layout by ``helpers`` (key names and shapes as
in the official code, github.com/facebookresearch/ConvNeXt-V2: models/convnextv2.py, models/convnextv2_sparse.py
and models/fcmae.py). The sparse (pretraining) layout is written from dense tensors with the inverse of the
documented kernel remapping, so converting it back must reproduce the dense model.
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from expected_errors import (
    CODE_RUNNING_PICKLE_REFUSED,
    INJECTED_CARD_FAILURE_MATCH,
    MISSING_TENSOR,
    NOT_A_PYTORCH_CHECKPOINT,
    OUTPUT_FOLDER_EXISTS,
    SHAPES_OF_ANOTHER_SIZE_THAN_NAMED,
    UNEXPECTED_TENSOR,
)
from helpers import (
    CUSTOM,
    REPO,
    broken_card_save,
    load_script,
    official_dense,
    official_pretraining,
    save_official,
    write_bad_input,
)
from hub_server import hub_server  # noqa: F401  (fixture)
from huggingface_hub import ModelCard
from timm.models.convnext import checkpoint_filter_fn
from transformers import AutoImageProcessor, AutoModelForImageClassification

from convnextv2_hf import (
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2Model,
)
from convnextv2_hf import conversion as conversion_module
from convnextv2_hf.checkpoints import (
    FCMAE,
    FINETUNED_1K,
    FINETUNED_22K,
    OFFICIAL_CHECKPOINTS,
    find_official_checkpoint,
    imagenet1k_labels,
    select_checkpoints,
)
from convnextv2_hf.conversion import (
    CONVERSION_MARKER,
    FCMAE_ENCODER,
    FCMAE_PRETRAINING,
    FINETUNED,
    OriginalCheckpoint,
    VerificationError,
    convert_checkpoint,
    convert_state_dict,
    resolve_checkpoint,
    sparse_kernel_to_dense,
    verify_against_timm,
)
from convnextv2_hf.model_card import MODEL_CARD_TEMPLATE, write_model_cards

TOLERANCE = 1e-4
IMAGE_SIZE = 64  # verification inputs in tests
ATTO = ([2, 2, 6, 2], [40, 80, 160, 320])
FEMTO = ([2, 2, 6, 2], [48, 96, 192, 384])
DIFF = re.compile(r"max abs diff ([0-9.]+e[+-]\d+)")


# ----------------------------------------------------------------------------------------------------------
# References and readings (the synthetic official checkpoints are in helpers)
# ----------------------------------------------------------------------------------------------------------


def timm_from_dense(state_dict: dict, shapes, num_classes: int) -> torch.nn.Module:
    """timm's ConvNeXt V2 loaded through timm's own filter: the independent reference of these tests."""
    depths, widths = shapes
    model = timm.create_model("convnextv2_atto", num_classes=num_classes, depths=depths, dims=widths)
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=False)
    return model.eval()


def pixels(size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))


def printed_differences(lines: list[str]) -> list[float]:
    values = [float(value) for line in lines for value in DIFF.findall(line)]
    assert values, f"no max abs diff printed in {lines}"
    return values


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------


def test_table_lists_the_26_official_checkpoints_with_the_readme_numbers():
    by_data = {
        data: [c for c in OFFICIAL_CHECKPOINTS if c.pretraining == data]
        for data in (FCMAE, FINETUNED_1K, FINETUNED_22K)
    }
    assert [len(rows) for rows in by_data.values()] == [8, 8, 10]
    assert len({c.url for c in OFFICIAL_CHECKPOINTS}) == len({c.repo_id() for c in OFFICIAL_CHECKPOINTS}) == 26
    assert all(c.acc1 is None and c.gflops is None and not c.is_classifier for c in by_data[FCMAE])
    atto = find_official_checkpoint("convnextv2_atto_1k_224_ema")
    assert (atto.acc1, atto.params_m, atto.gflops, atto.resolution) == (76.7, 3.7, 0.55, 224)
    assert atto.url == "https://dl.fbaipublicfiles.com/convnext/convnextv2/im1k/convnextv2_atto_1k_224_ema.pt"
    huge = find_official_checkpoint(
        "https://dl.fbaipublicfiles.com/convnext/convnextv2/im22k/convnextv2_huge_22k_512_ema.pt"
    )
    assert (huge.acc1, huge.params_m, huge.gflops, huge.resolution, huge.repo_name) == (
        88.9,
        660,
        600.8,
        512,
        "convnextv2-huge-22k-512",
    )
    assert find_official_checkpoint("/some/dir/convnextv2_tiny_1k_224_fcmae.pt").pretraining == FCMAE
    assert find_official_checkpoint("my_checkpoint.pt") is None
    assert [c.name for c in select_checkpoints(["huge", "384"])] == [
        "convnextv2_huge_1k_224_fcmae",
        "convnextv2_huge_1k_224_ema",
        "convnextv2_nano_22k_384_ema",
        "convnextv2_tiny_22k_384_ema",
        "convnextv2_base_22k_384_ema",
        "convnextv2_large_22k_384_ema",
        "convnextv2_huge_22k_384_ema",
        "convnextv2_huge_22k_512_ema",
    ]


def test_imagenet_labels_ship_with_the_package():
    labels = imagenet1k_labels()
    assert len(labels) == len(set(labels)) == 1000
    assert (labels[0], labels[281], labels[999]) == ("tench", "tabby", "toilet tissue")


# ----------------------------------------------------------------------------------------------------------
# The sparse kernel rule
# ----------------------------------------------------------------------------------------------------------


def test_sparse_kernels_are_remapped_as_documented():
    kernel = torch.zeros(9, 2, 5)  # (k*k, in, out), k = 3
    kernel[1, 0, 4] = 1.0  # window entry 1: second along the axis the sparse kernel walks fastest
    dense = sparse_kernel_to_dense(kernel)
    assert dense.shape == (5, 2, 3, 3)
    assert dense[4, 0, 1, 0] == 1.0 and dense.abs().sum() == 1.0  # row 1, column 0 after the swap
    random_kernel = torch.randn(49, 6, 8)
    expected = random_kernel.permute(2, 1, 0).reshape(8, 6, 7, 7).transpose(3, 2)
    assert torch.equal(sparse_kernel_to_dense(random_kernel), expected)
    depthwise = torch.randn(49, 6)  # (k*k, C)
    assert torch.equal(sparse_kernel_to_dense(depthwise), depthwise.permute(1, 0).reshape(6, 1, 7, 7).transpose(3, 2))
    with pytest.raises(ValueError, match="k\\*k"):
        sparse_kernel_to_dense(torch.randn(8, 2, 2))


# ----------------------------------------------------------------------------------------------------------
# The three layouts, end to end
# ----------------------------------------------------------------------------------------------------------


def test_fine_tuned_classifier_converts_verifies_and_loads_back(tmp_path):
    original = official_dense(ATTO, num_classes=1000)
    source = save_official(tmp_path / "convnextv2_atto_1k_224_ema.pt", original)
    lines = []
    report = convert_checkpoint(source, tmp_path / "out", verify_image_size=IMAGE_SIZE, log=lines.append)

    assert report.converted.layout is FINETUNED and report.converted.size == "atto"
    assert max(printed_differences(lines)) <= TOLERANCE
    assert report.verification.max_abs_diff <= TOLERANCE
    photo_line = next(line for line in lines if "chelsea" in line)
    assert len(report.top5) == 5 and all(label in imagenet1k_labels() for label, _ in report.top5)
    assert report.top5[0][0] in photo_line

    folder = tmp_path / "out"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        p.name for p in folder.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(model) is ConvNextV2ForImageClassification
    assert (model.config.image_size, model.config.layer_norm_eps, model.config.id2label[281]) == (224, 1e-6, "tabby")
    with torch.no_grad():
        difference = (model(pixels()).logits - timm_from_dense(original, ATTO, 1000)(pixels())).abs().max()
    assert difference <= TOLERANCE
    assert AutoImageProcessor.from_pretrained(folder).size == {"shortest_edge": 224}

    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "cc-by-nc-4.0"
    assert card.data.eval_results[0].metric_value == 76.7
    assert hashlib.sha256(source.read_bytes()).hexdigest() in card.text
    assert "filled in at conversion time" not in card.text


def test_fcmae_encoder_converts_to_the_base_model_and_fine_tunes(tmp_path):
    original = official_dense(FEMTO, final_norm=False, seed=3)
    source = save_official(tmp_path / "convnextv2_femto_1k_224_fcmae.pt", original)
    lines = []
    report = convert_checkpoint(source, tmp_path / "out", verify_image_size=IMAGE_SIZE, log=lines.append)

    assert report.converted.layout is FCMAE_ENCODER and report.top5 is None
    assert max(printed_differences(lines)) <= TOLERANCE
    assert any("final feature map" in line for line in lines)
    encoder = ConvNextV2Model.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(encoder.layernorm.weight, torch.ones(384)) and torch.equal(
        encoder.layernorm.bias, torch.zeros(384)
    )
    with torch.no_grad():
        ours = encoder(pixels()).last_hidden_state
        reference = timm_from_dense(original, FEMTO, 0).forward_features(pixels())
    assert (ours - reference).abs().max() <= TOLERANCE
    classifier = ConvNextV2ForImageClassification.from_pretrained(tmp_path / "out", num_labels=10)
    assert torch.equal(
        classifier.convnextv2.encoder.stages[2].layers[5].grn.weight, encoder.encoder.stages[2].layers[5].grn.weight
    )
    assert ModelCard.load(tmp_path / "out" / "README.md").data.pipeline_tag == "image-feature-extraction"


def test_pretraining_checkpoint_converts_to_masked_image_modeling_with_its_decoder(tmp_path):
    encoder = official_dense(FEMTO, final_norm=False, seed=4)
    sparse = official_pretraining(encoder, decoder_width=512, decoder_depth=1)
    args = argparse.Namespace(model="convnextv2_femto", input_size=224, mask_ratio=0.75, norm_pix_loss=True)
    source = save_official(tmp_path / "checkpoint-799.pth", sparse, optimizer={"state": {}}, epoch=799, args=args)
    lines = []
    report = convert_checkpoint(source, tmp_path / "out", verify_image_size=IMAGE_SIZE, log=lines.append)

    assert report.converted.layout is FCMAE_PRETRAINING and report.converted.size == "femto"
    differences = printed_differences(lines)
    assert len(differences) == 2 and max(differences) <= TOLERANCE  # encoder and decoder
    assert any("documented kernel remapping" in line for line in lines)
    model = ConvNextV2ForMaskedImageModeling.from_pretrained(tmp_path / "out").eval()
    config = model.config
    assert (config.decoder_hidden_size, config.decoder_depth, config.mask_ratio, config.norm_pix_loss) == (
        512,
        1,
        0.75,
        True,
    )
    # the encoder equals the dense model the sparse file was written from (an independent check of the remapping)
    with torch.no_grad():
        ours = model.convnextv2(pixels()).last_hidden_state
        reference = timm_from_dense(encoder, FEMTO, 0).forward_features(pixels())
        assert (ours - reference).abs().max() <= TOLERANCE
        assert torch.isfinite(model(pixels()).loss)
    assert torch.equal(model.decoder_embed.weight, sparse["proj.weight"])
    assert torch.equal(model.mask_token, sparse["mask_token"])
    assert torch.equal(model.decoder_pred.weight, sparse["pred.weight"])
    assert torch.equal(model.decoder[0].grn.weight, sparse["decoder.0.grn.gamma"])


def test_decoder_verification_masks_with_the_models_own_rule(monkeypatch):
    # one home for the masking rule: the verification draws its mask with modeling's draw_mask, so a change to
    # the rule cannot leave the conversion checking a different mask than the model uses
    from convnextv2_hf import modeling_convnextv2

    calls = []

    def recording_draw_mask(noise, mask_ratio):
        mask = modeling_convnextv2.draw_mask(noise, mask_ratio)
        calls.append((tuple(noise.shape), mask_ratio, int(mask.sum())))
        return mask

    monkeypatch.setattr(conversion_module.verification, "draw_mask", recording_draw_mask)  # where it is looked up
    dense = official_pretraining(official_dense(CUSTOM, final_norm=False), decoder_width=32, decoder_depth=1)
    args = argparse.Namespace(mask_ratio=0.5, norm_pix_loss=True, input_size=64)
    converted = convert_state_dict(OriginalCheckpoint(dense, vars(args)))
    assert verify_against_timm(converted, IMAGE_SIZE).max_abs_diff <= TOLERANCE
    assert calls == [((2, 4), 0.5, 2 * 2)]  # 2x2 last-stage positions per image at 64 px, half of them removed


@pytest.mark.parametrize("layout", [FINETUNED, FCMAE_ENCODER, FCMAE_PRETRAINING], ids=lambda layout: layout.name)
def test_custom_shapes_are_read_off_the_tensors(layout):
    dense = official_dense(CUSTOM, num_classes=10 if layout is FINETUNED else None, final_norm=layout is FINETUNED)
    if layout is FCMAE_PRETRAINING:
        dense = official_pretraining(dense, decoder_width=32, decoder_depth=2)
    converted = convert_state_dict(OriginalCheckpoint(dense))
    assert converted.layout is layout and converted.size == "custom"
    config = converted.model.config
    assert (list(config.depths), list(config.hidden_sizes)) == (CUSTOM[0], CUSTOM[1])
    if layout is FINETUNED:
        assert config.num_labels == 10
    if layout is FCMAE_PRETRAINING:
        assert (config.decoder_hidden_size, config.decoder_depth) == (32, 2)
    assert verify_against_timm(converted, IMAGE_SIZE).max_abs_diff <= TOLERANCE


@pytest.mark.parametrize("layout", [FINETUNED, FCMAE_PRETRAINING], ids=lambda layout: layout.name)
def test_verification_fails_on_a_corrupted_tensor(layout):
    dense = official_dense(CUSTOM, num_classes=10 if layout is FINETUNED else None, final_norm=layout is FINETUNED)
    if layout is FCMAE_PRETRAINING:
        dense = official_pretraining(dense, decoder_width=32, decoder_depth=1)
    converted = convert_state_dict(OriginalCheckpoint(dense))
    assert verify_against_timm(converted, IMAGE_SIZE).max_abs_diff <= TOLERANCE
    corrupted = (
        "decoder.0.grn.weight" if layout is FCMAE_PRETRAINING else "convnextv2.encoder.stages.2.layers.0.grn.bias"
    )
    with torch.no_grad():
        converted.model.get_parameter(corrupted).add_(0.01)
    with pytest.raises(VerificationError, match="exceeds the tolerance"):
        verify_against_timm(converted, IMAGE_SIZE)


def test_a_wrong_kernel_remapping_fails_verification_and_the_cli_writes_nothing(tmp_path, monkeypatch, capsys):
    encoder = official_dense(CUSTOM, final_norm=False)
    source = save_official(
        tmp_path / "pretraining.pth", official_pretraining(encoder, decoder_width=32, decoder_depth=1)
    )
    cli = load_script("convert_convnextv2_to_hf")
    assert (
        cli.main(["--checkpoint", str(source), "--output-dir", str(tmp_path / "good"), "--verify-image-size", "64"])
        == 0
    )
    assert max(printed_differences(capsys.readouterr().out.splitlines())) <= TOLERANCE

    def without_the_axis_swap(kernel):  # the classic mistake: forget that the sparse window runs the other way
        return sparse_kernel_to_dense(kernel).transpose(2, 3)

    rules = [
        (p, r, without_the_axis_swap if f is sparse_kernel_to_dense else f)
        for p, r, f in conversion_module.SPARSE_TO_DENSE_RULES
    ]
    monkeypatch.setattr(conversion_module.building, "SPARSE_TO_DENSE_RULES", rules)  # where it is looked up
    code = cli.main(["--checkpoint", str(source), "--output-dir", str(tmp_path / "bad"), "--verify-image-size", "64"])
    assert code == 2 and re.match(r"error: .*exceeds the tolerance", capsys.readouterr().err)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".*.partial"))


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error, a non-zero exit, no folder
# ----------------------------------------------------------------------------------------------------------


BAD_INPUTS = {
    "code-running pickle": CODE_RUNNING_PICKLE_REFUSED,
    "not a checkpoint": NOT_A_PYTORCH_CHECKPOINT,
    "truncated file": NOT_A_PYTORCH_CHECKPOINT,
    "ConvNeXt V1": "ConvNeXt V1 checkpoint",
    "ViT": "Vision Transformer",
    "missing tensor": MISSING_TENSOR,
    "extra tensor": UNEXPECTED_TENSOR,
    "wrong shape": "wrong shape: classifier.bias .*'head.bias'.*\\(11,\\), expected \\(10,\\)",
    "no state dict": "no state dict",
    "other size than named": SHAPES_OF_ANOTHER_SIZE_THAN_NAMED,
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(kind, tmp_path, capsys):
    source = write_bad_input(kind, tmp_path / "checkpoint.pt")
    cli = load_script("convert_convnextv2_to_hf")
    code = cli.main(["--checkpoint", str(source), "--output-dir", str(tmp_path / "out"), "--verify-image-size", "64"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: ") and "Traceback" not in error
    assert re.search(BAD_INPUTS[kind], error), error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert not source.with_suffix(".ran").exists()  # the pickle's code never ran


def test_an_existing_output_folder_is_not_overwritten_unless_asked(tmp_path):
    source = save_official(tmp_path / "custom.pt", official_dense(CUSTOM, num_classes=10))
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=OUTPUT_FOLDER_EXISTS):
        convert_checkpoint(source, tmp_path / "out", verify=False, log=lambda line: None)
    convert_checkpoint(source, tmp_path / "out", verify=False, overwrite=True, log=lambda line: None)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_failure_while_writing_leaves_no_folder(tmp_path, monkeypatch):
    source = save_official(tmp_path / "custom.pt", official_dense(CUSTOM, num_classes=10))
    monkeypatch.setattr(ModelCard, "save", broken_card_save)  # stands for any failure inside the staging folder
    with pytest.raises(RuntimeError, match=INJECTED_CARD_FAILURE_MATCH):
        convert_checkpoint(source, tmp_path / "out", verify=False, log=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.pt"]


def test_official_names_resolve_through_the_cache_and_nothing_is_downloaded_offline(tmp_path):
    cached = save_official(tmp_path / "convnextv2_atto_1k_224_fcmae.pt", {"x": torch.zeros(1)})
    path, source = resolve_checkpoint("convnextv2_atto_1k_224_fcmae", cache_dir=tmp_path)
    assert path == cached and source == find_official_checkpoint("convnextv2_atto_1k_224_fcmae").url
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint("convnextv2_femto_1k_224_fcmae", cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------------------


def test_committed_model_cards_parse_and_are_what_the_generator_writes(tmp_path):
    assert MODEL_CARD_TEMPLATE.is_file()
    regenerated = write_model_cards(tmp_path)
    assert len(regenerated) == 26
    for path in regenerated:
        committed = REPO / "model_cards" / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run generate_model_cards.py"
        card = ModelCard.load(committed)
        checkpoint = next(c for c in OFFICIAL_CHECKPOINTS if c.repo_name == path.stem)
        assert card.data.license == "cc-by-nc-4.0"
        assert checkpoint.url in card.text and "filled in at conversion time" in card.text
        assert "arXiv 2301.00808" in card.text and "convnextv2-hf 0.1.0" in card.text
        assert f"{checkpoint.params_m:g}M" in card.text
        if checkpoint.is_classifier:
            assert card.data.eval_results[0].metric_value == checkpoint.acc1
            assert f"{checkpoint.gflops}G" in card.text and card.data.pipeline_tag == "image-classification"
        else:
            assert card.data.eval_results is None


# ----------------------------------------------------------------------------------------------------------
# convert_all.py
# ----------------------------------------------------------------------------------------------------------


def test_convert_all_dry_run_prints_the_plan_without_network(tmp_path, capsys):
    convert_all = load_script("convert_all")
    assert convert_all.main(["--dry-run", "--output-root", str(tmp_path / "converted"), "--namespace", "me"]) == 0
    out = capsys.readouterr().out
    for checkpoint in OFFICIAL_CHECKPOINTS:
        assert re.search(re.escape(checkpoint.url) + r"\s+->\s+" + re.escape(checkpoint.repo_id("me")), out)
        assert checkpoint.title in out
    assert not (tmp_path / "converted").exists()


def test_convert_all_converts_a_subset_and_resumes(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    save_official(cache / "convnextv2_atto_1k_224_fcmae.pt", official_dense(ATTO, final_norm=False))
    save_official(cache / "convnextv2_atto_1k_224_ema.pt", official_dense(ATTO, num_classes=1000))
    convert_all = load_script("convert_all")
    arguments = [
        "--output-root",
        str(tmp_path / "converted"),
        "--filter",
        "atto",
        "--cache-dir",
        str(cache),
        "--verify-image-size",
        "64",
    ]
    assert convert_all.main(arguments) == 0
    first = capsys.readouterr().out
    assert re.search(r"convnextv2_atto_1k_224_fcmae\s+converted\s+\S+e-\d\d", first)
    assert re.search(r"convnextv2_atto_1k_224_ema\s+converted", first) and "2 done, 0 failed" in first
    assert max(printed_differences(first.splitlines())) <= TOLERANCE
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == [
        "convnextv2-atto-1k-224",
        "convnextv2-atto-1k-224-fcmae",
    ]
    card = ModelCard.load(tmp_path / "converted" / "convnextv2-atto-1k-224" / "README.md")
    assert find_official_checkpoint("convnextv2_atto_1k_224_ema").url in card.text

    assert convert_all.main(arguments) == 0
    second = capsys.readouterr().out
    assert second.count("skipped (done)") == 2 and "converted" not in second.split("checkpoint")[-1]

    missing = [
        "--output-root",
        str(tmp_path / "converted"),
        "--filter",
        "femto_1k_224_fcmae",
        "--cache-dir",
        str(cache),
    ]
    assert convert_all.main(missing) == 1  # not in the cache, and offline: reported, not downloaded
    third = capsys.readouterr().out
    assert re.search(r"convnextv2_femto_1k_224_fcmae\s+FAILED", third) and "HF_HUB_OFFLINE" in third


# ----------------------------------------------------------------------------------------------------------
# Pushing to a (local, fake) Hub
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_pushes_to_a_local_hub_and_pushing_again_changes_nothing(tmp_path, hub_server):  # noqa: F811
    source = save_official(tmp_path / "custom.pt", official_dense(CUSTOM, num_classes=10))
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=hub_server.url, HF_TOKEN="hf_fake_token", HF_HOME=str(tmp_path / "hf_home"))
    command = [
        sys.executable,
        str(REPO / "conversion_scripts" / "convert_convnextv2_to_hf.py"),
        "--checkpoint",
        str(source),
        "--output-dir",
        str(tmp_path / "out"),
        "--verify-image-size",
        "64",
        "--push-to-hub",
        "--repo-id",
        "tester/convnextv2-custom",
        "--private",
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert max(printed_differences(run.stdout.splitlines())) <= TOLERANCE
    repo = hub_server.repos["tester/convnextv2-custom"]
    files = repo.branches["main"]
    assert repo.private and len(repo.commits) == 1 and "pushed" in run.stdout
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(files)
    assert CONVERSION_MARKER not in files and (tmp_path / "out" / CONVERSION_MARKER).is_file()  # stays local
    for name, content in files.items():
        assert content == (tmp_path / "out" / name).read_bytes()
    assert ModelCard(files["README.md"].decode()).data.license == "cc-by-nc-4.0"
    assert "Bearer hf_fake_token" in hub_server.authorizations

    # the same conversion again, pushed to a new branch: identical files, so no new upload commit
    again = command + ["--overwrite"]
    run = subprocess.run(again + ["--revision", "v1.0"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "No files have been modified" in run.stderr
    assert repo.branches["v1.0"] == files
    assert [summary for _, _, summary in repo.commits].count("branch created") == 1
    assert len([commit for commit in repo.commits if commit[2].startswith("Upload")]) == 1
    assert not hub_server.unknown
