import json
import math
import re

import pytest
import transformers
from expected_errors import (
    CONFIG_OF_ANOTHER_ARCHITECTURE,
    DEPTHS_AND_WIDTHS_LENGTHS_DIFFER,
    ID2LABEL_KEY_NOT_AN_INDEX,
    ID2LABEL_VALUE_NOT_A_NAME,
    LABEL_MAPS_DISAGREE,
    MASK_RATIO_OUT_OF_RANGE,
    NUM_LABELS_AGAINST_ID2LABEL,
    UNKNOWN_PRESET,
)
from helpers import tiny_config

from convnextv2_hf import PRESETS, ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling


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
    with pytest.raises(ValueError, match=UNKNOWN_PRESET):
        ConvNextV2Config.from_preset("gigantic")


# ---- the rules: each bad value is a ValueError naming the field and the value ------------------------------------

# (field, bad value, what the message says about it). Each rule is checked on the value alone, so the same table
# drives construction, from_dict/from_pretrained overrides and assignment.
BAD_VALUES = [
    ("mask_ratio", 0, MASK_RATIO_OUT_OF_RANGE),  # removes no patch: the loss would be 0/0
    ("mask_ratio", 0.0, MASK_RATIO_OUT_OF_RANGE),
    ("mask_ratio", 1, MASK_RATIO_OUT_OF_RANGE),
    ("mask_ratio", 1.5, MASK_RATIO_OUT_OF_RANGE),
    ("mask_ratio", -0.5, MASK_RATIO_OUT_OF_RANGE),
    ("mask_ratio", math.nan, MASK_RATIO_OUT_OF_RANGE),
    ("mask_ratio", "half", "must be a number"),
    ("mask_ratio", True, "must be a number"),
    ("depths", [2, 1, 2.0, 1], "non-empty list of positive ints"),
    ("depths", [2, -1, 2, 1], "non-empty list of positive ints"),
    ("depths", [2, True, 2, 1], "non-empty list of positive ints"),
    ("depths", [], "non-empty list of positive ints"),
    ("depths", None, "non-empty list of positive ints"),
    ("hidden_sizes", [8, 0, 24, 32], "non-empty list of positive ints"),
    ("hidden_sizes", [8, 16.5, 24, 32], "non-empty list of positive ints"),
    ("num_channels", 3.0, "must be a positive int"),
    ("num_channels", 0, "must be a positive int"),
    ("num_channels", True, "must be a positive int"),
    ("patch_size", 4.0, "must be a positive int"),
    ("patch_size", 0, "must be a positive int"),
    ("patch_size", [4, 2], "pair of two equal ones"),
    ("mask_patch_size", 32.0, "must be a positive int"),
    ("mask_patch_size", 0, "must be a positive int"),
    ("mask_patch_size", -32, "must be a positive int"),
    ("decoder_hidden_size", 0, "must be a positive int"),
    ("decoder_hidden_size", 16.0, "must be a positive int"),
    ("decoder_depth", -1, "must be an int >= 0"),
    ("decoder_depth", 1.0, "must be an int >= 0"),
    ("decoder_depth", False, "must be an int >= 0"),
    ("num_stages", 4.0, "must be a positive int"),
    ("num_stages", 0, "must be a positive int"),
    ("norm_pix_loss", "yes", "must be True or False"),
    ("norm_pix_loss", 1, "must be True or False"),
    ("drop_path_rate", 1, r"must be a number in \[0, 1\)"),
    ("drop_path_rate", -0.1, r"must be a number in \[0, 1\)"),
    ("drop_path_rate", math.nan, r"must be a number in \[0, 1\)"),
    ("hidden_act", "gelo", "must be the name of an activation in transformers.activations.ACT2FN"),
    ("hidden_act", None, "must be the name of an activation"),
    ("layer_norm_eps", 0.0, "must be a finite number > 0"),
    ("layer_norm_eps", -1e-6, "must be a finite number > 0"),
    ("layer_norm_eps", math.inf, "must be a finite number > 0"),
    ("layer_norm_eps", math.nan, "must be a finite number > 0"),
    ("layer_norm_eps", "1e-6", "must be a finite number > 0"),
    ("initializer_range", 0, "must be a finite number > 0"),
    ("initializer_range", -0.02, "must be a finite number > 0"),
    ("image_size", 0, "must be a positive int or"),
    ("image_size", 224.0, "must be a positive int or"),
    ("image_size", [224, -1], "must be a positive int or"),
    ("fcmae_impl", "bogus", r"must be one of \('sparse', 'dense'\)"),
    ("fcmae_impl", "minkowski", "must be one of"),
    ("fast_paths", ["grn_fold", "warp_drive"], r"unknown: \['warp_drive'\]"),
    ("fast_paths", "grn_fold", "must be True, False or a list of names"),
    ("fast_paths", 1, "must be True, False or a list of names"),
]
IDS = [f"{field}={value!r}" for field, value, _ in BAD_VALUES]


def names(field, value, message):
    """The message must name the rule, the field and the value the user gave."""
    return f"^{field} .*{message}.*, got {re.escape(f'{field}={value!r}')}$"


@pytest.mark.parametrize(("field", "value", "message"), BAD_VALUES, ids=IDS)
def test_construction_rejects_each_bad_value(field, value, message):
    with pytest.raises(ValueError, match=names(field, value, message)):
        tiny_config(**{field: value})


@pytest.mark.parametrize(("field", "value", "message"), BAD_VALUES, ids=IDS)
def test_assignment_rejects_each_bad_value_and_keeps_the_old_one(field, value, message):
    config = tiny_config()
    before = getattr(config, field)
    with pytest.raises(ValueError, match=names(field, value, message)):
        setattr(config, field, value)
    assert getattr(config, field) == before


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        ({"mask_ratio": 0.999}, lambda c: c.mask_ratio == 0.999),
        ({"mask_ratio": 0.001}, lambda c: c.mask_ratio == 0.001),
        ({"drop_path_rate": 0}, lambda c: c.drop_path_rate == 0),
        ({"decoder_depth": 0}, lambda c: c.decoder_depth == 0),
        ({"layer_norm_eps": 1e-12}, lambda c: c.layer_norm_eps == 1e-12),
        # transformers types these as plain float and would refuse the int; stored as float
        ({"layer_norm_eps": 1}, lambda c: c.layer_norm_eps == 1.0 and type(c.layer_norm_eps) is float),
        ({"initializer_range": 1}, lambda c: c.initializer_range == 1.0 and type(c.initializer_range) is float),
        ({"patch_size": [4, 4]}, lambda c: c.total_stride == 32),
        ({"image_size": [224, 160]}, lambda c: list(c.image_size) == [224, 160]),
        ({"hidden_act": "relu"}, lambda c: c.hidden_act == "relu"),
        ({"fast_paths": ["grn_fold", "inplace_gelu"]}, lambda c: c.fast_paths == ["grn_fold", "inplace_gelu"]),
        ({"fast_paths": False}, lambda c: c.fast_paths is False),
        (
            {"norm_pix_loss": False, "fcmae_impl": "dense"},
            lambda c: (c.norm_pix_loss, c.fcmae_impl) == (False, "dense"),
        ),
    ],
)
def test_valid_edge_values_are_accepted(overrides, check):
    assert check(tiny_config(**overrides))
    config = tiny_config()
    for field, value in overrides.items():
        setattr(config, field, value)
    assert check(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask_patch_size": 48}, r"mask_patch_size must be a positive multiple of the total stride 32.*=48"),
        (
            {"patch_size": 8, "mask_patch_size": 32},
            "mask_patch_size must be a positive multiple of the total stride 64",
        ),
        ({"depths": [1, 1, 1], "hidden_sizes": [8, 16, 24, 32]}, DEPTHS_AND_WIDTHS_LENGTHS_DIFFER),
        ({"depths": [1, 1, 1], "hidden_sizes": [8, 16, 24]}, "num_stages=4 does not match the 3 stages"),
    ],
)
def test_construction_rejects_fields_that_disagree(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_three_stage_config_with_matching_num_stages_is_valid():
    config = ConvNextV2Config(depths=[1, 1, 1], hidden_sizes=[8, 16, 24], num_stages=3, mask_patch_size=16)
    assert config.total_stride == 16


# ---- assignment ---------------------------------------------------------------------------------------------------


def test_assignment_checks_fields_against_the_rest_of_the_config():
    config = tiny_config()
    with pytest.raises(ValueError, match=r"setting mask_patch_size=48: mask_patch_size must be a positive multiple"):
        config.mask_patch_size = 48
    with pytest.raises(ValueError, match=r"setting patch_size=8: .*total stride 64.*mask_patch_size=32"):
        config.patch_size = 8
    with pytest.raises(ValueError, match=r"setting depths=\[1, 1, 1\]: depths and hidden_sizes must have the same"):
        config.depths = [1, 1, 1]
    # transformers' alias of num_stages goes through the same check, and the message uses the name the user wrote
    with pytest.raises(ValueError, match=r"setting num_hidden_layers=3: num_stages=3 does not match the 4 stages"):
        config.num_hidden_layers = 3
    assert (config.mask_patch_size, config.patch_size, list(config.depths), config.num_stages) == (
        32,
        4,
        [2, 1, 2, 1],
        4,
    )
    config.mask_patch_size = 64
    config.depths = [1, 1, 1, 1]  # same number of stages: fine
    assert (config.mask_patch_size, list(config.depths)) == (64, [1, 1, 1, 1])


def test_assignment_on_a_model_config_is_checked():
    model = ConvNextV2ForMaskedImageModeling(tiny_config())
    with pytest.raises(ValueError, match=r"mask_ratio must be a number with 0 < mask_ratio < 1.*got mask_ratio=1.5"):
        model.config.mask_ratio = 1.5
    assert model.config.mask_ratio == 0.6


def test_update_changes_related_fields_together_or_not_at_all():
    config = tiny_config()
    # one by one, mask_patch_size=16 first fails (stride still 32); together they agree
    config.update({"mask_patch_size": 16, "patch_size": 2})
    assert (config.total_stride, config.mask_patch_size) == (16, 16)
    with pytest.raises(ValueError, match=r"update\(.*mask_patch_size must be a positive multiple of the total"):
        config.update({"mask_ratio": 0.5, "mask_patch_size": 24})
    with pytest.raises(ValueError, match="mask_ratio must be a number with 0 < mask_ratio < 1.*got mask_ratio=0"):
        config.update({"decoder_depth": 3, "mask_ratio": 0})
    assert (config.mask_ratio, config.mask_patch_size, config.decoder_depth) == (0.6, 16, 1)  # nothing changed


def test_transformers_own_type_checks_also_surface_as_value_error():
    config = tiny_config()
    with pytest.raises(ValueError, match="_out_features=5 is not valid"):
        config._out_features = 5


def test_unknown_attributes_stay_free():
    config = tiny_config()
    config.my_note = {"anything": [1, 2]}
    config.auto_map = {"AutoConfig": "x.Y"}
    assert config.my_note == {"anything": [1, 2]} and config.auto_map == {"AutoConfig": "x.Y"}


# ---- keyword overrides of from_dict / from_pretrained ---------------------------------------------------------------


def test_from_dict_overrides_are_checked():
    data = tiny_config().to_dict()
    with pytest.raises(ValueError, match=r"mask_patch_size must be a positive multiple of the total stride 32.*=48"):
        ConvNextV2Config.from_dict(data, mask_patch_size=48)
    with pytest.raises(ValueError, match=names("mask_ratio", -0.5, "must be a number with 0 < mask_ratio < 1")):
        ConvNextV2Config.from_dict(data, mask_ratio=-0.5)
    # overrides join the construction, so related fields may change together, in any order
    config = ConvNextV2Config.from_dict(data, mask_patch_size=16, patch_size=2)
    assert (config.mask_patch_size, config.total_stride) == (16, 16)
    four_stage_only = ("out_features", "out_indices", "_out_features", "_out_indices", "stage_names")
    three_stage_data = {key: value for key, value in data.items() if key not in four_stage_only}
    three = ConvNextV2Config.from_dict(
        three_stage_data, depths=[1, 1, 1], hidden_sizes=[8, 16, 24], num_stages=3, mask_patch_size=16
    )
    assert (three.num_stages, three.total_stride, three.stage_names[-1]) == (3, 16, "stage3")
    assert data["mask_patch_size"] == 32  # the caller's dict is left alone


@pytest.fixture
def saved_config(tmp_path):
    tiny_config(mask_ratio=0.75).save_pretrained(tmp_path)
    return tmp_path


def test_from_pretrained_overrides_are_checked(saved_config):
    with pytest.raises(ValueError, match=names("fcmae_impl", "bogus", "must be one of")):
        ConvNextV2Config.from_pretrained(saved_config, fcmae_impl="bogus")
    with pytest.raises(ValueError, match=names("mask_ratio", -0.5, "must be a number with 0 < mask_ratio < 1")):
        transformers.AutoConfig.from_pretrained(saved_config, mask_ratio=-0.5)
    with pytest.raises(ValueError, match=r"mask_patch_size must be a positive multiple of the total stride 32.*=48"):
        ConvNextV2Config.from_pretrained(saved_config, mask_patch_size=48)
    config, unused = ConvNextV2Config.from_pretrained(
        saved_config, decoder_depth=2, num_labels=3, not_a_field=1, return_unused_kwargs=True
    )
    assert (config.mask_ratio, config.decoder_depth, config.num_labels, unused) == (0.75, 2, 3, {"not_a_field": 1})


def test_model_from_pretrained_overrides_are_checked_before_any_model_is_built(tmp_path):
    ConvNextV2ForMaskedImageModeling(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=names("mask_ratio", -0.5, "must be a number with 0 < mask_ratio < 1")):
        ConvNextV2ForMaskedImageModeling.from_pretrained(tmp_path, mask_ratio=-0.5)
    with pytest.raises(ValueError, match=names("mask_ratio", 0, "must be a number with 0 < mask_ratio < 1")):
        transformers.AutoModelForMaskedImageModeling.from_pretrained(tmp_path, mask_ratio=0)
    model = ConvNextV2ForMaskedImageModeling.from_pretrained(tmp_path, mask_ratio=0.5, norm_pix_loss=False)
    assert (model.config.mask_ratio, model.config.norm_pix_loss) == (0.5, False)


# ---- from_preset rejects unknown keyword arguments ------------------------------------------------------------------


def test_from_preset_suggests_the_closest_known_argument():
    with pytest.raises(ValueError, match=r"'mask_ration' \(did you mean 'mask_ratio'\?\)"):
        ConvNextV2Config.from_preset("atto", mask_ration=0.5)
    with pytest.raises(ValueError, match=r"arguments .*'num_label' \(did you mean 'num_labels'\?\), 'drop_pth_rate'"):
        ConvNextV2Config.from_preset("atto", num_label=3, drop_pth_rate=0.1)
    with pytest.raises(ValueError, match=r"'zzzz' \(no known argument is close\)"):
        ConvNextV2Config.from_preset("atto", zzzz=1)


def test_from_preset_accepts_transformers_own_arguments_and_checks_values():
    config = ConvNextV2Config.from_preset(
        "atto",
        num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"},
        label2id={"a": 0, "b": 1, "c": 2},
        problem_type="single_label_classification",
        out_features=["stage2", "stage4"],
        output_hidden_states=True,
        return_dict=False,
        num_hidden_layers=4,
    )
    assert (config.num_labels, config.out_indices, config.output_hidden_states, config.return_dict) == (
        3,
        [2, 4],
        True,
        False,
    )
    assert ConvNextV2Config.from_preset("atto", out_indices=[1]).out_features == ["stage1"]
    with pytest.raises(ValueError, match=names("mask_ratio", 0, "must be a number with 0 < mask_ratio < 1")):
        ConvNextV2Config.from_preset("atto", mask_ratio=0)
    # other stage counts: num_stages follows depths unless given
    three = ConvNextV2Config.from_preset("atto", depths=[1, 1, 1], hidden_sizes=[8, 16, 24], mask_patch_size=16)
    assert (three.num_stages, three.total_stride) == (3, 16)
    known = ConvNextV2Config.known_kwargs()
    assert {"mask_ratio", "fcmae_impl", "num_labels", "id2label", "out_features", "out_indices"} <= set(known)
    assert not [name for name in known if name.startswith("_")]


# ---- saving and loading -------------------------------------------------------------------------------------------


def test_save_and_reload_keeps_fcmae_fields_and_stock_config_reads_them(tmp_path):
    config = tiny_config(mask_ratio=0.75, decoder_depth=2, fcmae_impl="dense")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["mask_ratio"] == 0.75 and saved["fcmae_impl"] == "dense"
    assert not [key for key in saved if key.startswith("_") and key != "_name_or_path"]
    reloaded = ConvNextV2Config.from_pretrained(tmp_path)
    assert (reloaded.mask_ratio, reloaded.decoder_depth, reloaded.fcmae_impl) == (0.75, 2, "dense")
    stock = transformers.models.convnextv2.ConvNextV2Config.from_pretrained(tmp_path)
    assert stock.mask_ratio == 0.75 and list(stock.hidden_sizes) == [8, 16, 24, 32]


def test_stock_config_file_keeps_its_final_norm_eps(tmp_path):
    transformers.models.convnextv2.ConvNextV2Config().save_pretrained(tmp_path)
    assert ConvNextV2Config.from_pretrained(tmp_path).layer_norm_eps == 1e-12


def test_stock_config_with_unknown_keys_still_loads(tmp_path):
    transformers.models.convnextv2.ConvNextV2Config(drop_path_rate=0.2, patch_size=[4, 4]).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(some_tool_note={"x": 1}, legacy_flag=True, image_size=[224, 224])
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = ConvNextV2Config.from_pretrained(tmp_path)
    assert (config.some_tool_note, config.legacy_flag, config.layer_norm_eps) == ({"x": 1}, True, 1e-12)
    assert (config.drop_path_rate, config.total_stride, config.mask_ratio) == (0.2, 32, 0.6)
    config.some_tool_note = None  # unknown keys stay plain attributes
    assert config.some_tool_note is None


def test_config_of_another_architecture_is_a_value_error(tmp_path):
    transformers.ConvNextConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=CONFIG_OF_ANOTHER_ARCHITECTURE):
        ConvNextV2Config.from_pretrained(tmp_path)


# ---- id2label and label2id ----------------------------------------------------------------------------------------

BAD_LABEL_MAPS = [
    ({"id2label": {"0": 5}}, ID2LABEL_VALUE_NOT_A_NAME),
    ({"id2label": {"cat": "a"}}, ID2LABEL_KEY_NOT_AN_INDEX),
    ({"id2label": ["a", "b"]}, r"id2label must be a dict from class index to label name, got a list"),
    ({"id2label": {0: "a", 5: "b"}}, r"id2label must name the classes 0 .. 1 \(one per logit\), got the keys \[0, 5\]"),
    ({"label2id": {"cat": "x"}}, r"label2id values must be class indices \(ints\), but 'cat' maps to 'x'"),
    ({"label2id": {"cat": True}}, r"label2id values must be class indices"),
    ({"label2id": {"a": 0, "b": 0}}, r"label2id\['a'\] = 0 but id2label\[0\] = '(b|LABEL_0)'"),
    (
        {"id2label": {0: "a", 1: "b"}, "label2id": {"a": 1, "b": 0}},
        LABEL_MAPS_DISAGREE,
    ),
    ({"id2label": {0: "a", 1: "b"}, "label2id": {"a": 0}}, r"label2id lacks the labels \['b'\] of id2label"),
    ({"id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1, "c": 2}}, r"label2id\['c'\] = 2 but id2label\[2\]"),
]
# maps a JSON file cannot hold (its keys are strings): refused at construction and in from_dict
BAD_LABEL_MAPS_IN_PYTHON = [
    ({"id2label": {0.5: "a"}}, r"id2label keys must be class indices .*not 0.5"),
    ({"id2label": {0: "a", "0": "b"}}, r"id2label names a class twice"),
    ({"label2id": {3: 0}}, r"label2id keys must be label names \(str\), not 3"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_LABEL_MAPS + BAD_LABEL_MAPS_IN_PYTHON)
def test_label_maps_of_the_wrong_type_or_inconsistent_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ConvNextV2Config(**fields)
    with pytest.raises(ValueError, match=message):
        ConvNextV2Config.from_dict({**ConvNextV2Config().to_dict(), **fields})


@pytest.mark.parametrize(("fields", "message"), BAD_LABEL_MAPS)
def test_label_maps_in_a_hand_edited_config_json_are_refused(fields, message, tmp_path):
    ConvNextV2ForImageClassification(tiny_config(depths=[1, 1, 1, 1])).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved = {key: value for key, value in saved.items() if key not in ("id2label", "label2id")}
    (tmp_path / "config.json").write_text(json.dumps({**saved, **fields}))
    with pytest.raises(ValueError, match=message):
        ConvNextV2Config.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        transformers.AutoModelForImageClassification.from_pretrained(tmp_path)


def test_label_maps_that_agree_are_kept_and_repeated_names_are_allowed():
    # ImageNet-1k names two classes "crane": label2id keeps one of them, which is consistent
    config = tiny_config(num_labels=3, id2label={0: "crane", 1: "cat", 2: "crane"}, label2id={"crane": 2, "cat": 1})
    assert (config.num_labels, config.id2label[0], config.label2id) == (3, "crane", {"crane": 2, "cat": 1})
    from_file_keys = ConvNextV2Config(id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1})
    assert from_file_keys.id2label == {0: "a", 1: "b"}


def test_num_labels_must_count_the_named_classes_except_for_a_new_head_when_loading(tmp_path):
    # transformers warns, then silently replaces the two names with five placeholders
    assert transformers.ConvNextV2Config(num_labels=5, id2label={0: "a", 1: "b"}).id2label[0] == "LABEL_0"
    with pytest.raises(ValueError, match=NUM_LABELS_AGAINST_ID2LABEL):
        ConvNextV2Config(num_labels=5, id2label={0: "a", 1: "b"})
    with pytest.raises(ValueError, match=r"num_labels=3 does not match the 2 classes named by label2id"):
        ConvNextV2Config(num_labels=3, label2id={"a": 0, "b": 1})
    # a saved classifier reloaded for a new head of another size: the saved names give way, as in transformers
    ConvNextV2Config(id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1}).save_pretrained(tmp_path)
    config = ConvNextV2Config.from_pretrained(tmp_path, num_labels=4)
    assert (config.num_labels, config.label2id["LABEL_3"]) == (4, 3)
    assert ConvNextV2Config.from_pretrained(tmp_path, num_labels=2).id2label == {0: "a", 1: "b"}


def test_placeholder_label2id_beside_real_names_is_rebuilt_and_label2id_alone_names_the_classes():
    config = ConvNextV2Config(id2label={0: "a", 1: "b"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
    assert config.label2id == {"a": 0, "b": 1}
    # transformers would replace a label2id given alone with two placeholder classes
    assert transformers.ConvNextV2Config(label2id={"a": 0, "b": 1, "c": 2}).num_labels == 2
    alone = ConvNextV2Config(label2id={"a": 0, "b": 1, "c": 2})
    assert (alone.num_labels, alone.id2label) == (3, {0: "a", 1: "b", 2: "c"})


def test_update_checks_the_label_maps_together_and_assignment_checks_types():
    config = tiny_config(num_labels=2)
    with pytest.raises(ValueError, match=r"update\(\.\.\.\): label2id and id2label disagree"):
        config.update({"id2label": {0: "x", 1: "y"}, "label2id": {"x": 1, "y": 0}})
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1"}  # nothing changed
    config.update({"id2label": {0: "x", 1: "y"}, "label2id": {"x": 0, "y": 1}})
    assert config.label2id == {"x": 0, "y": 1}
    with pytest.raises(ValueError, match=r"label2id values must be class indices"):
        config.label2id = {"x": "0"}
