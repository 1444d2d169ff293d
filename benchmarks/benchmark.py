"""Throughput of our ConvNeXt V2 classes against the anchors, measured in the same run with identical weights.

Anchors: transformers' built-in ConvNeXt V2 (and timm's, when installed) for inference and training; the
dense (paper) FCMAE path for the sparse one, and transformers' ViTMAE-Base pretraining step beside it (the
horizon). ``--only ablate`` times our model with each way in to its speed taken out. Prints a table of img/s,
peak memory and ratios (speed and memory, against the anchor), and writes JSON (after every group, so a run cut
short keeps what it measured).

Peak memory: what one extra steady step allocates above what was alive before it (parameters, gradients and
optimizer state of the earlier steps excluded): on CUDA from the allocator's peak, on CPU, which keeps no
allocator statistics, from the allocations the profiler records.

``--time-budget`` makes a run fit a lease: a group or case that would start after it (or whose warm-up, judged by
the last one, would end after it) is skipped and listed under ``skipped`` in the JSON, instead of overrunning.

    python benchmarks/benchmark.py                      # CPU defaults: tiny, batch 8, FCMAE tiny batch 8
    python benchmarks/benchmark.py --preset gpu         # V2-T batch 256 / 128, FCMAE-B batch 128, bf16, compiled
    python benchmarks/benchmark.py --preset gpu --only ablate --modes eager
"""

from __future__ import annotations

import argparse
import atexit
import copy
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from transformers.models import convnextv2 as builtin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from convnextv2_hf import (  # noqa: E402
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
)
from convnextv2_hf.compat_convnextv2 import onednn_linear  # noqa: E402
from convnextv2_hf.configuration_convnextv2 import FAST_PATH_NAMES  # noqa: E402
from convnextv2_hf.cpu_memory import freed_memory_kept, glibc_version, keep_freed_memory  # noqa: E402
from convnextv2_hf.fast_paths_convnextv2 import native_bf16_cpu  # noqa: E402

# Defaults that a preset sets; any flag given on the command line wins over them.
PRESETS: dict[str, dict] = {
    # issue 13's GPU sizes: V2-T inference at batch 256 and a training step at 128, FCMAE-B at 128, all under bf16
    # autocast; timm's model eager only (a third compile of V2-T costs a minute and anchors nothing the targets need)
    "gpu": dict(
        device="cuda",
        dtype="bf16",
        model="tiny",
        batch=256,
        train_batch=128,
        fcmae_model="base",
        fcmae_batch=128,
        vitmae="base",
        warmup=2,
        repeats=6,
        modes=["eager", "compile"],
        timm="eager",
    ),
}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ablation precisions: (weights dtype, autocast dtype or None)
PRECISIONS: dict[str, tuple[str, str | None]] = {
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "fp16": ("fp16", None),
    "bf16-autocast": ("fp32", "bf16"),
    "fp16-autocast": ("fp32", "fp16"),
}
# how far the logits of a fast-path variant may be from the reference math in the same precision (of the largest)
ABLATION_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}
RUNTIMES = ("onnxruntime", "openvino")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="defaults for a device class; flags override them")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    parser.add_argument("--model", default="tiny", help="preset for inference and training")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="inference batch")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--fcmae-model", default="tiny")
    parser.add_argument("--fcmae-batch", type=int, default=8)
    parser.add_argument(
        "--vitmae",
        choices=sorted(VITMAE_SIZES) + ["none"],
        default="base",
        help="ViTMAE pretraining step measured beside the FCMAE step (the horizon: ViTMAE-Base against V2-Base; "
        "tiny: a smoke-test size)",
    )
    parser.add_argument("--timm", choices=["all", "eager", "none"], default="all", help="where timm's model is timed")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile variants")
    parser.add_argument(
        "--modes", nargs="+", choices=["eager", "compile"], default=None, help="eager, compiled or both (infer, fcmae)"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="run only these groups: infer train fcmae ablate (ablate: not by default)",
    )
    parser.add_argument(
        "--low-precision",
        nargs="*",
        choices=["weights", "autocast"],
        default=["weights", "autocast"],
        help="extra cases in --low-dtype: weights cast to it, and fp32 weights under autocast (inference, training "
        "step; autocast also for the sparse FCMAE step); none: --low-precision with no value",
    )
    parser.add_argument("--low-dtype", choices=["bf16", "fp16"], default="bf16", help="dtype of --low-precision")
    parser.add_argument(
        "--runtimes",
        nargs="*",
        choices=list(RUNTIMES),
        default=None,
        help="deployment runtimes timed beside eager inference on our ONNX export (default on CPU: all; on CUDA: "
        "none); a runtime not installed is skipped with a note",
    )
    parser.add_argument(
        "--ablate-precisions",
        nargs="+",
        choices=list(PRECISIONS),
        default=None,
        help="--only ablate in these precisions (weights cast, or fp32 weights under autocast; default: the run's "
        "--dtype); the rows of the others are named with the precision in brackets",
    )
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the timed matmul for the peak GFLOPS")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later groups and cases are skipped")
    parser.add_argument(
        "--prime-allocator",
        action="store_true",
        help="free one 32 MiB block first, so that every case meets glibc at its largest mmap threshold "
        "(reproducible page faults; see prime_allocator)",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="make glibc keep freed memory for reuse before anything runs (convnextv2_hf.cpu_memory, what the "
        "examples do when training on CPU); the JSON's machine facts say which allocator setting the run had",
    )
    parser.add_argument("--output", default="benchmarks/results.json")
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    if args.modes is None:
        args.modes = ["eager", "compile"] if args.compile else ["eager"]
    elif args.compile and "compile" not in args.modes:
        args.modes.append("compile")
    unknown = set(args.only or []) - set(GROUPS)
    if unknown:
        parser.error(f"--only: unknown group(s) {sorted(unknown)}; known: {list(GROUPS)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cpu or cuda[:N]")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: only cpu and cuda are measured")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for (preset {preset}), but torch sees no CUDA device")
    if args.peak_size < 1:
        parser.error(f"--peak-size must be >= 1, got {args.peak_size}")
    if args.runtimes is None:
        args.runtimes = list(RUNTIMES) if device.type == "cpu" else []
    elif args.runtimes and device.type != "cpu":
        parser.error(f"--runtimes {' '.join(args.runtimes)}: the runtimes are timed on CPU only")
    if args.ablate_precisions is None:
        args.ablate_precisions = [args.dtype if args.dtype == "fp32" else f"{args.dtype}-autocast"]
    return args


NAME_WIDTH = 48


@contextmanager
def _native_stderr_silenced():
    """The profiler's native library logs its start and stop to fd 2 whatever the log level; the step it
    profiles already ran in the warm-up, so nothing of the step's own output is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        self.rows: list[dict] = []
        self.comparisons: list[tuple[str, str]] = []  # (row, second anchor) ratios printed under the table
        self.skipped: list[dict] = []  # {"name": group or case, "reason": ...}: what the time budget left out
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu_name()
        self.started = time.perf_counter()
        self.deadline = None if args.time_budget is None else self.started + args.time_budget
        self.last_warmup_s = 0.0  # the latest case's warm-up (compile included): the estimate for the next one
        self.machine = machine_facts(self.device)
        self.peaks: dict[str, float] = {}  # measured matmul GFLOPS per precision ("fp32", "bf16", ...)
        self.agreement: dict[str, dict] = {}  # low precision against fp32 on real photos
        self.notes: list[str] = []  # what was not run and why (a runtime not installed, no native bf16, ...)

    def out_of_time(self, name: str, estimate_s: float = 0.0) -> bool:
        """Whether ``name`` (a group or case) would start after the time budget or, by ``estimate_s``, end after it;
        if so it is recorded as skipped."""
        if self.deadline is None:
            return False
        now = time.perf_counter()
        if now + estimate_s <= self.deadline:
            return False
        reason = (
            f"time budget of {self.args.time_budget:.0f} s spent"
            if now > self.deadline
            else f"would end after the time budget of {self.args.time_budget:.0f} s (estimate {estimate_s:.0f} s)"
        )
        self.skipped.append({"name": name, "reason": reason, "at_s": round(now - self.started, 1)})
        print(f"  skipped {name}: {reason}", flush=True)
        return True

    def result(self, complete: bool) -> dict:
        """The JSON document: environment, arguments, rows with their ratios, and what was skipped."""
        return {
            "device": self.device_name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "machine": self.machine,
            "matmul_peak_gflops": self.peaks,
            "agreement": self.agreement,
            "notes": self.notes,
            "args": vars(self.args),
            "date": time.strftime("%Y-%m-%d"),
            "complete": complete,
            "seconds": round(time.perf_counter() - self.started, 1),
            "rows": self.rows,
            "comparisons": [{"row": name, "anchor": anchor} for name, anchor in self.comparisons],
            "skipped": self.skipped,
        }

    def save(self, complete: bool = False) -> None:
        """Write the JSON (atomically: a run killed while writing leaves the previous version)."""
        output = Path(self.args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(output.name + ".partial")
        partial.write_text(json.dumps(self.result(complete), indent=2))
        os.replace(partial, output)

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def peak_gb(self, step: Callable[[], None]) -> float:
        """Peak memory of one more ``step`` in GB, above what was alive before it (module docstring)."""
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            step()
            self.sync()
            return (torch.cuda.max_memory_allocated(self.device) - before) / 1e9
        if self.device.type != "cpu":
            return float("nan")
        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            step()
        # every allocation and free is a "[memory]" event with signed bytes; replay them in time order
        events = sorted(
            (event.start_ns(), event.nbytes())
            for event in profiler.profiler.kineto_results.events()
            if event.name() == "[memory]"
        )
        alive = peak = 0
        for _, nbytes in events:
            alive += nbytes
            peak = max(peak, alive)
        return peak / 1e9

    def measure(self, cases: list[tuple[str, int, Callable[[], None], str | None]]) -> None:
        """Time (name, batch, step, anchor) cases against each other. Each case warms up alone and its peak
        memory is read then; the timed repeats then go round-robin over the cases, so a slow spell of a shared
        machine hits every case alike. One row per case with the median time; the JSON is written after."""
        warm, peaks = [], []
        for case in cases:
            if self.out_of_time(case[0], estimate_s=self.last_warmup_s):
                continue
            step = case[2]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            start = time.perf_counter()
            # at least one step, so the peak is that of a steady step (AdamW creates its state in the first)
            for _ in range(max(self.args.warmup, 1)):
                step()
            self.sync()
            self.last_warmup_s = time.perf_counter() - start
            warm.append(case)
            peaks.append(self.peak_gb(step))
        times: list[list[float]] = [[] for _ in warm]
        for repeat in range(self.args.repeats):
            if repeat and self.deadline is not None and time.perf_counter() > self.deadline:
                names = ", ".join(case[0] for case in warm)
                name = f"repeats {repeat + 1}-{self.args.repeats} of {names}"
                self.skipped.append({"name": name, "reason": "time budget spent"})
                break
            for case_times, (_, _, step, *_) in zip(times, warm, strict=True):
                start = time.perf_counter()
                step()
                self.sync()
                case_times.append(time.perf_counter() - start)
        new_rows = []
        for (name, batch, _, anchor, *extra), case_times, peak in zip(warm, times, peaks, strict=True):
            if not case_times:  # no repeat at all (--repeats 0)
                continue
            median = statistics.median(case_times)
            row = {"name": name, "batch": batch, "img_per_s": batch / median, "median_s": median, "peak_gb": peak}
            row["anchor"] = anchor
            row["repeats"] = len(case_times)
            row.update(self.share(row, *extra))
            self.rows.append(row)
            new_rows.append(row)
            print(f"  {name:<{NAME_WIDTH}} {row['img_per_s']:9.1f} img/s", flush=True)
        for row in new_rows:
            row["ratio"], row["memory_ratio"] = self.ratio(row), self.ratio(row, "peak_gb")
        self.save()

    def note(self, name: str, reason: str) -> None:
        """Something not run, and why (a runtime not installed, an export that failed): in the JSON and printed."""
        self.notes.append(f"{name}: {reason}")
        print(f"  not run: {name}: {reason}", flush=True)

    def share(self, row: dict, extra: dict | None = None) -> dict:
        """A case's precision, its matrix-product work per image (GFLOP, the fp32 model's) and the share of the
        machine's measured matmul peak in that precision it reaches (``extra``: ``precision``, ``gflop``)."""
        extra = dict(extra or {})
        precision, gflop = extra.pop("precision", None), extra.pop("gflop", None)
        peak = self.peaks.get(precision) if precision else None
        result = {"precision": precision, "gflop_per_image": gflop, **extra}
        result["share_of_peak"] = gflop * row["img_per_s"] / peak if gflop and peak else None
        return result

    def ratio(self, row: dict, key: str = "img_per_s") -> float | None:
        """``row[key]`` over its anchor's (speed by default; ``peak_gb`` for memory)."""
        anchors = {r["name"]: r for r in self.rows}
        anchor = anchors.get(row["anchor"])
        if anchor is None or not row[key] or not anchor[key]:
            return None
        return row[key] / anchor[key]


def classifier_pair(preset: str, device: torch.device):
    """Our classifier and the built-in one with identical (perturbed) weights."""
    config = ConvNextV2Config.from_preset(preset, num_labels=1000)
    torch.manual_seed(0)
    ours = ConvNextV2ForImageClassification(config)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    fields = {k: v for k, v in config.to_dict().items() if k in builtin.ConvNextV2Config.__dataclass_fields__}
    fields.pop("_out_features", None), fields.pop("_out_indices", None)
    reference = builtin.ConvNextV2ForImageClassification(builtin.ConvNextV2Config(**fields))
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(device), reference.to(device)


def timm_model(preset: str, device: torch.device):
    try:
        import timm
    except ImportError:
        return None
    return timm.create_model(f"convnextv2_{preset}", pretrained=False).to(device)


def run_inference(bench: Bench) -> None:
    """Eager (and compiled) inference of the built-in, ours and timm's; in the eager run also both classes with
    weights in ``--low-dtype`` and under its autocast, and the deployment runtimes on our ONNX export, all in one
    round-robin. Every row is against the built-in in the run's dtype, eager."""
    args = bench.args
    print(f"inference, ConvNeXt V2-{args.model}, batch {args.batch}, {args.image_size}px")
    ours, reference = classifier_pair(args.model, bench.device)
    timm = timm_model(args.model, bench.device) if args.timm != "none" else None
    candidates = {"builtin": reference, "ours": ours, "timm": timm}
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, device=bench.device)
    gflop = model_gflop(reference, pixels[:1])
    base = args.dtype if args.dtype != "fp32" else "fp32"
    low, low_dtype = args.low_dtype, DTYPES[args.low_dtype]
    for mode in args.modes:
        compiled = mode == "compile"
        if bench.out_of_time(f"infer {mode}"):
            continue
        cases = []
        for name, model in candidates.items():
            if model is None or (name == "timm" and compiled and args.timm != "all"):
                continue
            model = model.eval()
            inputs = pixels
            if compiled:
                model = torch.compile(model.to(memory_format=torch.channels_last))
                inputs = pixels.contiguous(memory_format=torch.channels_last)

            def step(model=model, inputs=inputs):
                with torch.inference_mode(), bench.autocast():
                    model(inputs)

            anchor = None if name == "builtin" else f"infer builtin {mode}"
            cases.append((f"infer {name} {mode}", args.batch, step, anchor, {"precision": base, "gflop": gflop}))
        anchor = f"infer builtin {mode}"
        extra = {"precision": low, "gflop": gflop}
        for name, model in (("builtin", reference), ("ours", ours)):
            if "weights" in args.low_precision and (name == "ours" or not compiled):
                cases.append(
                    (f"infer {name} {low}-weights {mode}", args.batch,
                     low_weights_step(model, pixels, low_dtype, compiled), anchor, extra)
                )  # fmt: skip
            if "autocast" in args.low_precision and args.dtype == "fp32" and (name == "ours" or not compiled):
                model = compile_frozen(model.eval()) if compiled else model.eval()
                cases.append(
                    (f"infer {name} {low}-autocast {mode}", args.batch, autocast_step(model, pixels, bench, low_dtype),
                     anchor, extra)
                )  # fmt: skip
        names = {name for name, *_ in cases}
        for row in (f"infer ours {low}-autocast compile", f"infer ours {low}-weights compile"):
            if compiled and row in names:
                bench.comparisons.append((row, "infer openvino default eager"))
        bench.measure(cases)
        if not compiled:
            # each runtime in a round-robin of its own, after the torch cases and against their built-in anchor: a
            # runtime's thread pool keeps spinning after each call (ONNX Runtime by default), which took a third
            # of the 2 cores from the torch cases timed beside it; its sessions are gone before the next phase
            for make_cases in runtime_phases(bench, ours, pixels, gflop):
                runtime_cases = make_cases()
                bench.measure(runtime_cases)
                del runtime_cases
                gc.collect()
    if args.low_precision and not bench.out_of_time("agreement"):
        photos = photo_batch(args.image_size).to(bench.device)
        bench.agreement = low_precision_agreement(ours, photos, low_dtype)
        for case, figures in bench.agreement.items():
            print(f"  {case} against fp32 on {figures['images']} photos: top-1 agreement "
                  f"{figures['top1_agreement']}/{figures['images']}, largest logit error "
                  f"{figures['max_abs_logit_error']:.3g} (largest logit {figures['max_abs_logit']:.3g})")  # fmt: skip
        bench.save()


def low_weights_step(
    model: torch.nn.Module, pixels: torch.Tensor, dtype: torch.dtype, compiled: bool = False
) -> Callable[[], None]:
    """Inference of a copy of ``model`` with its weights in ``dtype`` (as ``from_pretrained(..., dtype=dtype)``
    loads it) on the pixels in ``dtype``; ``compiled``: compiled with freezing (``compile_frozen``)."""
    model = copy.deepcopy(model).to(dtype).eval()
    model = compile_frozen(model) if compiled else model
    inputs = pixels.to(dtype)

    def step():
        with torch.inference_mode():
            model(inputs)

    return step


def autocast_step(model, pixels: torch.Tensor, bench: Bench, dtype: torch.dtype) -> Callable[[], None]:
    """Inference of fp32 ``model`` under ``torch.autocast(device, dtype)``."""

    def step():
        with torch.inference_mode(), torch.autocast(bench.device.type, dtype=dtype):
            model(pixels)

    return step


def compile_frozen(model: torch.nn.Module):
    """``torch.compile`` with Inductor's freezing (weights folded in as constants and prepacked for oneDNN: inference
    only), which is how the compiled low-precision anchor of issue 19 was measured; on CPU also with Inductor's C++
    wrapper (the graph's calls made from C++, not from generated Python: 1.02-1.04x at V2-T batch 8 on the EPYC,
    BENCHMARKS.md). Both options are read while Dynamo traces, at the first call, so they are patched around every
    call rather than passed as ``options`` (there, in torch 2.14, freezing does not take effect)."""
    cpu = all(parameter.device.type == "cpu" for parameter in model.parameters())
    compiled = torch.compile(model.to(memory_format=torch.channels_last))
    options = {"freezing": True, "cpp_wrapper": cpu}

    def run(pixels):
        with torch._inductor.config.patch(**options):
            return compiled(pixels.contiguous(memory_format=torch.channels_last))

    return run


def runtime_phases(bench: Bench, model, pixels: torch.Tensor, gflop: float | None) -> list[Callable[[], list]]:
    """ONNX Runtime fp32, OpenVINO f32 and OpenVINO at its default precision on this CPU, on one
    ``torch.onnx.export(dynamo=True)`` of ``model`` (``convnextv2_hf.export``), with as many threads as torch uses:
    one function per runtime that opens its sessions and returns its cases, so that no runtime's threads exist
    while another phase is timed. A runtime that is not installed, or an export that fails, is a note, not an
    error."""
    args = bench.args
    wanted = [runtime for runtime in args.runtimes if not bench.out_of_time(f"infer {runtime}")]
    if not wanted:
        return []
    import importlib.util
    import tempfile

    missing = [runtime for runtime in wanted if importlib.util.find_spec(runtime) is None]
    for runtime in missing:
        bench.note(f"infer {runtime}", f"{runtime} not installed (pip install '.[deploy]')")
    wanted = [runtime for runtime in wanted if runtime not in missing]
    if not wanted:
        return []
    try:
        from convnextv2_hf.deploy import openvino_core
        from convnextv2_hf.export import export_onnx
    except ImportError as error:
        bench.note("infer runtimes", f"convnextv2_hf.export not importable ({error})")
        return []
    folder = Path(tempfile.mkdtemp(prefix="benchmark_onnx_"))
    # the runtimes read the file when their sessions open (in the phases the caller runs): removed at exit
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "model.onnx"
    try:
        export_onnx(model, path)
    except Exception as error:  # an exporter failure is reported, not fatal: the other groups still run
        bench.note("infer runtimes", f"torch.onnx.export failed: {type(error).__name__}: {error}")
        return []
    inputs = pixels.cpu().numpy()
    threads = torch.get_num_threads()
    anchor = "infer builtin eager"

    def onnxruntime_cases() -> list[tuple]:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return [
            ("infer onnxruntime fp32 eager", args.batch, lambda: session.run(None, {"pixel_values": inputs}), anchor,
             {"precision": "fp32", "gflop": gflop, "peak_gb": None})
        ]  # fmt: skip

    def openvino_cases() -> list[tuple]:
        cases = []
        for label, hint in (("f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("default", {})):
            # one Core per process (deploy.openvino_core): several of them corrupted memory once workers forked
            compiled = openvino_core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, **hint})
            precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            precision = {"f32": "fp32", "f16": "fp16"}.get(precision, precision)
            cases.append(
                (f"infer openvino {label} eager", args.batch, lambda compiled=compiled: compiled(inputs), anchor,
                 {"precision": precision, "gflop": gflop, "runtime_precision": precision, "peak_gb": None})
            )  # fmt: skip
        return cases

    makers = {"onnxruntime": onnxruntime_cases, "openvino": openvino_cases}
    return [makers[runtime] for runtime in wanted]


def training_step(model, make_loss, bench: Bench, dtype: torch.dtype | None | str = "run") -> Callable[[], None]:
    """One optimizer step; the forward under the run's autocast (``dtype="run"``), ``dtype``'s autocast, or none."""
    # fused AdamW, as the Trainer's default optim ("adamw_torch_fused") runs it
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    autocast = bench.autocast if dtype == "run" else (
        lambda: nullcontext() if dtype is None else torch.autocast(bench.device.type, dtype=dtype))  # fmt: skip

    def step():
        with autocast():
            loss = make_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_training(bench: Bench) -> None:
    """The classifier's training step (AdamW) of the built-in and ours; with ``--low-precision`` also with weights
    in ``--low-dtype`` and under its autocast. Every row against the built-in's step in the run's dtype."""
    args = bench.args
    print(f"training step (AdamW), ConvNeXt V2-{args.model}, batch {args.train_batch}")
    ours, reference = classifier_pair(args.model, bench.device)
    pixels = torch.randn(args.train_batch, 3, args.image_size, args.image_size, device=bench.device)
    labels = torch.randint(0, 1000, (args.train_batch,), device=bench.device)
    gflop = model_gflop(reference, pixels[:1], labels[:1])
    base = args.dtype if args.dtype != "fp32" else "fp32"
    low, low_dtype = args.low_dtype, DTYPES[args.low_dtype]
    cases = []
    anchor = "train builtin eager"
    for name, model in (("builtin", reference), ("ours", ours)):
        variants = [(name, model, "run", base)]
        if "weights" in args.low_precision:
            variants.append((f"{name} {low}-weights", copy.deepcopy(model).to(low_dtype), None, low))
        if "autocast" in args.low_precision and args.dtype == "fp32":
            variants.append((f"{name} {low}-autocast", copy.deepcopy(model), low_dtype, low))
        for label, variant, autocast, precision in variants:
            variant.train()
            cast = low_dtype if label.endswith("-weights") else None

            def loss(m, cast=cast):
                return m(pixel_values=pixels if cast is None else pixels.to(cast), labels=labels).loss

            step = training_step(variant, loss, bench, autocast)
            cases.append((f"train {label} eager", args.train_batch, step, None if label == "builtin" else anchor,
                          {"precision": precision, "gflop": gflop}))  # fmt: skip
    names = {case[0] for case in cases}
    if f"train ours {low}-autocast eager" in names:  # issue 19's targets: >= 2x our fp32 step, >= 1.5x the built-in's
        bench.comparisons.append((f"train ours {low}-autocast eager", "train ours eager"))
        bench.comparisons.append((f"train ours {low}-autocast eager", f"train builtin {low}-autocast eager"))
    bench.measure(cases)


def run_fcmae(bench: Bench) -> None:
    args = bench.args
    print(f"FCMAE pretraining step (decoder, loss, AdamW), ConvNeXt V2-{args.fcmae_model}, batch {args.fcmae_batch}")
    pixels = torch.randn(args.fcmae_batch, 3, args.image_size, args.image_size, device=bench.device)
    num_patches = (args.image_size // 32) ** 2
    noise = torch.rand(args.fcmae_batch, num_patches, device=bench.device)
    low, low_dtype = args.low_dtype, DTYPES[args.low_dtype]
    for mode in args.modes:
        compiled = mode == "compile"
        if bench.out_of_time(f"fcmae {mode}"):
            continue
        cases = []
        for impl in ("dense", "sparse"):
            torch.manual_seed(0)
            model = ConvNextV2ForMaskedImageModeling(ConvNextV2Config.from_preset(args.fcmae_model, fcmae_impl=impl))
            model = model.to(bench.device).train()
            forward = torch.compile(model) if compiled else model
            step = training_step(forward, lambda m: m(pixels, noise=noise).loss, bench)
            anchor = None if impl == "dense" else f"fcmae dense {mode}"
            cases.append((f"fcmae {impl} {mode}", args.fcmae_batch, step, anchor))
            if impl == "sparse" and "autocast" in args.low_precision and args.dtype == "fp32" and not compiled:
                variant = copy.deepcopy(model)  # its own optimizer; the fp32 step is its anchor (issue 19: >= 1.8x)
                step = training_step(variant, lambda m: m(pixels, noise=noise).loss, bench, low_dtype)
                cases.append((f"fcmae sparse {low}-autocast {mode}", args.fcmae_batch, step, f"fcmae sparse {mode}"))
        if args.vitmae != "none":
            cases.append(vitmae_case(bench, mode, compiled, pixels))
            bench.comparisons.append((f"fcmae sparse {mode}", cases[-1][0]))
        bench.measure(cases)


# ViTMAE sizes beside the FCMAE step: Base is transformers' default config; tiny only keeps a smoke run fast
VITMAE_SIZES: dict[str, dict] = {
    "base": {},
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    ),
}


def vitmae_case(bench: Bench, mode: str, compiled: bool, pixels: torch.Tensor):
    """transformers' ViTMAE pretraining step (mask ratio 0.75, SDPA attention, its decoder and loss, AdamW) on
    the same pixels: the horizon anchor for FCMAE pretraining speed."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    args = bench.args
    torch.manual_seed(0)
    config = ViTMAEConfig(image_size=args.image_size, attn_implementation="sdpa", **VITMAE_SIZES[args.vitmae])
    model = ViTMAEForPreTraining(config).to(bench.device).train()
    forward = torch.compile(model) if compiled else model
    num_patches = (args.image_size // config.patch_size) ** 2
    noise = torch.rand(pixels.shape[0], num_patches, device=bench.device)
    step = training_step(forward, lambda m: m(pixels, noise=noise).loss, bench)
    return (f"fcmae vitmae-{args.vitmae} {mode}", pixels.shape[0], step, None)


# The fast paths, taken out of our model one at a time through the config switch (`config.fast_paths`): every path
# on, every path but one, none. The variants share one model and its weights; each step sets the switch it needs.
FCMAE_ONLY_PATHS = {"sparse_depthwise_conv", "sparse_downsample_matmul"}
CLASSIFIER_FAST_PATHS = [name for name in FAST_PATH_NAMES if name not in FCMAE_ONLY_PATHS]


# the sparse FCMAE step with every path on, without each of its training paths, and with none
FCMAE_ABLATED_PATHS = ["sparse_depthwise_conv", "sparse_downsample_matmul", "fused_gelu_grn_linear"]


def ablation_variants(paths: list[str] = CLASSIFIER_FAST_PATHS, ablated: list[str] | None = None):
    """``{"ours": paths, "ours, without X": paths - X for X in ablated, "ours, no fast path": False}``."""
    variants: dict[str, bool | list[str]] = {"ours": list(paths)}
    for name in paths if ablated is None else ablated:
        variants[f"ours, without {name}"] = [other for other in paths if other != name]
    variants["ours, no fast path"] = False
    return variants


@contextmanager
def exact_fp32():
    """TF32 off for an fp32 comparison on CUDA (cuDNN convs default to TF32, ~1e-3 relative)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run_ablation(bench: Bench) -> None:
    """The ablation in every precision of ``--ablate-precisions``: ``DEVICE_DEFAULTS`` is keyed by device and dtype,
    and each of its rows is chosen from the ablation in that dtype (autocast counting as its dtype)."""
    for precision in bench.args.ablate_precisions:
        if not bench.out_of_time(f"ablate {precision}"):
            run_ablation_in(bench, precision)


def precision_context(bench: Bench, precision: str):
    """(weights dtype, a context for the forward) of an ablation precision: weights cast, or autocast on fp32."""
    weights, autocast = PRECISIONS[precision]
    if autocast is None:
        return DTYPES[weights], nullcontext
    return DTYPES[weights], lambda: torch.autocast(bench.device.type, dtype=DTYPES[autocast])


def run_ablation_in(bench: Bench, precision: str) -> None:
    """Eager inference and training step of our classifier with each fast path switched off, and in channels_last;
    the sparse FCMAE step without each of its training paths; in ``precision``. "ours" is every path on, whatever
    the defaults (``DEVICE_DEFAULTS``): this table is what those defaults are chosen from. Rows of a precision other
    than the run's own are named with it in brackets (``ablate infer ours, without grn_fold [bf16]``)."""
    args = bench.args
    own = precision == args.ablate_precisions[0] and precision in (args.dtype, f"{args.dtype}-autocast")
    suffix = "" if own else f" [{precision}]"
    dtype, context = precision_context(bench, precision)
    print(f"ablation{suffix}: our ConvNeXt V2-{args.model} without each fast path (inference batch {args.batch}, "
          f"training batch {args.train_batch}), FCMAE V2-{args.fcmae_model} batch {args.fcmae_batch}")  # fmt: skip
    ours, reference = classifier_pair(args.model, bench.device)
    ours, reference = ours.to(dtype), reference.to(dtype)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, device=bench.device).to(dtype)
    variants = ablation_variants()
    tolerance = ABLATION_TOLERANCE[PRECISIONS[precision][1] or PRECISIONS[precision][0]]
    with torch.inference_mode(), exact_fp32(), context():
        ours.config.fast_paths = False
        expected = ours.eval()(pixels).logits.float()
        for name, setting in variants.items():
            ours.config.fast_paths = setting
            error = (ours(pixels).logits.float() - expected).abs().max().item()
            if not error <= tolerance * max(expected.abs().max().item(), 1.0):
                raise RuntimeError(f"ablation {name!r}{suffix} changes the logits by {error:.2e}: a fast path is wrong")
    cases = []

    def infer_step(model, inputs, setting):
        def step():
            model.config.fast_paths = setting
            with torch.inference_mode(), context():
                model(inputs)

        return step

    cases.append((f"ablate infer builtin{suffix}", args.batch, infer_step(reference.eval(), pixels, True), None))
    for name, setting in variants.items():
        step = infer_step(ours.eval(), pixels, setting)
        anchor = f"ablate infer builtin{suffix}" if name == "ours" else f"ablate infer ours{suffix}"
        cases.append((f"ablate infer {name}{suffix}", args.batch, step, anchor))
    channels_last = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    step = infer_step(channels_last, pixels.contiguous(memory_format=torch.channels_last), variants["ours"])
    cases.append((f"ablate infer ours, channels_last{suffix}", args.batch, step, f"ablate infer ours{suffix}"))
    bench.measure(cases)

    pixels = torch.randn(args.train_batch, 3, args.image_size, args.image_size, device=bench.device).to(dtype)
    labels = torch.randint(0, 1000, (args.train_batch,), device=bench.device)
    cases = []
    for name, setting in variants.items():
        model = copy.deepcopy(ours).train()  # one optimizer (and one config) per variant
        model.config.fast_paths = setting

        def loss(model):
            with context():
                return model(pixel_values=pixels, labels=labels).loss

        anchor = None if name == "ours" else f"ablate train ours{suffix}"
        step = training_step(model, loss, bench, None)
        cases.append((f"ablate train {name}{suffix}", args.train_batch, step, anchor))
    if not bench.out_of_time(f"ablate train{suffix}"):
        bench.measure(cases)
    del cases
    if not bench.out_of_time(f"ablate fcmae{suffix}"):
        run_fcmae_ablation(bench, dtype, context, suffix)


def run_fcmae_ablation(bench: Bench, dtype: torch.dtype = torch.float32, context=None, suffix: str = "") -> None:
    """The sparse FCMAE step (encoder, decoder, loss, AdamW) with every path on, without each of its training paths,
    and with none; "ours" against the dense path's row of the fcmae group where that ran."""
    args = bench.args
    context = context or bench.autocast
    pixels = torch.randn(args.fcmae_batch, 3, args.image_size, args.image_size, device=bench.device).to(dtype)
    noise = torch.rand(args.fcmae_batch, (args.image_size // 32) ** 2, device=bench.device)
    torch.manual_seed(0)
    config = ConvNextV2Config.from_preset(args.fcmae_model, fcmae_impl="sparse")
    model = ConvNextV2ForMaskedImageModeling(config).to(bench.device).to(dtype).train()

    def loss(model):
        with context():
            return model(pixels, noise=noise).loss

    cases = []
    for name, setting in ablation_variants(list(FAST_PATH_NAMES), FCMAE_ABLATED_PATHS).items():
        variant = copy.deepcopy(model)  # one optimizer (and one config) per variant
        variant.config.fast_paths = setting
        step = training_step(variant, loss, bench, None)
        anchor = ("fcmae dense eager" if not suffix else None) if name == "ours" else f"ablate fcmae ours{suffix}"
        cases.append((f"ablate fcmae {name}{suffix}", args.fcmae_batch, step, anchor))
    del model
    bench.measure(cases)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_facts(device: torch.device) -> dict:
    """What the figures depend on: the CPU (name, torch's capability, native bf16/fp16 instructions), threads and how
    busy the machine was (load average; ``uptime``), and the GPU where one is used."""
    flags = cpu_flags()
    facts = {
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512_fp16": "avx512_fp16" in flags,
        "native_bf16": native_bf16_cpu(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "glibc": glibc_version(),
        "freed_memory_kept": freed_memory_kept(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 1.0) -> float | None:
    """GFLOPS of a timed square matmul in ``dtype``, the best of repeats over about ``seconds`` for each of torch's
    matmul kernels (``torch.mm``; on CPU also oneDNN's linear, which the ``onednn_linear`` path runs: in fp32
    ``torch.mm`` is MKL's, half as fast on an AMD CPU): the machine's practical peak, which each case's share is
    taken of. The side grows from 256 up to ``size`` while one product takes under 50 ms, so an emulated dtype (bf16
    on a CPU without native bf16, ~100x slower) is timed in seconds, not minutes. ``None`` where the dtype does not
    run there."""
    kernels = [torch.mm]
    if device.type == "cpu":
        kernels.append(lambda a, b: onednn_linear(a, b, None, gelu=False))  # a @ b.T: the same work

    def timed(a, b, kernel=torch.mm) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        kernel(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    side = min(256, size)
    while True:
        try:
            a = torch.randn(side, side, device=device).to(dtype)
            b = torch.randn(side, side, device=device).to(dtype)
            torch.mm(a, b)
        except RuntimeError:
            return None
        if side >= size or timed(a, b) >= 0.05:
            break
        side = min(2 * side, size)
    best = float("inf")
    for kernel in kernels:
        if kernel(a, b) is None:  # oneDNN cannot run this dtype here
            continue
        fastest, spent = float("inf"), 0.0
        while spent < seconds or fastest == float("inf"):
            elapsed = timed(a, b, kernel)
            fastest, spent = min(fastest, elapsed), spent + elapsed
        best = min(best, fastest)
    return 2 * side**3 / best / 1e9


def model_gflop(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor | None = None) -> float | None:
    """Matrix-product and conv work of one image (GFLOP, torch's flop counter): the forward, or with ``labels`` a
    training step, counted as three forwards (each product's backward is two products of its size: the input and
    the weight gradients). The backward is not counted by the flop counter itself: torch 2.14's formula for a conv's
    weight gradient ignores ``groups``, which counts a depthwise conv's as if it were dense (C times too much: 96-768x
    here) and put training at 79-169% of the matmul peak. The fp32 built-in model's figure is used for every case of a
    group, so the shares of the peak compare like with like."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model.eval()(pixels)
    except RuntimeError:
        return None
    forward = counter.get_total_flops() / 1e9 / len(pixels)
    return forward if labels is None else 3 * forward


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera")


def photo_batch(image_size: int = 224) -> torch.Tensor:
    """Eight of scikit-image's bundled photographs (``PHOTOS``; grey ones as RGB) through our image processor at
    ``image_size``: a realistic batch for agreement figures (natural-image statistics, not noise)."""
    import numpy as np
    from skimage import data

    from convnextv2_hf import ConvNextV2ImageProcessor

    images = []
    for name in PHOTOS:
        image = getattr(data, name)()
        images.append(np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3])
    processor = ConvNextV2ImageProcessor(size={"shortest_edge": image_size})
    return processor(images=images, return_tensors="pt")["pixel_values"].float()


def low_precision_agreement(model, pixels: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> dict[str, dict]:
    """``model`` (fp32, left as it is) with weights in ``dtype`` and under ``dtype`` autocast, against its own fp32
    logits on ``pixels``: the largest logit error and how many images keep their top-1 class."""
    label = next(name for name, value in DTYPES.items() if value == dtype)
    model = model.eval()
    device_type = pixels.device.type
    with torch.inference_mode():
        expected = model(pixels).logits.float()
        with torch.autocast(device_type, dtype=dtype):
            autocast = model(pixels).logits.float()
        low = copy.deepcopy(model).to(dtype)
        weights = low(pixels.to(dtype)).logits.float()
    figures = {}
    for case, logits in ((f"{label} weights", weights), (f"{label} autocast", autocast)):
        figures[case] = {
            "images": len(pixels),
            "top1_agreement": int((logits.argmax(-1) == expected.argmax(-1)).sum()),
            "max_abs_logit_error": (logits - expected).abs().max().item(),
            "max_abs_logit": expected.abs().max().item(),
        }
    return figures


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


GROUPS: dict[str, Callable[[Bench], None]] = {
    "infer": run_inference,
    "train": run_training,
    "fcmae": run_fcmae,
    "ablate": run_ablation,
}


# glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def prime_allocator() -> None:
    """Allocate and free one block just under 32 MiB. glibc maps every allocation at or above its mmap threshold
    afresh (page-faulted in at 4 KB a time) and raises the threshold only when it frees a mapped block larger than
    it, up to 32 MiB. A process that keeps allocating one size (a 19 MB activation, each forward) keeps faulting it
    in until some larger block is freed once, so the faults a case pays depend on what ran before it in the process.
    After this, every allocation under 32 MiB comes from the heap, whatever ran before; larger ones still fault."""
    block = torch.empty(GLIBC_MMAP_THRESHOLD_MAX - 4096, dtype=torch.uint8)
    block.fill_(0)
    del block


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.keep_freed_memory and not keep_freed_memory():
        print("--keep-freed-memory: the C library is not glibc; the allocator is left as it is")
    if args.prime_allocator:
        prime_allocator()
    bench = Bench(args)
    torch.backends.cudnn.benchmark = True
    print(
        f"device {bench.device_name} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, dtype {args.dtype}, modes {' '.join(args.modes)}"
    )
    machine = bench.machine
    print(
        f"cpu capability {machine['cpu_capability']}, amx_bf16 {machine['amx_bf16']}, avx512_bf16 "
        f"{machine['avx512_bf16']}, load average {machine['load_average']}, glibc {machine['glibc']}, "
        f"freed memory kept {machine['freed_memory_kept']}"
    )
    if not machine["native_bf16"] and bench.device.type == "cpu":
        bench.notes.append("no native bf16 on this CPU (no AMX-BF16, no AVX512-BF16): torch emulates bf16, so the "
                           "bf16 rows measure the emulation, not what bf16 gives on a CPU built for it")  # fmt: skip
        print(f"  note: {bench.notes[-1]}")
    for label in dict.fromkeys(["fp32", args.low_dtype, args.dtype]):
        if bench.out_of_time(f"matmul peak {label}"):
            continue
        peak = matmul_peak_gflops(bench.device, DTYPES[label], args.peak_size)
        if peak is not None:
            bench.peaks[label] = peak
    if bench.peaks:
        print("matmul peak: " + ", ".join(f"{label} {peak:.1f} GFLOPS" for label, peak in bench.peaks.items()))
    for group, run in GROUPS.items():
        if group in (args.only or ["infer", "train", "fcmae"]) and not bench.out_of_time(group):
            run(bench)
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()  # the group's models are gone; the next group starts from an empty cache

    print(f"\n{'case':<{NAME_WIDTH}} {'img/s':>9} {'ratio':>7} {'peak GB':>8} {'memory':>7} {'of peak':>8}  anchor")
    for row in bench.rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        memory = f"{row['memory_ratio']:.0%}" if row["memory_ratio"] is not None else "-"
        share = f"{row['share_of_peak']:.0%} {row['precision']}" if row.get("share_of_peak") else "-"
        peak = "-" if row["peak_gb"] is None else f"{row['peak_gb']:.3f}"  # a runtime's memory is outside torch's view
        print(
            f"{row['name']:<{NAME_WIDTH}} {row['img_per_s']:9.1f} {ratio:>7} {peak:>8} {memory:>7} "
            f"{share:>8}  {row['anchor'] or ''}"
        )
    rows = {row["name"]: row for row in bench.rows}
    for name, anchor in bench.comparisons:
        if name not in rows or anchor not in rows:
            continue
        speed = rows[name]["img_per_s"] / rows[anchor]["img_per_s"]
        peaks = rows[name]["peak_gb"], rows[anchor]["peak_gb"]
        memory = f", {peaks[0] / peaks[1]:.0%} of the peak memory" if all(peaks) else ""
        print(f"{name} against {anchor}: {speed:.2f}x the img/s{memory}")
    for case, figures in bench.agreement.items():
        print(f"{case} against fp32 on {figures['images']} photos: top-1 {figures['top1_agreement']}/"
              f"{figures['images']}, largest logit error {figures['max_abs_logit_error']:.3g}")  # fmt: skip
    for note in bench.notes:
        print(f"note: {note}")
    for skipped in bench.skipped:
        print(f"skipped {skipped['name']}: {skipped['reason']}")
    bench.save(complete=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
