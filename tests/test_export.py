"""Tracing, export and compile: each works and matches eager outputs (<= 1e-4), at sizes other than the traced one
where the format allows. No fast path runs inside them (`fast_path_allowed`), so they record the reference math."""

import warnings

import pytest
import torch
from helpers import close, randomize_, tiny_config

from convnextv2_hf import ConvNextV2Backbone, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling

TOLERANCE = 1e-4


def classifier() -> ConvNextV2ForImageClassification:
    return randomize_(ConvNextV2ForImageClassification(tiny_config())).eval()


class Logits(torch.nn.Module):
    """Tensor in, tensor out: what tracing and export record."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values).logits


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_jit_trace_matches_eager_with_and_without_gradients(grad):
    model = classifier()
    if grad:
        model.train()  # training mode: the fused autograd function would run in eager mode, not in the trace
        model.config.drop_path_rate = 0.0
    pixels = torch.randn(2, 3, 64, 96)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; TracerWarnings on shape checks
        traced = torch.jit.trace(Logits(model), (pixels,), check_trace=False)
        expected = model(pixels).logits
        got = traced(pixels)
    assert close(got, expected, TOLERANCE)
    if grad:  # the traced graph backpropagates to the same gradients
        got.square().sum().backward()
        traced_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(pixels).logits.square().sum().backward()
        for traced_grad, parameter in zip(traced_grads, model.parameters(), strict=True):
            assert close(traced_grad, parameter.grad, TOLERANCE)


@pytest.mark.slow
def test_torch_export_with_dynamic_batch_height_and_width_runs_other_sizes():
    model = classifier()
    # min 64: torch specialises dimensions of size 1, and below 64 px the last stage is 1 position high or wide
    batch, height, width = (torch.export.Dim(n, min=m, max=1024) for n, m in (("batch", 1), ("h", 64), ("w", 64)))
    program = torch.export.export(
        Logits(model), (torch.randn(2, 3, 64, 96),), dynamic_shapes={"pixel_values": {0: batch, 2: height, 3: width}}
    )
    for shape in [(2, 3, 64, 96), (1, 3, 65, 97), (3, 3, 225, 225), (2, 3, 100, 75), (1, 3, 256, 64)]:
        pixels = torch.randn(*shape)
        with torch.no_grad():
            assert close(program.module()(pixels), model(pixels).logits, TOLERANCE), shape


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_at_other_sizes(tmp_path):
    import onnxruntime  # the dev extra installs it, with onnx and onnxscript
    model = classifier()
    path = tmp_path / "classifier.onnx"
    dims = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(model),
            (torch.randn(2, 3, 64, 96),),
            str(path),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_shapes={"pixel_values": dims},
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 64, 96), (1, 3, 65, 97), (3, 3, 128, 160)]:
        pixels = torch.randn(*shape)
        (got,) = session.run(None, {"pixel_values": pixels.numpy()})
        with torch.no_grad():
            assert close(torch.from_numpy(got), model(pixels).logits, TOLERANCE), shape


@pytest.mark.slow
def test_compile_dynamic_matches_eager_at_several_sizes():
    model = classifier()
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        for shape in [(2, 3, 64, 96), (3, 3, 33, 47), (1, 3, 100, 75)]:
            pixels = torch.randn(*shape)
            assert close(compiled(pixels).logits, model(pixels).logits, TOLERANCE), shape


@pytest.mark.slow
def test_backbone_exports_with_dynamic_sizes_and_selected_hidden_states():
    model = randomize_(ConvNextV2Backbone(tiny_config(out_features=["stage1", "stage3"]))).eval()

    class Maps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values).feature_maps

    height, width = torch.export.Dim("h", min=64, max=512), torch.export.Dim("w", min=64, max=512)
    program = torch.export.export(Maps(), (torch.randn(1, 3, 64, 64),), dynamic_shapes=({2: height, 3: width},))
    pixels = torch.randn(1, 3, 100, 75)
    with torch.no_grad():
        for got, expected in zip(program.module()(pixels), model(pixels).feature_maps, strict=True):
            assert close(got, expected, TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("fcmae_impl", ["sparse", "dense"])
def test_fcmae_compiles_and_exports_with_static_shapes(fcmae_impl):
    model = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config(fcmae_impl=fcmae_impl))).eval()
    pixels, noise = torch.randn(2, 3, 64, 96), torch.rand(2, 6)
    with torch.no_grad():
        expected = model(pixels, noise=noise)
        compiled = torch.compile(model, dynamic=False)(pixels, noise=noise)
    assert close(compiled.loss, expected.loss, TOLERANCE) and close(compiled.logits, expected.logits, TOLERANCE)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values, noise):
            output = self.model(pixel_values, noise=noise)
            return output.loss, output.logits, output.mask

    program = torch.export.export(Step(), (pixels, noise))
    loss, logits, mask = program.module()(pixels, noise)
    assert close(loss, expected.loss, TOLERANCE) and close(logits, expected.logits, TOLERANCE)
    assert torch.equal(mask, expected.mask)
    other_noise = torch.rand(2, 6)  # another mask through the same program
    with torch.no_grad():
        assert close(program.module()(pixels, other_noise)[0], model(pixels, noise=other_noise).loss, TOLERANCE)
