"""Run transformers' own ConvNeXt V2 model tests against this package's classes and against the built-in ones.

transformers' test file for the model (``tests/models/convnextv2/test_modeling_convnextv2.py`` in the transformers
repository) is written against the common test mixins (``ModelTesterMixin``, ``ConfigTester``,
``PipelineTesterMixin``). The mixins ship in transformers' source distribution on PyPI, the model test file does not.
This script:

1. downloads the sdist (``pip download transformers==VERSION --no-binary :all: --no-deps``) into a cache directory
   and extracts its top-level ``tests/*.py`` (the mixins) into a workspace there;
2. writes stand-ins for the few helper modules the mixins import that the sdist lacks (``HELPER_STUBS``);
3. takes the model test file from ``--test-file`` (a path or URL), from a transformers source archive
   (``--test-source``), or else from transformers' repository at the version's tag, and writes two copies of it
   into the workspace: ``builtin`` as it is, ``ours`` with its own ``from transformers import ConvNextV2...`` lines
   pointed at ``convnextv2_hf`` plus ``import convnextv2_hf`` (so the Auto classes map to ours). Rewriting the
   import lines is what works: names set on the ``transformers`` module do not reach the mixins, which re-import
   transformers through ``direct_transformers_import``;
4. runs each copy with pytest in its own subprocess (our registration in the Auto classes is process-wide), with this
   repository first on ``PYTHONPATH`` so the tests see whatever is in the working tree, and checks from the collected
   modules that each copy really tested the classes it was meant to;
5. prints passed / skipped / failed for each, every failure and skip of ours with its first message line, and the
   tests skipped for ours that run for the built-in; writes the same as JSON.

Nothing from transformers is kept in this repository: the sdist and the test file live in the cache directory.
Exit status: 0 when ours has no failures or errors and no test is skipped for ours that runs for the built-in,
1 otherwise, 2 when the suite could not be set up.

    python tests/transformers_suite/run_transformers_suite.py [--test-file PATH_OR_URL] [-- extra pytest args]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "convnextv2_hf"
# where the model test file sits in transformers' repository (and in a source archive of it)
TEST_FILE_MEMBER = "tests/models/convnextv2/test_modeling_convnextv2.py"
TEST_FILE_URL = "https://raw.githubusercontent.com/huggingface/transformers/v{version}/" + TEST_FILE_MEMBER
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / PACKAGE / "transformers_suite"
VARIANTS = ("ours", "builtin")
ORIGINS_ENV = "CONVNEXTV2_SUITE_ORIGINS"

# Helper modules that the sdist's mixins import but the sdist does not ship, with the names the mixins use.
HELPER_STUBS: dict[str, str] = {
    "generation/test_utils.py": '''"""Written by the convnextv2_hf harness: the sdist lacks tests/generation/.

test_modeling_common only checks whether a test class inherits from this mixin (ConvNeXt V2's does not generate).
"""


class GenerationTesterMixin:
    pass
''',
    "exporters/test_export.py": '''"""Written by the convnextv2_hf harness: the sdist lacks tests/exporters/.

ModelTesterMixin inherits from ExportTesterMixin; without the real module its export tests do not run, for our
classes and the built-in ones alike (this package tests tracing and export in its own tests).
"""


class ExportTesterMixin:
    pass
''',
    "utils/test_configuration_utils.py": '''"""Written by the convnextv2_hf harness: the sdist lacks tests/utils/.

ConfigTester.check_config_arguments_init builds a config from these keyword arguments and checks each one stuck.
Every key is a field of the base PreTrainedConfig, each set to a value other than its default.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["ConvNextV2Model"],
    "id2label": {0: "label"},
    "label2id": {"label": 0},
    "problem_type": "regression",
}
''',
}

# conftest.py of the workspace: records which module every ConvNextV2* class the test modules imported comes from,
# so the harness can prove that `ours` tested our classes and `builtin` the built-in ones.
WORKSPACE_CONFTEST = f'''"""Written by the convnextv2_hf harness."""

import inspect
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(session, config, items):
    origins = {{}}
    for item in items:
        module = getattr(item, "module", None)
        for name, value in vars(module or object).items():
            if name.startswith("ConvNextV2") and inspect.isclass(value) and value.__module__ != module.__name__:
                origins[name] = value.__module__
    path = os.environ.get("{ORIGINS_ENV}")
    if path:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(origins, file, indent=1, sort_keys=True)
'''


class SuiteSetupError(RuntimeError):
    """The suite could not be prepared (download, archive or test file problems)."""


# ----------------------------------------------------------------------------------------------------------------
# The import rewriting
# ----------------------------------------------------------------------------------------------------------------


def package_public_names(package_init: Path) -> set[str]:
    """The ``ConvNextV2*`` names in ``__all__`` of our package's ``__init__.py``, read without importing it."""
    tree = ast.parse(package_init.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            names = ast.literal_eval(node.value)
            return {name for name in names if name.startswith("ConvNextV2")}
    raise SuiteSetupError(f"{package_init} defines no __all__")


def _is_transformers_source(module: str | None) -> bool:
    # the top-level package and the model's own module are where a test file imports the model classes from
    return module == "transformers" or (module or "").startswith("transformers.models.convnextv2")


def _format_import(module: str, aliases: list[ast.alias]) -> str:
    names = ", ".join(alias.name if alias.asname is None else f"{alias.name} as {alias.asname}" for alias in aliases)
    return f"from {module} import {names}"


def rewrite_imports(source: str, swap_names: Iterable[str], package: str = PACKAGE) -> tuple[str, list[str]]:
    """Point a test file's imports of the ConvNeXt V2 classes at ``package``.

    Every ``from transformers import ...`` (or ``from transformers.models.convnextv2... import ...``) statement,
    at any depth (inside ``if is_torch_available():`` too), is split in two: the names in ``swap_names`` are
    imported from ``package``, the others stay where they were. ``import package`` is added before the file's
    first import, so that importing the test file registers our classes in the Auto classes before any test runs.
    Nothing else in the file changes.

    Args:
        source: the test file's text.
        swap_names: the names ``package`` provides in place of transformers' (e.g. ``ConvNextV2Model``).
        package: the package to import them from.

    Returns:
        The rewritten text and the sorted list of names now imported from ``package``.

    Raises:
        ValueError: the file does not parse, imports none of ``swap_names`` from transformers, or shares a line
            between such an import and other code (which a line-based edit would damage).
    """
    swap_names = set(swap_names)
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise ValueError(f"the test file does not parse: {error}") from error
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, list[str]]] = []  # (first line, end line exclusive, new lines), 0-based
    swapped: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and _is_transformers_source(node.module)):
            continue
        ours = [alias for alias in node.names if alias.name in swap_names]
        if not ours:
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        before, after = lines[first][: node.col_offset], lines[last][node.end_col_offset :]
        if before.strip() or after.strip().lstrip(";").strip():
            raise ValueError(f"line {node.lineno}: an import of {ours[0].name} shares its line with other code")
        rest = [alias for alias in node.names if alias.name not in swap_names]
        new = [before + _format_import(package, ours) + "\n"]
        if rest:
            new.insert(0, before + _format_import(node.module, rest) + "\n")
        edits.append((first, last + 1, new))
        swapped.update(alias.name for alias in ours)
    if not swapped:
        raise ValueError(f"the test file imports none of {sorted(swap_names)} from transformers; nothing to swap")
    # `import package` goes before the first top-level statement that is not the docstring or a __future__ import
    body = list(tree.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    body = [node for node in body if not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
    anchor = body[0].lineno - 1 if body else len(lines)
    note = "  # noqa: F401  (added by convnextv2_hf's harness: registers our classes in the Auto classes)"
    edits.append((anchor, anchor, [f"import {package}{note}\n"]))
    # apply bottom-up so earlier line numbers stay valid; at one line, the replacement before the insertion
    for first, end, new in sorted(edits, key=lambda edit: (edit[0], edit[1]), reverse=True):
        lines[first:end] = new
    return "".join(lines), sorted(swapped)


# ----------------------------------------------------------------------------------------------------------------
# Getting the pieces: sdist, mixins, the model test file
# ----------------------------------------------------------------------------------------------------------------


def _download(url: str, destination: Path) -> Path:
    if not destination.exists():
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_suffix(destination.suffix + ".part")
        try:
            with urllib.request.urlopen(url, timeout=120) as response, open(partial, "wb") as file:
                shutil.copyfileobj(response, file)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise SuiteSetupError(f"could not download {url}: {error}") from error
        partial.replace(destination)  # only a complete download ever has the final name
    return destination


def ensure_sdist(version: str, cache_dir: Path) -> Path:
    """transformers' source distribution for ``version``, downloaded with pip into ``cache_dir`` on first use."""
    sdist_dir = cache_dir / "sdist"
    sdist = sdist_dir / f"transformers-{version}.tar.gz"
    if not sdist.exists():
        command = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:"]
        command += ["--no-deps", "--quiet", "-d", str(sdist_dir)]
        print(f"[suite] downloading the transformers {version} sdist into {sdist_dir}", flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not sdist.exists():
            raise SuiteSetupError(f"`{' '.join(command)}` failed:\n{result.stdout}{result.stderr}")
    return sdist


def extract_mixins(sdist: Path, tests_dir: Path) -> list[str]:
    """Copy the sdist's top-level ``tests/*.py`` (the common test mixins) into ``tests_dir``; return their names."""
    names = []
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = member.name.split("/")
            # <top>/tests/<name>.py, exactly: the mixins, not whatever else a future sdist ships under tests/
            if member.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                (tests_dir / parts[2]).write_bytes(archive.extractfile(member).read())
                names.append(parts[2])
    if "test_modeling_common.py" not in names:
        raise SuiteSetupError(f"{sdist} has no tests/test_modeling_common.py; it is not a transformers sdist")
    return sorted(names)


def read_test_file_from_archive(archive_path: Path) -> str:
    """The ConvNeXt V2 model test file from a transformers source archive (.tar.gz, .tgz or .zip)."""

    def pick(names: list[str]) -> str:
        matches = [name for name in names if name == TEST_FILE_MEMBER or name.endswith("/" + TEST_FILE_MEMBER)]
        if not matches:
            raise SuiteSetupError(f"{archive_path} has no {TEST_FILE_MEMBER}")
        return min(matches, key=len)

    if zipfile.is_zipfile(archive_path):
        with zipfile.ZipFile(archive_path) as archive:
            return archive.read(pick(archive.namelist())).decode("utf-8")
    try:
        with tarfile.open(archive_path) as archive:
            return archive.extractfile(pick(archive.getnames())).read().decode("utf-8")
    except tarfile.TarError as error:
        raise SuiteSetupError(f"{archive_path} is neither a zip nor a tar archive: {error}") from error


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def load_test_file(test_file: str | None, test_source: str | None, cache_dir: Path, version: str) -> tuple[str, str]:
    """The model test file's text and where it came from: ``test_file`` (path or URL), else the file inside the
    ``test_source`` archive (path or URL), else the file at the tag ``v{version}`` of transformers' repository."""
    if not test_file and not test_source:
        test_file = TEST_FILE_URL.format(version=version)
    if test_file:
        if _is_url(test_file):
            return _download(test_file, cache_dir / "downloads" / _cache_name(test_file)).read_text("utf-8"), test_file
        path = Path(test_file).expanduser()
        if not path.is_file():
            raise SuiteSetupError(f"--test-file {test_file}: no such file")
        return path.read_text(encoding="utf-8"), str(path.resolve())
    archive = Path(test_source).expanduser()
    if _is_url(test_source):
        archive = _download(test_source, cache_dir / "downloads" / _cache_name(test_source))
    elif not archive.is_file():
        raise SuiteSetupError(f"--test-source {test_source}: no such file")
    return read_test_file_from_archive(archive), f"{test_source}:{TEST_FILE_MEMBER}"


def _cache_name(url: str) -> str:
    # one readable, collision-resistant file name per URL
    return hashlib.sha256(url.encode()).hexdigest()[:12] + "-" + url.rstrip("/").rsplit("/", 1)[-1]


def installed_transformers_dir() -> Path:
    """The directory of the transformers package this interpreter imports (found without importing it)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise SuiteSetupError("transformers is not installed in this interpreter")
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_workspace(
    sdist: Path, test_source_text: str, workspace: Path, swap_names: Iterable[str]
) -> dict[str, object]:
    """Lay out ``workspace`` as a transformers ``tests/`` tree holding the mixins, the stubs and both test copies.

    Returns a description: the mixins copied, the stubs written, the test file of each variant and the names
    swapped in ``ours``.
    """
    if workspace.exists():
        shutil.rmtree(workspace)  # a fresh tree each run: no test copy or stub from another version lingers
    tests_dir = workspace / "tests"
    tests_dir.mkdir(parents=True)
    mixins = extract_mixins(sdist, tests_dir)
    stubs = []
    for relative, text in HELPER_STUBS.items():
        path = tests_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        stubs.append(relative)
    # test_pipeline_mixin reads the Hub's tiny-model index (no entry: its pipeline tests skip, for both variants,
    # as they would need tiny checkpoints from the Hub) and re-imports transformers from ../src/transformers
    (tests_dir / "utils" / "tiny_model_summary.json").write_text("{}\n", encoding="utf-8")
    (workspace / "src").mkdir()
    (workspace / "src" / "transformers").symlink_to(installed_transformers_dir(), target_is_directory=True)
    model_dir = tests_dir / "models" / "convnextv2"
    model_dir.mkdir(parents=True)
    for package_dir in {tests_dir, *(p.parent for p in tests_dir.rglob("*.py")), model_dir, model_dir.parent}:
        (package_dir / "__init__.py").touch()
    rewritten, swapped = rewrite_imports(test_source_text, swap_names)
    files = {
        "ours": model_dir / "test_modeling_convnextv2_ours.py",
        "builtin": model_dir / "test_modeling_convnextv2_builtin.py",
    }
    files["ours"].write_text(rewritten, encoding="utf-8")
    files["builtin"].write_text(test_source_text, encoding="utf-8")
    (workspace / "conftest.py").write_text(WORKSPACE_CONFTEST, encoding="utf-8")
    # an ini file of its own: rootdir here, and no settings from this repository's pyproject.toml
    (workspace / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    return {"mixins": mixins, "stubs": stubs, "files": {k: str(v) for k, v in files.items()}, "swapped": swapped}


# ----------------------------------------------------------------------------------------------------------------
# Running and reading the results
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TestResult:
    """One test's outcome: ``passed``, ``skipped``, ``failed`` or ``error``, and the first line of its message."""

    outcome: str
    message: str = ""


def parse_junit(xml_path: Path) -> dict[str, TestResult]:
    """Outcomes from a pytest junit XML file, keyed ``TestClass::test_name`` (the module name left out, so the two
    variants' copies of a test share a key)."""
    results: dict[str, TestResult] = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        key = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        result = TestResult("passed")
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = element.get("message") or (element.text or "")
                first = next((line.strip() for line in text.splitlines() if line.strip()), "")
                result = TestResult(outcome, first[:300])
                break
        # a teardown error is a second <testcase> with the same name; keep the worse outcome
        if key not in results or results[key].outcome in ("passed", "skipped"):
            results[key] = result
    return results


def count(results: dict[str, TestResult]) -> dict[str, int]:
    """Passed / skipped / failed / error counts."""
    counts = {"passed": 0, "skipped": 0, "failed": 0, "error": 0}
    for result in results.values():
        counts[result.outcome] += 1
    return counts


def skip_differences(ours: dict[str, TestResult], builtin: dict[str, TestResult]) -> list[str]:
    """Tests that run (pass or fail) for the built-in but are skipped for ours, or are missing from ours."""
    return sorted(
        key
        for key, result in builtin.items()
        if result.outcome != "skipped" and (key not in ours or ours[key].outcome == "skipped")
    )


def check_origins(origins: dict[str, str], variant: str) -> list[str]:
    """Problems with where a variant's ConvNextV2* classes came from (empty when all is as meant)."""
    expected = PACKAGE if variant == "ours" else "transformers"
    if not origins:
        return [f"{variant}: no ConvNextV2* class was collected"]
    return [
        f"{variant}: {name} comes from {module}, not {expected}"
        for name, module in sorted(origins.items())
        if module.split(".")[0] != expected
    ]


def run_variant(
    variant: str, workspace: Path, test_path: Path, repo: Path, pytest_args: list[str], timeout: float
) -> dict[str, object]:
    """Run one test copy with pytest in a subprocess; return its outcomes, counts and the classes' origins."""
    junit = workspace / f"junit_{variant}.xml"
    origins_path = workspace / f"origins_{variant}.json"
    for path in (junit, origins_path):
        path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE"]
    command += ["-c", str(workspace / "pytest.ini"), "--rootdir", str(workspace), f"--junitxml={junit}"]
    command += ["-W", "ignore::pytest.PytestUnknownMarkWarning"]  # transformers' markers live in its root conftest
    if importlib.util.find_spec("xdist") is not None:
        command += ["-n", "1"]  # a crash kills a worker, not the run; one worker leaves the machine to others
    command += [str(test_path), *pytest_args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env[ORIGINS_ENV] = str(origins_path)
    print(f"[suite] {variant}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise SuiteSetupError(f"{variant}: pytest ran past {timeout:.0f} s") from error
    seconds = time.perf_counter() - start
    (workspace / f"pytest_{variant}.log").write_text(completed.stdout + completed.stderr, encoding="utf-8")
    if not junit.exists() or completed.returncode not in (0, 1):
        tail = (completed.stdout + completed.stderr)[-4000:]
        raise SuiteSetupError(f"{variant}: pytest exited {completed.returncode} without test results:\n{tail}")
    results = parse_junit(junit)
    origins = json.loads(origins_path.read_text(encoding="utf-8")) if origins_path.exists() else {}
    return {"results": results, "counts": count(results), "origins": origins, "seconds": round(seconds, 1)}


def render_report(runs: dict[str, dict[str, object]], differences: list[str], problems: list[str]) -> str:
    """A human-readable summary of the runs."""
    out = []
    for variant, run in runs.items():
        counts = run["counts"]
        out.append(
            f"{variant:8s} passed {counts['passed']:3d}  skipped {counts['skipped']:3d}  failed {counts['failed']:3d}"
            f"  error {counts['error']:3d}  ({run['seconds']} s)"
        )
    for variant, run in runs.items():
        bad = {k: r for k, r in run["results"].items() if r.outcome in ("failed", "error")}
        out.append(f"\n{variant}: {len(bad)} failed or errored")
        out += [f"  FAIL {key}: {result.message}" for key, result in sorted(bad.items())]
        if variant == "ours":
            skipped = {k: r for k, r in run["results"].items() if r.outcome == "skipped"}
            out.append(f"{variant}: {len(skipped)} skipped")
            out += [f"  SKIP {key}: {result.message}" for key, result in sorted(skipped.items())]
    if "ours" in runs and "builtin" in runs:
        out.append(f"\nskipped or missing for ours but run for the built-in: {len(differences)}")
        out += [f"  {key}" for key in differences]
    out += [f"PROBLEM {problem}" for problem in problems]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--test-file",
        help=f"path or URL of transformers' {TEST_FILE_MEMBER} (default, without --test-source: "
        f"{TEST_FILE_URL.format(version='VERSION')})",
    )
    parser.add_argument("--test-source", help="path or URL of a transformers source archive holding the test file")
    parser.add_argument(
        "--transformers-version",
        default=importlib.metadata.version("transformers"),
        help="version of the sdist whose mixins to use (default: the installed transformers)",
    )
    parser.add_argument("--sdist", help="a local transformers sdist (.tar.gz) instead of downloading one")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help=f"default: {DEFAULT_CACHE_DIR}")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="the checkout whose package is tested")
    parser.add_argument("--variant", choices=(*VARIANTS, "both"), default="both")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per variant")
    parser.add_argument("--report", type=Path, help="JSON report path (default: <cache-dir>/report.json)")
    args = parser.parse_args(argv)

    cache_dir = args.cache_dir.expanduser().resolve()
    repo = args.repo.resolve()
    try:
        sdist = Path(args.sdist).resolve() if args.sdist else ensure_sdist(args.transformers_version, cache_dir)
        if importlib.util.find_spec("parameterized") is None:
            raise SuiteSetupError("transformers' test mixins import `parameterized`: pip install parameterized")
        text, origin = load_test_file(args.test_file, args.test_source, cache_dir, args.transformers_version)
        swap_names = package_public_names(repo / PACKAGE / "__init__.py")
        try:
            layout = prepare_workspace(sdist, text, cache_dir / "workspace", swap_names)
        except ValueError as error:
            raise SuiteSetupError(f"{origin}: {error}") from error
        print(f"[suite] mixins from {sdist.name}; test file {origin}; stubs {', '.join(layout['stubs'])}")
        print(f"[suite] names imported from {PACKAGE} in `ours`: {', '.join(layout['swapped'])}", flush=True)
        variants = VARIANTS if args.variant == "both" else (args.variant,)
        workspace = cache_dir / "workspace"
        runs = {
            variant: run_variant(variant, workspace, Path(layout["files"][variant]), repo, pytest_args, args.timeout)
            for variant in variants
        }
    except SuiteSetupError as error:
        print(f"[suite] error: {error}", file=sys.stderr)
        return 2

    problems = [problem for variant, run in runs.items() for problem in check_origins(run["origins"], variant)]
    differences = skip_differences(runs["ours"]["results"], runs["builtin"]["results"]) if len(runs) == 2 else []
    print(render_report(runs, differences, problems))
    report = {
        "transformers_sdist": sdist.name,
        "test_file": origin,
        "stubs": layout["stubs"],
        "swapped": layout["swapped"],
        "skipped_for_ours_but_run_for_builtin": differences,
        "problems": problems,
        "runs": {
            variant: {
                "counts": run["counts"],
                "seconds": run["seconds"],
                "origins": run["origins"],
                "results": {key: dataclasses.asdict(result) for key, result in sorted(run["results"].items())},
            }
            for variant, run in runs.items()
        },
    }
    report_path = args.report or cache_dir / "report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"[suite] report: {report_path}; logs and junit files: {workspace}")
    ours = runs.get("ours")
    failed = bool(ours) and (ours["counts"]["failed"] + ours["counts"]["error"]) > 0
    return 1 if failed or differences or problems else 0


if __name__ == "__main__":
    sys.exit(main())
