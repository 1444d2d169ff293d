"""Conversion never deletes what it did not create, and bad input never costs memory, a traceback or a half-written
folder: ``--overwrite`` limits, the ``.partial`` staging folder under signals, hostile and malformed tensors,
provenance (SHA-256), awkward output paths (symlink, file, read-only, full disk), convert-all going on past
failures, and CLI exit codes.

Checkpoints are the synthetic official files of ``helpers``. Real disks where possible: the full-disk and
read-only cases mount a small tmpfs when the tests run as root (they are skipped otherwise, and a narrow simulated
ENOSPC covers the full-disk message everywhere).
"""

import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from expected_errors import (
    CHECKPOINT_MODEL_TOO_LARGE,
    COMPLEX_TENSOR,
    DISK_FULL_WHILE_WRITING,
    INJECTED_CARD_FAILURE_MATCH,
    INTEGER_KEY,
    INTEGER_TENSOR,
    LIST_NOT_A_TENSOR,
    NOT_A_PYTORCH_CHECKPOINT,
    OUTPUT_FOLDER_EXISTS,
    OUTPUT_IS_A_FILE,
    OUTPUT_IS_A_SYMLINK,
    ZERO_D_TENSOR,
)
from helpers import (
    CUSTOM,
    REPO,
    broken_card_save,
    load_script,
    malformed_state,
    official_dense,
    save_official,
    write_expanded,
    write_huge_widths,
    write_lying_header,
)

from convnextv2_hf import __version__
from convnextv2_hf import conversion as conversion_module
from convnextv2_hf.conversion import (
    CONVERSION_MARKER,
    OriginalCheckpoint,
    check_output_dir,
    convert_checkpoint,
    convert_state_dict,
    is_converted_folder,
    read_conversion_marker,
)


def quiet(line: str) -> None:
    pass


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (relative) with its bytes; None for folders."""
    return {
        str(path.relative_to(folder)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(folder.rglob("*"))
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def source(tmp_path) -> Path:
    return save_official(tmp_path / "custom.pt", official_dense(CUSTOM, num_classes=10))


def convert(source: Path, output_dir: Path, **kwargs):
    return convert_checkpoint(source, output_dir, verify=False, log=quiet, **kwargs)


def partials(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".partial"))


# ----------------------------------------------------------------------------------------------------------
# --overwrite replaces only what a conversion wrote
# ----------------------------------------------------------------------------------------------------------


def test_output_dir_dot_with_overwrite_refuses_and_every_file_survives(tmp_path, monkeypatch, capsys):
    # the reported disaster: run in a folder holding the checkpoint and other work, --output-dir . --overwrite
    work = tmp_path / "work"
    work.mkdir()
    save_official(work / "custom.pt", official_dense(CUSTOM, num_classes=10))
    (work / "notes.txt").write_text("my notes\n")
    (work / "results").mkdir()
    (work / "results" / "run1.csv").write_text("a,b\n1,2\n")
    before = snapshot(work)
    monkeypatch.chdir(work)
    cli = load_script("convert_convnextv2_to_hf")
    code = cli.main(["--checkpoint", "custom.pt", "--output-dir", ".", "--overwrite", "--no-verify"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: refusing to write the output folder .") and "current directory" in error
    assert snapshot(work) == before and len(before) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no staging folder beside it either


def test_overwrite_refuses_every_folder_a_conversion_did_not_write(tmp_path, monkeypatch, source):
    home, cwd = tmp_path / "home", tmp_path / "home" / "project" / "run"
    cwd.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    nested = tmp_path / "data" / "checkpoints" / "custom.pt"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(source.read_bytes())
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "thesis.tex").write_text("\\documentclass{article}\n")
    refused = {
        "/": "is the filesystem root",
        str(home): "is your home folder",
        str(cwd): "is the current directory",
        str(cwd.parent): "holds the current directory",
        str(tmp_path / "data"): "holds the source checkpoint",
        str(nested.parent): "holds the source checkpoint",
        str(tmp_path / "user"): "not empty and no conversion wrote it",
    }
    before = snapshot(tmp_path)
    for output_dir, reason in refused.items():
        with pytest.raises(ValueError, match=reason):
            check_output_dir(output_dir, source_path=nested, overwrite=True)
    for output_dir in (str(tmp_path / "data"), str(tmp_path / "user"), str(cwd)):
        with pytest.raises(ValueError, match="refusing"):
            convert(nested, Path(output_dir), overwrite=True)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_converted_folder_and_keeps_foreign_files_safe(tmp_path, source):
    out = tmp_path / "out"
    convert(source, out)
    first = read_conversion_marker(out)
    assert first["source_sha256"] == sha256(source) and first["package_version"] == __version__
    assert first["source_path"] == str(source.resolve()) and first["layout"] == "fine-tuned"
    assert set(first["files"]) == {p.name for p in out.iterdir()} - {CONVERSION_MARKER}
    assert "writer" not in first and first["created"].endswith("+00:00")

    other = save_official(tmp_path / "other.pt", official_dense(CUSTOM, num_classes=10, seed=5))
    convert(other, out, overwrite=True)  # a folder a conversion wrote: replaced
    assert read_conversion_marker(out)["source_sha256"] == sha256(other) != first["source_sha256"]
    assert partials(tmp_path) == [] and is_converted_folder(out)

    before = snapshot(out)

    with pytest.MonkeyPatch.context() as patch:  # any failure while the replacement is being written
        patch.setattr(conversion_module.output.ModelCard, "save", broken_card_save)
        with pytest.raises(RuntimeError, match=INJECTED_CARD_FAILURE_MATCH):
            convert(source, out, overwrite=True)
    assert snapshot(out) == before and partials(tmp_path) == []  # the previous output is untouched

    (out / "my_eval.json").write_text("{}")  # the user's own file inside a converted folder
    with pytest.raises(ValueError, match="also holds files the conversion did not write.*my_eval.json"):
        convert(source, out, overwrite=True)
    assert (out / "my_eval.json").read_text() == "{}"
    assert read_conversion_marker(out)["source_sha256"] == sha256(other)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=OUTPUT_FOLDER_EXISTS):
        convert(source, empty)
    convert(source, empty, overwrite=True)  # an empty folder holds nothing to lose
    assert is_converted_folder(empty)


# ----------------------------------------------------------------------------------------------------------
# Signals: no .partial folder survives SIGINT or SIGTERM; one left by SIGKILL is removed by the next run
# ----------------------------------------------------------------------------------------------------------

# Runs the real CLI in a real process. The only change: the model card, written inside the staging folder, takes
# 120 s longer, so the test can signal the process while it is writing (a slow disk stands in for that sleep).
SLOW_CLI = """
import sys, time
from huggingface_hub import ModelCard
save = ModelCard.save
def slow_save(self, path):
    save(self, path)
    time.sleep(120)
ModelCard.save = slow_save
sys.path.insert(0, sys.argv[1])
import convert_convnextv2_to_hf
sys.exit(convert_convnextv2_to_hf.main(sys.argv[2:]))
"""


def start_slow_conversion(source: Path, out: Path, log: Path) -> tuple[subprocess.Popen, Path]:
    """Start the CLI and wait until its staging folder holds the model card: the process is mid-write."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", SLOW_CLI, str(REPO / "conversion_scripts")]
    command += ["--checkpoint", str(source), "--output-dir", str(out), "--no-verify"]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        staging = [p for p in out.parent.glob(f".{out.name}.*.partial") if (p / "README.md").is_file()]
        if staging:
            return process, staging[0]
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the conversion never reached its staging folder: {log.read_text()[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_while_writing_leave_no_partial_folder(tmp_path, source, signum):
    out = tmp_path / "out"
    process, staging = start_slow_conversion(source, out, tmp_path / "log.txt")
    assert read_conversion_marker(staging)["writer"]["pid"] == process.pid
    process.send_signal(signum)
    assert process.wait(timeout=60) == 128 + signum
    log = (tmp_path / "log.txt").read_text()
    assert f"error: interrupted{' by SIGTERM' if signum == signal.SIGTERM else ''}" in log, log
    assert "Traceback" not in log
    assert not out.exists() and partials(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.pt", "log.txt"]


@pytest.mark.slow
def test_a_later_run_removes_the_partial_folder_of_a_killed_run_and_nothing_else(tmp_path, source):
    out = tmp_path / "out"
    process, staging = start_slow_conversion(source, out, tmp_path / "log.txt")
    process.kill()  # SIGKILL: no clean-up can run
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert staging.is_dir() and not out.exists()

    live = tmp_path / ".out.live.partial"  # a conversion still running (this process) keeps its folder
    live.mkdir()
    marker = {"format": "convnextv2-hf conversion", "writer": {"pid": os.getpid(), "host": socket.gethostname()}}
    (live / CONVERSION_MARKER).write_text(json.dumps(marker))
    foreign = tmp_path / ".out.mine.partial"  # a name that matches, but no conversion made it
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    convert(source, tmp_path / "earlier")  # a finished folder a killed run had moved aside to replace it
    (tmp_path / "earlier").rename(tmp_path / ".out.x1y2.replaced.partial")

    convert(source, out)
    assert not staging.exists() and is_converted_folder(out)
    assert partials(tmp_path) == [".out.live.partial", ".out.mine.partial"]
    assert (foreign / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------------
# Hostile files: shapes are checked before memory is allocated
# ----------------------------------------------------------------------------------------------------------

# the files: helpers.write_lying_header, write_expanded and write_huge_widths

MEMORY_PROBE = """
import json, resource, sys
from convnextv2_hf.conversion import convert_state_dict, load_original_checkpoint

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def virtual_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))

# a regression must fail fast with an allocation error here, not swap the machine: 3 GB of address space at most
resource.setrlimit(resource.RLIMIT_AS, (virtual_bytes() + (3 << 30), resource.RLIM_INFINITY))
baseline, results = peak_mb(), {}
for path in sys.argv[1:]:
    try:
        convert_state_dict(load_original_checkpoint(path))
        outcome = "converted"
    except ValueError as error:
        outcome = "ValueError: " + str(error)
    except BaseException as error:
        outcome = type(error).__name__ + ": " + str(error)[:300]
    results[path] = {"outcome": outcome, "peak_growth_mb": peak_mb() - baseline}
print(json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_small_hostile_files_get_a_clear_error_without_allocating_gigabytes(tmp_path):
    files = {
        "lying header": write_lying_header(tmp_path / "header.pt", "stages.0.0.pwconv1.weight", (100_000, 100_000)),
        "stride-0 view": write_expanded(tmp_path / "expanded.pt"),
        "huge widths": write_huge_widths(tmp_path / "widths.pt"),
    }
    expected = {
        "lying header": NOT_A_PYTORCH_CHECKPOINT,
        "stride-0 view": "tensor 'stages.0.0.pwconv1.weight' declares shape \\(100000, 100000\\)",
        # widths whose model would exceed the size bound: refused with the estimate before anything is allocated
        "huge widths": CHECKPOINT_MODEL_TOO_LARGE,
    }
    assert max(path.stat().st_size for path in files.values()) < 20 << 20
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *map(str, files.values())],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for kind, path in files.items():
        result = results[str(path)]
        assert result["outcome"].startswith("ValueError: "), (kind, result)
        assert re.search(expected[kind], result["outcome"]), (kind, result)
        assert result["peak_growth_mb"] < 300, (kind, result)  # the files are < 20 MB; a model would be gigabytes


def test_a_gap_in_the_block_numbering_is_an_error_not_a_deep_model():
    state = official_dense(CUSTOM, num_classes=10)
    state["stages.0.99999999.dwconv.weight"] = state["stages.0.0.dwconv.weight"]
    with pytest.raises(ValueError, match="blocks of stage 0 must be numbered 0, 1, ...; found blocks 0, 99999999"):
        convert_state_dict(OriginalCheckpoint(state))


# ----------------------------------------------------------------------------------------------------------
# Malformed tensors: a ValueError naming the key
# ----------------------------------------------------------------------------------------------------------

# the state dicts: helpers.malformed_state

MALFORMED = {
    "0-d tensor": ZERO_D_TENSOR,
    "integer key": INTEGER_KEY,
    "tuple key": "key \\('stages', 0\\) is a tuple",
    "complex tensor": COMPLEX_TENSOR,
    "NaN": "tensor 'stages.1.1.pwconv1.weight' holds 1 NaN and 0 infinite",
    "infinity": "tensor 'stages.2.0.grn.beta' holds 0 NaN and 1 infinite",
    "integer tensor": INTEGER_TENSOR,
    "not a tensor": LIST_NOT_A_TENSOR,
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_tensors_exit_2_naming_the_key(kind, tmp_path, capsys):
    source = save_official(tmp_path / "bad.pt", malformed_state(kind))
    cli = load_script("convert_convnextv2_to_hf")
    code = cli.main(["--checkpoint", str(source), "--output-dir", str(tmp_path / "out"), "--no-verify"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith(f"error: {source}: ") and "Traceback" not in error
    assert re.search(MALFORMED[kind], error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]
    if kind != "not a tensor":  # a direct caller of the engine gets the same check
        with pytest.raises(ValueError, match=MALFORMED[kind]):
            convert_state_dict(OriginalCheckpoint(malformed_state(kind)))


# ----------------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------------


def test_sha256_is_recorded_and_checked_before_anything_is_read(tmp_path, source, capsys):
    digest = sha256(source)
    cli = load_script("convert_convnextv2_to_hf")
    arguments = ["--checkpoint", str(source), "--no-verify"]
    assert cli.main([*arguments, "--output-dir", str(tmp_path / "good"), "--sha256", digest.upper()]) == 0
    assert f"sha256 {digest[:16]}..., as expected" in capsys.readouterr().out
    assert read_conversion_marker(tmp_path / "good")["source_sha256"] == digest
    assert f"SHA-256 of the source file: {digest}" in (tmp_path / "good" / "README.md").read_text()

    flipped = bytearray(source.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01  # one bit in the tensor data: still loads, converts and "verifies"
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(bytes(flipped))
    code = cli.main(
        ["--checkpoint", str(corrupted), "--no-verify", "--output-dir", str(tmp_path / "bad"), "--sha256", digest]
    )
    error = capsys.readouterr().err
    assert code == 2 and f"has SHA-256 {sha256(corrupted)}, not the expected {digest}" in error
    assert not (tmp_path / "bad").exists() and partials(tmp_path) == []

    with pytest.raises(SystemExit) as usage:  # argparse's own exit for a malformed value
        cli.main([*arguments, "--output-dir", str(tmp_path / "x"), "--sha256", "abc123"])
    assert usage.value.code == 2 and "is not a SHA-256 (64 hexadecimal digits)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Awkward output paths: a clear error, no partial folder
# ----------------------------------------------------------------------------------------------------------


def test_symlinks_files_and_paths_through_files_are_clear_errors(tmp_path, source, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("text")
    cases = {
        "link": OUTPUT_IS_A_SYMLINK,
        "dangling": OUTPUT_IS_A_SYMLINK,
        "file.txt": OUTPUT_IS_A_FILE,
        "file.txt/sub": "cannot create the output folder .*file.txt/sub: .*file.txt is a file, not a folder",
    }
    before = snapshot(tmp_path)
    cli = load_script("convert_convnextv2_to_hf")
    for output_dir, message in cases.items():
        for overwrite in ([], ["--overwrite"]):
            code = cli.main(
                ["--checkpoint", str(source), "--output-dir", str(tmp_path / output_dir), "--no-verify"] + overwrite
            )
            error = capsys.readouterr().err
            assert code == 2 and re.search(message, error), (output_dir, error)
            assert "Traceback" not in error
    assert snapshot(tmp_path) == before


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a real tmpfs (options given by the test); skipped where mounting is not allowed (not root)."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()[:100]})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_folder(tmp_path, source, tmpfs):
    disk = tmpfs("size=128k")  # room for the staging folder and marker, not for the weights
    with pytest.raises(ValueError, match=f"could not write the output folder {disk}/out: no space left on the disk"):
        convert(source, disk / "out")
    assert list(disk.iterdir()) == []


def test_a_read_only_folder_is_a_clear_error(tmp_path, source, tmpfs):
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount is the real thing
        folder, reason = tmpfs("ro,size=64k"), "the filesystem is read-only"
    else:
        folder, reason = tmp_path / "locked", "permission denied"
        folder.mkdir()
        folder.chmod(0o555)
    with pytest.raises(ValueError, match=f"could not write the output folder {folder}/out: {reason}"):
        convert(source, folder / "out")
    assert list(folder.iterdir()) == []


def test_enospc_from_the_weights_writer_is_a_clear_error(tmp_path, source, monkeypatch):
    # simulated, narrowly, for machines where no small disk can be mounted: the safetensors writer reports a full
    # disk as its own error type, which the message must still translate
    import safetensors
    import transformers.modeling_utils

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # what a writer leaves behind when the disk fills
        message = f"Error while serializing: I/O error: No space left on device (os error {errno.ENOSPC})"
        raise safetensors.SafetensorError(message)  # the very text a full tmpfs gives

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(ValueError, match=DISK_FULL_WHILE_WRITING):
        convert(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.pt"]


# ----------------------------------------------------------------------------------------------------------
# convert_all.py goes on past any failure
# ----------------------------------------------------------------------------------------------------------


def test_convert_all_goes_on_past_failures_and_reports_them_in_its_table(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    save_official(cache / "convnextv2_atto_1k_224_fcmae.pt", {"x": torch.zeros(1)})
    save_official(
        cache / "convnextv2_atto_1k_224_ema.pt", official_dense(([2, 2, 6, 2], [40, 80, 160, 320]), num_classes=1000)
    )
    truncated = save_official(cache / "convnextv2_femto_1k_224_fcmae.pt", official_dense(CUSTOM))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    # femto ema is not in the cache and the tests run offline

    load = conversion_module.load_original_checkpoint

    def load_with_a_bug(path):
        if "atto_1k_224_fcmae" in str(path):  # stands for an unforeseen bug: no real input raises anything else
            raise RuntimeError("an unexpected failure")
        return load(path)

    monkeypatch.setattr(conversion_module.convert, "load_original_checkpoint", load_with_a_bug)  # its caller
    convert_all = load_script("convert_all")
    arguments = ["--output-root", str(tmp_path / "converted"), "--cache-dir", str(cache), "--no-verify"]
    assert convert_all.main([*arguments, "--filter", "atto_1k", "--filter", "femto_1k"]) == 1
    out = capsys.readouterr().out
    table = out[out.index("checkpoint  ") :]
    assert re.search(r"convnextv2_atto_1k_224_fcmae\s+FAILED .*RuntimeError: an unexpected failure", table)
    assert re.search(r"convnextv2_atto_1k_224_ema\s+converted\s+not verified", table)
    assert re.search(r"convnextv2_femto_1k_224_fcmae\s+FAILED .*ValueError: ", table)
    assert re.search(r"convnextv2_femto_1k_224_ema\s+FAILED .*ValueError: ", table)
    assert re.search(r"convnextv2_femto_1k_224_fcmae: FAILED: ValueError: .* not a readable PyTorch checkpoint", out)
    assert re.search(r"convnextv2_femto_1k_224_ema: FAILED: ValueError: .* HF_HUB_OFFLINE is set", out)
    assert "1 done, 3 failed" in out
    assert [p.name for p in (tmp_path / "converted").iterdir()] == ["convnextv2-atto-1k-224"]

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion_module.convert, "load_original_checkpoint", interrupted)
    assert convert_all.main([*arguments, "--filter", "atto_1k", "--filter", "femto_1k_224_fcmae"]) == 130
    out = capsys.readouterr().out
    assert re.search(r"convnextv2_atto_1k_224_fcmae\s+INTERRUPTED", out)
    assert "0 done, 1 failed, 2 not started (interrupted)" in out


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    cli, convert_all = load_script("convert_convnextv2_to_hf"), load_script("convert_all")
    for arguments in (["--checkpoint", "x.pt", "--output-dir", "o", "--resolution", "0"], ["--output-dir", "o"]):
        with pytest.raises(SystemExit) as usage:
            cli.main(arguments)
        assert usage.value.code == 2
    assert "must be positive, got 0" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(tmp_path / "missing.pt"), "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")
    assert convert_all.main(["--filter", "no-such-model"]) == 2
    assert capsys.readouterr().err == "error: no official checkpoint matches --filter ['no-such-model']\n"
    (tmp_path / "root.txt").write_text("")
    assert convert_all.main(["--output-root", str(tmp_path / "root.txt"), "--filter", "atto"]) == 2
    assert OUTPUT_IS_A_FILE in capsys.readouterr().err
