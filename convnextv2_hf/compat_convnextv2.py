"""Every private internal of transformers and torch that convnextv2_hf relies on, in one room.

The rest of the package reaches each one through a function here, never directly. ``INTERNALS`` lists them, each with
what it is used for and a check; ``internal_problems()`` runs the checks and returns one line per internal that is
missing or has changed behaviour, naming it. ``tests/test_compat.py`` fails with those lines, so an upgrade of
transformers or torch that moves one of them fails loudly in CI instead of quietly at a user's. At run time, where an
internal is gone, each function here takes the safe side: the reference math instead of a fast path, no layer taken
as unhooked, bf16 not chosen automatically.

Two of the internals are hooks transformers calls on its subclasses (``_dict_from_json_file``,
``_validate_preprocess_kwargs``): the package overrides them, so their checks verify that transformers still calls
them. This file travels to the Hub as remote code beside the modeling, configuration and image-processing files: it
imports only torch and transformers.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------
# torch
# ----------------------------------------------------------------------------------------------------------

_MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")  # on every nn.Module
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks")  # in torch.nn.modules.module
_CPU_BF16_QUERIES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # in torch.cpu


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``...) is running: the fast paths' autograd
    functions are not written for them, and reading a tensor's values (a host sync) is impossible inside one.
    torch has no public query; where its private one is gone, say yes (the reference math runs)."""
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if probe is None else bool(probe())


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` (or every module: the global hooks) has forward or forward-pre hooks, which a fast path
    that works on its weight would bypass. torch has no public query; where the private dicts are gone, say yes."""
    registry = nn.modules.module
    try:
        return any(getattr(module, name) for name in _MODULE_HOOK_DICTS) or any(
            getattr(registry, name) for name in _GLOBAL_HOOK_DICTS
        )
    except AttributeError:
        return True


def convolution_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    conv: nn.Conv2d,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad of the input, grad of the weight) of ``conv``'s convolution, without bias, in one ATen call (what
    autograd runs for ``F.conv2d``). Every argument is passed by its schema name, so a reordering of the schema
    cannot silently swap two of them: a renamed one is a ``TypeError`` (and ``internal_problems`` names it)."""
    grads = torch.ops.aten.convolution_backward(
        grad_output,
        input,
        weight,
        bias_sizes=None,
        stride=list(conv.stride),
        padding=list(conv.padding),
        dilation=list(conv.dilation),
        transposed=False,
        output_padding=[0] * len(conv.stride),
        groups=conv.groups,
        output_mask=[bool(output_mask[0]), bool(output_mask[1]), False],
    )
    return grads[0], grads[1]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AMX-BF16 tiles or AVX512-BF16). torch's queries are
    private; where both are gone, say no (bf16 is then not chosen automatically)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in _CPU_BF16_QUERIES]
    return any(bool(check()) for check in checks if check is not None)


def onednn_linear(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool
) -> torch.Tensor | None:
    """``F.linear(inputs, weight, bias)``, then exact GELU where ``gelu``, as one oneDNN matmul on CPU with the bias
    and GELU as post-ops of the product, so the output is written once (the op Inductor's CPU backend lowers a
    linear to, called eagerly). ``None`` where it cannot run: not on CPU, oneDNN absent or switched off
    (``torch.backends.mkldnn``), dtypes that differ or are not fp32 or bf16 (bf16 only on a CPU with native bf16),
    or the op gone. Inference only: the op has no backward."""
    if inputs.device.type != "cpu" or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    dtype = inputs.dtype
    if dtype not in (torch.float32, torch.bfloat16) or weight.dtype != dtype or weight.ndim != 2:
        return None
    if (bias is not None and bias.dtype != dtype) or (dtype == torch.bfloat16 and not cpu_has_native_bf16()):
        return None
    if inputs.ndim < 2 or getattr(torch.ops.mkldnn, "_linear_pointwise", None) is None:
        return None
    return _linear_pointwise(inputs, weight, bias, gelu)


def _linear_pointwise(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool):
    attribute, algorithm = ("gelu", "none") if gelu else ("none", "")  # exact (erf) GELU; no post-op
    return torch.ops.mkldnn._linear_pointwise(inputs, weight.contiguous(), bias, attribute, [], algorithm)


# ----------------------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------------------


def register_image_processor_classes(key: str, classes: dict) -> None:
    """Add an entry of ``AutoImageProcessor``'s backend mapping under ``key`` (a name, not a config class), so that
    the ``image_processor_type`` names among ``classes``' values resolve to them. transformers offers registration
    by config class only (``AutoImageProcessor.register``). Idempotent."""
    from transformers.models.auto import image_processing_auto

    image_processing_auto.IMAGE_PROCESSOR_MAPPING.register(key, classes, exist_ok=True)


def prefer_pil_backend(type_name: str) -> None:
    """Make ``AutoImageProcessor`` pick the PIL backend for a saved ``image_processor_type`` of ``type_name`` when no
    ``backend`` is asked for. Idempotent."""
    from transformers.models.auto import image_processing_auto

    if type_name not in image_processing_auto.DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS:
        image_processing_auto.DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS.append(type_name)


def replace_pipeline_class(task: str, pipeline_class: type) -> None:
    """Make ``pipeline(task)`` build ``pipeline_class`` by changing only the ``impl`` of the task's registry entry
    (``PIPELINE_REGISTRY.register_pipeline`` would also mark the class as custom code: see ``pipelines.py``)."""
    from transformers.pipelines import PIPELINE_REGISTRY

    entry = PIPELINE_REGISTRY.supported_tasks[task]
    PIPELINE_REGISTRY.supported_tasks[task] = {**entry, "impl": pipeline_class}


# ----------------------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Internal:
    name: str  # as a maintainer would search for it
    used_for: str
    check: Callable[[], str | None]  # None when it is as expected, else what changed


def _check_functorch_probe() -> str | None:
    if getattr(torch._C, "_are_functorch_transforms_active", None) is None:
        return "is gone"
    inside = torch.func.grad(lambda x: (x * float(functorch_transforms_active())).sum())(torch.ones(1))
    if functorch_transforms_active() or inside.item() != 1.0:
        return "no longer reports whether a torch.func transform runs"
    return None


def _check_hook_dicts() -> str | None:
    layer = nn.Linear(1, 1)
    registry = nn.modules.module
    if not all(hasattr(registry, name) for name in _GLOBAL_HOOK_DICTS):
        return "the global hook dicts are gone"
    if not all(hasattr(layer, name) for name in _MODULE_HOOK_DICTS):
        return "a module's hook dicts are gone"
    if has_forward_hooks(layer):
        return "a new module reports hooks"
    registrations = [
        ("a hook", layer.register_forward_hook),
        ("a hook", layer.register_forward_pre_hook),
        ("a global hook", registry.register_module_forward_hook),
        ("a global hook", registry.register_module_forward_pre_hook),
    ]
    for kind, register in registrations:
        handle = register(lambda *args: None)
        seen = has_forward_hooks(layer)
        handle.remove()
        if not seen:
            return f"{kind} added by {register.__name__} is not in the dicts read"
    return None


def _check_convolution_backward() -> str | None:
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=3)
    x = torch.randn(2, 3, 5, 5, generator=generator, requires_grad=True)
    weight = conv.weight.detach().clone().requires_grad_(True)
    grad = torch.randn(2, 3, 5, 5, generator=generator)
    F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups).backward(grad)
    try:
        grad_input, grad_weight = convolution_backward(grad, x.detach(), weight.detach(), conv, [True, True])
    except (TypeError, RuntimeError) as error:
        return f"cannot be called by argument names: {error}"
    if not (torch.allclose(grad_input, x.grad, atol=1e-5) and torch.allclose(grad_weight, weight.grad, atol=1e-5)):
        return "gives other gradients than autograd through F.conv2d"
    return None


def _check_cpu_queries() -> str | None:
    cpu = getattr(torch, "cpu", None)
    missing = [name for name in _CPU_BF16_QUERIES if not hasattr(cpu, name)]
    return f"{', '.join(missing)} gone" if missing else None


def _check_onednn_linear() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return None  # a torch built without oneDNN: the path never runs, nothing has changed
    if getattr(torch.ops.mkldnn, "_linear_pointwise", None) is None:
        return "is gone"
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 3, 5, 8, generator=generator).permute(0, 2, 3, 1)  # channels last, not contiguous
    weight, bias = torch.randn(6, 3, generator=generator), torch.randn(6, generator=generator)
    try:  # the op itself, whether or not oneDNN is switched on in this process
        fused = _linear_pointwise(inputs, weight, bias, gelu=True)
        plain = _linear_pointwise(inputs, weight, None, gelu=False)
    except (TypeError, RuntimeError) as error:
        return f"cannot be called as (input, weight, bias, attr, scalars, algorithm): {error}"
    if not torch.allclose(fused, F.gelu(F.linear(inputs, weight, bias)), atol=1e-5):
        return "gives other numbers than F.gelu(F.linear(...)) with the 'gelu' post-op"
    if not torch.allclose(plain, F.linear(inputs, weight), atol=1e-5):
        return "gives other numbers than F.linear(...) without a post-op"
    return None


def _check_dict_from_json_file() -> str | None:
    from transformers import PreTrainedConfig

    calls = []

    class Spy(PreTrainedConfig):
        model_type = "convnextv2-compat-check"

        @classmethod
        def _dict_from_json_file(cls, json_file):
            calls.append(os.fspath(json_file))
            return super()._dict_from_json_file(json_file)

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.json")
        with open(path, "w", encoding="utf-8") as file:
            json.dump({"model_type": Spy.model_type}, file)
        Spy.get_config_dict(folder)
        Spy.from_json_file(path)
    if len(calls) != 2:
        return f"is no longer called by get_config_dict and from_json_file ({len(calls)} of 2 calls seen)"
    return None


def _check_validate_preprocess_kwargs() -> str | None:
    from transformers.models.convnext.image_processing_convnext import ConvNextImageProcessor

    calls = []

    class Spy(ConvNextImageProcessor):
        def _validate_preprocess_kwargs(self, **kwargs):
            calls.append(kwargs)
            return super()._validate_preprocess_kwargs(**kwargs)

    Spy(size={"shortest_edge": 32})(torch.zeros(3, 40, 40, dtype=torch.uint8), crop_pct=0.5, return_tensors="pt")
    if len(calls) != 1:
        return "is no longer called when a processor preprocesses"
    if calls[0].get("crop_pct") != 0.5:
        return "no longer receives the call's settings merged with the processor's"
    return None


def _check_image_processor_mapping() -> str | None:
    from transformers.models.auto import image_processing_auto

    mapping = getattr(image_processing_auto, "IMAGE_PROCESSOR_MAPPING", None)
    if mapping is None or not callable(getattr(mapping, "register", None)):
        return "IMAGE_PROCESSOR_MAPPING.register is gone"
    if not isinstance(getattr(image_processing_auto, "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS", None), list):
        return "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS is no longer a list"
    return None


def _check_pipeline_registry() -> str | None:
    from transformers.pipelines import PIPELINE_REGISTRY

    tasks = getattr(PIPELINE_REGISTRY, "supported_tasks", None)
    if not isinstance(tasks, dict):
        return "PIPELINE_REGISTRY.supported_tasks is no longer a dict"
    for task in ("image-classification", "image-feature-extraction"):
        if not isinstance(tasks.get(task), dict) or "impl" not in tasks[task]:
            return f"the {task!r} entry has no 'impl'"
    return None


INTERNALS: tuple[Internal, ...] = (
    Internal(
        "torch._C._are_functorch_transforms_active",
        "fast paths and the FCMAE noise check step aside under torch.func transforms",
        _check_functorch_probe,
    ),
    Internal(
        "torch.nn.Module._forward_hooks / _forward_pre_hooks and torch.nn.modules.module._global_forward_hooks / "
        "_global_forward_pre_hooks",
        "a fast path never bypasses a hooked layer",
        _check_hook_dicts,
    ),
    Internal(
        "torch.ops.aten.convolution_backward (argument names)",
        "the sparse depthwise conv's backward",
        _check_convolution_backward,
    ),
    Internal(
        "torch.cpu._is_amx_tile_supported / _is_avx512_bf16_supported",
        "native bf16 detection (per-dtype defaults, the main job's bf16 autocast, benchmarks)",
        _check_cpu_queries,
    ),
    Internal(
        "torch.ops.mkldnn._linear_pointwise (Inductor's oneDNN linear with post-ops)",
        "at inference on CPU, pwconv1, its bias and GELU in one matmul, and pwconv2 with its bias (fast path "
        "onednn_linear)",
        _check_onednn_linear,
    ),
    Internal(
        "transformers.PreTrainedConfig._dict_from_json_file (overridden hook)",
        "a config file that is not a JSON object is a ValueError naming the file",
        _check_dict_from_json_file,
    ),
    Internal(
        "transformers BaseImageProcessor._validate_preprocess_kwargs (overridden hook)",
        "a bad setting in a processor call is a ValueError naming it",
        _check_validate_preprocess_kwargs,
    ),
    Internal(
        "transformers.models.auto.image_processing_auto.IMAGE_PROCESSOR_MAPPING / "
        "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS",
        "AutoImageProcessor loads a folder saved by the PIL backend as the PIL backend",
        _check_image_processor_mapping,
    ),
    Internal(
        "transformers.pipelines.PIPELINE_REGISTRY.supported_tasks",
        "pipeline('image-classification') builds this package's pipeline classes",
        _check_pipeline_registry,
    ),
)


def internal_problems() -> list[str]:
    """One line per internal in ``INTERNALS`` that is missing or behaves differently, naming it and its use."""
    problems = []
    for internal in INTERNALS:
        try:
            problem = internal.check()
        except Exception as error:  # a check that cannot even run is a changed internal too
            problem = f"its check failed: {type(error).__name__}: {error}"
        if problem is not None:
            problems.append(f"{internal.name}: {problem} (used for: {internal.used_for})")
    return problems


__all__ = [
    "INTERNALS",
    "Internal",
    "convolution_backward",
    "cpu_has_native_bf16",
    "functorch_transforms_active",
    "has_forward_hooks",
    "internal_problems",
    "onednn_linear",
    "prefer_pil_backend",
    "register_image_processor_classes",
    "replace_pipeline_class",
]
