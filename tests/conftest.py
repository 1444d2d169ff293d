import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from convnextv2_hf import ConvNextV2Config  # noqa: E402


def tiny_config(**overrides) -> ConvNextV2Config:
    """A 4-stage config small enough for CPU tests but with every structural feature (depth > 1 per stage)."""
    fields = dict(depths=[2, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], decoder_hidden_size=16, num_labels=5)
    fields.update(overrides)
    return ConvNextV2Config(**fields)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter (GRN and LayerNorm included, which start at constants) so parity tests exercise them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


@pytest.fixture
def config() -> ConvNextV2Config:
    return tiny_config()


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default=os.environ.get("CONVNEXTV2_TEST_DEVICE", "cpu"),
        help="device for the tests marked `device` (the fast paths, parity, precision): cpu (default) or cuda[:N]",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs on the device given by --device (cpu by default)")
    config.addinivalue_line(
        "markers", "slow: compiles, exports, starts processes or runs whole scripts; `make test-fast` leaves it out"
    )
    value = config.getoption("--device")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise pytest.UsageError(f"--device {value!r} is not a device; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device {value!r}: the device tests run on cpu or cuda[:N]")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of `--device` / CONVNEXTV2_TEST_DEVICE. On CUDA, TF32 is off so fp32 parity holds to 1e-5."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            pytest.exit(f"--device {device} asked for, but torch sees no CUDA device", returncode=4)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def free_port() -> str:
    """A free TCP port on 127.0.0.1 for torchrun's --master_port: the default 29500 collides when two multi-process
    tests run at once (two test sessions, or a run beside another job)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])
