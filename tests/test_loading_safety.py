"""Loading and saving stay safe (issue 17): weights are what they claim to be, a shard index stays inside its folder,
a config cannot exhaust memory, and no non-finite weights are saved.

Everything runs on real files: folders written by ``save_pretrained`` (sharded with ``max_shard_size``), then edited
the way a damaged or hostile checkpoint would be.
"""

import json
import os
import resource
import shutil
import time

import pytest
import torch
import transformers
from expected_errors import MODEL_BEYOND_THE_BOUNDS
from helpers import randomize_, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.models import convnextv2 as builtin

from convnextv2_hf import (
    PRESETS,
    ConvNextV2Backbone,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2Model,
)
from convnextv2_hf import modeling_convnextv2 as modeling
from convnextv2_hf.configuration_convnextv2 import MAX_BLOCKS, MAX_PARAMETERS
from convnextv2_hf.modeling_convnextv2 import (
    ARCHITECTURES,
    ConvNextV2Encoder,
    NonFiniteWeightsError,
    check_finite_weights,
    estimated_parameters,
)

CLASSES = {
    "ConvNextV2Encoder": ConvNextV2Encoder,
    "ConvNextV2Model": ConvNextV2Model,
    "ConvNextV2ForImageClassification": ConvNextV2ForImageClassification,
    "ConvNextV2Backbone": ConvNextV2Backbone,
    "ConvNextV2ForMaskedImageModeling": ConvNextV2ForMaskedImageModeling,
}


def saved_classifier(folder, **save_options):
    torch.manual_seed(0)
    model = randomize_(ConvNextV2ForImageClassification(tiny_config())).eval()
    model.save_pretrained(folder, **save_options)
    return model


def rewrite_weights(path, change):
    """Rewrite the safetensors file ``path`` with ``change(name, tensor)`` applied to every tensor."""
    state = load_file(str(path))
    save_file({name: change(name, tensor) for name, tensor in state.items()}, str(path), metadata={"format": "pt"})


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- no non-finite weights are saved ----------------------------------------------------------------------------


def test_check_finite_weights_names_the_first_bad_tensor_and_counts_them():
    state = {
        "fine": torch.ones(4),
        "steps": torch.tensor([3]),  # integers cannot be non-finite: skipped
        "meta": torch.empty(8, device="meta"),  # no data: skipped
        "half": torch.tensor([1.0, float("nan"), float("nan")], dtype=torch.float16),
        "later": torch.tensor([float("inf")]),
    }
    with pytest.raises(NonFiniteWeightsError) as caught:
        check_finite_weights(state, "the EMA weights")
    assert str(caught.value) == (
        "the EMA weights: 2 of 3 floating-point tensors hold NaN or inf, the first 'half' (2 of 3 values)"
    )
    assert isinstance(caught.value, ValueError)
    check_finite_weights({"fine": torch.ones(3), "steps": torch.tensor([1])}, "anything")  # no error


def test_save_pretrained_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    model = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config()))
    with torch.no_grad():
        model.decoder_pred.bias[3] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"to save to .*new \(nothing was written\).*'decoder_pred.bias'"):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # an existing folder (an earlier good save) is left exactly as it was
    good = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config()))
    good.save_pretrained(tmp_path / "old")
    before = snapshot(tmp_path / "old")
    with pytest.raises(NonFiniteWeightsError):
        model.save_pretrained(tmp_path / "old")
    assert snapshot(tmp_path / "old") == before


def test_save_pretrained_checks_the_state_dict_it_is_given(tmp_path):
    # the Trainer saves through save_pretrained(output_dir, state_dict=...): that state is what gets written
    model = randomize_(ConvNextV2ForImageClassification(tiny_config()))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["classifier.weight"][0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"1 of \d+ floating-point tensors.*'classifier.weight' \(1 of"):
        model.save_pretrained(tmp_path / "x", state_dict=state)
    assert not (tmp_path / "x").exists()


def test_trainer_save_model_refuses_nan_weights(tmp_path):
    model = randomize_(ConvNextV2ForImageClassification(tiny_config()))
    with torch.no_grad():
        model.convnextv2.layernorm.weight.fill_(float("nan"))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args)
    with pytest.raises(NonFiniteWeightsError, match=r"'convnextv2.layernorm.weight' \(32 of 32 values\)"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()


# ---- weights are what they claim to be ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, stored",
    [(torch.int8, "I8"), (torch.int64, "I64"), (torch.uint8, "U8"), (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8")],
)
def test_integer_bool_and_float8_tensors_are_refused_naming_the_tensor(tmp_path, dtype, stored):
    saved_classifier(tmp_path)
    target = "convnextv2.encoder.stages.2.layers.0.pwconv1.weight"
    rewrite_weights(tmp_path / "model.safetensors", lambda n, t: t.to(dtype) if n == target else t)
    with pytest.raises(ValueError, match=rf"model.safetensors stores the tensor '{target}' as {stored}"):
        ConvNextV2ForImageClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"must be floating point \(F16, BF16, F32, F64"):
        transformers.AutoModelForImageClassification.from_pretrained(tmp_path)


def test_every_tensor_rewritten_as_int8_is_refused_not_loaded_as_garbage(tmp_path):
    saved_classifier(tmp_path)
    rewrite_weights(tmp_path / "model.safetensors", lambda n, t: (t * 100).to(torch.int8))
    with pytest.raises(ValueError, match=r"stores the tensor '.*' as I8"):
        ConvNextV2ForMaskedImageModeling.from_pretrained(tmp_path)


def test_pytorch_bin_weights_with_integer_tensors_are_refused(tmp_path):
    model = saved_classifier(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["classifier.bias"] = state["classifier.bias"].to(torch.int32)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin stores the tensor 'classifier.bias' as torch.int32"):
        ConvNextV2ForImageClassification.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"pytorch_model.bin is not a readable PyTorch weights file"):
        ConvNextV2ForImageClassification.from_pretrained(tmp_path)


def test_state_dict_argument_is_held_to_the_same_dtypes():
    config = tiny_config()
    state = ConvNextV2ForImageClassification(config).state_dict()
    state["classifier.weight"] = state["classifier.weight"].to(torch.int16)
    with pytest.raises(ValueError, match=r"state_dict stores the tensor 'classifier.weight' as torch.int16"):
        ConvNextV2ForImageClassification.from_pretrained(None, config=config, state_dict=state)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("load_dtype", [None, "auto", torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config_dtype", [True, False])
def test_float_checkpoints_load_and_are_cast_as_stock_transformers_casts_them(
    tmp_path, stored, load_dtype, config_dtype
):
    saved_classifier(tmp_path)
    rewrite_weights(tmp_path / "model.safetensors", lambda n, t: t.to(stored))
    if not config_dtype:  # save_pretrained records "float32"; a config without it leaves the choice to the file
        config = json.loads((tmp_path / "config.json").read_text())
        del config["dtype"]
        (tmp_path / "config.json").write_text(json.dumps(config))
    kwargs = {} if load_dtype is None else {"dtype": load_dtype}
    ours = ConvNextV2ForImageClassification.from_pretrained(tmp_path, **kwargs)
    stock = builtin.ConvNextV2ForImageClassification.from_pretrained(tmp_path, **kwargs)
    if load_dtype in (None, "auto"):  # transformers 5's default is "auto": the config's dtype, else the file's
        expected_dtype = torch.float32 if config_dtype else stored
    else:
        expected_dtype = load_dtype
    stored_state = load_file(str(tmp_path / "model.safetensors"))
    ours_state, stock_state = ours.state_dict(), stock.state_dict()
    assert set(ours_state) == set(stock_state) == set(stored_state)
    for name, tensor in ours_state.items():
        assert tensor.dtype == stock_state[name].dtype == expected_dtype, name
        assert torch.equal(tensor, stock_state[name]), name  # the very same cast
        assert torch.equal(tensor, stored_state[name].to(expected_dtype)), name  # of the stored values


# ---- a shard index may name only files inside its folder ----------------------------------------------------------


@pytest.fixture
def sharded(tmp_path):
    """A classifier saved in several shards, and the parsed index."""
    folder = tmp_path / "model"
    model = saved_classifier(folder, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and not (folder / "model.safetensors").exists()
    return folder, model, index


def write_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def moved_shard(folder, index, new_name_for):
    """Move the first shard to ``new_name_for(path)`` (a path) and point the index at the name returned."""
    first = sorted(set(index["weight_map"].values()))[0]
    target, name = new_name_for(folder / first)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(folder / first, target)
    index["weight_map"] = {key: (name if value == first else value) for key, value in index["weight_map"].items()}
    write_index(folder, index)
    return name


def test_sharded_checkpoint_loads_unchanged(sharded):
    folder, model, _ = sharded
    loaded = ConvNextV2ForImageClassification.from_pretrained(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def opened_safetensors(monkeypatch):
    """Every path our checks open with safetensors (the real safe_open, recorded)."""
    opened = []
    real = safe_open

    def recording(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr("safetensors.safe_open", recording)
    return opened


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_naming_a_file_outside_the_folder_is_refused_before_reading_it(sharded, monkeypatch, where):
    folder, _, index = sharded
    outside = folder.parent / "outside" / "shard.safetensors"
    name = "../outside/shard.safetensors" if where == "parent" else str(outside)
    moved_shard(folder, index, lambda path: (outside, name))
    opened = opened_safetensors(monkeypatch)
    with pytest.raises(ValueError, match=rf"index.json names the shard '{name}', which is outside .*model: an index"):
        ConvNextV2ForImageClassification.from_pretrained(folder)
    assert os.path.realpath(outside) not in opened and opened == []  # refused before any shard was opened


def test_index_naming_a_symlink_that_leaves_the_folder_is_refused(sharded):
    folder, _, index = sharded
    first = sorted(set(index["weight_map"].values()))[0]
    outside = folder.parent / "elsewhere.safetensors"
    shutil.move(folder / first, outside)
    (folder / first).symlink_to(outside)
    with pytest.raises(ValueError, match=rf"names the shard '{first}', which is outside"):
        ConvNextV2ForImageClassification.from_pretrained(folder)


def test_index_naming_a_missing_shard_is_refused_naming_it(sharded):
    folder, _, index = sharded
    first = sorted(set(index["weight_map"].values()))[0]
    (folder / first).unlink()
    with pytest.raises(ValueError, match=rf"index.json names the shard '{first}', which is not a file in .*model"):
        ConvNextV2ForImageClassification.from_pretrained(folder)


def test_index_naming_a_subfolder_inside_is_accepted(sharded):
    folder, model, index = sharded
    moved_shard(folder, index, lambda path: (path.parent / "parts" / path.name, f"parts/{path.name}"))
    loaded = ConvNextV2ForImageClassification.from_pretrained(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_hub_cache_snapshot_links_into_blobs_are_inside(sharded, tmp_path):
    """A Hub cache snapshot holds links into the repository's blobs folder; loading that folder keeps working."""
    folder, model, _ = sharded
    repo = tmp_path / "hub" / "models--someone--convnextv2"
    snapshot_folder = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot_folder.mkdir(parents=True)
    for number, path in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"blob{number}"
        shutil.copy(path, blob)
        (snapshot_folder / path.name).symlink_to(os.path.relpath(blob, snapshot_folder))
    loaded = ConvNextV2ForImageClassification.from_pretrained(snapshot_folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"index.json is not a valid JSON file"),
        ("[1, 2]", r"index.json holds a JSON list, not a checkpoint index object"),
        ('{"metadata": {}}', r"index.json is not a checkpoint index: it needs a non-empty 'weight_map' object"),
        ('{"metadata": {}, "weight_map": ["a"]}', r"needs a non-empty 'weight_map' object .*got list"),
        ('{"weight_map": {"classifier.bias": "x.safetensors"}}', r"it needs a 'metadata' object"),
        ('{"metadata": {}, "weight_map": {"classifier.bias": 3}}', r"weight_map\['classifier.bias'\] must be a shard"),
    ],
)
def test_broken_index_is_a_clear_error_naming_the_file(sharded, content, message):
    folder, _, _ = sharded
    (folder / "model.safetensors.index.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        ConvNextV2ForImageClassification.from_pretrained(folder)


def test_shards_are_held_to_the_weight_dtypes_too(sharded):
    folder, _, index = sharded
    last = sorted(set(index["weight_map"].values()))[-1]
    rewrite_weights(folder / last, lambda n, t: t.to(torch.int8))
    with pytest.raises(ValueError, match=rf"{last} stores the tensor '.*' as I8"):
        ConvNextV2ForImageClassification.from_pretrained(folder)


# ---- configs cannot exhaust memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_estimated_parameters_equal_the_built_models_exactly(preset):
    configs = [
        ConvNextV2Config.from_preset(preset, num_labels=1000),
        ConvNextV2Config.from_preset(
            preset,
            num_labels=0,
            patch_size=2,
            mask_patch_size=16,
            decoder_depth=2,
            out_features=["stem", "stage2", "stage4"],
        ),
    ]
    for config in configs:
        for name in ARCHITECTURES:
            with torch.device("meta"):  # the real modules, without their memory
                model = CLASSES[name](config)
            assert estimated_parameters(config, name) == sum(p.numel() for p in model.parameters()), (preset, name)


def test_the_bounds_sit_far_above_the_huge_preset():
    huge = ConvNextV2Config.from_preset("huge", num_labels=1000)
    largest = max(estimated_parameters(huge, name) for name in ARCHITECTURES)
    assert MAX_PARAMETERS >= 10 * largest and MAX_BLOCKS >= 10 * (sum(huge.depths) + huge.decoder_depth)
    for name in ARCHITECTURES:
        modeling.check_model_size(huge, name)  # no error


def test_config_json_with_20000_blocks_fails_fast_without_allocating(tmp_path):
    saved_classifier(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(depths=[2, 2, 20000, 2], hidden_sizes=[96, 192, 384, 768])
    (tmp_path / "config.json").write_text(json.dumps(config))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    for load in (ConvNextV2ForImageClassification.from_pretrained, transformers.AutoModel.from_pretrained):
        with pytest.raises(ValueError) as caught:
            load(tmp_path)
        assert "builds a" in str(caught.value) and "allow_large_model=True" in str(caught.value)
    elapsed = time.perf_counter() - start
    expected = estimated_parameters(ConvNextV2Config(depths=[2, 2, 20000, 2], num_labels=5))
    assert f"ConvNextV2ForImageClassification of {expected:,} parameters" in str(caught.value) or (
        "ConvNextV2Model of" in str(caught.value)
    )
    assert expected > 24e9  # 24 billion parameters: about 96 GB in float32
    assert elapsed < 10.0, elapsed  # building 20,000 blocks alone takes ~15 s; allocating them, until MemoryError
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 500_000  # < 500 MB more at peak


def test_direct_construction_is_bounded_too_and_names_the_estimate():
    config = ConvNextV2Config(depths=[2, 2, 20000, 2])
    start = time.perf_counter()
    with pytest.raises(
        ValueError,
        match=r"builds a ConvNextV2ForMaskedImageModeling of [\d,]+ parameters \([\d,.]+ GB in "
        r"float32\) and 20,007 blocks, beyond the bounds of 10,000,000,000 parameters and 1,000 blocks",
    ):
        ConvNextV2ForMaskedImageModeling(config)
    with pytest.raises(ValueError, match=MODEL_BEYOND_THE_BOUNDS):
        transformers.AutoModelForImageClassification.from_config(config)
    assert time.perf_counter() - start < 5.0


def test_many_narrow_blocks_are_bounded_by_the_block_count():
    config = ConvNextV2Config(depths=[1, 1, MAX_BLOCKS, 1], hidden_sizes=[1, 1, 1, 1])
    assert estimated_parameters(config, "ConvNextV2Model") < 1e6  # tiny in parameters, but 30 KB of objects a block
    with pytest.raises(ValueError, match=rf"and {MAX_BLOCKS + 3:,} blocks, beyond the bounds"):
        ConvNextV2Model(config)


def test_allow_large_model_opts_in_and_is_never_saved_or_read_from_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(modeling, "MAX_PARAMETERS", 1_000)  # so the tiny model counts as large
    with pytest.raises(ValueError, match=r"beyond the bounds of 1,000 parameters"):
        ConvNextV2ForImageClassification(tiny_config())
    allowed = ConvNextV2ForImageClassification(tiny_config(allow_large_model=True))
    assert sum(p.numel() for p in allowed.parameters()) > 1_000
    allowed.save_pretrained(tmp_path)
    assert "allow_large_model" not in json.loads((tmp_path / "config.json").read_text())
    assert "allow_large_model" not in allowed.config.to_dict()
    with pytest.raises(ValueError, match=MODEL_BEYOND_THE_BOUNDS):
        ConvNextV2ForImageClassification.from_pretrained(tmp_path)
    loaded = ConvNextV2ForImageClassification.from_pretrained(tmp_path, allow_large_model=True)
    assert loaded.config.allow_large_model is True
    auto = transformers.AutoModelForImageClassification.from_pretrained(tmp_path, allow_large_model=True)
    assert type(auto) is ConvNextV2ForImageClassification
    # a config file cannot lift its own bound
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "allow_large_model": True}))
    assert ConvNextV2Config.from_pretrained(tmp_path).allow_large_model is False
    with pytest.raises(ValueError, match=MODEL_BEYOND_THE_BOUNDS):
        ConvNextV2ForImageClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"allow_large_model must be True or False"):
        tiny_config(allow_large_model="yes")
