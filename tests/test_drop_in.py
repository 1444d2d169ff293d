"""Drop-in wherever transformers' built-in ConvNeXt V2 goes: any input size it accepts, batch 0, hidden-state
selection (a bool or a list of indices), input dtypes. Outputs compared with the built-in classes in fp32."""

import pytest
import torch
import transformers
from expected_errors import LABELS_OUT_OF_RANGE, PIXELS_OF_INTEGER_DTYPE, SOFT_LABELS_SHAPE
from helpers import builtin_config, randomize_, tiny_config
from transformers.models import convnextv2 as builtin

from convnextv2_hf import ConvNextV2Backbone, ConvNextV2ForImageClassification, ConvNextV2Model

TOLERANCE = 1e-5
ODD_SIZES = [(33, 47), (225, 225), (100, 75), (513, 385), (32, 32)]
PAIRS = {
    "model": (ConvNextV2Model, builtin.ConvNextV2Model),
    "classifier": (ConvNextV2ForImageClassification, builtin.ConvNextV2ForImageClassification),
    "backbone": (ConvNextV2Backbone, builtin.ConvNextV2Backbone),
}


def pair(kind: str, **overrides):
    ours_class, builtin_class = PAIRS[kind]
    config = tiny_config(layer_norm_eps=1e-12, out_features=["stem", "stage2", "stage4"], **overrides)
    ours = randomize_(ours_class(config)).eval()
    reference = builtin_class(builtin_config(config)).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


def outputs_of(kind: str, output) -> list[torch.Tensor | None]:
    """The tensors a caller reads, in a fixed order (hidden states last, None where not selected)."""
    if kind == "model":
        main = [output.last_hidden_state, output.pooler_output]
    elif kind == "classifier":
        main = [output.logits]
    else:
        main = list(output.feature_maps)
    return main + list(output.hidden_states or [])


def assert_same(kind: str, got, expected) -> None:
    got, expected = outputs_of(kind, got), outputs_of(kind, expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape
            if a.numel():
                assert (a - b).abs().max().item() <= TOLERANCE * max(1.0, b.abs().max().item())


@pytest.mark.device
@pytest.mark.parametrize("size", ODD_SIZES, ids=[f"{h}x{w}" for h, w in ODD_SIZES])
@pytest.mark.parametrize("kind", list(PAIRS))
def test_any_size_the_builtin_accepts_gives_its_outputs(kind, size, device):
    ours, reference = (m.to(device) for m in pair(kind))
    pixels = torch.randn(2, 3, *size, device=device)
    with torch.no_grad():
        assert_same(kind, ours(pixels, output_hidden_states=True), reference(pixels, output_hidden_states=True))


@pytest.mark.parametrize("kind", list(PAIRS))
def test_batch_zero_gives_empty_outputs_like_the_builtin(kind):
    ours, reference = pair(kind)
    pixels = torch.randn(0, 3, 64, 96)
    with torch.no_grad():
        got, expected = ours(pixels, output_hidden_states=True), reference(pixels, output_hidden_states=True)
    assert_same(kind, got, expected)
    assert all(t.shape[0] == 0 for t in outputs_of(kind, got))
    # and in training mode, with gradients (the fused training function and the fold see zero samples)
    ours.train()
    total = sum(t.sum() for t in outputs_of(kind, ours(pixels)) if t is not None)
    total.backward()


@pytest.mark.parametrize("selection", [[0, 2, -1], [1], [-2, 3], 4, [], True, False])
@pytest.mark.parametrize("kind", list(PAIRS))
def test_hidden_state_selection_matches_the_builtin(kind, selection):
    ours, reference = pair(kind)
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        got = ours(pixels, output_hidden_states=selection)
        expected = reference(pixels, output_hidden_states=selection)
    assert (got.hidden_states is None) == (expected.hidden_states is None)
    assert_same(kind, got, expected)
    if isinstance(selection, list) and selection:
        selected = {i % 5 for i in selection}
        assert [h is not None for h in got.hidden_states] == [i in selected for i in range(5)]


@pytest.mark.parametrize("kind", list(PAIRS))
def test_hidden_states_from_the_config_and_tuples(kind):
    ours, reference = pair(kind, output_hidden_states=True)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, expected = ours(pixels), reference(pixels)
        assert got.hidden_states is not None and len(got.hidden_states) == 5
        assert_same(kind, got, expected)
        as_tuple, expected_tuple = ours(pixels, return_dict=False), reference(pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(expected_tuple)


def test_floating_inputs_of_another_dtype_are_cast_and_integers_are_refused():
    ours, _ = pair("classifier")
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ours(pixels).logits
        got = ours(pixels.double()).logits
        assert got.dtype == torch.float32 and (got - expected).abs().max().item() <= 1e-6
        half_model = pair("classifier")[0].to(torch.bfloat16)
        assert half_model(pixels).logits.dtype == torch.bfloat16  # no "Input type and bias type" error
    with pytest.raises(ValueError, match=PIXELS_OF_INTEGER_DTYPE):
        ours(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 7]), LABELS_OUT_OF_RANGE),
        (torch.tensor([0, -3]), LABELS_OUT_OF_RANGE),
        (torch.tensor([0, 1, 2]), r"must have shape \(2,\)"),
        (torch.tensor([True, False]), "must be an integer tensor"),
        (torch.full((2, 5), 0.2).index_fill(1, torch.tensor([0]), -0.2), "non-negative"),
        (torch.full((2, 5), 0.3), "sum to 1"),
        (torch.full((2, 4), 0.25), SOFT_LABELS_SHAPE),
        (torch.full((2, 5), float("nan")), "finite"),
    ],
    ids=["too-large", "negative", "wrong-shape", "bool", "negative-soft", "rows-not-one", "soft-shape", "nan"],
)
def test_bad_labels_raise_value_error_naming_the_problem(labels, message):
    ours, _ = pair("classifier")
    with pytest.raises(ValueError, match=message):
        ours(torch.randn(2, 3, 64, 64), labels=labels)


def test_soft_labels_that_are_distributions_are_accepted():
    ours, _ = pair("classifier")
    labels = torch.softmax(torch.randn(2, 5), dim=-1)
    loss = ours(torch.randn(2, 3, 64, 64), labels=labels).loss
    assert torch.isfinite(loss) and loss.item() > 0


def test_an_empty_batch_with_labels_has_a_zero_loss_not_nan():
    ours, _ = pair("classifier")
    output = ours(torch.randn(0, 3, 64, 64), labels=torch.zeros(0, dtype=torch.long))
    assert output.loss.item() == 0.0
    output = ours(torch.randn(0, 3, 64, 64), labels=torch.zeros(0, dtype=torch.long), num_items_in_batch=0)
    assert output.loss.item() == 0.0


@pytest.mark.parametrize("keep", [0.5, 5], ids=["half", "five-bytes"])
def test_a_truncated_weights_file_is_a_value_error_naming_it(tmp_path, keep):
    ConvNextV2ForImageClassification(tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a complete safetensors file"):
        ConvNextV2ForImageClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a complete safetensors file"):
        transformers.AutoModelForImageClassification.from_pretrained(tmp_path)


def test_upernet_on_our_backbone_matches_the_builtin_backbone_at_odd_sizes():
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    backbone_config = tiny_config(out_features=["stage1", "stage2", "stage3", "stage4"], layer_norm_eps=1e-12)
    config = UperNetConfig(backbone_config=backbone_config, hidden_size=16, auxiliary_in_channels=24, num_labels=3)
    ours = randomize_(UperNetForSemanticSegmentation(config)).eval()
    assert isinstance(ours.backbone, ConvNextV2Backbone)  # AutoBackbone.from_config builds ours after the import
    reference = UperNetForSemanticSegmentation(config).eval()
    reference.backbone = builtin.ConvNextV2Backbone(builtin_config(backbone_config)).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    for size in [(100, 75), (33, 47), (225, 161)]:
        pixels = torch.randn(2, 3, *size)
        with torch.no_grad():
            got, expected = ours(pixels).logits, reference(pixels).logits
        assert got.shape == (2, 3, *size)
        assert (got - expected).abs().max().item() <= TOLERANCE * max(1.0, expected.abs().max().item()), size
