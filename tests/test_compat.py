"""The private internals of transformers and torch the package relies on (``convnextv2_hf/compat_convnextv2.py``):
each is as expected on the installed versions (CI runs this on the newest and the lowest transformers allowed), a
changed one is named by ``internal_problems``, the run-time side of each takes the safe side when it is gone, and no
other file of the package reaches a private internal directly."""

import json
import re
import tokenize
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import randomize_, tiny_config
from torch import nn
from transformers.models.auto import image_processing_auto
from transformers.pipelines import PIPELINE_REGISTRY

from convnextv2_hf import ConvNextV2Config, compat_convnextv2
from convnextv2_hf.compat_convnextv2 import INTERNALS, internal_problems
from convnextv2_hf.fast_paths_convnextv2 import fast_path_allowed, is_bare, native_bf16_cpu

PACKAGE = Path(compat_convnextv2.__file__).parent


def test_every_private_internal_is_as_the_package_expects():
    problems = internal_problems()
    assert problems == [], "private internals of transformers/torch changed:\n" + "\n".join(problems)
    assert len(INTERNALS) == 9


def problem_naming(fragment: str) -> str:
    lines = [line for line in internal_problems() if fragment in line]
    assert len(lines) == 1, internal_problems()
    return lines[0]


def test_a_missing_functorch_probe_is_named_and_fast_paths_step_aside(monkeypatch):
    x = torch.ones(2, 3)
    assert fast_path_allowed("grn_fold", ["grn_fold"], x)
    monkeypatch.delattr(torch._C, "_are_functorch_transforms_active")
    assert "is gone" in problem_naming("torch._C._are_functorch_transforms_active")
    assert not fast_path_allowed("grn_fold", ["grn_fold"], x)  # the reference math runs


def test_missing_hook_dicts_are_named_and_no_layer_counts_as_bare(monkeypatch):
    layer = nn.Linear(2, 2)
    assert is_bare(layer)
    monkeypatch.delattr(nn.modules.module, "_global_forward_hooks")
    assert "the global hook dicts are gone" in problem_naming("_global_forward_hooks")
    assert not is_bare(layer)


def test_hooks_that_the_dicts_do_not_show_are_named(monkeypatch):
    monkeypatch.setattr(compat_convnextv2, "has_forward_hooks", lambda module: False)
    assert "is not in the dicts read" in problem_naming("_forward_hooks")


def test_a_convolution_backward_with_other_argument_names_is_named(monkeypatch):
    def renamed(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                groups, mask):  # fmt: skip
        raise AssertionError("never called with the old names")

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", renamed)
    assert "cannot be called by argument names" in problem_naming("torch.ops.aten.convolution_backward")


def test_a_missing_onednn_linear_is_named_and_the_layers_run(monkeypatch):
    # without Inductor's oneDNN linear (a torch that drops or renames it), the check names it, onednn_linear declines,
    # and a model asking for the path gives the reference logits through its nn.Linear layers
    from convnextv2_hf import ConvNextV2ForImageClassification

    x, weight, bias = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
    fused = compat_convnextv2.onednn_linear(x, weight, bias, gelu=True)
    assert torch.allclose(fused, F.gelu(F.linear(x, weight, bias)), atol=1e-5)
    torch.manual_seed(0)
    reference = randomize_(ConvNextV2ForImageClassification(tiny_config(fast_paths=False))).eval()
    model = ConvNextV2ForImageClassification(tiny_config(fast_paths=["onednn_linear"])).eval()
    model.load_state_dict(reference.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    monkeypatch.setattr(torch.ops, "mkldnn", type("Namespace", (), {})(), raising=False)
    assert "is gone" in problem_naming("torch.ops.mkldnn._linear_pointwise")
    assert compat_convnextv2.onednn_linear(x, weight, bias, gelu=True) is None
    with torch.no_grad():
        assert torch.allclose(model(pixels).logits, reference(pixels).logits, atol=1e-5)


def test_onednn_linear_declines_what_it_cannot_run():
    # other devices, dtypes that oneDNN's linear does not take here, mixed dtypes, oneDNN switched off: None, so the
    # caller runs the layer
    x, weight, bias = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
    assert compat_convnextv2.onednn_linear(x.double(), weight.double(), bias.double(), gelu=False) is None
    assert compat_convnextv2.onednn_linear(x.half(), weight.half(), bias.half(), gelu=False) is None
    assert compat_convnextv2.onednn_linear(x.bfloat16(), weight, bias, gelu=False) is None
    assert compat_convnextv2.onednn_linear(x.to("meta"), weight.to("meta"), bias.to("meta"), gelu=False) is None
    assert compat_convnextv2.onednn_linear(torch.randn(3), weight, bias, gelu=False) is None
    enabled = torch.backends.mkldnn.enabled
    try:
        torch.backends.mkldnn.enabled = False
        assert compat_convnextv2.onednn_linear(x, weight, bias, gelu=False) is None
    finally:
        torch.backends.mkldnn.enabled = enabled
    assert torch.allclose(compat_convnextv2.onednn_linear(x, weight, None, gelu=False), F.linear(x, weight), atol=1e-6)


def test_a_convolution_backward_with_other_results_is_named(monkeypatch):
    real = torch.ops.aten.convolution_backward

    def negated(*args, **kwargs):  # an op that took the same names for other meanings
        return tuple(None if grad is None else -grad for grad in real(*args, **kwargs))

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", negated)
    assert "other gradients than autograd" in problem_naming("torch.ops.aten.convolution_backward")


def test_missing_cpu_queries_are_named_and_bf16_is_not_chosen(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert "_is_amx_tile_supported, _is_avx512_bf16_supported gone" in problem_naming("torch.cpu._is_amx")
    assert native_bf16_cpu() is False


def test_a_config_hook_transformers_stopped_calling_is_named(monkeypatch):
    reader = transformers.PreTrainedConfig._dict_from_json_file.__func__

    def get_config_dict(cls, path, **kwargs):  # a transformers that reads the file some other way
        return json.loads((Path(path) / "config.json").read_text()), kwargs

    monkeypatch.setattr(transformers.PreTrainedConfig, "get_config_dict", classmethod(get_config_dict))
    assert reader is transformers.PreTrainedConfig._dict_from_json_file.__func__
    assert "1 of 2 calls seen" in problem_naming("_dict_from_json_file")


def test_a_processor_hook_transformers_stopped_calling_is_named(monkeypatch):
    from transformers.image_processing_utils import BaseImageProcessor

    monkeypatch.delattr(BaseImageProcessor, "_validate_preprocess_kwargs")
    assert "_validate_preprocess_kwargs" in problem_naming("_validate_preprocess_kwargs")


def test_a_changed_image_processor_mapping_is_named(monkeypatch):
    monkeypatch.setattr(image_processing_auto, "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS", ("a", "tuple"))
    assert "no longer a list" in problem_naming("IMAGE_PROCESSOR_MAPPING")


def test_a_changed_pipeline_registry_is_named(monkeypatch):
    entries = {task: {k: v for k, v in entry.items() if k != "impl"} for task, entry in
               PIPELINE_REGISTRY.supported_tasks.items()}  # fmt: skip
    monkeypatch.setattr(PIPELINE_REGISTRY, "supported_tasks", entries)
    assert "has no 'impl'" in problem_naming("PIPELINE_REGISTRY.supported_tasks")


def test_the_configs_own_built_flag_checks_assignments_and_is_never_saved(tmp_path):
    config = ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32])
    with pytest.raises(ValueError, match=r"setting depths=\[1, 1\]: "):
        config.depths = [1, 1]  # two stages, four widths
    config.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert "_convnextv2_built" not in saved and "_convnextv2_built" not in config.to_dict()
    reloaded = ConvNextV2Config.from_pretrained(tmp_path)
    assert reloaded.depths == config.depths and reloaded.hidden_sizes == config.hidden_sizes
    with pytest.raises(ValueError, match=r"setting hidden_sizes=\[8\]: "):
        reloaded.hidden_sizes = [8]  # a loaded config is checked as a built one


PRIVATE_REACHES = re.compile(
    r"torch\._C\b|\b_forward_hooks|\b_forward_pre_hooks|\b_global_forward|aten\.convolution_backward|_is_amx_tile|"
    r"_is_avx512_bf16|IMAGE_PROCESSOR_MAPPING|DEFAULT_TO_PIL_BACKEND|PIPELINE_REGISTRY\.|_post_init_done|"
    r"_are_functorch"
)


def code_lines(path: Path) -> dict[int, str]:
    """The code of each line of ``path`` without its strings and comments (a docstring may name an internal)."""
    lines: dict[int, str] = {}
    with path.open("rb") as file:
        for token in tokenize.tokenize(file.readline):
            if token.type not in (tokenize.STRING, tokenize.COMMENT, tokenize.ENCODING):
                lines[token.start[0]] = lines.get(token.start[0], "") + token.string
    return lines


def test_no_other_file_of_the_package_reaches_a_private_internal():
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {code}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "compat_convnextv2.py"
        for number, code in code_lines(path).items()
        if PRIVATE_REACHES.search(code)
    ]
    assert found == [], "reach these through compat_convnextv2:\n" + "\n".join(found)
    # the scan itself sees what it looks for
    assert any(PRIVATE_REACHES.search(code) for code in code_lines(PACKAGE / "compat_convnextv2.py").values())
