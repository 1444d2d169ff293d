"""ConvNeXt V2 configuration with the FCMAE (masked image modeling) fields.

This file travels to the Hub as remote code: it imports only ``transformers`` and the standard library.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import ConvNextV2Config as _BuiltinConvNextV2Config

# depths and widths of the eight official sizes (paper, Table 1 / official README)
PRESETS: dict[str, dict[str, list[int]]] = {
    "atto": {"depths": [2, 2, 6, 2], "hidden_sizes": [40, 80, 160, 320]},
    "femto": {"depths": [2, 2, 6, 2], "hidden_sizes": [48, 96, 192, 384]},
    "pico": {"depths": [2, 2, 6, 2], "hidden_sizes": [64, 128, 256, 512]},
    "nano": {"depths": [2, 2, 8, 2], "hidden_sizes": [80, 160, 320, 640]},
    "tiny": {"depths": [3, 3, 9, 3], "hidden_sizes": [96, 192, 384, 768]},
    "base": {"depths": [3, 3, 27, 3], "hidden_sizes": [128, 256, 512, 1024]},
    "large": {"depths": [3, 3, 27, 3], "hidden_sizes": [192, 384, 768, 1536]},
    "huge": {"depths": [3, 3, 27, 3], "hidden_sizes": [352, 704, 1408, 2816]},
}

FCMAE_IMPLEMENTATIONS = ("sparse", "dense")

# The fast paths of ``fast_paths_convnextv2.py``, by name. Each computes the same numbers as the reference math in
# ``modeling_convnextv2.py`` (tests pin each one to it).
FAST_PATH_NAMES = (
    "grn_fold",  # GRN's scale and shift folded into the next linear's weight and bias (inference)
    "inplace_gelu",  # GELU written over its input when no autograd graph needs it (inference)
    "square_sum_norm",  # GRN's L2 norm as a chunked square-and-sum on CPU (eager)
    "fused_gelu_grn_linear",  # GELU, GRN and pwconv2 as one autograd function keeping only pwconv1's output
    "sparse_depthwise_conv",  # sparse FCMAE depthwise conv keeping the gathered input for its backward
)


@strict
class ConvNextV2Config(_BuiltinConvNextV2Config):
    r"""Configuration of every ConvNeXt V2 model in this package.

    A drop-in subclass of transformers' ``ConvNextV2Config``: same class name and ``model_type`` (the Auto
    classes match configs by class name), so checkpoints saved by either load with either. The defaults build
    ConvNeXt V2-Tiny, as in [facebook/convnextv2-tiny-1k-224](https://huggingface.co/facebook/convnextv2-tiny-1k-224)
    (transformers reads its docstring examples' checkpoint from this line). It adds:

    layer_norm_eps (`float`, defaults to 1e-6):
        Epsilon of the final LayerNorm. The official models use 1e-6; transformers' default is 1e-12.
        Configs loaded from a file keep whatever value the file holds.
    mask_ratio (`float`, defaults to 0.6):
        Fraction of ``mask_patch_size`` patches removed per image during FCMAE pretraining, in [0, 1).
    mask_patch_size (`int`, defaults to 32):
        Side of a masked patch in pixels; a positive multiple of the total stride (32 for the official layout).
    decoder_hidden_size (`int`, defaults to 512):
        Width of the FCMAE decoder.
    decoder_depth (`int`, defaults to 1):
        Number of ConvNeXt V2 blocks in the FCMAE decoder.
    norm_pix_loss (`bool`, defaults to True):
        Normalise each target patch by its own mean and standard deviation before the MSE.
    fcmae_impl (`str`, defaults to "sparse"):
        How the masked encoder runs. ``"sparse"``: the pointwise part of every block runs only on the
        visible positions, gathered per sample (fast, the default). ``"dense"``: the paper's masked dense
        recipe, kept as the numerical reference. Both give the same result.
    fast_paths (`bool` or `list[str]`, defaults to True):
        Which of the speed-ups in ``fast_paths_convnextv2.py`` may run. ``True``: those chosen for the input's
        device (see ``DEVICE_DEFAULTS`` there); ``False``: none, the reference math everywhere; a list of names
        from ``FAST_PATH_NAMES``: exactly those, on any device. Whatever the setting, no fast path runs while
        tracing, exporting, compiling, under torch.func transforms, or on a wrapped or hooked layer. The numbers
        are the same either way.
    """

    model_type = "convnextv2"

    layer_norm_eps: float = 1e-6
    mask_ratio: float | int = 0.6
    mask_patch_size: int = 32
    decoder_hidden_size: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = True
    fcmae_impl: str = "sparse"
    fast_paths: bool | list[str] = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_values()

    @property
    def total_stride(self) -> int:
        """Ratio between the input size and the last stage's resolution (32 for the official layout)."""
        patch = self.patch_size if isinstance(self.patch_size, int) else self.patch_size[0]
        return patch * 2 ** (self.num_stages - 1)

    def _check_values(self) -> None:
        for name in ("mask_ratio", "mask_patch_size", "decoder_hidden_size", "decoder_depth", "num_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {name}={value!r}")
        depths, widths = list(self.depths), list(self.hidden_sizes)
        if len(depths) != len(widths):
            raise ValueError(
                f"depths and hidden_sizes must have the same length, got depths={depths} ({len(depths)} stages) "
                f"and hidden_sizes={widths} ({len(widths)} stages)"
            )
        if self.num_stages != len(depths):
            raise ValueError(
                f"num_stages={self.num_stages} does not match the {len(depths)} stages given by depths={depths}; "
                f"pass num_stages={len(depths)}"
            )
        for name, values in (("depths", depths), ("hidden_sizes", widths)):
            if any(v <= 0 for v in values):
                raise ValueError(f"every entry of {name} must be positive, got {name}={values}")
        for name in ("num_channels", "patch_size", "decoder_hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {name}={getattr(self, name)}")
        if self.decoder_depth < 0:
            raise ValueError(f"decoder_depth must be zero or positive, got decoder_depth={self.decoder_depth}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got mask_ratio={self.mask_ratio}")
        if self.mask_patch_size <= 0 or self.mask_patch_size % self.total_stride != 0:
            raise ValueError(
                f"mask_patch_size must be a positive multiple of the total stride {self.total_stride} "
                "(one masked patch covers whole positions of the last stage), "
                f"got mask_patch_size={self.mask_patch_size}"
            )
        if self.fcmae_impl not in FCMAE_IMPLEMENTATIONS:
            raise ValueError(f"fcmae_impl must be one of {FCMAE_IMPLEMENTATIONS}, got fcmae_impl={self.fcmae_impl!r}")
        if not isinstance(self.fast_paths, bool):
            unknown = [name for name in self.fast_paths if name not in FAST_PATH_NAMES]
            if unknown:
                raise ValueError(
                    f"fast_paths must be True, False or a list of names from {FAST_PATH_NAMES}, got unknown {unknown}"
                )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As transformers' ``from_dict``, but a config of another architecture is an error, not a warning."""
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            architectures = config_dict.get("architectures") or []
            raise ValueError(
                f"this is a checkpoint of another architecture (model_type={model_type!r}"
                f"{', architectures=' + str(architectures) if architectures else ''}); ConvNeXt V2 models need "
                f"model_type={cls.model_type!r}"
            )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ConvNextV2Config:
        """Config of one of the eight official sizes (``atto`` ... ``huge``), with any field overridden.

        >>> ConvNextV2Config.from_preset("tiny", num_labels=10, drop_path_rate=0.1).hidden_sizes
        [96, 192, 384, 768]
        """
        key = name.lower().removeprefix("convnextv2-").removeprefix("convnextv2_")
        if key not in PRESETS:
            raise ValueError(
                f"unknown ConvNeXt V2 preset {name!r}; choose one of {sorted(PRESETS, key=list(PRESETS).index)}"
            )
        preset = PRESETS[key]
        fields = {"depths": list(preset["depths"]), "hidden_sizes": list(preset["hidden_sizes"]), "num_stages": 4}
        fields.update(overrides)
        return cls(**fields)


ConvNextV2Config.register_for_auto_class()

__all__ = ["FAST_PATH_NAMES", "ConvNextV2Config", "PRESETS"]
