"""Pytest hooks (--device, the markers) and fixtures; the helpers several test files use are in helpers.py."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import tiny_config  # noqa: E402

from convnextv2_hf import ConvNextV2Config  # noqa: E402


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
