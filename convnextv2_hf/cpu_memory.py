"""Keeping freed memory in the process on CPU (glibc), what jemalloc or tcmalloc under ``LD_PRELOAD`` do.

glibc's ``malloc`` gives every allocation at or above its mmap threshold (128 KiB at first, raised on the fly up to
32 MiB) a fresh mapping, and returns freed memory at the top of its heap to the system once more than its trim
threshold lies free. Each time, the memory is page-faulted back in at 4 KiB a page when it is next written. A
training step allocates and frees its activations and gradients every step, so on CPU it pays those faults every
step. What that costs depends on how much a step allocates afresh (BENCHMARKS.md, "glibc keeping freed memory in
training": most for the built-in classes and the main job, little for our own steps, which reuse their buffers).

``keep_freed_memory()`` sets both thresholds to their largest value through ``mallopt`` (glibc's public API), so
freed blocks stay in the heap and the next step reuses them without faults. The cost: the process's resident memory
no longer falls after its peak (a training loop reaches its peak every step anyway). It acts on the whole process,
from the call on; it changes nothing where the C library is not glibc (musl, macOS, Windows), and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# mallopt takes an int: the largest threshold it can be given (allocations of 2 GiB or more are still mapped)
LARGEST_THRESHOLD = 2**31 - 1
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit

_kept = False

# what ``--keep_freed_memory`` (``recipes.CheckedTrainingArguments``, ``training.KeepFreedMemoryCallback``) takes
KEEP_FREED_MEMORY_SETTINGS = ("auto", "on", "off")


def check_keep_freed_memory(setting) -> None:
    """``ValueError`` naming the flag unless ``setting`` is one of ``KEEP_FREED_MEMORY_SETTINGS``."""
    if setting not in KEEP_FREED_MEMORY_SETTINGS:
        raise ValueError(f"keep_freed_memory must be one of {list(KEEP_FREED_MEMORY_SETTINGS)}, got {setting!r}")


def glibc_version() -> str | None:
    """The running process's glibc version (``"2.36"``), or ``None`` where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"; unset (None) or an error elsewhere (musl)
    except (ValueError, OSError):
        return None
    if not name or not name.startswith("glibc "):
        return None
    return name.split()[1]


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of unmapping or trimming it (module docstring).
    Returns ``True`` once it is in effect (again ``True`` on later calls), ``False`` where the C library is not glibc
    (nothing is changed then) or ``mallopt`` refused a value."""
    global _kept
    if _kept:
        return True
    if glibc_version() is None:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    # where a glibc refuses a threshold above its dynamic maximum (32 MiB), larger blocks stay mapped afresh
    if not any(libc.mallopt(M_MMAP_THRESHOLD, value) == 1 for value in (LARGEST_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)):
        return False
    if libc.mallopt(M_TRIM_THRESHOLD, LARGEST_THRESHOLD) != 1:  # any positive value is taken
        return False
    _kept = True
    return True


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory`` is in effect in this process."""
    return _kept


__all__ = [
    "KEEP_FREED_MEMORY_SETTINGS",
    "check_keep_freed_memory",
    "freed_memory_kept",
    "glibc_version",
    "keep_freed_memory",
]
