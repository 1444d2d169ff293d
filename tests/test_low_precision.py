"""Half precision keeps its reductions in fp32: GRN's statistics and LayerNorm, in the reference math and in the fast
paths, with activations of trained-network magnitude (values ~1e2-1e3 over 56x56 maps: in fp16 a sum of their
squares overflows, in bf16 it loses about 3 digits); and a bf16 classifier (weights in bf16, or fp32 under bf16
autocast) that agrees with fp32 on real photos.

Each comparison is against fp64 on the same half-precision values (inputs and weights rounded once), so what is
left is the error of the computation itself; tolerances are stated in units of the dtype's rounding.
"""

import pytest
import torch
from helpers import randomize_, tiny_config

from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ImageProcessor
from convnextv2_hf import fast_paths_convnextv2 as fast
from convnextv2_hf.configuration_convnextv2 import FAST_PATH_NAMES
from convnextv2_hf.modeling_convnextv2 import ConvNextV2Layer, ConvNextV2LayerNorm

HALF = [torch.bfloat16, torch.float16]
# half an ulp at 1: the largest relative rounding of one value in the dtype (bf16 keeps 8 significant bits, fp16 11)
ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def trained_magnitude(shape, dtype, seed: int = 0) -> torch.Tensor:
    """Activations like a trained network's late-block ones: channel offsets of 1e2-1e3 plus spread of ~3e2."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.empty(shape[-1], dtype=torch.float64).uniform_(100.0, 1000.0, generator=generator)
    values = offsets + 300.0 * torch.randn(shape, dtype=torch.float64, generator=generator)
    return values.to(dtype)


def max_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute error over ``expected``'s largest value, in fp64 (not helpers.relative_error, an L2)."""
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("path", ["reference", "square_sum_norm"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_grn_statistics_accumulate_in_fp32(dtype, path):
    # (2, 56, 56, 16): 3136 positions of ~1e3; the fp16 sum of squares (~3e9) overflows fp16's 65504, a bf16 sum
    # drifts by ~0.4%. Accumulated in fp32 the norm and its channel mean are within 1e-5 of fp64; the square-sum
    # path squares bf16 in bf16 (each square rounded once, at most 2^-8, then summed in fp32): within 2^-9, the
    # bound its docstring states (measured: ~8e-5 here, 30x better than the bf16 sum).
    tolerance = ROUNDING[torch.bfloat16] / 2 if (path, dtype) == ("square_sum_norm", torch.bfloat16) else 1e-5
    assert ROUNDING[torch.bfloat16] == torch.finfo(torch.bfloat16).eps / 2  # the bound is stated in bf16's own terms
    values = trained_magnitude((2, 56, 56, 16), dtype)
    layer = ConvNextV2Layer(tiny_config(), 4)
    grn = randomize_(layer.grn, scale=0.5).to(dtype)
    positions = values.flatten(1, 2)
    norm = grn.norm(values) if path == "reference" else fast.square_sum_norm(positions)
    expected = torch.linalg.vector_norm(positions.double(), dim=1)
    assert norm.dtype == torch.float32
    assert torch.isfinite(norm).all()
    assert max_relative_error(norm, expected) < tolerance
    expected_mean = expected.mean(dim=-1)
    assert ((norm.mean(dim=-1).double() - expected_mean).abs() / expected_mean).max().item() < tolerance
    # the half-precision sum this replaces is measurably wrong: overflow in fp16, ~3e-3 relative in bf16
    naive = positions.square().sum(dim=1).sqrt()
    if dtype == torch.float16:
        assert not torch.isfinite(naive).all()
    else:
        assert max_relative_error(naive, expected) > 1e-3
        assert max_relative_error(naive, expected) > 10 * max_relative_error(norm, expected)


def _block_in(dtype, fast_paths, dim: int = 4):
    torch.manual_seed(0)
    layer = randomize_(ConvNextV2Layer(tiny_config(fast_paths=fast_paths), dim), scale=0.5)
    reference = ConvNextV2Layer(tiny_config(fast_paths=False), dim)
    layer = layer.to(dtype)
    reference.load_state_dict(layer.state_dict())  # the same rounded weights, in fp64
    return layer, reference.double()


@pytest.mark.parametrize("fast_paths", [False, list(FAST_PATH_NAMES)], ids=["reference", "fast"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_gelu_grn_linear_in_half_precision_matches_fp64(dtype, fast_paths):
    # GELU -> GRN -> pwconv2 of a block on (2, 56, 56, 16) activations of ~1e3, at inference (fold, square-sum norm,
    # in-place GELU) and in training (the fused function: forward and backward), fast paths off and on. The error
    # against fp64 is that of rounding the outputs and the half-precision matmul (<= 8 roundings of the output's
    # scale), not of a half-precision reduction, which would be ~100x that in bf16 and overflow in fp16.
    layer, reference = _block_in(dtype, fast_paths)
    values = trained_magnitude((2, 56, 56, 16), dtype)
    expected = reference.pwconv2(reference.grn(reference.act(values.double())))
    tolerance = 8 * ROUNDING[dtype]
    with torch.no_grad():
        got = fast.gelu_grn_linear(layer, values.clone(), None)
        if got is None:
            got = layer.pwconv2(layer.grn(layer.act(values)))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert max_relative_error(got, expected) < tolerance, max_relative_error(got, expected)
    # training: outputs and the gradients of the input and of GRN's and pwconv2's parameters
    features = values.clone().requires_grad_(True)
    fused = fast.gelu_grn_linear(layer, features, None)
    got = layer.pwconv2(layer.grn(layer.act(features))) if fused is None else fused
    assert (fused is not None) == bool(fast_paths)
    # upstream gradients of ~1e-2 (a mean loss): the parameter gradients, sums over 6272 positions of ~1e3 values,
    # then stay within fp16's range (with ~1 they would be ~1e5: not representable in fp16 whatever the accumulation)
    generator = torch.Generator().manual_seed(1)
    weights = 1e-2 * torch.randn(got.shape, generator=generator, dtype=torch.float64)
    parameters = [layer.grn.weight, layer.grn.bias, layer.pwconv2.weight, layer.pwconv2.bias]
    grads = torch.autograd.grad((got * weights.to(dtype)).sum(), [features] + parameters)
    reference_features = values.double().requires_grad_(True)
    expected = reference.pwconv2(reference.grn(reference.act(reference_features)))
    reference_parameters = [reference.grn.weight, reference.grn.bias, reference.pwconv2.weight, reference.pwconv2.bias]
    expected_grads = torch.autograd.grad((expected * weights).sum(), [reference_features] + reference_parameters)
    assert max_relative_error(got, expected) < tolerance
    names = ["input", "gamma", "beta", "weight", "bias"]
    for name, grad, expected_grad in zip(names, grads, expected_grads, strict=True):
        assert torch.isfinite(grad).all(), name
        # gradients sum over 6272 positions: a few more roundings than the outputs
        assert max_relative_error(grad, expected_grad) < 4 * tolerance, (name, max_relative_error(grad, expected_grad))


@pytest.mark.parametrize("how", ["weights", "autocast"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_depthwise_conv_gradients_in_half_precision_accumulate_in_fp32(dtype, how):
    # the block's 7x7 depthwise conv in training by the dense_depthwise_conv path, on (2, 16, 56, 56) maps of ~1e3
    # (channels_last, as the residual stream is) and at the last stage's size (7x7 maps: the weight gradient of all
    # samples as one conv), weights in half precision or fp32 under half autocast. The weight and bias gradients sum
    # over 6272 positions in fp32 and are rounded once to the dtype, so they are within a few roundings of fp64; the
    # input gradient sums 49 taps, as the conv backward does. Upstream gradients of ~1e-3 keep the sums in fp16's range.
    for side in (56, 7):
        torch.manual_seed(0)
        conv = randomize_(torch.nn.Conv2d(16, 16, 7, padding=3, groups=16), scale=0.5)
        if how == "weights":
            conv = conv.to(dtype)
        reference = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16).double()
        reference.load_state_dict({k: v.to(dtype).double() for k, v in conv.state_dict().items()})
        values = trained_magnitude((2, side, side, 16), dtype).permute(0, 3, 1, 2)
        inputs = values.to(conv.weight.dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype, enabled=how == "autocast"):
            got = fast.dense_depthwise_conv(conv, inputs, ["dense_depthwise_conv"])
        assert got is not None and got.dtype == dtype
        generator = torch.Generator().manual_seed(1)
        weights = 1e-3 * torch.randn(got.shape, generator=generator, dtype=torch.float64)
        grads = torch.autograd.grad((got * weights.to(dtype)).sum(), [inputs, conv.weight, conv.bias])
        reference_inputs = values.double().requires_grad_(True)
        expected = reference(reference_inputs)
        expected_grads = torch.autograd.grad((expected * weights).sum(), [reference_inputs, *reference.parameters()])
        assert max_relative_error(got, expected) < 8 * ROUNDING[dtype]
        for name, grad, expected_grad in zip(["input", "weight", "bias"], grads, expected_grads, strict=True):
            assert grad.dtype == conv.weight.dtype and torch.isfinite(grad).all(), name
            error = max_relative_error(grad, expected_grad)
            assert error < (8 if name == "input" else 2) * ROUNDING[dtype], (side, name, error)


@pytest.mark.parametrize("how", ["weights", "autocast"])
def test_onednn_linear_in_bf16_matches_fp64(how):
    # a block's LayerNorm -> pwconv2 at inference with only oneDNN's linear on (pwconv1 + bias + GELU in one matmul,
    # pwconv2 + bias in another), in bf16 weights and under bf16 autocast, on (2, 56, 56, 16) activations of ~1e3:
    # within 8 roundings of the output's scale of fp64 on the same rounded values, as the layers' own bf16 math is
    if not fast.native_bf16_cpu() or not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN's bf16 linear runs only on a CPU with native bf16")
    layer, reference = _block_in(torch.bfloat16, ["onednn_linear"], dim=16)
    values = trained_magnitude((2, 56, 56, 16), torch.bfloat16)
    expected = reference.pwconv2(reference.grn(reference.act(reference.pwconv1(reference.layernorm(values.double())))))
    calls = []
    original = fast.onednn_linear

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return original(*args, **kwargs)

    fast.onednn_linear = counted
    try:
        with torch.no_grad():
            if how == "weights":
                got = fast.block_mlp(layer, values, None)
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    got = fast.block_mlp(layer.float(), values.float(), None)
    finally:
        fast.onednn_linear = original
    assert calls == [torch.bfloat16, torch.bfloat16]  # pwconv1 (with GELU) and pwconv2, both in bf16
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert max_relative_error(got, expected) < 8 * ROUNDING[torch.bfloat16], max_relative_error(got, expected)
    plain = reference.float().to(torch.bfloat16)  # the layers' own bf16 math, for the record of what 8 roundings is
    with torch.no_grad():
        layers = plain.pwconv2(plain.grn(plain.act(plain.pwconv1(plain.layernorm(values)))))
    assert max_relative_error(got, expected) <= 2 * max_relative_error(layers, expected) + ROUNDING[torch.bfloat16]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_layernorm_in_half_precision_matches_fp64(dtype, data_format):
    # a mean of ~1e3 and a spread of ~3e2 over 96 channels (plus one channel at 2e3): statistics in half precision
    # would lose the spread against the mean. torch's CPU LayerNorm kernel accumulates in fp32, so the error is the
    # output's rounding (<= 4 roundings of its scale)
    torch.manual_seed(0)
    norm = randomize_(ConvNextV2LayerNorm(96, data_format=data_format), scale=0.5).to(dtype)
    reference = ConvNextV2LayerNorm(96, data_format=data_format).double()
    reference.load_state_dict(norm.state_dict())
    values = trained_magnitude((2, 56, 56, 96), dtype)
    values[..., 7] = 2000.0
    if data_format == "channels_first":
        values = values.permute(0, 3, 1, 2).contiguous()
    got = norm(values)
    expected = reference(values.double())
    assert got.dtype == dtype
    assert max_relative_error(got, expected) < 4 * ROUNDING[dtype], max_relative_error(got, expected)
    with torch.autocast("cpu", dtype=dtype):  # fp32 weights and input under autocast: fp32 statistics too
        autocast = reference.float()(values.float())
    assert max_relative_error(autocast, expected) < 4 * ROUNDING[dtype]


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Four real photos (scikit-image's astronaut, coffee, chelsea, rocket) through our image processor, at 128 px
    (the official evaluation transform at a small size, to keep the test fast)."""
    data = pytest.importorskip("skimage.data")
    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    processor = ConvNextV2ImageProcessor(size={"shortest_edge": 128})
    return processor(images, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("fast_paths", [True, False], ids=["default-paths", "reference"])
@pytest.mark.parametrize("how", ["bf16-weights", "bf16-autocast"])
def test_a_bf16_classifier_agrees_with_fp32_on_real_photos(photos, how, fast_paths):
    # a tiny classifier (perturbed weights, 10 labels): weights in bf16, or fp32 under bf16 autocast, against fp32.
    # Stated thresholds: top-1 agrees on all 4 photos (the fp32 margins are >= 0.03, ~3x the error), and the largest
    # logit error is below 3% of the largest logit (measured: ~1%)
    assert photos.shape == (4, 3, 128, 128)
    torch.manual_seed(0)
    model = randomize_(ConvNextV2ForImageClassification(tiny_config(num_labels=10, fast_paths=fast_paths))).eval()
    with torch.no_grad():
        expected = model(photos).logits
        if how == "bf16-weights":
            logits = model.to(torch.bfloat16)(photos.to(torch.bfloat16)).logits
            assert logits.dtype == torch.bfloat16
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(photos).logits
    error = (logits.float() - expected).abs().max().item()
    scale = expected.abs().max().item()
    top2 = expected.topk(2).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    print(f"{how} fast_paths={fast_paths}: largest logit error {error:.4f} of {scale:.3f}, margin {margin:.3f}")
    assert 0 < error < 0.03 * scale  # 0 would mean bf16 never ran
    assert (logits.float().argmax(-1) == expected.argmax(-1)).all()
