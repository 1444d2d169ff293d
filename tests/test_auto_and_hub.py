"""Auto-class registration, loading with stock transformers, and remote code where the package is absent."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from expected_errors import MODEL_BEYOND_THE_BOUNDS
from helpers import randomize_, tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)
from transformers.models import convnextv2 as builtin

import convnextv2_hf
from convnextv2_hf import (
    ConvNextV2Backbone,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2Model,
)


@pytest.fixture
def stock_checkpoint(tmp_path):
    """A classifier saved by stock transformers alone."""
    config = builtin.ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_labels=3)
    model = randomize_(builtin.ConvNextV2ForImageClassification(config)).eval()
    model.save_pretrained(tmp_path / "stock")
    return tmp_path / "stock", model


def test_auto_classes_load_stock_checkpoints_into_our_classes(stock_checkpoint):
    path, stock_model = stock_checkpoint
    pixels = torch.randn(2, 3, 64, 64)
    assert type(AutoConfig.from_pretrained(path)) is ConvNextV2Config
    classifier = AutoModelForImageClassification.from_pretrained(path).eval()
    assert type(classifier) is ConvNextV2ForImageClassification
    with torch.no_grad():
        assert (classifier(pixels).logits - stock_model(pixels).logits).abs().max() <= 1e-5
    assert type(AutoModel.from_pretrained(path)) is ConvNextV2Model
    fcmae = AutoModelForMaskedImageModeling.from_pretrained(path)
    assert type(fcmae) is ConvNextV2ForMaskedImageModeling and fcmae.config.mask_ratio == 0.6
    assert fcmae.config.layer_norm_eps == 1e-12  # the file's value, not the new-config default


def test_auto_classes_build_our_classes_from_stock_and_our_configs():
    stock_config = builtin.ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32])
    for config in (stock_config, tiny_config()):
        assert type(AutoModel.from_config(config)) is ConvNextV2Model
        assert type(AutoModelForImageClassification.from_config(config)) is ConvNextV2ForImageClassification
        assert type(AutoModelForMaskedImageModeling.from_config(config)) is ConvNextV2ForMaskedImageModeling
        assert type(transformers.AutoBackbone.from_config(config)) is ConvNextV2Backbone


def test_saved_checkpoints_are_safetensors_with_remote_code_files(tmp_path):
    randomize_(ConvNextV2ForMaskedImageModeling(tiny_config())).save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == [
        "compat_convnextv2.py",
        "config.json",
        "configuration_convnextv2.py",
        "fast_paths_convnextv2.py",
        "model.safetensors",
        "modeling_convnextv2.py",
    ]
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForMaskedImageModeling"] == "modeling_convnextv2.ConvNextV2ForMaskedImageModeling"
    assert set(auto_map) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForImageClassification",
        "AutoModelForMaskedImageModeling",
        "AutoBackbone",
    }


def run_without_package(script: str, tmp_path) -> dict:
    """Run ``script`` in a fresh interpreter where ``import convnextv2_hf`` fails; it ends by printing one JSON
    object (after whatever prompts transformers writes to stdout)."""
    prelude = "import sys, json; sys.modules['convnextv2_hf'] = None\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    return json.loads(last_line[last_line.index("{") :])


@pytest.mark.slow
def test_our_checkpoints_load_with_stock_transformers_alone(tmp_path):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 96)
    torch.save(pixels, tmp_path / "pixels.pt")
    classifier = randomize_(ConvNextV2ForImageClassification(tiny_config(out_features=["stage2", "stage4"]))).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    with torch.no_grad():
        expected = classifier(pixels)
        backbone = ConvNextV2Backbone(classifier.config).eval()
        backbone.load_state_dict(classifier.convnextv2.state_dict(), strict=False)
        backbone.save_pretrained(tmp_path / "backbone")
        expected_maps = backbone(pixels).feature_maps
    got = run_without_package(
        """
        import torch, transformers
        from transformers import AutoModel, AutoModelForImageClassification, ConvNextV2Backbone
        pixels = torch.load("pixels.pt")
        clf = AutoModelForImageClassification.from_pretrained("classifier").eval()
        enc = AutoModel.from_pretrained("classifier").eval()
        bb = ConvNextV2Backbone.from_pretrained("backbone").eval()
        with torch.no_grad():
            print(json.dumps({
                "classes": [type(m).__module__ + "." + type(m).__name__ for m in (clf, enc, bb)],
                "logits": clf(pixels).logits.tolist(),
                "pooled": enc(pixels).pooler_output.tolist(),
                "maps": [m.sum().item() for m in bb(pixels).feature_maps],
            }))
        """,
        tmp_path,
    )
    assert all(name.startswith("transformers.models.convnextv2.") for name in got["classes"]), got["classes"]
    assert (torch.tensor(got["logits"]) - expected.logits).abs().max() <= 1e-5
    with torch.no_grad():
        assert (torch.tensor(got["pooled"]) - classifier.convnextv2(pixels).pooler_output).abs().max() <= 1e-5
    assert torch.allclose(torch.tensor(got["maps"]), torch.stack([m.sum() for m in expected_maps]), atol=1e-3)


@pytest.mark.slow
def test_remote_code_loads_our_classes_where_the_package_is_absent(tmp_path):
    pixels = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 4)
    torch.save({"pixels": pixels, "noise": noise}, tmp_path / "inputs.pt")
    fcmae = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config(mask_ratio=0.5))).eval()
    fcmae.save_pretrained(tmp_path / "fcmae")
    with torch.no_grad():
        expected = fcmae(pixels, noise=noise)
    got = run_without_package(
        """
        import torch
        from transformers import AutoModelForMaskedImageModeling, AutoModelForImageClassification
        inputs = torch.load("inputs.pt")
        try:
            AutoModelForMaskedImageModeling.from_pretrained("fcmae")
            refused = False
        except ValueError as error:
            refused = "trust_remote_code" in str(error) or "custom code" in str(error)
        model = AutoModelForMaskedImageModeling.from_pretrained("fcmae", trust_remote_code=True).eval()
        clf = AutoModelForImageClassification.from_pretrained("fcmae", trust_remote_code=True, num_labels=4)
        with torch.no_grad():
            out = model(inputs["pixels"], noise=inputs["noise"])
        import sys
        fast = [m for name, m in sys.modules.items() if name.endswith(".fast_paths_convnextv2")]
        print(json.dumps({
            "fast_paths_module": [m.__name__ for m in fast],
            "fast_path_allowed": fast[0].fast_path_allowed("onednn_linear", True, inputs["pixels"]) if fast else None,
            "refused_without_trust": refused,
            "mim_class": type(model).__module__ + "." + type(model).__name__,
            "clf_class": type(clf).__module__ + "." + type(clf).__name__,
            "mask_ratio": model.config.mask_ratio,
            "loss": out.loss.item(),
            "logits_sum": out.logits.double().sum().item(),
        }))
        """,
        tmp_path,
    )
    assert got["refused_without_trust"]
    # the fast paths travel with the modeling file and run there
    assert len(got["fast_paths_module"]) == 1 and got["fast_paths_module"][0].startswith("transformers_modules.")
    assert got["fast_path_allowed"] is True
    assert got["mim_class"].startswith("transformers_modules.") and got["mim_class"].endswith(
        "modeling_convnextv2.ConvNextV2ForMaskedImageModeling"
    )
    assert got["clf_class"].endswith("modeling_convnextv2.ConvNextV2ForImageClassification")
    assert got["mask_ratio"] == 0.5
    assert abs(got["loss"] - expected.loss.item()) <= 1e-6
    assert abs(got["logits_sum"] - expected.logits.double().sum().item()) <= 1e-3


def test_loading_another_architecture_is_a_value_error(tmp_path):
    transformers.ViTForImageClassification(
        transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    ).save_pretrained(tmp_path / "vit")
    with pytest.raises(
        ValueError, match="another architecture \\(model_type='vit', architectures=\\['ViTForImageClassification'\\]"
    ):
        ConvNextV2ForImageClassification.from_pretrained(tmp_path / "vit")
    transformers.ConvNextModel(
        transformers.ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32])
    ).save_pretrained(tmp_path / "v1")
    with pytest.raises(ValueError, match="model_type='convnext'"):
        ConvNextV2ForMaskedImageModeling.from_pretrained(tmp_path / "v1")


def test_checkpoint_with_other_shapes_fails_to_load(tmp_path):
    ConvNextV2ForImageClassification(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="(?i)size mismatch|mismatch"):
        ConvNextV2ForImageClassification.from_pretrained(tmp_path, hidden_sizes=[8, 16, 24, 40])


def test_package_version_is_exposed():
    assert convnextv2_hf.__version__.count(".") == 2


@pytest.mark.slow
def test_builtin_modeling_imported_after_ours_logs_no_docstring_error():
    # transformers builds the built-in classes' docstrings from the registered config's docstring; ours must name
    # a checkpoint the way it expects, or every import of the built-in modeling prints an "[ERROR]" line
    code = "import convnextv2_hf\nimport transformers.models.convnextv2.modeling_convnextv2"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "No checkpoint found" not in run.stdout + run.stderr


def test_loading_checks_travel_with_the_remote_code(tmp_path):
    """The weight, shard-index and size checks live in the files that travel as remote code: they hold where the
    package is absent, through trust_remote_code."""
    from safetensors.torch import load_file, save_file

    ConvNextV2ForMaskedImageModeling(tiny_config()).save_pretrained(tmp_path / "int8")
    state = load_file(str(tmp_path / "int8" / "model.safetensors"))
    state["mask_token"] = state["mask_token"].to(torch.int8)
    save_file(state, str(tmp_path / "int8" / "model.safetensors"), metadata={"format": "pt"})
    ConvNextV2ForMaskedImageModeling(tiny_config()).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {key: "../outside.safetensors" for key in index["weight_map"]}
    index_path.write_text(json.dumps(index))
    ConvNextV2ForMaskedImageModeling(tiny_config()).save_pretrained(tmp_path / "deep")
    config = json.loads((tmp_path / "deep" / "config.json").read_text())
    config.update(depths=[2, 2, 20000, 2], hidden_sizes=[96, 192, 384, 768])
    (tmp_path / "deep" / "config.json").write_text(json.dumps(config))
    got = run_without_package(
        """
        from transformers import AutoModelForMaskedImageModeling
        errors = {}
        for folder in ("int8", "sharded", "deep"):
            try:
                AutoModelForMaskedImageModeling.from_pretrained(folder, trust_remote_code=True)
                errors[folder] = None
            except ValueError as error:
                errors[folder] = str(error)
        print(json.dumps(errors))
        """,
        tmp_path,
    )
    assert "stores the tensor 'mask_token' as I8" in got["int8"]
    assert "names the shard '../outside.safetensors', which is outside" in got["sharded"]
    assert MODEL_BEYOND_THE_BOUNDS in got["deep"] and "allow_large_model=True" in got["deep"]
