"""Packaging and documentation truth.

- The wheel is built the way a user's ``pip install .`` builds it (sdist, then a wheel from the sdist), with no
  deprecation warning, and carries every file of the package directory (the label names, the card template).
- Installed into a fresh folder away from the source tree, it converts a synthetic official checkpoint and the
  result runs in ``pipeline("image-classification")``.
- No text in the repository cites a file that does not exist (such as a team-internal ``OFFICIAL.md``), and no
  docstring of the package names a method or attribute that exists nowhere.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from helpers import REPO, official_dense  # official_dense: the official fine-tuned layout, random weights

import convnextv2_hf

PACKAGE = REPO / "convnextv2_hf"
# what setup.py reads to build: the copy keeps the shared source tree free of build/ and *.egg-info folders, and a
# stale build/lib (files deleted from the source) can never leak into the tested wheel
BUILD_INPUTS = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "convnextv2_hf"]
NOT_SOURCE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
TINY = ([1, 1, 2, 1], [8, 16, 24, 32])  # depths, widths: no official size has these


def _run(command: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    """Run ``command``; its combined output, or a failure that shows it."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """sdist of a copy of the build inputs, then a wheel from that sdist (as ``python -m build`` does), offline."""
    import setuptools

    # the build runs without isolation (offline), so it uses this environment's setuptools: the dev extra pins it
    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, f"setuptools {setuptools.__version__} is too old for license_expression: pip install -e .[dev]"
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=NOT_SOURCE)
        else:
            shutil.copy2(path, source / name)
    dist = root / "dist"
    sdist_log = _run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
         str(dist)],
        cwd=source,
    )
    (sdist,) = dist.glob("*.tar.gz")
    wheel_log = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-v",
         "-w", str(dist), str(sdist)],
        cwd=root,
    )
    (wheel,) = dist.glob("*.whl")
    return {"root": root, "sdist": sdist, "wheel": wheel, "log": sdist_log + wheel_log}


def test_the_build_gives_no_deprecation_warning_and_declares_an_spdx_license(built):
    log = built["log"]
    assert "deprecat" not in log.lower(), log[-6000:]
    assert "SetuptoolsDeprecationWarning" not in log and "BuildBackendWarning" not in log
    with zipfile.ZipFile(built["wheel"]) as wheel:
        metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata
    assert "Classifier: License ::" not in metadata and "\nLicense: " not in metadata
    assert f"Version: {convnextv2_hf.__version__}" in metadata


def test_the_wheel_and_the_sdist_carry_every_file_of_the_package(built):
    expected = {
        path.relative_to(REPO).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    # the data files the package reads at run time, by name, so the test fails if they ever move out
    assert {"convnextv2_hf/imagenet1k_labels.json", "convnextv2_hf/model_card_template.md"} <= expected
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = wheel.namelist()
    # the package and its metadata only: no tests, scripts or model cards at the top of site-packages
    dist_info = f"convnextv2_hf-{convnextv2_hf.__version__}.dist-info"
    assert {name.split("/", 1)[0] for name in names} == {"convnextv2_hf", dist_info}
    in_wheel = {name for name in names if name.startswith("convnextv2_hf/")}
    assert expected - in_wheel == set(), f"not in the wheel: {sorted(expected - in_wheel)}"
    with tarfile.open(built["sdist"]) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert expected - in_sdist == set(), f"not in the sdist: {sorted(expected - in_sdist)}"
    assert {"setup.py", "pyproject.toml", "README.md"} <= in_sdist


# runs in the fresh folder, with only the installed wheel on the path for this package
INSTALLED_RUN = r"""
import json, sys
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import pipeline

import convnextv2_hf
from convnextv2_hf.checkpoints import imagenet1k_labels
from convnextv2_hf.conversion import convert_checkpoint

lines = []
report = convert_checkpoint("custom_1k.pt", "converted", verify_image_size=64, log=lines.append)
classifier = pipeline("image-classification", model="converted", device="cpu")
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
predictions = classifier(image, top_k=1000)
print(json.dumps({
    "package_file": convnextv2_hf.__file__,
    "sys_path": sys.path,
    "labels": imagenet1k_labels(),
    "predictions": predictions,
    "max_abs_diff": report.verification.max_abs_diff,
    "card": Path("converted/README.md").read_text(),
    "files": sorted(p.name for p in Path("converted").iterdir()),
}))
"""


@pytest.mark.slow
def test_the_installed_wheel_converts_a_checkpoint_and_the_result_classifies_in_a_pipeline(built):
    root = built["root"]
    site, work = root / "site", root / "work"
    work.mkdir()
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
          str(built["wheel"])], cwd=root)
    checkpoint = work / "custom_1k.pt"
    torch.save({"model": official_dense(TINY, num_classes=1000)}, checkpoint)
    # only the installed copy: the source tree is neither the working directory nor on PYTHONPATH (the venv's
    # editable finder sits after the path entries, and the assertion below proves which copy ran)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    output = _run([sys.executable, "-c", INSTALLED_RUN], cwd=work, env=env)
    # the last line that is our JSON object (progress bars of the load may follow it on stderr)
    result = json.loads(next(line for line in reversed(output.splitlines()) if line.startswith('{"package_file"')))

    assert Path(result["package_file"]).resolve().is_relative_to(site.resolve()), result["package_file"]
    # relative entries ("" is the script's working directory) resolve against the subprocess's cwd, not ours
    assert not any((work / entry).resolve() == REPO for entry in result["sys_path"]), result["sys_path"]
    assert {"config.json", "model.safetensors", "README.md", "preprocessor_config.json"} <= set(result["files"])
    assert result["max_abs_diff"] <= 1e-4
    labels, predictions = result["labels"], result["predictions"]
    assert len(labels) == 1000 and len(predictions) == 1000
    assert predictions[0]["label"] in labels and {p["label"] for p in predictions} == set(labels)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)
    assert predictions[0]["score"] > predictions[-1]["score"]
    # the card came from the template inside the installed package, with this file's hash
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert f"SHA-256 of the source file: {sha256}" in result["card"]
    assert "## Conversion provenance" in result["card"] and "arXiv 2301.00808" in result["card"]


# ----------------------------------------------------------------------------------------------------------
# Documentation truth
# ----------------------------------------------------------------------------------------------------------

# text a user reads: the package, the docs, the model cards, the scripts and the tests
DOCUMENTED = ["convnextv2_hf", "examples", "conversion_scripts", "benchmarks", "model_cards", "tests", "README.md",
              "BENCHMARKS.md", "Makefile", "setup.py"]
# the official repository's files, which text may cite as such (github.com/facebookresearch/ConvNeXt-V2)
OFFICIAL_FILES = {"README.md", "TRAINING.md", "INSTALL.md", "LICENSE", "main_finetune.py", "main_pretrain.py",
                  "optim_factory.py", "datasets.py", "utils.py", "engine_finetune.py", "engine_pretrain.py",
                  "convnextv2.py", "convnextv2_sparse.py", "fcmae.py", "models/convnextv2.py",
                  "models/convnextv2_sparse.py", "models/fcmae.py", "models/utils.py"}
CITED_DOCUMENT = re.compile(r"(?<![\w./<>-])([\w./-]*\w\.md)\b")
THIS_FILE = Path(__file__).resolve()
NOT_THE_REPOSITORY = {".git", ".venv", "build", "dist", "outputs", "__pycache__"}  # environments and outputs


def _repository_files(pattern: str) -> list[Path]:
    return [p for p in REPO.rglob(pattern) if not NOT_THE_REPOSITORY & set(p.relative_to(REPO).parts)]


def _documented_files() -> list[Path]:
    files = []
    for name in DOCUMENTED:
        path = REPO / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.suffix in {".py", ".md"} and "__pycache__" not in p.parts]
    return [path for path in files if path.resolve() != THIS_FILE]


def dangling_document_citations(text: str, existing: set[str]) -> list[str]:
    """The ``*.md`` names in ``text`` that are neither a file of the repository (by path or name) nor an official
    repository's file cited as such (on a line that says "official"; later mentions in the same text may drop it)."""
    lines = [(line, CITED_DOCUMENT.findall(line)) for line in text.splitlines()]
    introduced = {
        cited.rsplit("/", 1)[-1]
        for line, citations in lines
        for cited in citations
        if cited.rsplit("/", 1)[-1] in OFFICIAL_FILES and "official" in line.lower()
    }
    return [
        cited
        for _, citations in lines
        for cited in citations
        if cited not in existing and Path(cited).name not in existing and cited.rsplit("/", 1)[-1] not in introduced
    ]


def test_no_text_cites_a_document_that_is_not_in_the_repository():
    existing = {p.relative_to(REPO).as_posix() for p in _repository_files("*.md")}
    existing |= {Path(p).name for p in existing}
    # the check itself: a team-internal reference document is caught, the official repository's is not
    assert dangling_document_citations("Official eval transform (OFFICIAL.md): bicubic", existing) == ["OFFICIAL.md"]
    assert dangling_document_citations("the official TRAINING.md recipes", existing) == []
    assert dangling_document_citations("the official TRAINING.md\nnot in TRAINING.md", existing) == []
    assert dangling_document_citations("recipes of TRAINING.md", existing) == ["TRAINING.md"]
    problems = {}
    for path in _documented_files():
        if dangling := dangling_document_citations(path.read_text(encoding="utf-8"), existing):
            problems[path.relative_to(REPO).as_posix()] = dangling
    assert problems == {}, f"documents cited but not shipped (cite the official repository instead): {problems}"


def test_the_package_cites_only_python_files_that_exist_here_or_in_the_official_repository():
    existing = {p.name for p in _repository_files("*.py")}
    problems = []
    for path in PACKAGE.rglob("*.py"):
        for cited in re.findall(r"(?<![\w./<>-])([\w./-]*\w\.py)\b", path.read_text(encoding="utf-8")):
            name = Path(cited).name
            if name not in existing and cited not in OFFICIAL_FILES and name not in OFFICIAL_FILES:
                problems.append(f"{path.name}: {cited}")
    assert problems == []


# ---- docstrings name only things that exist ----

_BACKTICKED = re.compile(r"``([^`]+)``|(?<!`)`([^`]+)`(?!`)")
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def names_in_code(source: str) -> set[str]:
    """Every identifier a module's code uses or defines (names, attributes, parameters, keywords, identifier strings
    such as dictionary keys)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.add(node.value)
    return names


def unknown_names(docstring: str | None, owner: type, known: set[str], calls_only: bool = False) -> list[str]:
    """Backticked names in ``docstring`` that are neither attributes of ``owner`` nor in ``known``: a method or
    attribute that does not exist. ``calls_only``: only the names written as members (``name()``, ``name(...)``,
    ``self.name``, ``Owner.name``), the rest being free to name arguments, keys or other libraries' things."""
    unknown = []
    for match in _BACKTICKED.finditer(docstring or ""):
        token = (match.group(1) or match.group(2)).strip()
        member = "(" in token or token.startswith(("self.", owner.__name__ + "."))
        token = token.split("(")[0].split("=")[0].strip().removeprefix("self.").removeprefix(owner.__name__ + ".")
        if not _NAME.match(token) or (calls_only and not member):
            continue
        if not hasattr(owner, token) and token not in known:
            unknown.append(token)
    return unknown


def _public_classes():
    """(module, class) for every public class the package defines."""
    for info in pkgutil.walk_packages(convnextv2_hf.__path__, "convnextv2_hf."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and not name.startswith("_") and obj.__module__ == module.__name__:
                yield module, obj


def known_names() -> set[str]:
    """What a class docstring may name besides the class's attributes: the identifiers of the package's code (an
    example key such as ``fixed_mask`` may be read in another module), the package's exports, builtins, tensor and
    module methods (``gather``, ``named_modules``) and the stage names the config gives (``stem``, ``stage1`` ...)."""
    known = set(dir(builtins)) | set(vars(convnextv2_hf)) | set(dir(torch.Tensor)) | set(dir(torch.nn.Module))
    # the Trainer's own arguments, which the plug-ins' docstrings name (``compute_loss_func``, ``dataloader_drop_last``)
    known |= set(inspect.signature(transformers.Trainer.__init__).parameters)
    known |= {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
    for path in PACKAGE.rglob("*.py"):
        known |= names_in_code(path.read_text(encoding="utf-8"))
    return known | set(convnextv2_hf.ConvNextV2Config().stage_names)


def test_no_class_docstring_names_a_method_that_does_not_exist():
    from convnextv2_hf.training import EMACallback

    # the check itself: the EMACallback docstring as it once read is caught, the real methods pass
    known = known_names()
    old = "``evaluate_ema`` does the same for a given evaluation (see ``ema_weights``); ``copy_to`` a model."
    assert unknown_names(old, EMACallback, known) == ["evaluate_ema", "ema_weights"]
    assert unknown_names("call ``self.ema_weights()``, then ``save(path)``", EMACallback, known, True) == [
        "ema_weights"
    ]
    for method in ("copy_to", "state_dict", "save", "load"):
        assert callable(getattr(EMACallback, method)) and method in EMACallback.__doc__

    problems = {}
    for module, cls in _public_classes():
        # the class docstring: every backticked name; its methods' docstrings: every name written as a member
        if unknown := unknown_names(cls.__dict__.get("__doc__"), cls, known):
            problems[f"{module.__name__}.{cls.__name__}"] = unknown
        for attribute, value in vars(cls).items():
            function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if inspect.isfunction(function) and (unknown := unknown_names(function.__doc__, cls, known, True)):
                problems[f"{module.__name__}.{cls.__name__}.{attribute}"] = unknown
    assert problems == {}, f"docstrings name methods or attributes that exist nowhere: {problems}"
