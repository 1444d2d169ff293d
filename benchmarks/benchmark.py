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
import copy
import json
import os
import platform
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
from convnextv2_hf.configuration_convnextv2 import FAST_PATH_NAMES  # noqa: E402

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
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later groups and cases are skipped")
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
            for case_times, (_, _, step, _) in zip(times, warm, strict=True):
                start = time.perf_counter()
                step()
                self.sync()
                case_times.append(time.perf_counter() - start)
        new_rows = []
        for (name, batch, _, anchor), case_times, peak in zip(warm, times, peaks, strict=True):
            if not case_times:  # no repeat at all (--repeats 0)
                continue
            median = statistics.median(case_times)
            row = {"name": name, "batch": batch, "img_per_s": batch / median, "median_s": median, "peak_gb": peak}
            row["anchor"] = anchor
            row["repeats"] = len(case_times)
            self.rows.append(row)
            new_rows.append(row)
            print(f"  {name:<{NAME_WIDTH}} {row['img_per_s']:9.1f} img/s", flush=True)
        for row in new_rows:
            row["ratio"], row["memory_ratio"] = self.ratio(row), self.ratio(row, "peak_gb")
        self.save()

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
    args = bench.args
    print(f"inference, ConvNeXt V2-{args.model}, batch {args.batch}, {args.image_size}px")
    ours, reference = classifier_pair(args.model, bench.device)
    timm = timm_model(args.model, bench.device) if args.timm != "none" else None
    candidates = {"builtin": reference, "ours": ours, "timm": timm}
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, device=bench.device)
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
            cases.append((f"infer {name} {mode}", args.batch, step, anchor))
        bench.measure(cases)


def training_step(model, make_loss, bench: Bench) -> Callable[[], None]:
    # fused AdamW, as the Trainer's default optim ("adamw_torch_fused") runs it
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step():
        with bench.autocast():
            loss = make_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_training(bench: Bench) -> None:
    args = bench.args
    print(f"training step (AdamW), ConvNeXt V2-{args.model}, batch {args.train_batch}")
    ours, reference = classifier_pair(args.model, bench.device)
    pixels = torch.randn(args.train_batch, 3, args.image_size, args.image_size, device=bench.device)
    labels = torch.randint(0, 1000, (args.train_batch,), device=bench.device)
    cases = []
    for name, model in (("builtin", reference), ("ours", ours)):
        model.train()
        step = training_step(model, lambda m: m(pixel_values=pixels, labels=labels).loss, bench)
        anchor = None if name == "builtin" else "train builtin eager"
        cases.append((f"train {name} eager", args.train_batch, step, anchor))
    bench.measure(cases)


def run_fcmae(bench: Bench) -> None:
    args = bench.args
    print(f"FCMAE pretraining step (decoder, loss, AdamW), ConvNeXt V2-{args.fcmae_model}, batch {args.fcmae_batch}")
    pixels = torch.randn(args.fcmae_batch, 3, args.image_size, args.image_size, device=bench.device)
    num_patches = (args.image_size // 32) ** 2
    noise = torch.rand(args.fcmae_batch, num_patches, device=bench.device)
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
CLASSIFIER_FAST_PATHS = [name for name in FAST_PATH_NAMES if name != "sparse_depthwise_conv"]  # FCMAE only


# the sparse FCMAE step with every path on, without each of its training paths, and with none
FCMAE_ABLATED_PATHS = ["sparse_depthwise_conv", "fused_gelu_grn_linear"]


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
    """Eager inference and training step of our classifier with each fast path switched off, and in channels_last;
    the sparse FCMAE step without each of its training paths. "ours" is every path on, whatever the device's
    defaults (``DEVICE_DEFAULTS``): this table is what those defaults are chosen from."""
    args = bench.args
    print(f"ablation: our ConvNeXt V2-{args.model} without each fast path (inference batch {args.batch}, "
          f"training batch {args.train_batch}), FCMAE V2-{args.fcmae_model} batch {args.fcmae_batch}")  # fmt: skip
    ours, reference = classifier_pair(args.model, bench.device)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, device=bench.device)
    variants = ablation_variants()
    with torch.inference_mode(), exact_fp32():
        ours.config.fast_paths = False
        expected = ours.eval()(pixels).logits.float()
        for name, setting in variants.items():
            ours.config.fast_paths = setting
            error = (ours(pixels).logits.float() - expected).abs().max().item()
            if not error <= 1e-4 * max(expected.abs().max().item(), 1.0):
                raise RuntimeError(f"ablation {name!r} changes the logits by {error:.2e}: a fast path is wrong")
    cases = []

    def infer_step(model, inputs, setting):
        def step():
            model.config.fast_paths = setting
            with torch.inference_mode(), bench.autocast():
                model(inputs)

        return step

    cases.append(("ablate infer builtin", args.batch, infer_step(reference.eval(), pixels, True), None))
    for name, setting in variants.items():
        step = infer_step(ours.eval(), pixels, setting)
        anchor = "ablate infer builtin" if name == "ours" else "ablate infer ours"
        cases.append((f"ablate infer {name}", args.batch, step, anchor))
    channels_last = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    step = infer_step(channels_last, pixels.contiguous(memory_format=torch.channels_last), variants["ours"])
    cases.append(("ablate infer ours, channels_last", args.batch, step, "ablate infer ours"))
    bench.measure(cases)

    pixels = torch.randn(args.train_batch, 3, args.image_size, args.image_size, device=bench.device)
    labels = torch.randint(0, 1000, (args.train_batch,), device=bench.device)
    cases = []
    for name, setting in variants.items():
        model = copy.deepcopy(ours).train()  # one optimizer (and one config) per variant
        model.config.fast_paths = setting

        def loss(model):
            return model(pixel_values=pixels, labels=labels).loss

        anchor = None if name == "ours" else "ablate train ours"
        cases.append((f"ablate train {name}", args.train_batch, training_step(model, loss, bench), anchor))
    if not bench.out_of_time("ablate train"):
        bench.measure(cases)
    del cases
    if not bench.out_of_time("ablate fcmae"):
        run_fcmae_ablation(bench)


def run_fcmae_ablation(bench: Bench) -> None:
    """The sparse FCMAE step (encoder, decoder, loss, AdamW) with every path on, without each of its training paths,
    and with none; "ours" against the dense path's row of the fcmae group where that ran."""
    args = bench.args
    pixels = torch.randn(args.fcmae_batch, 3, args.image_size, args.image_size, device=bench.device)
    noise = torch.rand(args.fcmae_batch, (args.image_size // 32) ** 2, device=bench.device)
    torch.manual_seed(0)
    config = ConvNextV2Config.from_preset(args.fcmae_model, fcmae_impl="sparse")
    model = ConvNextV2ForMaskedImageModeling(config).to(bench.device).train()
    cases = []
    for name, setting in ablation_variants(list(FAST_PATH_NAMES), FCMAE_ABLATED_PATHS).items():
        variant = copy.deepcopy(model)  # one optimizer (and one config) per variant
        variant.config.fast_paths = setting
        step = training_step(variant, lambda m: m(pixels, noise=noise).loss, bench)
        anchor = "fcmae dense eager" if name == "ours" else "ablate fcmae ours"
        cases.append((f"ablate fcmae {name}", args.fcmae_batch, step, anchor))
    del model
    bench.measure(cases)


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench = Bench(args)
    torch.backends.cudnn.benchmark = True
    print(
        f"device {bench.device_name} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, dtype {args.dtype}, modes {' '.join(args.modes)}"
    )
    for group, run in GROUPS.items():
        if group in (args.only or ["infer", "train", "fcmae"]) and not bench.out_of_time(group):
            run(bench)
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()  # the group's models are gone; the next group starts from an empty cache

    print(f"\n{'case':<{NAME_WIDTH}} {'img/s':>9} {'ratio':>7} {'peak GB':>8} {'memory':>7}  anchor")
    for row in bench.rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        memory = f"{row['memory_ratio']:.0%}" if row["memory_ratio"] is not None else "-"
        print(
            f"{row['name']:<{NAME_WIDTH}} {row['img_per_s']:9.1f} {ratio:>7} {row['peak_gb']:8.3f} {memory:>7}  "
            f"{row['anchor'] or ''}"
        )
    rows = {row["name"]: row for row in bench.rows}
    for name, anchor in bench.comparisons:
        if name not in rows or anchor not in rows:
            continue
        speed = rows[name]["img_per_s"] / rows[anchor]["img_per_s"]
        memory = rows[name]["peak_gb"] / rows[anchor]["peak_gb"]
        print(f"{name} against {anchor}: {speed:.2f}x the img/s, {memory:.0%} of the peak memory")
    for skipped in bench.skipped:
        print(f"skipped {skipped['name']}: {skipped['reason']}")
    bench.save(complete=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
