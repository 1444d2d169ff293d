"""Every fast path pinned to the reference math, and the one predicate that decides where they may run.

The tests marked `device` run on `--device` (cpu by default; `make gpu-check` runs them on CUDA). They name the fast
paths explicitly (`fast_paths=[name]`), so they exercise them on any device, whatever `DEVICE_DEFAULTS` enables there.
"""

import warnings

import pytest
import torch
from helpers import randomize_, tiny_config
from transformers.models import convnextv2 as builtin

from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf import fast_paths_convnextv2 as fast
from convnextv2_hf.configuration_convnextv2 import FAST_PATH_NAMES
from convnextv2_hf.modeling_convnextv2 import ConvNextV2GRN

pytestmark = pytest.mark.device


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def count_calls(monkeypatch):
    """Count calls of fast-path functions by name (the module's globals are looked up at call time)."""
    counts: dict[str, int] = {}

    def wrap(name: str, owner=fast, attribute: str | None = None):
        original = getattr(owner, attribute or name)

        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attribute or name, counted)

    wrap("grn_into_linear")
    wrap("square_sum_norm")
    wrap("downsample_as_matmul")
    wrap("GeluGrnLinear.apply", fast.GeluGrnLinear, "apply")
    wrap("SparseDepthwiseConv.apply", fast.SparseDepthwiseConv, "apply")
    wrap("DenseDepthwiseConv.apply", fast.DenseDepthwiseConv, "apply")
    wrap("run_mlp_in_chunks")
    wrap("onednn_linear")
    wrap("differentiable_backward")
    monkeypatch.setattr(torch.ops.aten, "gelu_", _counting(torch.ops.aten.gelu_, counts, "gelu_"), raising=False)
    return counts


def _counting(function, counts, name):
    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return function(*args, **kwargs)

    return counted


# which function proves that a path ran
EVIDENCE = {
    "grn_fold": "grn_into_linear",
    "inplace_gelu": "gelu_",
    "square_sum_norm": "square_sum_norm",
    "fused_gelu_grn_linear": "GeluGrnLinear.apply",
    "sparse_depthwise_conv": "SparseDepthwiseConv.apply",
    "sparse_downsample_matmul": "downsample_as_matmul",
    "dense_depthwise_conv": "DenseDepthwiseConv.apply",
    "chunked_mlp": "run_mlp_in_chunks",
    "onednn_linear": "onednn_linear",
}
FCMAE_ONLY = {"sparse_depthwise_conv", "sparse_downsample_matmul"}  # paths of the sparse FCMAE encoder


@pytest.fixture
def small_mlp_chunks(monkeypatch):
    """The MLP in chunks from any size on, two samples a chunk at the tiny config's first stage (a test setting:
    the measured thresholds only reach 224 px batches)."""
    monkeypatch.setattr(fast, "MLP_CHUNK_FROM", 0)
    monkeypatch.setattr(fast, "MLP_CHUNK_ELEMENTS", 2 * 24 * 16 * 32)


@pytest.mark.parametrize("name", FAST_PATH_NAMES)
def test_each_fast_path_alone_gives_the_reference_outputs_and_gradients(name, device, count_calls, small_mlp_chunks):
    # classifier (inference: fold, in-place GELU, norm; training: fused function, norm) and the sparse FCMAE
    # (training: sparse depthwise conv; training and inference: the downsampling matmul), each with only `name`
    # switched on, against fast_paths=False
    if name == "onednn_linear" and not onednn_runs_here(device):
        pytest.skip("oneDNN's linear runs on CPU only, with torch built with oneDNN")
    torch.manual_seed(0)
    reference_config, fast_config = tiny_config(fast_paths=False), tiny_config(fast_paths=[name])
    model_class = ConvNextV2ForMaskedImageModeling if name in FCMAE_ONLY else None
    if model_class is None:
        reference = randomize_(ConvNextV2ForImageClassification(reference_config)).to(device)
        model = ConvNextV2ForImageClassification(fast_config).to(device)
        labels = torch.tensor([0, 2, 4], device=device)
        inputs = {"pixel_values": torch.randn(3, 3, 96, 64, device=device), "labels": labels}
    else:
        reference = randomize_(ConvNextV2ForMaskedImageModeling(reference_config)).to(device)
        model = ConvNextV2ForMaskedImageModeling(fast_config).to(device)
        inputs = {"pixel_values": torch.randn(3, 3, 96, 64, device=device), "noise": torch.rand(3, 6, device=device)}
    model.load_state_dict(reference.state_dict())
    for mode in ("eval", "train"):
        reference.train(mode == "train"), model.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            expected, got = reference(**inputs), model(**inputs)
        assert max_diff(got.logits, expected.logits) <= 1e-5 * max(1.0, expected.logits.abs().max().item()), mode
        if mode == "train":
            expected.loss.backward(), got.loss.backward()
            assert_same_parameter_grads(model, reference)
    assert count_calls.get(EVIDENCE[name], 0) > 0, f"{name} never ran: {count_calls}"
    for other, evidence in EVIDENCE.items():
        if other != name and evidence != EVIDENCE[name]:
            assert count_calls.get(evidence, 0) == 0, f"{other} ran though only {name} was on"


def onednn_runs_here(device) -> bool:
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def assert_same_parameter_grads(model, reference, tolerance: float = 1e-5):
    """Every parameter gradient of ``model`` equals ``reference``'s to ``tolerance`` of the largest (or both None)."""
    expected_grads = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        want = expected_grads[name].grad
        if want is None:
            assert parameter.grad is None, name
            continue
        assert max_diff(parameter.grad, want) <= tolerance * max(1.0, want.abs().max().item()), name


def _dense_fcmae_pair(fast_paths: list[str], device):
    """(reference with fast_paths=False, model with ``fast_paths``) of the dense FCMAE recipe, the same perturbed
    weights, and an input batch with its noise."""
    torch.manual_seed(0)
    reference = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config(fast_paths=False, fcmae_impl="dense")))
    model = ConvNextV2ForMaskedImageModeling(tiny_config(fast_paths=fast_paths, fcmae_impl="dense"))
    model.load_state_dict(reference.state_dict())
    inputs = {"pixel_values": torch.randn(3, 3, 96, 64, device=device), "noise": torch.rand(3, 6, device=device)}
    return reference.to(device), model.to(device), inputs


@pytest.mark.parametrize(
    "batch, channels, height, width, kernel",
    [(3, 6, 9, 13, 7), (2, 8, 56, 56, 7), (1, 4, 7, 7, 7), (2, 5, 3, 3, 7), (2, 3, 11, 8, 5), (0, 5, 7, 7, 7)],
    ids=["non-square", "stage-1 side", "map as large as the kernel", "map smaller than the kernel", "5x5", "empty"],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_depthwise_weight_grad_is_the_conv_backwards_in_fp64(device, batch, channels, height, width, kernel, layout):
    # the depthwise conv's weight gradient as a forward conv of each sample's input with that sample's gradient as
    # the kernel (all samples as one conv where a map is no larger than the kernel): the same sums as aten's conv
    # backward, to fp64 rounding, in either memory layout; an empty batch is a zero gradient
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels).double().to(device)
    form = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    shape = (batch, channels, height, width)
    inputs = torch.randn(shape, dtype=torch.float64, device=device).contiguous(memory_format=form)
    grad = torch.randn(shape, dtype=torch.float64, device=device).contiguous(memory_format=form)
    got = fast.depthwise_weight_grad(grad, inputs, conv)
    assert got.shape == conv.weight.shape and got.dtype == torch.float64
    if batch == 0:
        assert torch.equal(got, torch.zeros_like(conv.weight))
        return
    output = torch.nn.functional.conv2d(inputs, conv.weight, None, 1, conv.padding, 1, channels)
    (expected,) = torch.autograd.grad(output, conv.weight, grad)
    assert max_diff(got, expected) < 1e-10 * max(expected.abs().max().item(), 1.0)


def test_the_dense_fcmae_recipe_runs_the_dense_depthwise_conv_with_the_reference_gradients(device, count_calls):
    # the paper's masked dense recipe zeroes masked positions around every depthwise conv: the path runs on the
    # masked map, and the loss and every gradient match fast_paths=False (fp32, 1e-5 of the largest)
    reference, model, inputs = _dense_fcmae_pair(["dense_depthwise_conv"], device)
    reference.train(), model.train()
    expected, got = reference(**inputs), model(**inputs)
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5 * max(1.0, abs(expected.loss.item()))
    expected.loss.backward(), got.loss.backward()
    config = tiny_config()  # every encoder block and the decoder's block
    assert count_calls.get("DenseDepthwiseConv.apply", 0) == sum(config.depths) + config.decoder_depth
    assert_same_parameter_grads(model, reference)


def test_the_mlp_in_chunks_keeps_each_samples_visible_positions(device, count_calls, small_mlp_chunks):
    # the dense FCMAE recipe at inference: GRN's statistics over each sample's visible positions, chunk by chunk;
    # the reconstruction (logits) and the loss match fast_paths=False (fp32, 1e-5 of the largest)
    reference, model, inputs = _dense_fcmae_pair(["chunked_mlp"], device)
    reference.eval(), model.eval()
    with torch.no_grad():
        expected, got = reference(**inputs), model(**inputs)
    assert count_calls.get("run_mlp_in_chunks", 0) > 0
    assert max_diff(got.logits, expected.logits) <= 1e-5 * max(1.0, expected.logits.abs().max().item())
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5 * max(1.0, abs(expected.loss.item()))


def test_fast_paths_false_runs_none_and_true_runs_the_device_defaults(device, count_calls):
    model = ConvNextV2ForImageClassification(tiny_config(fast_paths=False)).to(device).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64, device=device))
    assert count_calls == {}
    model.config.fast_paths = True  # read at run time: the switch works on a built model
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64, device=device))
    ran = {name for name, evidence in EVIDENCE.items() if count_calls.get(evidence)}
    # training paths, and the MLP in chunks, which only large maps take
    not_in_classifier_inference = {"fused_gelu_grn_linear", "dense_depthwise_conv", "chunked_mlp"} | FCMAE_ONLY
    expected = set(fast.DEVICE_DEFAULTS.get((device.type, torch.float32), frozenset())) - not_in_classifier_inference
    if "onednn_linear" in expected and onednn_runs_here(device):
        expected.discard("inplace_gelu")  # GELU is then a post-op of pwconv1's matmul: there is no GELU to run in place
    else:
        expected.discard("onednn_linear")
    assert ran == expected


@pytest.mark.parametrize("how", ["weights", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_paths_true_follows_the_compute_dtype(dtype, how, monkeypatch, count_calls):
    # the defaults are chosen per (device, compute dtype), autocast counting as its dtype: with a table that allows
    # only the square-sum norm for `dtype`, `True` runs exactly that one in `dtype` (weights in `dtype` or fp32 under
    # autocast), and all of them in fp32. The table is patched here (a test table, not the measured one): it is the
    # switch under test; the counters prove which functions ran.
    # (oneDNN's linear is left out of the fp32 row: it would fuse GELU away, and in-place GELU is one of the counters)
    every = frozenset(FAST_PATH_NAMES) - {"onednn_linear"}
    table = {("cpu", torch.float32): every, ("cpu", dtype): frozenset({"square_sum_norm"})}
    monkeypatch.setattr(fast, "DEVICE_DEFAULTS", table)
    torch.manual_seed(0)
    model = randomize_(ConvNextV2ForImageClassification(tiny_config(fast_paths=True))).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(pixels)
        assert {"grn_into_linear", "gelu_", "square_sum_norm"} <= set(count_calls), count_calls  # fp32: every path
        count_calls.clear()
        if how == "weights":
            model.to(dtype)(pixels.to(dtype))
        else:
            with torch.autocast("cpu", dtype=dtype):
                model(pixels)
    assert count_calls.get("square_sum_norm", 0) > 0 and "grn_into_linear" not in count_calls, count_calls
    assert "gelu_" not in count_calls, count_calls
    with torch.autocast("cpu", dtype=dtype):
        assert fast.compute_dtype(pixels) == dtype and fast.default_fast_paths(pixels) == {"square_sum_norm"}
    assert fast.compute_dtype(pixels) == torch.float32
    assert fast.default_fast_paths(pixels.double()) == frozenset()  # a dtype not in the table: the reference
    # training in `dtype`: the fused function is not in the row, so it does not run; in fp32 it does
    model.train().to(torch.float32)
    count_calls.clear()
    with torch.autocast("cpu", dtype=dtype):
        model(pixels, labels=torch.tensor([0, 1])).loss.backward()
    assert "GeluGrnLinear.apply" not in count_calls and count_calls.get("square_sum_norm", 0) > 0, count_calls
    model(pixels, labels=torch.tensor([0, 1])).loss.backward()
    assert count_calls.get("GeluGrnLinear.apply", 0) > 0


def test_the_measured_table_has_a_row_per_device_and_dtype():
    # CPU fp32 keeps every path but the GRN fold, which oneDNN's plain linear outruns there (measured); CUDA stays off
    # in every dtype until `make gpu-check` measures it
    assert fast.DEVICE_DEFAULTS[("cpu", torch.float32)] == frozenset(FAST_PATH_NAMES) - {"grn_fold"}
    # CPU bf16 keeps every path but the MLP in chunks: the ablation on a native-bf16 CPU (AVX512-BF16) showed none
    # slower, and the chunks no faster (BENCHMARKS.md)
    assert fast.DEVICE_DEFAULTS[("cpu", torch.bfloat16)] == frozenset(FAST_PATH_NAMES) - {"chunked_mlp"}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert ("cpu", dtype) in fast.DEVICE_DEFAULTS
        assert fast.DEVICE_DEFAULTS[("cuda", dtype)] == frozenset()
    assert all(paths <= set(FAST_PATH_NAMES) for paths in fast.DEVICE_DEFAULTS.values())


def test_fast_path_allowed_says_no_while_tracing_compiling_exporting_and_under_functorch():
    x = torch.randn(2, 3)
    linear = torch.nn.Linear(3, 3)
    assert fast.fast_path_allowed("inplace_gelu", True, x, linear)
    assert fast.fast_path_allowed("inplace_gelu", ["inplace_gelu"], x.to("meta"), linear)  # a list: on any device
    assert not fast.fast_path_allowed("inplace_gelu", True, x.to("meta"), linear)  # no defaults for an unknown device
    assert not fast.fast_path_allowed("inplace_gelu", False, x, linear)
    assert not fast.fast_path_allowed("inplace_gelu", ["square_sum_norm"], x, linear)
    seen = {}

    def probe(tensor):
        seen[len(seen)] = fast.fast_path_allowed("square_sum_norm", True, tensor)
        return tensor * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated, and still in use
        torch.jit.trace(probe, (x,), check_trace=False)
    torch.func.vmap(probe)(x)
    torch.func.grad(lambda t: probe(t).sum())(x)
    torch.compile(probe, backend="eager", fullgraph=True)(x)
    torch.export.export(_Probe(probe), (x,))
    assert list(seen.values()) == [False] * 5
    with pytest.raises(ValueError, match="unknown fast path 'nope'"):
        fast.fast_path_allowed("nope", True, x)


class _Probe(torch.nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


def test_a_wrapped_or_hooked_layer_is_never_bypassed():
    x = torch.randn(2, 3)

    class LinearWithAdapter(torch.nn.Linear):
        pass

    hooked = torch.nn.Linear(3, 3)
    hooked.register_forward_hook(lambda module, args, output: None)
    pre_hooked_grn = ConvNextV2GRN(3)
    pre_hooked_grn.register_forward_pre_hook(lambda module, args: None)
    assert fast.fast_path_allowed("grn_fold", ["grn_fold"], x, ConvNextV2GRN(3), torch.nn.Linear(3, 3))
    assert not fast.fast_path_allowed("grn_fold", ["grn_fold"], x, LinearWithAdapter(3, 3))
    assert not fast.fast_path_allowed("grn_fold", ["grn_fold"], x, hooked)
    assert not fast.fast_path_allowed("grn_fold", ["grn_fold"], x, pre_hooked_grn, torch.nn.Linear(3, 3))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        assert not fast.fast_path_allowed("grn_fold", ["grn_fold"], x, torch.nn.Linear(3, 3))
    finally:
        handle.remove()


def test_onednn_linear_calls_a_hooked_linear_as_its_module(device, count_calls):
    # a forward hook on every block's pwconv1 and pwconv2 (as a PEFT adapter or a feature probe would add): the hooks
    # see every call, oneDNN's linear runs none of them, and the logits equal fast_paths=False (fp32, 1e-5)
    if not onednn_runs_here(device):
        pytest.skip("oneDNN's linear runs on CPU only, with torch built with oneDNN")
    torch.manual_seed(0)
    reference = randomize_(ConvNextV2ForImageClassification(tiny_config(fast_paths=False))).to(device).eval()
    model = ConvNextV2ForImageClassification(tiny_config(fast_paths=["onednn_linear"])).to(device).eval()
    model.load_state_dict(reference.state_dict())
    pixels = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        expected = reference(pixels).logits
        unhooked = model(pixels).logits
        assert count_calls.pop("onednn_linear", 0) > 0  # unhooked, the path runs
        seen = []
        linears = [m for name, m in model.named_modules() if name.endswith(("pwconv1", "pwconv2"))]
        for linear in linears:
            linear.register_forward_hook(lambda module, args, output: seen.append(module))
        got = model(pixels).logits
    assert "onednn_linear" not in count_calls and len(seen) == len(linears)
    assert max_diff(got, expected) <= 1e-5 * max(1.0, expected.abs().max().item())
    assert max_diff(unhooked, expected) <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    ("shape", "out_features"),
    [((3, 6, 6, 16), 4), ((2, 10, 16), 4)],
    ids=["map", "gathered"],
)
def test_grn_into_linear_equals_grn_then_linear_with_gradients(shape, out_features, masked, device):
    torch.manual_seed(0)
    grn = randomize_(ConvNextV2GRN(shape[-1]), scale=0.5).to(device)
    linear = torch.nn.Linear(shape[-1], out_features).to(device)
    visible = (torch.rand(*shape[:-1], 1, device=device) > 0.4).float() if masked else None
    features = torch.randn(shape, device=device, requires_grad=True)
    parameters = [features, grn.weight, grn.bias, linear.weight]
    expected = linear(grn(features, visible))
    expected_grads = torch.autograd.grad(expected.square().sum(), parameters)
    assert fast.folds(features, linear)
    got = fast.grn_into_linear(grn, features, linear, visible, grn.norm(features, visible))
    grads = torch.autograd.grad(got.square().sum(), parameters)
    assert got.shape == expected.shape and max_diff(got, expected) <= 1e-5
    for got_grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert max_diff(got_grad, expected_grad) <= 1e-4 * max(1.0, expected_grad.abs().max().item())


@pytest.mark.parametrize("path", ["reference", "square_sum", "fold", "fused"])
def test_grn_gradients_are_finite_with_an_all_zero_channel(path, device):
    # a channel that is zero at every position of a sample (dead unit, fp16 GELU outputs flushed to zero): the norm's
    # gradient there is 0 by torch's definition; a plain sqrt's is inf, and inf * 0 would make every gradient NaN
    torch.manual_seed(0)
    grn = randomize_(ConvNextV2GRN(8), scale=0.5).to(device)
    linear = torch.nn.Linear(8, 4).to(device)
    h = torch.randn(2, 6, 6, 8, device=device)
    h[0, ..., 3] = -20.0  # GELU(-20) == 0 in fp32: a dead channel after the activation
    h.requires_grad_(True)
    reference = builtin.modeling_convnextv2.ConvNextV2GRN(8).to(device)
    reference.load_state_dict(grn.state_dict())
    gelu = torch.nn.functional.gelu
    expected_grads = torch.autograd.grad(linear(reference(gelu(h))).square().sum(), [h, reference.weight])
    if path == "reference":
        got = linear(grn(gelu(h)))
    elif path == "square_sum":
        activated = gelu(h)
        got = linear(grn(activated, norm=fast.square_sum_norm(activated.flatten(1, 2))))
    elif path == "fold":
        activated = gelu(h)
        got = fast.grn_into_linear(grn, activated, linear, None, fast.square_sum_norm(activated.flatten(1, 2)))
    else:
        parameters = (grn.weight, grn.bias, linear.weight, linear.bias)
        got = fast.GeluGrnLinear.apply(h, *parameters, grn, linear, None, True, True)
    grads = torch.autograd.grad(got.square().sum(), [h, grn.weight])
    for got_grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert torch.isfinite(got_grad).all()
        assert max_diff(got_grad, expected_grad) <= 1e-4 * expected_grad.abs().max().item()


@pytest.mark.parametrize("frozen", [(), ("linear.weight",), ("grn.weight", "grn.bias", "linear.bias")])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("fold", "square_sum"), [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("shape", [(3, 6, 6, 16), (2, 10, 16)], ids=["map", "rows"])
def test_gelu_grn_linear_function_equals_autograd_through_the_modules_in_fp64(
    shape, fold, square_sum, masked, frozen, device
):
    # the training function keeps only h and writes GRN's backward out by hand: fp64 makes any slip visible
    torch.manual_seed(0)
    modules = (
        torch.nn.ModuleDict(
            {"grn": randomize_(ConvNextV2GRN(shape[-1]), scale=0.5), "linear": torch.nn.Linear(shape[-1], 4)}
        )
        .double()
        .to(device)
    )
    for name in frozen:
        modules.get_parameter(name).requires_grad_(False)
    grn, linear = modules["grn"], modules["linear"]
    visible = (torch.rand(*shape[:-1], 1, device=device) > 0.4).double() if masked else None
    h = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    inputs = [h] + [parameter for parameter in modules.parameters() if parameter.requires_grad]
    expected = linear(grn(torch.nn.functional.gelu(h), visible))
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    got = fast.GeluGrnLinear.apply(
        h, grn.weight, grn.bias, linear.weight, linear.bias, grn, linear, visible, fold, square_sum
    )
    grads = torch.autograd.grad(got.square().sum(), inputs)
    assert max_diff(got, expected) <= 1e-12
    for got_grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert (got_grad - expected_grad).abs().max().item() <= 1e-12 * max(1.0, expected_grad.abs().max().item())


class _ActivationAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the distinct storages of ``numel`` elements that ops create (views and in-place or ``out=`` results
    share a storage that already exists). Every result is kept alive, so no freed storage is handed out again and
    counted twice."""

    def __init__(self, numel: int, existing):
        super().__init__()
        self.numel, self.seen, self.kept = numel, {t.untyped_storage().data_ptr() for t in existing}, []
        self.created = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() == self.numel:
                pointer = tensor.untyped_storage().data_ptr()
                if pointer not in self.seen:
                    self.seen.add(pointer)
                    self.created += 1
                self.kept.append(tensor)
        return result


@pytest.mark.parametrize("fold", [False, True])
def test_gelu_grn_linear_function_allocates_two_activations_in_its_backward(fold):
    # pwconv1's output of (4, 32, 32, 1024): 16 MB in fp32, page-faulted in afresh each time a tensor of that size is
    # allocated. The forward allocates one (GELU's output; GRN's is written over it), the backward two (GELU's
    # recomputed output and the gradient of GRN's output; every later step overwrites one of them). Out of place
    # they were one and six. One sample per chunk, so the norm's scratch is a quarter of that size.
    torch.manual_seed(0)
    grn, linear = randomize_(ConvNextV2GRN(1024), scale=0.5), torch.nn.Linear(1024, 64)
    h = torch.randn(4, 32, 32, 1024, requires_grad=True)
    parameters = (grn.weight, grn.bias, linear.weight, linear.bias)
    with _ActivationAllocations(h.numel(), [h]) as forward:
        output = fast.GeluGrnLinear.apply(h, *parameters, grn, linear, None, fold, True)
    grad_output = torch.randn_like(output)
    with _ActivationAllocations(h.numel(), [h]) as backward:
        grads = torch.autograd.grad(output, [h, *parameters], grad_output)
    assert forward.created == 1
    assert backward.created == 2
    expected = linear(grn(torch.nn.functional.gelu(h)))
    expected_grads = torch.autograd.grad(expected, [h, *parameters], grad_output)
    for got, want in zip(grads, expected_grads, strict=True):
        assert max_diff(got, want) <= 1e-4 * want.abs().max().item()


def test_square_sum_norm_in_chunks_equals_the_norm():
    # 2M values per sample: at inference it squares 2 samples at a time, so 5 samples take 3 chunks
    positions = torch.randn(5, 2048, 1024)
    expected = torch.linalg.vector_norm(positions.double(), dim=1)
    got = fast.square_sum_norm(positions)
    assert got.dtype == torch.float32 and got.shape == (5, 1024)
    assert ((got.double() - expected).abs() / expected).max().item() < 1e-6
    half = fast.square_sum_norm(torch.full((3, 64, 8), 1.0e4, dtype=torch.float16))  # 8e4 overflows fp16
    assert half.dtype == torch.float32 and torch.allclose(half, torch.full((3, 8), 8.0e4))
    assert fast.square_sum_norm(torch.randn(0, 4, 8)).shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grn_fold_in_half_precision_is_close_to_fp32(dtype, device):
    # the folded weight is scaled in fp32 and cast once; the unfolded GRN rounds its output instead
    torch.manual_seed(0)
    model = randomize_(ConvNextV2ForImageClassification(tiny_config(fast_paths=["grn_fold"]))).to(device).eval()
    pixels = torch.randn(2, 3, 128, 128, device=device)
    with torch.no_grad():
        expected = model(pixels).logits
        model.to(dtype)
        folded = model(pixels.to(dtype)).logits.float()
        model.config.fast_paths = False
        plain = model(pixels.to(dtype)).logits.float()
    scale = expected.abs().max().item()
    assert torch.isfinite(folded).all()
    assert max_diff(folded, expected) / scale < 3e-2
    assert max_diff(folded, expected) <= 2 * max_diff(plain, expected) + 1e-2 * scale


def test_a_block_reads_as_the_reference_and_the_masks_share_one_interface():
    import inspect

    from convnextv2_hf import modeling_convnextv2 as modeling

    forward = inspect.getsource(modeling.ConvNextV2Layer.forward)
    assert "self.pwconv2(self.grn(self.act(features), visible))" in forward
    assert "self.pwconv1(self.layernorm(features))" in forward
    source = inspect.getsource(modeling)
    assert "is_sparse" not in source and "autograd.Function" not in source  # the fast paths live elsewhere
    masks = modeling.build_stage_masks(torch.rand(2, 4) > 0.5, (2, 2), tiny_config(fcmae_impl="dense"))
    masks += modeling.build_stage_masks(torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]]).bool(), (2, 2), tiny_config())
    assert {type(mask).__name__ for mask in masks} == {"DenseStageMask", "SparseStageMask"}
    assert all(isinstance(mask, modeling.StageMask) for mask in masks)


def _penalty_gradients(model, inputs, create_graph: bool):
    """First-order gradients of the loss (input and parameters; with a graph when ``create_graph``) and, with a
    graph, the gradients of a gradient penalty: loss + the squared norm of those first-order gradients."""
    pixels = inputs["pixel_values"].clone().requires_grad_(True)
    targets = [pixels] + [parameter for parameter in model.parameters() if parameter.requires_grad]
    loss = model(**dict(inputs, pixel_values=pixels)).loss
    first = torch.autograd.grad(loss, targets, create_graph=create_graph, allow_unused=True)
    if not create_graph:
        return first, None
    penalty = loss + sum(grad.square().sum() for grad in first if grad is not None)
    return first, torch.autograd.grad(penalty, targets, allow_unused=True)


def _assert_same_gradients(got, expected, tolerance: float, what: str):
    assert len(got) == len(expected)
    for index, (got_grad, want) in enumerate(zip(got, expected, strict=True)):
        assert (got_grad is None) == (want is None), f"{what} {index}"
        if want is not None:
            scale = max(1.0, want.abs().max().item())
            assert max_diff(got_grad, want) <= tolerance * scale, f"{what} {index}: {max_diff(got_grad, want):.2e}"


@pytest.mark.parametrize("architecture", ["classifier", "sparse_fcmae"])
def test_gradients_of_gradients_equal_the_reference_with_the_training_paths_on(architecture, device, count_calls):
    # a gradient penalty (autograd.grad(..., create_graph=True), then a second backward) with the training paths on:
    # their hand-written backwards step aside for a differentiable recomputation. fp64, against fast_paths=False:
    # first-order and second-order gradients agree to 1e-10 (relative to the largest). Every path is named, as
    # `True` runs the measured per-dtype defaults and fp64 has none.
    torch.manual_seed(0)
    model_class = ConvNextV2ForImageClassification if architecture == "classifier" else ConvNextV2ForMaskedImageModeling
    reference = randomize_(model_class(tiny_config(fast_paths=False))).double().to(device).train()
    model = model_class(tiny_config(fast_paths=list(FAST_PATH_NAMES))).double().to(device).train()
    model.load_state_dict(reference.state_dict())
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64, dtype=torch.float64, device=device)}
    if architecture == "classifier":
        inputs["labels"] = torch.tensor([1, 3], device=device)
    else:
        inputs["noise"] = torch.rand(2, 4, dtype=torch.float64, device=device)
    expected_first, expected_second = _penalty_gradients(reference, inputs, create_graph=True)
    assert count_calls == {}
    got_first, got_second = _penalty_gradients(model, inputs, create_graph=True)
    assert count_calls.get("GeluGrnLinear.apply", 0) > 0
    depthwise = "SparseDepthwiseConv.apply" if architecture == "sparse_fcmae" else "DenseDepthwiseConv.apply"
    assert count_calls.get(depthwise, 0) > 0
    assert count_calls.get("differentiable_backward", 0) > 0  # the graph of the backward came from the recomputation
    _assert_same_gradients(got_first, expected_first, 1e-10, "first-order gradient")
    _assert_same_gradients(got_second, expected_second, 1e-10, "gradient-penalty gradient")
    assert any(grad is not None and grad.abs().max() > 0 for grad in expected_second)
    # without a graph of the backward the hand-written backwards run, as before (same numbers)
    count_calls.clear()
    got_plain, _ = _penalty_gradients(model, inputs, create_graph=False)
    assert count_calls.get("GeluGrnLinear.apply", 0) > 0 and count_calls.get("differentiable_backward", 0) == 0
    _assert_same_gradients(got_plain, expected_first, 1e-10, "first-order gradient without a graph")


def test_a_gradient_penalty_runs_with_the_default_fast_paths_in_fp32(device, count_calls):
    # the case: fp32, fast_paths=True (the device's defaults), autograd.grad(create_graph=True) then backward
    torch.manual_seed(0)
    reference = randomize_(ConvNextV2ForImageClassification(tiny_config(fast_paths=False))).to(device).train()
    model = ConvNextV2ForImageClassification(tiny_config(fast_paths=True)).to(device).train()
    model.load_state_dict(reference.state_dict())
    inputs = {"pixel_values": torch.randn(2, 3, 64, 64, device=device), "labels": torch.tensor([0, 4], device=device)}
    expected_first, expected_second = _penalty_gradients(reference, inputs, create_graph=True)
    got_first, got_second = _penalty_gradients(model, inputs, create_graph=True)
    if "fused_gelu_grn_linear" in fast.default_fast_paths(inputs["pixel_values"]):
        assert count_calls.get("differentiable_backward", 0) > 0
    _assert_same_gradients(got_first, expected_first, 1e-4, "first-order gradient")
    _assert_same_gradients(got_second, expected_second, 1e-4, "gradient-penalty gradient")
