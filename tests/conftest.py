import os

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
