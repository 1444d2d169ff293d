import json

import pytest
import transformers
from conftest import tiny_config

from convnextv2_hf import PRESETS, ConvNextV2Config


def test_defaults_add_fcmae_fields_and_official_final_norm_eps():
    config = ConvNextV2Config()
    assert config.model_type == "convnextv2"
    assert type(config).__name__ == "ConvNextV2Config"
    assert isinstance(config, transformers.ConvNextV2Config)
    assert (config.mask_ratio, config.mask_patch_size, config.decoder_hidden_size) == (0.6, 32, 512)
    assert (config.decoder_depth, config.norm_pix_loss, config.fcmae_impl) == (1, True, "sparse")
    assert config.layer_norm_eps == 1e-6
    assert transformers.ConvNextV2Config().layer_norm_eps == 1e-12


@pytest.mark.parametrize("name", list(PRESETS))
def test_from_preset_builds_each_official_size(name):
    config = ConvNextV2Config.from_preset(name, num_labels=7, drop_path_rate=0.1)
    assert list(config.depths) == PRESETS[name]["depths"]
    assert list(config.hidden_sizes) == PRESETS[name]["hidden_sizes"]
    assert config.num_labels == 7 and config.drop_path_rate == 0.1
    assert config.layer_norm_eps == 1e-6


def test_from_preset_accepts_model_style_names_and_rejects_unknown():
    assert ConvNextV2Config.from_preset("convnextv2-tiny").hidden_sizes == [96, 192, 384, 768]
    with pytest.raises(ValueError, match="unknown ConvNeXt V2 preset 'gigantic'"):
        ConvNextV2Config.from_preset("gigantic")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask_ratio": 1}, r"mask_ratio must be in \[0, 1\), got mask_ratio=1"),
        ({"mask_ratio": 1.5}, "mask_ratio must be in"),
        ({"mask_ratio": -0.1}, "mask_ratio must be in"),
        ({"mask_ratio": "half"}, "mask_ratio must be a number"),
        ({"mask_patch_size": 48}, "mask_patch_size must be a positive multiple of the total stride 32"),
        ({"mask_patch_size": 0}, "mask_patch_size must be a positive multiple"),
        ({"mask_patch_size": -32}, "mask_patch_size must be a positive multiple"),
        ({"depths": [1, 1, 1], "hidden_sizes": [8, 16, 24, 32]}, "depths and hidden_sizes must have the same length"),
        ({"depths": [1, 1, 1], "hidden_sizes": [8, 16, 24]}, "num_stages=4 does not match the 3 stages"),
        ({"hidden_sizes": [8, 0, 24, 32]}, "every entry of hidden_sizes must be positive"),
        ({"depths": [1, -1, 1, 1]}, "every entry of depths must be positive"),
        ({"decoder_hidden_size": 0}, "decoder_hidden_size must be positive"),
        ({"decoder_depth": -1}, "decoder_depth must be zero or positive"),
        ({"num_channels": 0}, "num_channels must be positive"),
        ({"fcmae_impl": "minkowski"}, "fcmae_impl must be one of"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_three_stage_config_with_matching_num_stages_is_valid():
    config = ConvNextV2Config(depths=[1, 1, 1], hidden_sizes=[8, 16, 24], num_stages=3, mask_patch_size=16)
    assert config.total_stride == 16


def test_save_and_reload_keeps_fcmae_fields_and_stock_config_reads_them(tmp_path):
    config = tiny_config(mask_ratio=0.75, decoder_depth=2, fcmae_impl="dense")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["mask_ratio"] == 0.75 and saved["fcmae_impl"] == "dense"
    reloaded = ConvNextV2Config.from_pretrained(tmp_path)
    assert (reloaded.mask_ratio, reloaded.decoder_depth, reloaded.fcmae_impl) == (0.75, 2, "dense")
    stock = transformers.models.convnextv2.ConvNextV2Config.from_pretrained(tmp_path)
    assert stock.mask_ratio == 0.75 and list(stock.hidden_sizes) == [8, 16, 24, 32]


def test_stock_config_file_keeps_its_final_norm_eps(tmp_path):
    transformers.models.convnextv2.ConvNextV2Config().save_pretrained(tmp_path)
    assert ConvNextV2Config.from_pretrained(tmp_path).layer_norm_eps == 1e-12


def test_config_of_another_architecture_is_a_value_error(tmp_path):
    transformers.ConvNextConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="another architecture \\(model_type='convnext'"):
        ConvNextV2Config.from_pretrained(tmp_path)
