"""Parity with transformers' built-in classes and timm, presets, and the model-level features.

The tests marked `device` run on `--device` (cpu by default; `make gpu-check` runs them on CUDA, with TF32 off). Those
that check the fast paths run twice: with `fast_paths=True` (the device's defaults, what a user gets: none on CUDA until
measured, see `DEVICE_DEFAULTS`) and with every path named, so the paths themselves run on every device.
"""

import pytest
import timm
import torch
from expected_errors import SOFT_LABELS_SHAPE
from helpers import WITH_FAST_PATHS, builtin_config, close, max_diff, randomize_, relative_error, tiny_config
from transformers.models import convnextv2 as builtin

from convnextv2_hf import (
    PRESETS,
    ConvNextV2Backbone,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ConvNextV2Model,
)
from convnextv2_hf.modeling_convnextv2 import ConvNextV2GRN, ConvNextV2Layer

BUILTIN_TOLERANCE = 1e-5
TIMM_TOLERANCE = 1e-4
# the official README's table: params with a 1000-class head, in millions at the table's rounding
OFFICIAL_PARAMS = {
    "atto": 3.7,
    "femto": 5.2,
    "pico": 9.1,
    "nano": 15.6,
    "tiny": 28.6,
    "base": 89,
    "large": 198,
    "huge": 660,
}


@pytest.mark.device
@WITH_FAST_PATHS
@pytest.mark.parametrize("image_size", [(64, 64), (96, 160)])
@pytest.mark.parametrize("num_channels", [3, 1])
def test_classifier_matches_builtin_with_shared_weights(image_size, num_channels, fast_paths, device):
    config = tiny_config(num_channels=num_channels, layer_norm_eps=1e-12, fast_paths=fast_paths)
    ours = randomize_(ConvNextV2ForImageClassification(config)).eval()
    reference = builtin.ConvNextV2ForImageClassification(builtin_config(config)).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    ours, reference = ours.to(device), reference.to(device)
    pixels = torch.randn(2, num_channels, *image_size).to(device)
    with torch.no_grad():
        a = ours(pixels, output_hidden_states=True)
        b = reference(pixels, output_hidden_states=True)
    assert close(a.logits, b.logits, BUILTIN_TOLERANCE)
    assert len(a.hidden_states) == len(b.hidden_states) == 5
    for ours_state, reference_state in zip(a.hidden_states, b.hidden_states, strict=True):
        assert close(ours_state, reference_state, BUILTIN_TOLERANCE)


@pytest.mark.device
@WITH_FAST_PATHS
def test_state_dicts_load_strictly_both_ways_and_model_outputs_match(fast_paths, device):
    config = tiny_config(fast_paths=fast_paths)
    ours = randomize_(ConvNextV2Model(config)).eval()
    reference = builtin.ConvNextV2Model(builtin_config(config)).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(ours.state_dict(), strict=True)
    ours_again = ConvNextV2Model(config).eval()
    ours_again.load_state_dict(reference.state_dict(), strict=True)
    ours, reference, ours_again = ours.to(device), reference.to(device), ours_again.to(device)
    pixels = torch.randn(2, 3, 64, 96).to(device)
    with torch.no_grad():
        a, b, c = ours(pixels), reference(pixels), ours_again(pixels)
    assert close(a.last_hidden_state, b.last_hidden_state, BUILTIN_TOLERANCE)
    assert close(a.pooler_output, b.pooler_output, BUILTIN_TOLERANCE)
    assert max_diff(a.pooler_output, c.pooler_output) == 0.0


@pytest.mark.device
@WITH_FAST_PATHS
def test_backbone_matches_builtin_feature_maps(fast_paths, device):
    config = tiny_config(out_features=["stem", "stage2", "stage4"], fast_paths=fast_paths)
    ours = randomize_(ConvNextV2Backbone(config)).eval()
    reference = builtin.ConvNextV2Backbone(builtin_config(config)).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    ours, reference = ours.to(device), reference.to(device)
    pixels = torch.randn(2, 3, 64, 128).to(device)
    with torch.no_grad():
        a, b = ours(pixels), reference(pixels)
    assert [tuple(m.shape) for m in a.feature_maps] == [(2, 8, 16, 32), (2, 16, 8, 16), (2, 32, 2, 4)]
    for ours_map, reference_map in zip(a.feature_maps, b.feature_maps, strict=True):
        assert close(ours_map, reference_map, BUILTIN_TOLERANCE)
    assert a.hidden_states is None
    assert len(ours(pixels, output_hidden_states=True).hidden_states) == 5


def test_backbone_out_indices_select_stages():
    backbone = ConvNextV2Backbone(tiny_config(out_indices=[1, 3]))
    assert backbone.out_features == ["stage1", "stage3"]
    assert backbone.channels == [8, 24]
    assert len(backbone(torch.randn(1, 3, 64, 64)).feature_maps) == 2


def to_timm_state_dict(state_dict: dict[str, torch.Tensor], timm_state: dict[str, torch.Tensor]) -> dict:
    """Our (= transformers') parameter names -> timm's convnext names, reshaped to timm's shapes."""
    renames = [  # applied in order: the final norm before the blocks' ".layernorm."
        ("convnextv2.layernorm.", "head.norm."),
        ("convnextv2.embeddings.patch_embeddings.", "stem.0."),
        ("convnextv2.embeddings.layernorm.", "stem.1."),
        ("convnextv2.encoder.stages.", "stages."),
        (".downsampling_layer.", ".downsample."),
        (".layers.", ".blocks."),
        (".dwconv.", ".conv_dw."),
        (".layernorm.", ".norm."),
        (".pwconv1.", ".mlp.fc1."),
        (".grn.", ".mlp.grn."),
        (".pwconv2.", ".mlp.fc2."),
        ("classifier.", "head.fc."),
    ]
    converted = {}
    for name, tensor in state_dict.items():
        for old, new in renames:
            name = name.replace(old, new)
        converted[name] = tensor.reshape(timm_state[name].shape)
    return converted


@pytest.mark.parametrize("preset", ["atto", "femto"])
def test_classifier_matches_timm_convnextv2(preset):
    ours = randomize_(
        ConvNextV2ForImageClassification(ConvNextV2Config.from_preset(preset, num_labels=1000)), scale=0.05
    )
    ours.eval()
    reference = timm.create_model(f"convnextv2_{preset}", pretrained=False).eval()
    reference.load_state_dict(to_timm_state_dict(ours.state_dict(), reference.state_dict()), strict=True)
    pixels = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert max_diff(ours(pixels).logits, reference(pixels)) <= TIMM_TOLERANCE


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_match_official_table(name):
    with torch.device("meta"):  # no weights are allocated
        model = ConvNextV2ForImageClassification(ConvNextV2Config.from_preset(name, num_labels=1000))
    count = sum(p.numel() for p in model.parameters()) / 1e6
    expected = OFFICIAL_PARAMS[name]
    decimals = 1 if isinstance(expected, float) else 0
    assert round(count, decimals) == expected, f"{name}: {count:.3f}M"


def test_new_models_use_official_init():
    model = ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("atto", num_labels=10))
    grns = [m for m in model.modules() if isinstance(m, ConvNextV2GRN)]
    assert len(grns) == 12 and all(g.weight.abs().sum() == 0 and g.bias.abs().sum() == 0 for g in grns)
    weight = model.convnextv2.encoder.stages[2].layers[0].pwconv1.weight
    assert abs(weight.std().item() - 0.02) < 0.002
    assert model.classifier.bias.abs().sum() == 0
    assert model.convnextv2.layernorm.eps == 1e-6


def test_gradient_checkpointing_gives_the_same_gradients(config):
    torch.manual_seed(0)
    pixels, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    model = randomize_(ConvNextV2ForImageClassification(config))
    model.train()
    model(pixels, labels=labels).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert all(layer.gradient_checkpointing for layer in model.modules() if isinstance(layer, ConvNextV2Layer))
    model(pixels, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        assert max_diff(parameter.grad, expected[name]) <= 1e-6, name


@pytest.mark.device
@WITH_FAST_PATHS
def test_channels_last_inputs_give_the_same_outputs(fast_paths, device):
    model = randomize_(ConvNextV2ForImageClassification(tiny_config(fast_paths=fast_paths))).eval().to(device)
    pixels = torch.randn(2, 3, 64, 96).to(device)
    with torch.no_grad():
        expected = model(pixels).logits
        model_cl = model.to(memory_format=torch.channels_last)
        got = model_cl(pixels.contiguous(memory_format=torch.channels_last)).logits
    assert close(got, expected, 1e-5)


@pytest.mark.slow
def test_torch_compile_matches_eager(config):
    model = randomize_(ConvNextV2ForImageClassification(config)).eval()
    pixels = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert max_diff(compiled(pixels).logits, model(pixels).logits) <= 1e-5


@pytest.mark.slow
def test_one_compiled_graph_serves_every_batch_size(config):
    # dynamic batch, no graph break, no recompilation; Dynamo's frame counter with the eager backend (no Inductor)
    from torch._dynamo.testing import CompileCounter

    model = randomize_(ConvNextV2ForImageClassification(config)).eval()
    counter = CompileCounter()
    # entries that earlier tests compiled for the same forward count against Dynamo's recompile limit: start afresh
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for batch in (2, 3, 5):
            pixels = torch.randn(batch, 3, 64, 64)
            assert max_diff(compiled(pixels).logits, model(pixels).logits) <= 1e-5
    assert counter.frame_count == 1


def test_forward_hooks_on_the_first_linear_see_its_own_output_at_inference(config):
    # the inference GELU runs in place; a hook that keeps pwconv1's output must not see it change afterwards
    model = randomize_(ConvNextV2ForImageClassification(config)).eval()
    layer = model.convnextv2.encoder.stages[0].layers[0]
    kept = {}
    layer.pwconv1.register_forward_hook(lambda module, inputs, output: kept.update(inputs=inputs[0], output=output))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        assert max_diff(kept["output"], layer.pwconv1(kept["inputs"])) == 0.0


def test_forward_hooks_on_the_second_linear_fire_in_every_block(config):
    # at 64 px the first stage folds GRN into pwconv2's weight; a hooked pwconv2 must still be called as a module
    model = randomize_(ConvNextV2ForImageClassification(config)).eval()
    seen = []
    for layer in model.modules():
        if isinstance(layer, ConvNextV2Layer):
            layer.pwconv2.register_forward_hook(lambda module, inputs, output: seen.append((module, inputs, output)))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert len(seen) == sum(config.depths)
    for module, inputs, output in seen:
        assert max_diff(output, torch.nn.functional.linear(inputs[0], module.weight, module.bias)) == 0.0


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_peft_lora_on_the_block_linears_matches_the_builtin_model(config, mode):
    # a LoRA-wrapped pwconv2 must not be folded into (its adapter would be dropped): same logits as transformers'
    # built-in model under the same adapters, which differ clearly from the logits without them
    peft = pytest.importorskip("peft")
    ours = randomize_(ConvNextV2ForImageClassification(config))
    reference = builtin.ConvNextV2ForImageClassification(builtin_config(config))
    reference.load_state_dict(ours.state_dict(), strict=True)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        without_adapters = ours.eval()(pixels).logits
    lora = dict(r=4, target_modules=["pwconv1", "pwconv2"], init_lora_weights=False)
    torch.manual_seed(0)
    ours = peft.get_peft_model(ours, peft.LoraConfig(**lora))
    reference = peft.get_peft_model(reference, peft.LoraConfig(**lora))
    reference.load_state_dict(ours.state_dict(), strict=True)
    getattr(ours, mode)(), getattr(reference, mode)()
    with torch.set_grad_enabled(mode == "train"):
        got, expected = ours(pixels).logits, reference(pixels).logits
    assert max_diff(got, expected) <= BUILTIN_TOLERANCE
    assert max_diff(got, without_adapters) > 1e-2


def test_soft_labels_use_soft_cross_entropy(config):
    model = randomize_(ConvNextV2ForImageClassification(config)).eval()
    pixels = torch.randn(3, 3, 64, 64)
    hard = torch.tensor([0, 2, 4])
    soft = torch.nn.functional.one_hot(hard, 5).float()
    with torch.no_grad():
        hard_loss = model(pixels, labels=hard).loss
        soft_loss = model(pixels, labels=soft).loss
        mixed = 0.7 * soft + 0.3 * soft.flip(0)
        logits = model(pixels).logits
        mixed_loss = model(pixels, labels=mixed).loss
    assert abs(hard_loss.item() - soft_loss.item()) <= 1e-6
    expected = 0.7 * torch.nn.functional.cross_entropy(logits, hard) + 0.3 * torch.nn.functional.cross_entropy(
        logits, hard.flip(0)
    )
    assert abs(mixed_loss.item() - expected.item()) <= 1e-5
    with pytest.raises(ValueError, match=SOFT_LABELS_SHAPE):
        model(pixels, labels=soft[:, :3])


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 4, 64, 64), "has 4 channels but the model expects num_channels=3"),
        ((1, 3, 31, 64), "at least 32 .*got 31x64"),
        ((1, 3, 64, 16), "at least 32 .*got 64x16"),
        ((3, 64, 64), "must be a 4-D tensor"),
    ],
)
@pytest.mark.parametrize("model_class", [ConvNextV2Model, ConvNextV2ForImageClassification, ConvNextV2Backbone])
def test_bad_input_raises_value_error_naming_the_sizes(model_class, shape, message):
    model = model_class(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_missing_pixel_values_is_a_value_error(config):
    with pytest.raises(ValueError, match="pixel_values"):
        ConvNextV2Model(config)()


def test_return_dict_false_gives_tuples(config):
    model = ConvNextV2ForImageClassification(config).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 64), labels=torch.tensor([1]), return_dict=False)
    assert isinstance(outputs, tuple) and outputs[1].shape == (1, 5)


@pytest.mark.device
def test_half_precision_grn_does_not_overflow(device):
    grn = ConvNextV2GRN(8).to(device)
    with torch.no_grad():
        grn.weight.fill_(0.5)
    # 64 positions of 1e4: each value fits fp16 but the L2 norm (8e4) does not; the built-in GRN gives NaN here
    features = torch.full((1, 8, 8, 8), 1.0e4, device=device)
    features[..., 0] = 100.0
    expected = grn(features)
    for dtype in (torch.float16, torch.bfloat16):
        got = grn.to(dtype)(features.to(dtype)).float()
        grn.float()
        assert torch.isfinite(got).all(), dtype
        assert max_diff(got, expected) / expected.abs().max().item() < 1e-2, dtype


@pytest.mark.device
@WITH_FAST_PATHS
def test_training_gradients_match_the_builtin_model(fast_paths, device):
    # the whole block in training mode (GELU, GRN and pwconv2 as one function) against transformers' autograd
    config = tiny_config(fast_paths=fast_paths)
    ours = randomize_(ConvNextV2ForImageClassification(config)).train()
    reference = builtin.ConvNextV2ForImageClassification(builtin_config(config)).train()
    reference.load_state_dict(ours.state_dict(), strict=True)
    ours, reference = ours.to(device), reference.to(device)
    pixels, labels = torch.randn(2, 3, 64, 64).to(device), torch.tensor([1, 3], device=device)
    ours(pixels, labels=labels).loss.backward()
    reference(pixels, labels=labels).loss.backward()
    reference_parameters = dict(reference.named_parameters())
    for name, parameter in ours.named_parameters():
        assert close(parameter.grad, reference_parameters[name].grad, 1e-5), name


def test_torch_func_grad_gives_the_autograd_gradients(config):
    # torch.func transforms cannot run our training-only autograd functions: the modules run instead
    model = randomize_(ConvNextV2ForImageClassification(config)).train()
    pixels, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    model(pixels, labels=labels).loss.backward()
    parameters = {name: parameter.detach() for name, parameter in model.named_parameters()}

    def loss(parameters):
        return torch.func.functional_call(model, parameters, (pixels,), {"labels": labels}).loss

    grads = torch.func.grad(loss)(parameters)
    for name, parameter in model.named_parameters():
        assert max_diff(grads[name], parameter.grad) <= 1e-5 * max(1.0, parameter.grad.abs().max().item()), name


@pytest.mark.device
@WITH_FAST_PATHS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_classifier_is_finite_where_fp32_is(dtype, fast_paths, device):
    model = randomize_(ConvNextV2ForImageClassification(tiny_config(fast_paths=fast_paths))).eval().to(device)
    pixels = torch.randn(2, 3, 64, 64).to(device)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, ConvNextV2Layer):  # activations of ~100 at GRN: fp16 sums of their squares overflow
                layer.pwconv1.weight.mul_(300.0)
        expected = model(pixels).logits
        got = model.to(dtype)(pixels.to(dtype)).logits.float()
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()
    assert max_diff(got, expected) / expected.abs().max().item() < 5e-2


@pytest.mark.device
@WITH_FAST_PATHS
def test_training_gradients_under_bf16_autocast_and_in_fp16_are_finite_and_close_to_fp32(fast_paths, device):
    # the training function (GELU, GRN, pwconv2) replays autocast's dtype in its backward by hand; fp16 weights run it
    # in fp16 throughout, with GRN's norm accumulated in fp32
    torch.manual_seed(0)
    model = randomize_(ConvNextV2ForImageClassification(tiny_config(fast_paths=fast_paths))).train().to(device)
    pixels, labels = torch.randn(2, 3, 64, 64).to(device), torch.tensor([1, 3], device=device)
    model(pixels, labels=labels).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(pixels, labels=labels).loss
    loss.backward()
    autocast_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.half()(pixels.half(), labels=labels).loss.backward()
    half_grads = {name: p.grad.float() for name, p in model.named_parameters()}
    # bounds on each parameter's relative error (L2): over 20 seeds on CPU, bf16 reached 0.08 and fp16 0.07 (the same
    # with the fast paths off and in the built-in model: rounding, not a defect); the seed keeps this run's inputs fixed
    for label, grads, bound in (("bf16 autocast", autocast_grads, 0.15), ("fp16", half_grads, 0.12)):
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert torch.isfinite(grad).all(), (label, name)
            assert relative_error(grad, expected[name]) <= bound, (label, name)
