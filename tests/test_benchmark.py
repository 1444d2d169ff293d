"""The benchmark script runs end to end at tiny sizes (so it cannot rot); its ratios are output, not asserted. The
native-bf16 detection it records is the one the main job's ``--bf16_autocast auto`` uses: tested here too."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

from convnextv2_hf.fast_paths_convnextv2 import native_bf16_cpu


@pytest.mark.slow
def test_benchmark_runs_every_group_and_writes_ratios(tmp_path):
    output = tmp_path / "results.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--model", "atto", "--fcmae-model", "atto",
        "--image-size", "64", "--batch", "2", "--train-batch", "2", "--fcmae-batch", "2", "--warmup", "0",
        "--repeats", "1", "--output", str(output), "--only", "infer", "train", "fcmae", "ablate", "--peak-size", "256",
        "--vitmae", "tiny",
    ]  # fmt: skip
    scratch = tmp_path / "tmp"  # the runtimes' ONNX export goes to a temporary folder, removed at exit
    scratch.mkdir()
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(scratch))
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(scratch.glob("benchmark_onnx_*")), "the ONNX export was left behind"
    rows = {row["name"]: row for row in json.loads(output.read_text())["rows"]}
    expected = {
        "infer builtin eager", "infer ours eager", "infer timm eager", "train builtin eager", "train ours eager",
        "fcmae dense eager", "fcmae sparse eager",
    }  # fmt: skip
    # the ablation checks that each variant computes the same logits before it times them
    # through the config switch: every classifier fast path off in turn, then all of them
    expected |= {"ablate infer ours", "ablate infer ours, without grn_fold", "ablate train ours, without inplace_gelu"}
    expected |= {"ablate infer ours, no fast path", "ablate train ours, without fused_gelu_grn_linear"}
    expected |= {"fcmae vitmae-tiny eager"}
    # issue 19's anchors in the same run: both classes with bf16 weights and under bf16 autocast (inference and the
    # training step), the sparse FCMAE step under autocast, and the deployment runtimes on our ONNX export
    for name in ("builtin", "ours"):
        expected |= {f"infer {name} bf16-weights eager", f"infer {name} bf16-autocast eager"}
        expected |= {f"train {name} bf16-weights eager", f"train {name} bf16-autocast eager"}
    expected |= {"fcmae sparse bf16-autocast eager"}
    document = json.loads(output.read_text())
    runtimes = {"onnxruntime": "infer onnxruntime fp32 eager", "openvino": "infer openvino f32 eager"}
    for module, row in runtimes.items():
        if importlib.util.find_spec(module) is None:  # not installed: a note, not a failure
            assert any(note.startswith(f"infer {module}: {module} not installed") for note in document["notes"])
        else:
            expected |= {row} | ({"infer openvino default eager"} if module == "openvino" else set())
    assert expected <= set(rows)
    assert rows["infer ours bf16-weights eager"]["anchor"] == "infer builtin eager"
    assert rows["fcmae sparse bf16-autocast eager"]["anchor"] == "fcmae sparse eager"
    # the machine: CPU facts, the measured matmul peaks, and each case's share of the peak in its precision
    machine = document["machine"]
    assert machine["cpu"] and machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(machine["native_bf16"], bool) and len(machine["load_average"]) == 3
    # the allocator setting the run had (--keep-freed-memory not given: glibc's own)
    assert machine["glibc"] == os.confstr("CS_GNU_LIBC_VERSION").split()[1] and machine["freed_memory_kept"] is False
    assert document["matmul_peak_gflops"]["fp32"] > 0 and document["matmul_peak_gflops"]["bf16"] > 0
    ours = rows["infer ours eager"]
    assert ours["precision"] == "fp32" and ours["gflop_per_image"] > 0
    assert ours["share_of_peak"] == pytest.approx(
        ours["gflop_per_image"] * ours["img_per_s"] / document["matmul_peak_gflops"]["fp32"]
    )
    assert rows["infer ours bf16-autocast eager"]["precision"] == "bf16"
    if not machine["native_bf16"]:
        assert any("no native bf16" in note for note in document["notes"])
    # top-1 agreement with fp32 and the largest logit error on eight photos, bf16 weights and autocast
    for case in ("bf16 weights", "bf16 autocast"):
        figures = document["agreement"][case]
        assert figures["images"] == 8 and 0 <= figures["top1_agreement"] <= 8
        assert 0 < figures["max_abs_logit_error"] < figures["max_abs_logit"]
        assert f"{case} against fp32 on 8 photos" in result.stdout
    assert all(row["img_per_s"] > 0 for row in rows.values())
    sparse = rows["fcmae sparse eager"]
    assert sparse["ratio"] > 0 and sparse["anchor"] == "fcmae dense eager"
    # peak memory is measured on CPU too (profiler allocation events), and the sparse path needs less of it
    # (not for the deployment runtimes: their allocations are outside torch's view, recorded as None)
    assert all(row["peak_gb"] > 0 for name, row in rows.items() if "onnxruntime" not in name and "openvino" not in name)
    assert all(row["peak_gb"] is None for name, row in rows.items() if "onnxruntime" in name or "openvino" in name)
    assert 0 < sparse["memory_ratio"] < 1
    assert "ratio" in result.stdout and "fcmae sparse eager" in result.stdout
    assert "fcmae sparse eager against fcmae vitmae-tiny eager" in result.stdout


def load_benchmark_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import benchmark

    return benchmark


def test_a_preset_sets_defaults_that_flags_override():
    benchmark = load_benchmark_module()
    args = benchmark.parse_args(["--preset", "gpu", "--device", "cpu", "--batch", "4"])
    assert (args.device, args.batch, args.train_batch) == ("cpu", 4, 128)
    assert (args.fcmae_model, args.fcmae_batch, args.vitmae) == ("base", 128, "base")
    assert args.dtype == "bf16" and args.modes == ["eager", "compile"] and args.timm == "eager"
    assert benchmark.parse_args(["--compile"]).modes == ["eager", "compile"]
    assert benchmark.parse_args([]).modes == ["eager"]


def test_the_matmul_peak_is_the_best_of_torchs_matmul_kernels(monkeypatch):
    # the peak each case's share is taken of times torch.mm and, on CPU, oneDNN's linear (the onednn_linear path's
    # kernel; in fp32 torch.mm is MKL's, half as fast on an AMD CPU), and keeps the faster; a dtype oneDNN declines
    # (fp16 here) is timed on torch.mm alone
    benchmark = load_benchmark_module()
    calls = []
    real = benchmark.onednn_linear

    def counted(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(benchmark, "onednn_linear", counted)
    cpu = torch.device("cpu")
    peak = benchmark.matmul_peak_gflops(cpu, torch.float32, 256, seconds=0.05)
    assert peak > 0 and calls and all(calls)
    calls.clear()
    assert benchmark.matmul_peak_gflops(cpu, torch.float16, 64, seconds=0.01) > 0
    assert calls == [False]


@pytest.mark.slow
def test_time_budget_skips_what_would_start_after_it_and_still_writes_the_json(tmp_path):
    output = tmp_path / "results.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--model", "atto", "--image-size", "64",
        "--batch", "2", "--repeats", "1", "--warmup", "0", "--only", "infer", "train", "--time-budget", "0",
        "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(output.read_text())
    assert document["complete"] is True and document["rows"] == []
    # the matmul peaks are timed first, under the same budget
    names = [skipped["name"] for skipped in document["skipped"]]
    assert names == ["matmul peak fp32", "matmul peak bf16", "infer", "train"]
    assert all("time budget of 0 s spent" in skipped["reason"] for skipped in document["skipped"])
    assert "skipped infer: time budget of 0 s spent" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "meta"], "only cpu and cuda are measured"),
        (["--device", "nope"], "is not a device"),
        (["--only", "infer", "speed"], "unknown group(s) ['speed']"),
        (["--peak-size", "0"], "--peak-size must be >= 1"),
        (["--ablate-precisions", "fp8"], "invalid choice: 'fp8'"),
    ],
)
def test_bad_arguments_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark_module().parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_main_job_uses_bf16_autocast_only_where_the_cpu_has_native_bf16(monkeypatch):
    # the CPU's instructions cannot be changed in a test: the detection is patched (a stand-in for an AMX machine)
    sys.path.insert(0, str(REPO / "examples"))
    import main_job
    from transformers import HfArgumentParser

    for native in (False, True):
        monkeypatch.setattr(main_job, "native_bf16_cpu", lambda native=native: native)
        assert main_job.use_bf16_autocast("auto") is native
        assert main_job.use_bf16_autocast("off") is False and main_job.use_bf16_autocast("on") is True
    with pytest.raises(ValueError, match="--bf16_autocast must be auto, on or off"):
        main_job.use_bf16_autocast("sometimes")
    (args,) = HfArgumentParser(main_job.MainJobArguments).parse_args_into_dataclasses(args=["--bf16_autocast", "off"])
    assert args.bf16_autocast == "off"
    assert HfArgumentParser(main_job.MainJobArguments).parse_args_into_dataclasses(args=[])[0].bf16_autocast == "auto"
    # on: the Trainer's --bf16 reaches both scripts' arguments; off (this machine's auto): the fp32 run, unchanged
    on, off = main_job.common_arguments(Path("out"), 1, 8, bf16=True), main_job.common_arguments(Path("out"), 1, 8)
    assert on[:2] == ["--bf16", "true"] and on[2:] == off and "--bf16" not in off


def test_native_bf16_detection_agrees_with_the_cpu_flags():
    # torch's own checks (AMX tiles, AVX512-BF16) against the kernel's list of CPU flags, where Linux gives one
    benchmark = load_benchmark_module()
    flags = benchmark.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert native_bf16_cpu() == bool({"amx_bf16", "avx512_bf16"} & flags)
    facts = benchmark.machine_facts(torch.device("cpu"))
    assert facts["native_bf16"] == native_bf16_cpu() and facts["cpu_capability"]
    assert facts["amx_bf16"] == ("amx_bf16" in flags) and facts["threads"] == torch.get_num_threads()


def test_a_runtime_that_is_not_installed_is_a_note_not_a_failure(monkeypatch, tmp_path):
    # the deployment runtimes are an optional extra: without one, the benchmark says so and times the rest
    benchmark = load_benchmark_module()
    bench = benchmark.Bench(benchmark.parse_args(["--runtimes", "openvino", "--output", str(tmp_path / "r.json")]))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "openvino" else real_find_spec(name))
    phases = benchmark.runtime_phases(bench, None, torch.zeros(1, 3, 64, 64), None)
    assert phases == []
    assert bench.notes == ["infer openvino: openvino not installed (pip install '.[deploy]')"]
    assert benchmark.parse_args(["--device", "cpu"]).runtimes == ["onnxruntime", "openvino"]
    assert benchmark.parse_args(["--runtimes"]).runtimes == []


@pytest.mark.slow
def test_each_runtime_is_timed_in_a_round_robin_of_its_own_after_the_torch_cases(monkeypatch, tmp_path):
    # a runtime's spinning thread pool took a third of the cores from the torch cases timed beside it: no
    # round-robin may mix a runtime with torch, nor two runtimes, and the torch cases go first
    installed = [module for module in ("onnxruntime", "openvino") if importlib.util.find_spec(module) is not None]
    if not installed:
        pytest.skip("no deployment runtime installed (pip install '.[deploy]')")
    benchmark = load_benchmark_module()
    arguments = ["--model", "atto", "--image-size", "32", "--batch", "1", "--warmup", "0", "--repeats", "1",
                 "--timm", "none", "--only", "infer", "--output", str(tmp_path / "r.json")]  # fmt: skip
    bench = benchmark.Bench(benchmark.parse_args(arguments))
    rounds = []
    real_measure = bench.measure
    monkeypatch.setattr(bench, "measure", lambda cases: (rounds.append([c[0] for c in cases]), real_measure(cases)))
    benchmark.run_inference(bench)

    def kind(name: str) -> str:
        return next((module for module in ("onnxruntime", "openvino") if module in name), "torch")

    kinds = [{kind(name) for name in names} for names in rounds]
    assert all(len(round_kinds) == 1 for round_kinds in kinds), rounds
    assert [next(iter(k)) for k in kinds] == ["torch", *installed], rounds
    names = {row["name"] for row in bench.rows}
    assert "infer ours bf16-weights eager" in names and all(
        row["anchor"] == "infer builtin eager" for row in bench.rows if kind(row["name"]) != "torch"
    )


def test_the_flop_count_is_the_models_products_and_a_training_step_three_forwards():
    # the shares of the peak rest on this count: every conv and linear of the built-in model, depthwise convs by
    # their groups, counted by hand for a small config at 64 px; a training step is three forwards (torch's flop
    # counter counts a depthwise conv's weight gradient as a dense one's, C times too much)
    from transformers.models import convnextv2 as builtin

    config = builtin.ConvNextV2Config(depths=[2, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], num_labels=5)
    model = builtin.ConvNextV2ForImageClassification(config)
    size, widths = 64, config.hidden_sizes
    side = size // 4
    macs = side * side * widths[0] * 3 * 16  # the 4x4 stride-4 stem
    for stage, (depth, width) in enumerate(zip(config.depths, widths, strict=True)):
        if stage:
            side //= 2
            macs += side * side * width * widths[stage - 1] * 4  # 2x2 stride-2 downsampling
        macs += depth * side * side * (width * 49 + 2 * width * 4 * width)  # depthwise 7x7, pwconv1, pwconv2
    macs += widths[-1] * config.num_labels
    benchmark = load_benchmark_module()
    pixels, labels = torch.randn(2, 3, size, size), torch.tensor([0, 1])
    assert benchmark.model_gflop(model, pixels) == pytest.approx(2 * macs / 1e9, rel=1e-9)
    assert benchmark.model_gflop(model, pixels, labels) == pytest.approx(3 * 2 * macs / 1e9, rel=1e-9)


PRIMING_PROBE = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)  # the fills in this thread only: nothing else allocates meanwhile

def faulted_mb(count=6):
    torch.empty(19_267_584, dtype=torch.uint8).fill_(1)  # the first time, fresh pages either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        block = torch.empty(19_267_584, dtype=torch.uint8)  # a bf16 V2-T activation of batch 8 at 224 px
        block.fill_(1)
        del block
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4096 / 1e6 / count

unprimed = faulted_mb()  # before the benchmark's imports, which may free large blocks of their own
sys.path.insert(0, sys.argv[1])
import benchmark
benchmark.prime_allocator()
print(json.dumps({"unprimed": unprimed, "primed": faulted_mb()}))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's allocator"
)
def test_priming_the_allocator_stops_the_page_faults_of_a_repeated_allocation():
    # a fresh process allocating one 19 MB size over and over faults it in every time (glibc maps it afresh); once
    # a 32 MiB block has been freed, the same allocations come from the heap and, after the first, fault nothing
    result = subprocess.run(
        [sys.executable, "-c", PRIMING_PROBE, str(REPO / "benchmarks")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # measured here: unprimed 12.8-19.3 MB a time (most of the 19.3), primed 0-3.2 (at most one of the six)
    assert figures["unprimed"] > 0.5 * 19.27, figures
    assert figures["primed"] < 0.25 * 19.27, figures


@pytest.mark.slow
def test_the_compiled_anchor_freezes_prepacks_and_runs_from_a_cpp_wrapper():
    # benchmark.compile_frozen, the compiled case of issue 19: Inductor's freezing must be on while Dynamo traces
    # (passed as torch.compile's options it is not, in torch 2.14: the weights stay inputs and nothing is
    # prepacked), and on CPU the graph is called from a C++ wrapper. The generated code shows both: the linears as
    # prepacked ones (MKL's in fp32, oneDNN's pointwise linear in bf16), the wrapper as C++; the logits are eager's
    # to fp32 rounding.
    from torch._inductor.utils import run_and_get_code

    from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification

    benchmark = load_benchmark_module()
    torch.manual_seed(0)
    model = ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("atto", num_labels=5)).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(pixel_values=pixels).logits
        torch._dynamo.reset()
        try:
            output, code = run_and_get_code(benchmark.compile_frozen(model), pixels)
        finally:  # no compiled entry of this test stays behind to count against other tests' recompile limit
            torch._dynamo.reset()
    generated = "\n".join(code)
    prepacked = "_mkl_linear" in generated or "_linear_pointwise" in generated
    assert prepacked, "the linears were not prepacked (freezing off while tracing)"
    assert "CppWrapperCodeCache" in generated, "the graph is not called from a C++ wrapper"
    assert torch.allclose(output.logits, expected, atol=1e-4, rtol=1e-4), (output.logits - expected).abs().max()
