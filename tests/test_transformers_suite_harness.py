"""The harness that runs transformers' ConvNeXt V2 model tests on our classes (tests/transformers_suite/).

Its own logic on synthetic files, without the network: the import rewriting, and a whole run against a fake sdist
whose one mixin test tells our classes from the built-in ones.
"""

import importlib.util
import io
import json
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

HARNESS_PATH = Path(__file__).parent / "transformers_suite" / "run_transformers_suite.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("run_transformers_suite", HARNESS_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolves the module's annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


SWAP = {"ConvNextV2Config", "ConvNextV2Model", "ConvNextV2Backbone", "ConvNextV2ForImageClassification"}

SYNTHETIC_TEST_FILE = '''\
"""A test file shaped like transformers' model tests."""

import unittest

from transformers import ConvNextV2Config
from transformers.utils import is_torch_available

from ...test_modeling_common import ModelTesterMixin

if is_torch_available():
    import torch

    from transformers import (
        AutoImageProcessor,
        ConvNextV2ForImageClassification,
        ConvNextV2Model as Encoder,
    )
    from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2Backbone
    from transformers import ConvNextV2ForMaskedImageModeling  # not in the swap set: stays


class Test(unittest.TestCase):
    x = "from transformers import ConvNextV2Model"  # a string, not an import: stays
'''

EXPECTED_REWRITE = '''\
"""A test file shaped like transformers' model tests."""

import convnextv2_hf  # noqa: F401  (added by convnextv2_hf's harness: registers our classes in the Auto classes)
import unittest

from convnextv2_hf import ConvNextV2Config
from transformers.utils import is_torch_available

from ...test_modeling_common import ModelTesterMixin

if is_torch_available():
    import torch

    from transformers import AutoImageProcessor
    from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2Model as Encoder
    from convnextv2_hf import ConvNextV2Backbone
    from transformers import ConvNextV2ForMaskedImageModeling  # not in the swap set: stays


class Test(unittest.TestCase):
    x = "from transformers import ConvNextV2Model"  # a string, not an import: stays
'''


def test_rewrite_points_only_the_model_imports_at_our_package(harness):
    rewritten, swapped = harness.rewrite_imports(SYNTHETIC_TEST_FILE, SWAP)

    assert rewritten == EXPECTED_REWRITE
    assert swapped == ["ConvNextV2Backbone", "ConvNextV2Config", "ConvNextV2ForImageClassification", "ConvNextV2Model"]
    compile(rewritten, "rewritten.py", "exec")


def test_rewrite_puts_our_import_after_docstring_and_future_imports(harness):
    source = '"""Doc."""\nfrom __future__ import annotations\n\nfrom transformers import ConvNextV2Model\n'
    rewritten, _ = harness.rewrite_imports(source, SWAP)

    lines = rewritten.splitlines()
    assert lines[:2] == ['"""Doc."""', "from __future__ import annotations"]
    assert lines[3].startswith("import convnextv2_hf  # noqa")
    assert lines[4] == "from convnextv2_hf import ConvNextV2Model"


def test_rewrite_refuses_a_file_with_nothing_to_swap(harness):
    with pytest.raises(ValueError, match="nothing to swap"):
        harness.rewrite_imports("from transformers import AutoModel\n", SWAP)
    with pytest.raises(ValueError, match="does not parse"):
        harness.rewrite_imports("from transformers import (ConvNextV2Model\n", SWAP)


def test_rewrite_refuses_an_import_sharing_its_line(harness):
    with pytest.raises(ValueError, match="line 1: an import of ConvNextV2Model shares its line"):
        harness.rewrite_imports("import os; from transformers import ConvNextV2Model\n", SWAP)


def test_swap_names_are_the_packages_model_classes(harness):
    names = harness.package_public_names(harness.REPO_ROOT / "convnextv2_hf" / "__init__.py")

    assert SWAP | {"ConvNextV2ForMaskedImageModeling"} <= names
    assert "PRESETS" not in names and "__version__" not in names


def test_junit_outcomes_and_skip_differences(harness, tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        textwrap.dedent(
            """\
            <testsuites><testsuite>
              <testcase classname="m.test_ours.T" name="test_a"/>
              <testcase classname="m.test_ours.T" name="test_b"><skipped message="why&#10;more"/></testcase>
              <testcase classname="m.test_ours.T" name="test_c"><failure message="AssertionError: 1 != 2"/></testcase>
              <testcase classname="m.test_ours.T" name="test_c"><error message="teardown"/></testcase>
            </testsuite></testsuites>
            """
        )
    )
    ours = harness.parse_junit(xml)

    assert {key: (r.outcome, r.message) for key, r in ours.items()} == {
        "T::test_a": ("passed", ""),
        "T::test_b": ("skipped", "why"),
        "T::test_c": ("failed", "AssertionError: 1 != 2"),  # the teardown error does not hide the failure
    }
    assert harness.count(ours) == {"passed": 1, "skipped": 1, "failed": 1, "error": 0}
    builtin = {key: harness.TestResult("passed") for key in ("T::test_a", "T::test_b", "T::test_c", "T::test_d")}
    assert harness.skip_differences(ours, builtin) == ["T::test_b", "T::test_d"]


FAKE_MIXIN = """\
class ModelTesterMixin:
    def test_mixin_sees_our_class(self):
        assert self.model_class.__module__.startswith("convnextv2_hf"), self.model_class.__module__
"""

FAKE_MODEL_TEST = """\
import unittest

from transformers import ConvNextV2Model

from ...test_modeling_common import ModelTesterMixin


class ConvNextV2ModelTest(ModelTesterMixin, unittest.TestCase):
    model_class = ConvNextV2Model

    def test_runs_for_both(self):
        pass

    def test_skipped_only_for_ours(self):
        if ConvNextV2Model.__module__.startswith("convnextv2_hf"):
            self.skipTest("ours skips this one")
"""


@pytest.mark.slow
def test_whole_run_on_a_fake_sdist_tells_the_variants_apart(harness, tmp_path, capsys):
    sdist = tmp_path / "transformers-0.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name, text in {
            "transformers-0.0.0/tests/test_modeling_common.py": FAKE_MIXIN,
            "transformers-0.0.0/tests/models/other/test_other.py": "raise SystemExit('not a mixin')\n",
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    test_file = tmp_path / "test_modeling_convnextv2.py"
    test_file.write_text(FAKE_MODEL_TEST)
    report_path = tmp_path / "report.json"

    status = harness.main(
        ["--sdist", str(sdist), "--test-file", str(test_file), "--cache-dir", str(tmp_path / "cache")]
        + ["--report", str(report_path)]
    )

    report = json.loads(report_path.read_text())
    ours, builtin = report["runs"]["ours"], report["runs"]["builtin"]
    assert ours["counts"] == {"passed": 2, "skipped": 1, "failed": 0, "error": 0}
    assert builtin["counts"] == {"passed": 2, "skipped": 0, "failed": 1, "error": 0}
    assert builtin["results"]["ConvNextV2ModelTest::test_mixin_sees_our_class"]["message"].startswith(
        "AssertionError: transformers.models.convnextv2"
    )
    assert ours["origins"] == {"ConvNextV2Model": "convnextv2_hf.modeling_convnextv2"}
    assert builtin["origins"] == {"ConvNextV2Model": "transformers.models.convnextv2.modeling_convnextv2"}
    assert report["skipped_for_ours_but_run_for_builtin"] == ["ConvNextV2ModelTest::test_skipped_only_for_ours"]
    assert report["problems"] == []
    assert status == 1  # a test skipped for ours that runs for the built-in fails the run
    workspace = tmp_path / "cache" / "workspace" / "tests"
    assert sorted(p.name for p in workspace.glob("*.py")) == ["__init__.py", "test_modeling_common.py"]
    assert "skipped or missing for ours but run for the built-in: 1" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_test_file_is_found_in_a_source_archive(harness, tmp_path, kind):
    member = "transformers-5.0.0/tests/models/convnextv2/test_modeling_convnextv2.py"
    decoy = "transformers-5.0.0/vendored/tests/models/convnextv2/test_modeling_convnextv2.py"  # deeper: not it
    archive = tmp_path / f"source.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as file:
            file.writestr(decoy, "decoy")
            file.writestr(member, FAKE_MODEL_TEST)
    else:
        with tarfile.open(archive, "w:gz") as file:
            for name, text in ((decoy, "decoy"), (member, FAKE_MODEL_TEST)):
                info = tarfile.TarInfo(name)
                info.size = len(text.encode())
                file.addfile(info, io.BytesIO(text.encode()))

    text, origin = harness.load_test_file(None, str(archive), tmp_path / "cache", "5.0.0")

    assert text == FAKE_MODEL_TEST
    assert origin.endswith(":tests/models/convnextv2/test_modeling_convnextv2.py")
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as file:
        file.writestr("README.md", "no tests")
    with pytest.raises(harness.SuiteSetupError, match="has no tests/models/convnextv2"):
        harness.load_test_file(None, str(empty), tmp_path / "cache", "5.0.0")
