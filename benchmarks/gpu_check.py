"""One command for a GPU lent for minutes (issue 13): is the package correct on the device, and how fast is it there.

    make gpu-check                                  # python benchmarks/gpu_check.py --device cuda
    make gpu-check GPU_CHECK_OUTPUT=/somewhere/gpu_check.json
    make gpu-check DEVICE=cpu SMOKE=1               # tiny sizes on the CPU; the test suite runs this

Three phases, each with a time budget. The budgets are cumulative deadlines from the start, so time a phase leaves
unused rolls over to the next one, and a phase never runs past its deadline by more than a short grace:

1. ``tests``: ``pytest -m device --device DEVICE`` over the files holding the device tests (parity with the built-in
   classes in fp32 with TF32 off, the training autograd functions against autograd, sparse against dense FCMAE with
   gradients, bf16 autocast and fp16 gradients, the GRN fold in half precision). At its deadline pytest is
   interrupted (SIGINT: it still reports what ran) and the tests not reached are recorded as not run.
2. ``benchmark eager``: ``benchmark.py --preset gpu --modes eager``: V2-T inference (batch 256) and training step
   (batch 128), the FCMAE-B step sparse and dense with peak memory and ViTMAE-B beside it (batch 128), all under bf16
   autocast, the built-in and ours with bf16 weights, and the ablation (every fast path on, then each taken out) in
   bf16 autocast, bf16 and fp16 weights and fp32, that the rows ``DEVICE_DEFAULTS[("cuda", dtype)]`` are set from.
3. ``benchmark compiled``: the same inference and FCMAE groups under ``torch.compile`` (mode default).

The benchmark skips groups and cases that would start after its deadline and lists them; it writes its JSON after
every group, so a phase killed at its deadline plus the grace keeps the groups it finished. Compiling comes last: it
is the slowest and the least certain part.

Output: one JSON file (environment, the tests' outcome, benchmark rows, what was skipped, the issue's targets met or
not, the ablation's verdict per fast path) and the same as tables on stdout, last, so a log's tail holds them.

This launcher needs only the standard library. It runs the phases with the first Python that imports torch,
transformers, pytest and this package (and, for cuda, sees a GPU): ``--python``, then ``.venv``, then
``build/gpu-check-venv``, then the one running it, then ``python3`` on the PATH. A GPU machine whose image holds torch
and transformers needs no install; where none qualifies, ``--install-env`` builds ``build/gpu-check-venv`` from PyPI.
Exit status: 0 when every test that ran passed (targets are measurements, not pass/fail), 1 when a test failed or a
phase broke, 3 when no Python qualifies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = ["tests/test_fast_paths.py", "tests/test_modeling_convnextv2.py", "tests/test_fcmae.py"]
INSTALLED_ENV = ROOT / "build" / "gpu-check-venv"
FAST_PATHS = [
    "grn_fold", "inplace_gelu", "square_sum_norm", "fused_gelu_grn_linear", "sparse_depthwise_conv",
    "sparse_downsample_matmul", "dense_depthwise_conv", "chunked_mlp", "onednn_linear",
]  # fmt: skip

# (budget seconds per phase, cumulative): on an H100 the tests take about a minute, the eager benchmark about two,
# and compiling V2-T inference twice and three training steps (FCMAE-B dense and sparse, ViTMAE-B) the rest; 480 s
# in all is issue 13's "about 8 minutes", and the worst case (the last phase's grace) stays under 10 minutes
GPU_BUDGETS = {"tests": 100.0, "benchmark eager": 130.0, "benchmark compiled": 250.0}
# the smoke run compiles nothing (minutes on a 2-core CPU): its compiled phase is recorded as skipped
SMOKE_BUDGETS = {"tests": 60.0, "benchmark eager": 90.0, "benchmark compiled": 0.0}
GRACE_S = {"tests": 20.0, "benchmark eager": 45.0, "benchmark compiled": 45.0}  # past the deadline, then killed
# the ablation's precisions (benchmark.py --ablate-precisions): the run's own (bf16 autocast) first, then weights in
# bf16 and fp16 and plain fp32, each a row of DEVICE_DEFAULTS (device, dtype); the time budget cuts from the end
GPU_ABLATE_PRECISIONS = ["bf16-autocast", "bf16", "fp16", "fp32"]
SMOKE_ABLATE_PRECISIONS = ["bf16-autocast", "bf16"]
# the precisions of the run's own dtype (--preset gpu: bf16 autocast): benchmark.py names the rows of the first
# ablation precision without a suffix when it is one of these, and every other precision's rows with " [precision]"
RUN_PRECISIONS = ("bf16", "bf16-autocast")
# the benchmark groups (benchmark.py --only) of each benchmark phase; --groups keeps a subset
PHASE_GROUPS = {"benchmark eager": ["infer", "train", "fcmae", "ablate"], "benchmark compiled": ["infer", "fcmae"]}
# the dtype (DEVICE_DEFAULTS key) of each precision: autocast counts as its dtype
PRECISION_DTYPES = {"bf16-autocast": "bfloat16", "bf16": "bfloat16", "fp16-autocast": "float16", "fp16": "float16",
                    "fp32": "float32"}  # fmt: skip
SMOKE_SIZES = [
    "--model", "atto", "--fcmae-model", "atto", "--image-size", "64", "--batch", "2", "--train-batch", "2",
    "--fcmae-batch", "2", "--vitmae", "tiny", "--warmup", "0", "--repeats", "1",
]  # fmt: skip
# the smoke run's tests: one of each kind (fast path against the reference, sparse against dense, bf16/fp16 gradients)
SMOKE_TESTS = (
    "test_each_fast_path_alone or (test_sparse_and_dense_paths_agree and overrides0) "
    "or (bf16_autocast_and_in_fp16 and sparse)"
)

# issue 13's targets: (label, how the value is read from the rows, comparison, bound, what it is against)
TARGETS = [
    ("eager inference", ("ratio", "infer ours eager"), ">=", 2.0, "the built-in, eager"),
    ("compiled inference", ("ratio", "infer ours compile"), ">=", 1.15, "the compiled built-in"),
    ("training step", ("ratio", "train ours eager"), ">=", 1.5, "the built-in, eager"),
    ("sparse FCMAE, eager", ("ratio", "fcmae sparse eager"), ">=", 2.3, "the dense path, eager"),
    ("sparse FCMAE, compiled", ("ratio", "fcmae sparse compile"), ">=", 1.5, "the dense path, both compiled"),
    ("sparse FCMAE memory", ("memory_ratio", "fcmae sparse eager"), "<=", 0.45, "the dense path's peak, eager"),
    ("FCMAE step per image, eager", ("speed", "fcmae sparse eager", "fcmae vitmae-base eager"), ">=", 1.0,
     "ViTMAE-B's pretraining step"),
    ("FCMAE step per image, compiled", ("speed", "fcmae sparse compile", "fcmae vitmae-base compile"), ">=", 1.0,
     "ViTMAE-B's, both compiled"),
]  # fmt: skip

# where each fast path runs, by the ablation's groups: it is worth switching on where it helps in one and hurts in none
ABLATION_GROUPS = {
    "grn_fold": ["infer", "train"],
    "inplace_gelu": ["infer"],
    "square_sum_norm": ["infer", "train"],
    "fused_gelu_grn_linear": ["train", "fcmae"],
    "sparse_depthwise_conv": ["fcmae"],
    "sparse_downsample_matmul": ["fcmae"],
    "dense_depthwise_conv": ["train"],
    "chunked_mlp": ["infer"],
    "onednn_linear": ["infer"],
}
NOISE = 0.03  # speed changes within 3% are read as none
MEMORY_GAIN = 0.9  # a path that keeps the step at <= 90% of the memory without it is worth it at equal speed

PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, transformers, pytest
import convnextv2_hf
device = torch.device(sys.argv[2])
info = {"python": sys.executable, "torch": torch.__version__, "transformers": transformers.__version__,
        "pytest": pytest.__version__, "cuda": torch.cuda.is_available(), "device_name": None}
if device.type == "cuda":
    if not torch.cuda.is_available():
        raise SystemExit("torch " + torch.__version__ + " sees no CUDA device")
    info["device_name"] = torch.cuda.get_device_name(device)
else:  # the benchmark's own name for a CPU
    sys.path.insert(0, sys.argv[1] + "/benchmarks")
    from benchmark import cpu_name
    info["device_name"] = cpu_name()
try:
    import timm
    info["timm"] = timm.__version__
except ImportError:
    info["timm"] = None
print(json.dumps(info))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda[:N] (default) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few tests, nothing compiled (CPU smoke)")
    parser.add_argument("--output", help="JSON file (default: outputs/gpu_check_<device>[_smoke].json)")
    parser.add_argument("--python", help="the interpreter for the phases (default: the first that qualifies)")
    parser.add_argument("--install-env", action="store_true", help=f"no Python qualifies: build {INSTALLED_ENV}")
    parser.add_argument(
        "--ablate-precisions",
        nargs="+",
        choices=list(PRECISION_DTYPES),
        help="the ablation's precisions, in order (default: " + " ".join(GPU_ABLATE_PRECISIONS) + "; smoke: "
        + " ".join(SMOKE_ABLATE_PRECISIONS) + "); e.g. fp32 alone, for a second call that fills what a budget cut",
    )
    parser.add_argument(
        "--groups",
        nargs="+",
        choices=PHASE_GROUPS["benchmark eager"],
        help="only these benchmark groups, in the phases that have them (default: all); e.g. ablate alone, for a "
        "second call",
    )
    for phase in GPU_BUDGETS:
        flag = "--" + phase.replace("benchmark ", "").replace(" ", "-") + "-budget"
        parser.add_argument(flag, type=float, dest=phase.replace(" ", "_"), help=f"seconds for phase '{phase}'")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device {args.device!r}: the check runs on cpu or cuda[:N]")
    defaults = SMOKE_BUDGETS if args.smoke else GPU_BUDGETS
    args.budgets = {}
    for phase, default in defaults.items():
        given = getattr(args, phase.replace(" ", "_"))
        if given is not None and given < 0:
            parser.error(f"the budget of phase '{phase}' must be >= 0 seconds, got {given}")
        args.budgets[phase] = default if given is None else given
    if args.ablate_precisions is None:
        args.ablate_precisions = SMOKE_ABLATE_PRECISIONS if args.smoke else GPU_ABLATE_PRECISIONS
    elif len(set(args.ablate_precisions)) != len(args.ablate_precisions):
        parser.error(f"--ablate-precisions names a precision twice: {' '.join(args.ablate_precisions)}")
    device_type = args.device.split(":")[0]
    args.output = Path(
        args.output or ROOT / "outputs" / f"gpu_check_{device_type}{'_smoke' if args.smoke else ''}.json"
    )
    return args


# ----------------------------------------------------------------------------------------------------------
# the interpreter
# ----------------------------------------------------------------------------------------------------------


def probe(python: str, device: str) -> tuple[dict | None, str]:
    """(versions and device name, "") when ``python`` can run the check on ``device``, else (None, why not)."""
    try:
        result = subprocess.run(
            [python, "-c", PROBE, str(ROOT), device], capture_output=True, text=True, timeout=300, env=child_env()
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"{type(error).__name__}: {error}"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return None, lines[-1] if lines else f"exit status {result.returncode}"
    return json.loads(result.stdout.strip().splitlines()[-1]), ""


def candidates(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    found = [str(ROOT / ".venv" / "bin" / "python"), str(INSTALLED_ENV / "bin" / "python"), sys.executable]
    found += [path for path in (shutil.which("python3"), shutil.which("python")) if path]
    unique = []
    for path in found:
        if path not in unique and (Path(path).exists() or path == explicit):
            unique.append(path)
    return unique


def install_env() -> str:
    """A venv under build/ with torch from PyPI (the CUDA wheels on Linux) and this package's requirements."""
    python = INSTALLED_ENV / "bin" / "python"
    print(f"building {INSTALLED_ENV} from PyPI (torch, torchvision, this package, pytest, timm)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(INSTALLED_ENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + ["torch", "torchvision"], check=True)
    subprocess.run(pip + ["-e", str(ROOT), "pytest", "timm"], check=True)
    return str(python)


def choose_python(args: argparse.Namespace) -> tuple[str, dict] | None:
    tried = []
    for python in candidates(args.python):
        info, why = probe(python, args.device)
        if info is not None:
            return python, info
        tried.append(f"  {python}: {why}")
    if args.install_env and not args.python:
        try:
            python = install_env()
        except (OSError, subprocess.CalledProcessError) as error:
            tried.append(f"  {INSTALLED_ENV}: could not be built ({error})")
        else:
            info, why = probe(python, args.device)
            if info is not None:
                return python, info
            tried.append(f"  {python}: {why}")
    print(
        f"gpu-check: no Python here can run the check on {args.device} (it needs torch, transformers, pytest and "
        "this package importable"
        + (", and a CUDA device" if args.device.startswith("cuda") else "")
        + "). Tried:\n"
        + "\n".join(tried)
        + "\nName one with GPU_CHECK_PYTHON=/path/to/python (--python), or, where PyPI can be reached, let the check "
        f"build {INSTALLED_ENV.relative_to(ROOT)} with INSTALL=1 (--install-env).",
        file=sys.stderr,
    )
    return None


def child_env() -> dict[str, str]:
    """The phases import this package from the checkout (no install needed) and never reach the Hub."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# ----------------------------------------------------------------------------------------------------------
# running a phase under its deadline
# ----------------------------------------------------------------------------------------------------------


def run_phase(command: list[str], deadline: float, grace_s: float, interrupt_first: bool) -> dict:
    """Run ``command`` with its output passed through, until ``deadline`` (``time.monotonic``). Past it, SIGINT where
    ``interrupt_first`` (pytest then reports what ran), and SIGKILL ``grace_s`` after the deadline."""
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: the kill reaches compile workers too
    )  # fmt: skip
    tail: list[str] = []

    def copy_output() -> None:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
            del tail[:-40]

    reader = threading.Thread(target=copy_output, daemon=True)
    reader.start()
    outcome = "finished"
    try:
        try:
            process.wait(timeout=_left(deadline))
        except subprocess.TimeoutExpired:
            if interrupt_first:
                outcome = "interrupted at its deadline"
                _signal(process, signal.SIGINT)
                try:
                    process.wait(timeout=max(grace_s, 1.0))
                except subprocess.TimeoutExpired:
                    pass
            if process.poll() is None:
                outcome = "killed at its deadline" + (f" and {grace_s:.0f} s of grace" if interrupt_first else "")
                _signal(process, signal.SIGKILL)
                process.wait()
    except KeyboardInterrupt:  # the phase runs in its own session: a Ctrl-C here must end it too
        _signal(process, signal.SIGKILL)
        raise
    reader.join(timeout=5)
    return {
        "command": command,
        "returncode": process.returncode,
        "outcome": outcome,
        "seconds": round(time.monotonic() - started, 1),
        "output_tail": "".join(tail[-15:]),
    }


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _signal(process: subprocess.Popen, number: int) -> None:
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        pass


def parse_junit(path: Path) -> dict:
    """Counts and the failures of a pytest junit XML file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:  # the test an interrupt stopped: an empty element, neither passed nor failed
            continue
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                if child.tag != "skipped":
                    failures.append({"test": name, "message": (child.get("message") or "")[:300]})
                break
        counts[outcome] += 1
    return {**counts, "failures": failures}


def run_tests(args: argparse.Namespace, python: str, deadline: float, workdir: Path) -> dict:
    junit = workdir / "tests.xml"
    command = [python, "-m", "pytest", "-q", "-m", "device", "--device", args.device, "-p", "no:cacheprovider"]
    command += ["--junitxml", str(junit)] + (["-k", SMOKE_TESTS] if args.smoke else []) + TEST_FILES
    phase = run_phase(command, deadline, GRACE_S["tests"], interrupt_first=True)
    result = {**phase, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    if junit.exists():
        result.update(parse_junit(junit))
    interrupted = phase["outcome"] != "finished"
    # pytest: 0 all passed, 1 some failed, 2 interrupted, 5 none collected; anything else broke before testing
    if result["failed"] or result["errors"]:
        result["status"] = "failed"
    elif interrupted:
        result["status"] = "incomplete: time budget spent"
    elif phase["returncode"] == 0 and result["passed"]:
        result["status"] = "passed"
    else:
        result["status"] = f"error (pytest exit status {phase['returncode']})"
    return result


def phase_groups(args, phase: str) -> list[str]:
    """The benchmark groups ``phase`` runs: ``PHASE_GROUPS``, kept to ``--groups`` where given."""
    return [group for group in PHASE_GROUPS[phase] if args.groups is None or group in args.groups]


def run_benchmark(args, python: str, phase: str, deadline: float, workdir: Path) -> tuple[dict, dict | None]:
    output = workdir / (phase.replace(" ", "_") + ".json")
    modes, groups = (["eager"] if phase.endswith("eager") else ["compile"]), phase_groups(args, phase)
    command = [python, str(ROOT / "benchmarks" / "benchmark.py"), "--preset", "gpu", "--device", args.device]
    command += (SMOKE_SIZES if args.smoke else []) + ["--modes", *modes, "--only", *groups]
    command += ["--runtimes"]  # ONNX Runtime / OpenVINO rows are CPU deployment anchors, not part of this check
    if "ablate" in groups:
        command += ["--ablate-precisions", *args.ablate_precisions]
    command += ["--time-budget", f"{_left(deadline):.0f}", "--output", str(output)]
    result = run_phase(command, deadline + GRACE_S[phase], 0.0, interrupt_first=False)
    benchmark = json.loads(output.read_text()) if output.exists() else None
    if benchmark is None:
        result["status"] = "error: wrote no results"
    elif result["outcome"] != "finished":
        result["status"] = "incomplete: killed past its deadline (rows of the group it was in are lost)"
    elif result["returncode"] != 0:
        result["status"] = f"error (exit status {result['returncode']})"
    else:
        result["status"] = "done" if not benchmark["skipped"] else "done, parts skipped for time"
    return result, benchmark


# ----------------------------------------------------------------------------------------------------------
# reading the rows: targets and the ablation
# ----------------------------------------------------------------------------------------------------------


def target_value(rows: dict[str, dict], source: tuple) -> float | None:
    kind, name, *anchor = source
    if name not in rows:
        return None
    if kind == "speed":  # one row's img/s over another's, by name (the ViTMAE horizon)
        vitmae = rows.get(anchor[0])
        return rows[name]["img_per_s"] / vitmae["img_per_s"] if vitmae else None
    return rows[name].get(kind)


def evaluate_targets(rows: dict[str, dict], vitmae: str) -> list[dict]:
    targets = []
    for label, source, comparison, bound, against in TARGETS:
        source = tuple(part.replace("vitmae-base", f"vitmae-{vitmae}") for part in source)
        against = against.replace("ViTMAE-B", "ViTMAE-B" if vitmae == "base" else f"ViTMAE-{vitmae}")
        value = target_value(rows, source)
        if value is None:
            status = "not measured"
        else:
            status = "met" if (value >= bound if comparison == ">=" else value <= bound) else "not met"
        share = source[0] == "memory_ratio"  # a share of the anchor's memory, shown in %; the rest are speed ratios
        required = f"{comparison.replace('>=', '≥').replace('<=', '≤')} " + (f"{bound:.0%}" if share else f"{bound:g}x")
        shown = "-" if value is None else f"{value:.0%}" if share else f"{value:.2f}x"
        targets.append(
            {"target": label, "value": value, "shown": shown, "required": required, "against": against,
             "status": status}
        )  # fmt: skip
    return targets


def row_suffix(precision: str, index: int) -> str:
    """How benchmark.py names the ablation rows of the ``index``-th ``--ablate-precisions`` entry: no suffix for the
    first where it is the run's own precision (``RUN_PRECISIONS``), else `` [precision]``."""
    return "" if index == 0 and precision in RUN_PRECISIONS else f" [{precision}]"


def ablation_by_precision(rows: dict[str, dict], precisions: list[str]) -> dict:
    """``ablation_verdicts`` for every precision the ablation ran in (rows named as ``row_suffix`` says), and per
    dtype the paths on in every precision of that dtype: the suggested row
    ``DEVICE_DEFAULTS[(device, dtype)]`` (bf16 weights and bf16 autocast both decide the bf16 row)."""
    by_precision = {}
    for index, precision in enumerate(precisions):
        verdicts = ablation_verdicts(rows, row_suffix(precision, index))
        if any(entry["verdict"] != "not measured" for entry in verdicts["paths"].values()):
            by_precision[precision] = verdicts
    by_dtype: dict[str, list[str]] = {}
    for precision, verdicts in by_precision.items():
        dtype = PRECISION_DTYPES[precision]
        suggested = verdicts["suggested_defaults"]
        by_dtype[dtype] = [path for path in by_dtype.get(dtype, suggested) if path in suggested]
    return {"precisions": by_precision, "suggested_by_dtype": by_dtype}


def ablation_verdicts(rows: dict[str, dict], suffix: str = "") -> dict:
    """Per fast path, the speed (and memory) of every path on against the same without it, in each group where it
    runs; the verdict says whether ``DEVICE_DEFAULTS`` for this device should switch it on. ``suffix``: the
    precision of a second ablation (`` [bf16]``), as benchmark.py names its rows."""
    paths = {}
    for path, groups in ABLATION_GROUPS.items():
        effects: dict[str, float] = {}
        for group in groups:
            without = rows.get(f"ablate {group} ours, without {path}{suffix}")
            if without and without.get("ratio"):
                effects[f"{group} speed"] = 1 / without["ratio"]  # the row is against "ours": its inverse is the gain
                if group != "infer" and without.get("memory_ratio"):
                    effects[f"{group} memory"] = 1 / without["memory_ratio"]
        speeds = [value for key, value in effects.items() if key.endswith("speed")]
        memory_saved = any(value <= MEMORY_GAIN for key, value in effects.items() if key.endswith("memory"))
        if not speeds:
            verdict = "not measured"
        elif min(speeds) < 1 - NOISE and (max(speeds) > 1 + NOISE or memory_saved):
            verdict = "mixed: decide by hand"
        elif min(speeds) < 1 - NOISE:
            verdict = "off: slower"
        elif max(speeds) > 1 + NOISE:
            verdict = "on: faster"
        elif memory_saved:
            verdict = "on: less memory at the same speed"
        else:
            verdict = "off: no gain"
        paths[path] = {"effects": effects, "verdict": verdict}
    suggested = [path for path, entry in paths.items() if entry["verdict"].startswith("on")]
    return {"paths": paths, "suggested_defaults": suggested}


# ----------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    lines = [
        "",
        f"== gpu-check on {report['device']} ({report['device_type']}){' [smoke]' if report['smoke'] else ''}, "
        f"torch {report['torch']}, transformers {report['transformers']}, {report['date']}, "
        f"{report['seconds']:.0f} s ==",
    ]
    tests = report["tests"]
    if tests:
        lines.append(
            f"tests (pytest -m device --device {report['device_type']}): {tests['status']}: {tests['passed']} passed, "
            f"{tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped, {tests['seconds']:.0f} s"
        )
        lines += [f"  FAILED {failure['test']}: {failure['message']}" for failure in tests["failures"][:20]]
    for phase in report["phases"]:
        lines.append(f"phase {phase['name']}: {phase['status']} ({phase.get('seconds', 0):.0f} s)")
    lines += ["", f"{'case':<50} {'img/s':>10} {'ratio':>7} {'peak GB':>8} {'memory':>7}  anchor"]
    for row in report["rows"]:
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "-"
        memory = f"{row['memory_ratio']:.0%}" if row.get("memory_ratio") else "-"
        lines.append(
            f"{row['name']:<50} {row['img_per_s']:10.1f} {ratio:>7} {row.get('peak_gb') or 0:8.3f} {memory:>7}  "
            f"{row.get('anchor') or ''}"
        )
    lines += ["", f"{'target (issue 13)':<30} {'measured':>9} {'required':>9}  {'status':<13} against"]
    for target in report["targets"]:
        lines.append(
            f"{target['target']:<30} {target['shown']:>9} {target['required']:>9}  {target['status']:<13} "
            f"{target['against']}"
        )
    columns = ["infer speed", "train speed", "train memory", "fcmae speed", "fcmae memory"]
    lines += ["", "ablation: every fast path on against the same without the path, where it runs (speed: > 1 faster "
              "with it; memory: < 1 less with it)"]  # fmt: skip
    lines.append(f"{'fast path':<24}" + "".join(f"{column:>13}" for column in columns) + "  verdict")
    for path, entry in report["ablation"]["paths"].items():
        effects = entry["effects"]
        cells = "".join(f"{effects[column]:12.2f}x" if column in effects else f"{'':>13}" for column in columns)
        lines.append(f"{path:<24}{cells}  {entry['verdict']}")
    suggested = report["ablation"]["suggested_defaults"]
    lines.append(
        f"suggested DEVICE_DEFAULTS[{report['device_type']!r}] from this run: {suggested} "
        "(fast_paths_convnextv2.py; speed within 3% counts as none)"
    )
    per_precision = report.get("ablation_by_precision", {})
    for precision, verdicts in per_precision.get("precisions", {}).items():
        cells = ", ".join(f"{path} {entry['verdict']}" for path, entry in verdicts["paths"].items())
        lines.append(f"  ablation in {precision}: {cells}")
    for dtype, paths in per_precision.get("suggested_by_dtype", {}).items():
        lines.append(f"suggested DEVICE_DEFAULTS[({report['device_type']!r}, torch.{dtype})]: {paths}")
    for skipped in report["skipped"]:
        lines.append(f"skipped: {skipped['name']}: {skipped['reason']}")
    lines.append(f"wrote {report['output']}")
    return "\n".join(lines)


def save(report: dict) -> None:
    """Atomically: a check killed while writing leaves the previous version of the file."""
    output = Path(report["output"])
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    os.replace(partial, output)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_wall, started = time.time(), time.monotonic()
    chosen = choose_python(args)
    if chosen is None:
        return 3
    python, info = chosen
    device_type = args.device.split(":")[0]
    report = {
        "device": info["device_name"],
        "device_type": device_type,
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started_wall)),
        "seconds": 0.0,
        "python": python,
        **{key: info[key] for key in ("torch", "transformers", "pytest", "timm")},
        "budgets_s": args.budgets,
        "output": str(args.output),
        "phases": [],
        "tests": None,
        "rows": [],
        "skipped": [],
        "targets": [],
        "ablation": {"paths": {}, "suggested_defaults": []},
        "ablation_by_precision": {"precisions": {}, "suggested_by_dtype": {}},
    }
    print(f"gpu-check: {python} (torch {info['torch']}, transformers {info['transformers']}) on {report['device']}")
    deadline = started
    broken = False
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        for phase, budget in args.budgets.items():
            deadline += budget
            if budget == 0:  # the phase is off (the smoke run's compiling)
                reason = "budget 0 s"
            elif phase != "tests" and not phase_groups(args, phase):
                reason = "none of its groups asked for (--groups)"
            elif deadline - time.monotonic() <= 0:
                reason = "no time left in its budget"
            else:
                reason = None
            if reason:
                report["phases"].append({"name": phase, "status": f"skipped: {reason}"})
                report["skipped"].append({"name": f"phase {phase}", "reason": reason})
                continue
            print(f"\n-- {phase} (until {deadline - started:.0f} s) --", flush=True)
            if phase == "tests":
                result = run_tests(args, python, deadline, Path(workdir))
                report["tests"] = result
                broken |= not result["status"].startswith(("passed", "incomplete"))
            else:
                result, benchmark = run_benchmark(args, python, phase, deadline, Path(workdir))
                if benchmark is not None:
                    report["rows"] += benchmark["rows"]
                    report["skipped"] += [{**item, "name": f"{phase}: {item['name']}"} for item in benchmark["skipped"]]
                broken |= result["status"].startswith("error")
            report["phases"].append({"name": phase, **{k: v for k, v in result.items() if k != "failures"}})
            report["seconds"] = round(time.monotonic() - started, 1)
            save(report)
    rows = {row["name"]: row for row in report["rows"]}
    vitmae = "tiny" if args.smoke else "base"
    report["targets"] = evaluate_targets(rows, vitmae)
    report["ablation"] = ablation_verdicts(rows)
    report["ablation_by_precision"] = ablation_by_precision(rows, args.ablate_precisions)
    report["seconds"] = round(time.monotonic() - started, 1)
    save(report)
    print(format_report(report))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
