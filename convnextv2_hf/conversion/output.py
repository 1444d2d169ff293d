"""The output folder of a conversion, written atomically (``write_output_folder``), and its upload to the Hub.

An output folder carries a marker (``CONVERSION_MARKER``: source, SHA-256, time, package version); ``overwrite``
replaces only such a folder, never the working directory, an ancestor of it or of the source, the root or the home
folder (``check_output_dir``). The folder is staged in a ``.partial`` sibling that SIGTERM and SIGHUP, like Ctrl-C,
remove before they propagate (``ConversionInterrupted``); staging folders of killed runs are removed by the next
run (``remove_stale_partials``).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard
from safetensors import SafetensorError

from .. import __version__
from ..image_processing_convnextv2 import processor_for_resolution
from .building import ConvertedCheckpoint
from .key_maps import _describe

CONVERSION_MARKER = ".convnextv2_hf_conversion.json"  # in every folder a conversion writes, and only there
_MARKER_FORMAT = "convnextv2-hf conversion"
_PARTIAL_SUFFIX = ".partial"


class ConversionInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while an output folder was being written (SIGINT raises ``KeyboardInterrupt``).
    The staging folder is removed before it propagates; ``signum`` gives the conventional exit status
    ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``ConversionInterrupted`` as SIGINT raises ``KeyboardInterrupt``,
    so ``except``/``finally`` clean-up runs instead of the process dying mid-write. Handlers can only be set from
    the main thread; elsewhere the block runs with the process's own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise ConversionInterrupted(signum)

    numbers = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {number: signal.signal(number, interrupt) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Clean-up that a second Ctrl-C must not cut short: SIGINT, SIGTERM and SIGHUP wait until the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    deferred = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def read_conversion_marker(folder: str | Path) -> dict | None:
    """The marker a conversion left in ``folder`` (a dict), or None when there is none or it is not ours."""
    marker = Path(folder) / CONVERSION_MARKER
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and content.get("format") == _MARKER_FORMAT else None


def _write_marker(folder: Path, provenance: dict, **fields) -> None:
    content = {
        "format": _MARKER_FORMAT,
        "package_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance,
        **fields,
    }
    (folder / CONVERSION_MARKER).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(output_dir: str | Path, *, source_path: str | Path | None = None, overwrite: bool = False) -> Path:
    """``ValueError`` unless a conversion may write ``output_dir``; returns it resolved.

    Never a symbolic link or an existing file; never a folder whose removal would delete something the conversion
    did not create: the filesystem root, the home folder, the current directory, an ancestor of any of these or
    of the source file. An existing folder is replaced only with ``overwrite``, and only when it is empty or a
    conversion wrote it (it holds ``CONVERSION_MARKER``) and it holds nothing the conversion did not write.
    """
    output_dir = Path(output_dir)
    if output_dir.is_symlink():
        raise ValueError(f"the output folder {output_dir} is a symbolic link: give the real path of a new folder")
    target = output_dir.resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"the output folder {output_dir} is an existing file, not a folder")
    blocking = next((parent for parent in target.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"cannot create the output folder {output_dir}: {blocking} is a file, not a folder")
    protected = {
        Path(target.anchor): "the filesystem root",
        Path.home().resolve(): "your home folder",
        Path.cwd().resolve(): "the current directory",
    }
    if source_path is not None:
        source_path = Path(source_path)
        protected[source_path.absolute()] = f"the source checkpoint {source_path}"
        protected[source_path.resolve()] = f"the source checkpoint {source_path}"
    for path, what in protected.items():
        if _is_within(path, target):
            relation = "is" if path == target else "holds"
            raise ValueError(
                f"refusing to write the output folder {output_dir}: it {relation} {what}, which a conversion must "
                "never replace; choose a new folder"
            )
    if not target.exists():
        return target
    if not overwrite:
        raise ValueError(f"{output_dir} already exists (pass --overwrite to replace it)")
    contents = sorted(path.name for path in target.iterdir())
    if not contents:
        return target
    marker = read_conversion_marker(target)
    if marker is None:
        raise ValueError(
            f"refusing to replace {output_dir}: it is not empty and no conversion wrote it (it has no "
            f"{CONVERSION_MARKER}; it holds {_describe(contents, limit=5)}). Choose a new folder, or empty it yourself"
        )
    foreign = sorted(set(contents) - set(marker.get("files", [])) - {CONVERSION_MARKER})
    if foreign:
        raise ValueError(
            f"refusing to replace {output_dir}: a conversion wrote it, but it now also holds files the conversion "
            f"did not write ({_describe(foreign, limit=5)}). Move them away first"
        )
    return target


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(output_dir: str | Path) -> list[Path]:
    """Remove the staging folders (``.<name>.*.partial`` beside ``output_dir``) that killed runs (SIGKILL, power
    loss) left behind: those whose marker names a writer process on this host that no longer runs, and empty ones.
    Folders without our marker, and those of a running conversion, stay. Returns the removed paths."""
    output_dir = Path(output_dir)
    parent, prefix = output_dir.parent, f".{output_dir.name}."
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        if not (path.name.startswith(prefix) and path.name.endswith(_PARTIAL_SUFFIX)) or path.is_symlink():
            continue
        if not path.is_dir():
            continue
        marker = read_conversion_marker(path)
        if marker is None:
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds when empty: killed between mkdtemp and the marker
                removed.append(path)
            continue
        writer = marker.get("writer")
        if isinstance(writer, dict):  # a staging folder; without one, a finished folder moved aside to be replaced
            if writer.get("host") != socket.gethostname():
                continue  # written from another machine (a shared disk): its process cannot be checked from here
            pid = writer.get("pid")
            if not isinstance(pid, int) or pid <= 0 or _process_is_alive(pid):
                continue
        with signals_deferred():
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def write_output_folder(
    converted: ConvertedCheckpoint,
    output_dir: str | Path,
    card: ModelCard,
    overwrite: bool = False,
    *,
    source_path: str | Path | None = None,
    provenance: dict | None = None,
) -> Path:
    """Save weights (safetensors), config, processor, model card and the conversion marker (``provenance``: the
    source and its SHA-256) into a ``.partial`` sibling folder, check that it loads back to the same tensors, then
    rename it into place. A failure, Ctrl-C, SIGTERM or SIGHUP leaves no ``.partial`` folder and the previous
    output (if any) in place; a disk error (full, read-only) is a ``ValueError``. See ``check_output_dir`` for
    what ``overwrite`` may replace; ``source_path`` is protected from it."""
    target = check_output_dir(output_dir, source_path=source_path, overwrite=overwrite)
    provenance = dict(provenance or {})
    staging = aside = None
    try:
        with signals_raise():
            try:
                remove_stale_partials(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_PARTIAL_SUFFIX, dir=target.parent))
                # the marker first: a later run can tell this folder is ours and whether its writer still runs
                _write_marker(staging, provenance, writer={"pid": os.getpid(), "host": socket.gethostname()})
                converted.model.save_pretrained(staging)
                processor_for_resolution(converted.resolution).save_pretrained(staging)
                card.save(staging / "README.md")
                reloaded = type(converted.model).from_pretrained(staging)
                expected = converted.model.state_dict()
                if reloaded.state_dict().keys() != expected.keys() or any(
                    not torch.equal(tensor, expected[name]) for name, tensor in reloaded.state_dict().items()
                ):
                    raise ValueError(f"the saved folder does not load back to the converted tensors ({staging})")
                files = sorted(path.name for path in staging.iterdir() if path.name != CONVERSION_MARKER)
                _write_marker(staging, provenance, files=files)
                if target.exists():  # checked replaceable above; moved aside so the swap is two renames
                    # a staging-like name: if this process dies here, the next run removes it as stale
                    aside = staging.with_name(
                        staging.name.removesuffix(_PARTIAL_SUFFIX) + ".replaced" + _PARTIAL_SUFFIX
                    )
                    target.rename(aside)
                staging.rename(target)
                staging = None
            except BaseException:
                with signals_deferred():
                    if staging is not None:
                        shutil.rmtree(staging, ignore_errors=True)
                    if aside is not None and aside.exists() and not target.exists():
                        aside.rename(target)  # put the previous output back
                raise
            finally:
                if aside is not None:
                    with signals_deferred():
                        shutil.rmtree(aside, ignore_errors=True)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        raise ValueError(describe_write_error(error, target)) from None
    return target


def describe_write_error(error: OSError | SafetensorError, output_dir: Path) -> str:
    number = getattr(error, "errno", None)
    if number is None and (match := re.search(r"os error (\d+)", str(error))):
        number = int(match.group(1))
    reason = {
        errno.ENOSPC: "no space left on the disk",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(number, getattr(error, "strerror", None) or str(error))
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    return f"could not write the output folder {output_dir}: {reason}{where}; nothing was written"


def is_converted_folder(path: str | Path) -> bool:
    """A finished output folder: folders appear only complete, by rename, and with the conversion marker."""
    path = Path(path)
    return read_conversion_marker(path) is not None and all(
        (path / name).is_file() for name in ("config.json", "model.safetensors", "README.md")
    )


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Create ``repo_id`` if needed (``private``), create branch ``revision`` if needed, and upload ``folder``.

    ``endpoint`` and ``token`` default to ``HF_ENDPOINT`` and ``HF_TOKEN`` read now (huggingface_hub reads
    ``HF_ENDPOINT`` once, at import). Unchanged files are not re-uploaded; an unchanged folder makes no commit.
    The conversion marker stays local.
    """
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token or os.environ.get("HF_TOKEN"))
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        revision=revision,
        commit_message=commit_message or f"Upload ConvNeXt V2 converted with convnextv2-hf {__version__}",
        # the marker is local bookkeeping (a local path, a time); the card carries the source and its SHA-256
        ignore_patterns=[CONVERSION_MARKER],
    )
