"""FCMAE masked image modeling: masking, the sparse and dense encoder paths, decoder, loss, transfer.

The tests marked `device` run on `--device` (cpu by default; `make gpu-check` runs them on CUDA, with TF32 off). Those
that check the fast paths run twice: with `fast_paths=True` (the device's defaults: none on CUDA until measured, see
`DEVICE_DEFAULTS`) and with every path named, so the sparse depthwise conv and the training function run anywhere.
"""

import pytest
import torch
from expected_errors import (
    MASK_AND_NOISE_BOTH_GIVEN,
    MASK_REMOVES_EVERY_PATCH,
    NOISE_NOT_FINITE,
    NOISE_SHAPE,
    WRONG_NUMBER_OF_CHANNELS,
)
from helpers import WITH_FAST_PATHS, close, max_diff, randomize_, relative_error, tiny_config

from convnextv2_hf import (
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2Model,
)
from convnextv2_hf.modeling_convnextv2 import ConvNextV2GRN, draw_mask

PATH_TOLERANCE = 1e-5


def fcmae_pair(seed: int = 0, device: torch.device | str = "cpu", **overrides):
    """A sparse and a dense model with the same (perturbed) weights, on ``device``."""
    sparse = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config(fcmae_impl="sparse", **overrides)), seed)
    dense = ConvNextV2ForMaskedImageModeling(tiny_config(fcmae_impl="dense", **overrides))
    dense.load_state_dict(sparse.state_dict(), strict=True)
    return sparse.to(device), dense.to(device)


def test_output_shapes_and_exact_keep_count_per_sample():
    model = ConvNextV2ForMaskedImageModeling(tiny_config(mask_ratio=0.6))
    out = model(torch.randn(4, 3, 160, 96), output_hidden_states=True)
    num_patches = 5 * 3
    assert out.logits.shape == (4, num_patches, 32 * 32 * 3)
    assert out.mask.shape == (4, num_patches)
    assert out.mask.sum(dim=1).tolist() == [num_patches - int(num_patches * 0.4)] * 4
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert [tuple(h.shape) for h in out.hidden_states] == [
        (4, 8, 40, 24),
        (4, 8, 40, 24),
        (4, 16, 20, 12),
        (4, 24, 10, 6),
        (4, 32, 5, 3),
    ]


def test_noise_makes_the_mask_reproducible_and_keeps_the_smallest_noise():
    model = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config())).eval()
    pixels = torch.randn(2, 3, 64, 96)
    noise = torch.rand(2, 6)
    with torch.no_grad():
        a, b = model(pixels, noise=noise), model(pixels, noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.logits, b.logits)
    kept = noise.argsort(dim=1)[:, :2]
    assert (a.mask.gather(1, kept) == 0).all() and a.mask.sum().item() == 8


def test_bool_masked_pos_is_used_as_given():
    model = ConvNextV2ForMaskedImageModeling(tiny_config())
    bool_masked_pos = torch.tensor([[True, False, True, True, False, True], [False, True, True, True, True, False]])
    out = model(torch.randn(2, 3, 64, 96), bool_masked_pos=bool_masked_pos)
    assert torch.equal(out.mask, bool_masked_pos.float())


@pytest.mark.parametrize(
    ("overrides", "image_size"),
    [
        ({}, (64, 64)),
        ({}, (96, 160)),  # non-square
        ({"mask_patch_size": 64, "mask_ratio": 0.5}, (128, 192)),  # patches of 2x2 last-stage positions
        ({"num_channels": 1, "decoder_depth": 2}, (64, 96)),
        ({"norm_pix_loss": False, "mask_ratio": 0.25}, (64, 64)),
    ],
)
@pytest.mark.device
@WITH_FAST_PATHS
def test_sparse_and_dense_paths_agree(overrides, image_size, fast_paths, device):
    sparse, dense = fcmae_pair(device=device, fast_paths=fast_paths, **overrides)
    config = sparse.config
    pixels = torch.randn(3, config.num_channels, *image_size).to(device)
    num_patches = (image_size[0] // config.mask_patch_size) * (image_size[1] // config.mask_patch_size)
    noise = torch.rand(3, num_patches).to(device)
    a = sparse(pixels, noise=noise, output_hidden_states=True)
    b = dense(pixels, noise=noise, output_hidden_states=True)
    assert torch.equal(a.mask, b.mask)
    assert close(a.logits, b.logits, PATH_TOLERANCE)
    assert abs(a.loss.item() - b.loss.item()) <= PATH_TOLERANCE * max(1.0, b.loss.item())
    for sparse_state, dense_state in zip(a.hidden_states, b.hidden_states, strict=True):
        assert close(sparse_state, dense_state, PATH_TOLERANCE)
    a.loss.backward()
    b.loss.backward()
    for (name, p_sparse), p_dense in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        if p_sparse.grad is None:
            assert p_dense.grad is None, name
            continue
        assert close(p_sparse.grad, p_dense.grad, PATH_TOLERANCE), name


@pytest.mark.device
@pytest.mark.parametrize("fcmae_impl", ["sparse", "dense"])
def test_pixels_inside_removed_patches_change_no_logit(fcmae_impl, device):
    model = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config(fcmae_impl=fcmae_impl))).eval().to(device)
    pixels = torch.randn(2, 3, 96, 96).to(device)
    bool_masked_pos = model.random_masking(2, 9, noise=torch.rand(2, 9).to(device))
    removed_pixels = bool_masked_pos.view(2, 1, 3, 1, 3, 1).expand(2, 3, 3, 32, 3, 32).reshape(2, 3, 96, 96)
    altered = torch.where(removed_pixels, pixels + 100 * torch.randn_like(pixels), pixels)
    with torch.no_grad():
        a = model(pixels, bool_masked_pos=bool_masked_pos, output_hidden_states=True)
        b = model(altered, bool_masked_pos=bool_masked_pos, output_hidden_states=True)
        c = model(altered, bool_masked_pos=bool_masked_pos.roll(1, dims=1))
    assert max_diff(a.logits, b.logits) <= 1e-6
    for state_a, state_b in zip(a.hidden_states, b.hidden_states, strict=True):
        assert max_diff(state_a, state_b) <= 1e-6
    assert a.loss.item() != b.loss.item()  # the targets did change
    assert max_diff(a.logits, c.logits) > 1e-2  # and a different mask does see other pixels


@pytest.mark.device
@pytest.mark.parametrize("fcmae_impl", ["sparse", "dense"])
def test_each_sample_is_independent_of_the_rest_of_its_batch(fcmae_impl, device):
    model = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config(fcmae_impl=fcmae_impl))).eval().to(device)
    pixels = torch.randn(4, 3, 64, 96).to(device)
    bool_masked_pos = model.random_masking(4, 6, noise=torch.rand(4, 6).to(device))
    with torch.no_grad():
        together = model(pixels, bool_masked_pos=bool_masked_pos)
        for i in range(4):
            alone = model(pixels[i : i + 1], bool_masked_pos=bool_masked_pos[i : i + 1])
            assert close(alone.logits[0], together.logits[i], 1e-5)
        other_batch = torch.cat([pixels[:1], 10 * torch.randn(3, 3, 64, 96).to(device)])
        changed = model(other_batch, bool_masked_pos=bool_masked_pos)
    assert close(changed.logits[0], together.logits[0], 1e-5)


def reference_loss(pixels, logits, mask, patch_size, norm_pix_loss):
    """FCMAE loss written independently: unfold patches, normalise, MSE per patch, mean over removed ones."""
    batch, channels = pixels.shape[:2]
    patches = torch.nn.functional.unfold(pixels, kernel_size=patch_size, stride=patch_size)  # (N, C*p*p, L)
    patches = patches.view(batch, channels, patch_size * patch_size, -1).permute(0, 3, 2, 1).flatten(2)
    if norm_pix_loss:
        mean = patches.mean(-1, keepdim=True)
        std = torch.sqrt(patches.var(-1, unbiased=True, keepdim=True) + 1e-6)
        patches = (patches - mean) / std
    per_patch = ((logits - patches) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("mask_patch_size", [32, 64])
def test_loss_equals_an_independent_computation(norm_pix_loss, mask_patch_size):
    model = randomize_(
        ConvNextV2ForMaskedImageModeling(tiny_config(norm_pix_loss=norm_pix_loss, mask_patch_size=mask_patch_size))
    )
    pixels = torch.randn(2, 3, 128, 192)
    with torch.no_grad():
        out = model(pixels)
    expected = reference_loss(pixels, out.logits, out.mask, mask_patch_size, norm_pix_loss)
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * max(1.0, expected.item())


def test_patchify_and_unpatchify_round_trip_on_non_square_images():
    model = ConvNextV2ForMaskedImageModeling(tiny_config())
    pixels = torch.randn(2, 3, 64, 160)
    patches = model.patchify(pixels)
    assert patches.shape == (2, 10, 32 * 32 * 3)
    # (row, column, channel) order inside a patch: entry 1 is channel 1 of the top-left pixel
    assert patches[0, 1, 1] == pixels[0, 1, 0, 32 + 0 * 0]
    assert torch.equal(model.unpatchify(patches, image_size=(64, 160)), pixels)
    with pytest.raises(ValueError, match="do not form a square"):
        model.unpatchify(patches)


@pytest.mark.device
def test_masked_grn_statistics_come_from_visible_positions_of_each_sample_only(device):
    grn = randomize_(ConvNextV2GRN(6)).to(device)
    features = torch.randn(2, 4, 4, 6).to(device)
    visible = (torch.rand(2, 4, 4, 1) > 0.5).float().to(device)
    masked_out = grn(features, visible)
    for i in range(2):
        positions = features[i][visible[i, ..., 0].bool()]  # (V, C)
        alone = grn(positions.unsqueeze(0))  # gathered (1, V, C)
        assert max_diff(alone[0], masked_out[i][visible[i, ..., 0].bool()]) <= 1e-6


def test_fcmae_training_lowers_the_loss():
    torch.manual_seed(0)
    model = ConvNextV2ForMaskedImageModeling(tiny_config(decoder_hidden_size=32))
    pixels = torch.randn(4, 3, 64, 64).cumsum(dim=-1) / 8  # smooth rows: learnable structure
    noise = torch.rand(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(60):
        loss = model(pixels, noise=noise).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.device
@WITH_FAST_PATHS
def test_gradient_checkpointing_on_the_sparse_path_gives_the_same_gradients(fast_paths, device):
    # the training functions run again in the recomputed forward; CUDA's conv weight gradients sum in any order
    tolerance = 1e-6 if device.type == "cpu" else 1e-5
    model = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config(fast_paths=fast_paths))).train().to(device)
    pixels, noise = torch.randn(2, 3, 64, 64).to(device), torch.rand(2, 4).to(device)
    model(pixels, noise=noise).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model(pixels, noise=noise).loss.backward()
    for name, grad in expected.items():
        assert close(dict(model.named_parameters())[name].grad, grad, tolerance), name


def test_final_norm_is_frozen_and_every_trainable_parameter_gets_a_gradient():
    model = ConvNextV2ForMaskedImageModeling(tiny_config())
    model(torch.randn(2, 3, 64, 64)).loss.backward()
    assert not model.convnextv2.layernorm.weight.requires_grad
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_fcmae_weights_load_into_encoder_and_classifier_for_fine_tuning(tmp_path):
    fcmae = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config()))
    fcmae.save_pretrained(tmp_path)
    decoder_keys = {k for k in fcmae.state_dict() if not k.startswith("convnextv2.")}
    assert len(decoder_keys) == 15  # decoder_embed (2), mask_token, one block (10), decoder_pred (2)

    encoder, info = ConvNextV2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == set() and set(info["unexpected_keys"]) == decoder_keys
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, fcmae.state_dict()["convnextv2." + name]), name

    classifier, info = ConvNextV2ForImageClassification.from_pretrained(
        tmp_path, num_labels=3, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert set(info["unexpected_keys"]) == decoder_keys
    assert torch.equal(
        classifier.convnextv2.encoder.stages[3].layers[0].grn.weight,
        fcmae.convnextv2.encoder.stages[3].layers[0].grn.weight,
    )


def test_encoder_checkpoint_loads_into_fcmae_with_a_new_decoder(tmp_path):
    encoder = randomize_(ConvNextV2Model(tiny_config()))
    encoder.save_pretrained(tmp_path)
    fcmae, info = ConvNextV2ForMaskedImageModeling.from_pretrained(tmp_path, output_loading_info=True)
    assert len(info["missing_keys"]) == 15 and all(not k.startswith("convnextv2.") for k in info["missing_keys"])
    assert torch.equal(fcmae.convnextv2.embeddings.patch_embeddings.weight, encoder.embeddings.patch_embeddings.weight)
    assert torch.isfinite(fcmae(torch.randn(1, 3, 64, 64)).loss)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m: m(torch.randn(2, 3, 64, 64), bool_masked_pos=torch.zeros(2, 5, dtype=torch.bool)),
            r"bool_masked_pos must have shape \(batch, patches\) = \(2, 4\) for 64x64 images",
        ),
        (
            lambda m: m(torch.randn(2, 3, 64, 64), noise=torch.rand(2, 9)),
            NOISE_SHAPE,
        ),
        (
            lambda m: m(torch.randn(2, 3, 64, 64), bool_masked_pos=torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])),
            "same number of removed patches in every sample.*fcmae_impl='dense'",
        ),
        (lambda m: m(torch.randn(2, 3, 64, 80)), "multiples of mask_patch_size=32, got 64x80"),
        (
            lambda m: m(torch.randn(2, 3, 64, 64), bool_masked_pos=torch.tensor([[1.0, 0.5, 0, 0], [1, 0, 0, 0]])),
            "bool or hold only 0 and 1",
        ),
        (
            lambda m: m(torch.randn(1, 3, 64, 64), bool_masked_pos=torch.ones(1, 4, dtype=torch.bool)),
            MASK_REMOVES_EVERY_PATCH,
        ),
        (lambda m: m(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)), "must be a floating-point tensor"),
        (lambda m: m(torch.randn(2, 1, 64, 64)), WRONG_NUMBER_OF_CHANNELS),
        (lambda m: m(torch.randn(2, 3, 32, 32)), r"mask_ratio=0.6 keeps no patch of the 1"),
        (
            lambda m: m(torch.randn(2, 3, 64, 64), noise=torch.tensor([[0.1, float("nan"), 0.3, 0.2], [0.1] * 4])),
            NOISE_NOT_FINITE,
        ),
        (
            lambda m: m(torch.randn(1, 3, 64, 64), noise=torch.tensor([[float("inf"), 0.5, -float("inf"), 0.2]])),
            r"noise holds 2 NaN or infinite values of 4",
        ),
        (lambda m: m.random_masking(1, 4, torch.tensor([[True, False, True, False]])), "real numbers.*torch.bool"),
        (
            lambda m: m(
                torch.randn(2, 3, 64, 64), bool_masked_pos=torch.zeros(2, 4, dtype=torch.bool), noise=torch.rand(2, 4)
            ),
            MASK_AND_NOISE_BOTH_GIVEN,
        ),
    ],
)
def test_bad_input_raises_value_error(call, message):
    model = ConvNextV2ForMaskedImageModeling(tiny_config())
    with pytest.raises(ValueError, match=message):
        call(model)


def test_the_collators_masking_rule_refuses_non_finite_noise_too():
    with pytest.raises(ValueError, match=r"noise holds 1 NaN or infinite values of 4"):
        draw_mask(torch.tensor([[0.3, 0.1, float("nan"), 0.2]]), 0.5)
    assert draw_mask(torch.tensor([[0.3, 0.1, 0.4, 0.2]]), 0.5).tolist() == [[True, False, True, False]]


def test_image_size_must_be_a_multiple_of_the_mask_patch_size():
    model = ConvNextV2ForMaskedImageModeling(tiny_config(mask_patch_size=64))
    with pytest.raises(ValueError, match="multiples of mask_patch_size=64, got 96x128"):
        model(torch.randn(1, 3, 96, 128))


def test_dense_path_accepts_different_removed_counts_per_sample():
    model = ConvNextV2ForMaskedImageModeling(tiny_config(fcmae_impl="dense"))
    bool_masked_pos = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out = model(torch.randn(2, 3, 64, 64), bool_masked_pos=bool_masked_pos)
    assert out.mask.sum().item() == 3 and torch.isfinite(out.loss)


@pytest.mark.slow
def test_torch_compile_of_the_sparse_path_matches_eager_without_graph_breaks():
    model = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config())).train()
    pixels, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 4)
    # static shapes (dynamic=False): with dynamic sizes Inductor 2.14 fails on a symbolic stride comparison in the
    # sparse backward ("cannot determine truth value of Relational"), and earlier tests may have seen other sizes
    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # a random mask needs no host sync
    got = compiled(pixels, noise=noise)
    got.loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = model(pixels, noise=noise)
    expected.loss.backward()
    assert max_diff(got.logits, expected.logits) <= 1e-5
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-6
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert max_diff(compiled_grads[name], parameter.grad) <= 1e-5, name


@pytest.mark.device
@WITH_FAST_PATHS
@pytest.mark.parametrize("fcmae_impl", ["sparse", "dense"])
def test_training_gradients_under_bf16_autocast_and_in_fp16_are_finite_and_close_to_fp32(
    fcmae_impl, fast_paths, device
):
    # the training-only autograd functions (sparse depthwise conv, GELU-GRN-linear) replay autocast's dtype in
    # their backward by hand
    torch.manual_seed(0)
    config = tiny_config(fcmae_impl=fcmae_impl, fast_paths=fast_paths)
    model = randomize_(ConvNextV2ForMaskedImageModeling(config)).train().to(device)
    pixels, noise = torch.randn(2, 3, 64, 64).to(device), torch.rand(2, 4).to(device)
    model(pixels, noise=noise).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(pixels, noise=noise).loss
    loss.backward()
    autocast_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.half()(pixels.half(), noise=noise).loss.backward()
    half_grads = {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}
    # bounds on each parameter's relative error (L2): over 20 seeds on CPU, bf16 reached 0.08 and fp16 0.07 (the same
    # with the fast paths off and in the built-in model: rounding, not a defect); the seed keeps this run's inputs fixed
    for label, grads, bound in (("bf16 autocast", autocast_grads, 0.15), ("fp16", half_grads, 0.12)):
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert torch.isfinite(grad).all(), (label, name)
            assert relative_error(grad, expected[name]) <= bound, (label, name)


@pytest.mark.device
@WITH_FAST_PATHS
@pytest.mark.parametrize("fcmae_impl", ["sparse", "dense"])
def test_half_precision_and_autocast_stay_finite_and_close_to_fp32(fcmae_impl, fast_paths, device):
    config = tiny_config(fcmae_impl=fcmae_impl, fast_paths=fast_paths)
    model = randomize_(ConvNextV2ForMaskedImageModeling(config)).eval().to(device)
    pixels, noise = torch.randn(2, 3, 64, 64).to(device), torch.rand(2, 4).to(device)
    with torch.no_grad():
        expected = model(pixels, noise=noise)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            results = {"bf16 autocast": model(pixels, noise=noise)}
        for dtype in (torch.float16, torch.bfloat16):
            results[str(dtype)] = model.to(dtype)(pixels.to(dtype), noise=noise)
            model.float()
    scale = expected.logits.abs().max().item()
    for name, got in results.items():
        assert torch.isfinite(got.logits).all() and torch.isfinite(got.loss), name
        assert max_diff(got.logits.float(), expected.logits) / scale < 5e-2, name
        assert abs(got.loss.item() - expected.loss.item()) / expected.loss.item() < 1e-2, name
