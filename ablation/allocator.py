"""Keep freed memory in the process, so a training step does not page-fault its activations back in.

PyTorch's CPU tensors come from the C library's malloc. With glibc's defaults, blocks above a
dynamic threshold (at most 32 MiB) are mmap'd and unmapped on every free, and free memory at
the top of the heap is returned to the kernel beyond a trim threshold. A training step frees
its activations at the end and allocates them again in the next one, so each step faults its
memory back in page by page: about 78,000 minor faults (300 MB) per width-128 model step on
the development machine, and 8,000 at width 32. Raising both thresholds to 1 GiB keeps that
memory in the process and reuses it: about 900 and 80 faults per step. The numbers a run
computes do not change; the step is faster (see the README's Benchmark section) and the
resident memory stays at its high-water mark instead of shrinking between steps.

`trainer.reuse_memory=false` leaves the C library's settings alone. Other C libraries (macOS,
musl) are left alone too.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # bytes: blocks below this come from the heap, and up to this much free heap is kept
MMAP_FALLBACK = 32 << 20  # the largest mmap threshold glibc versions that refuse THRESHOLD accept

_applied: dict | None = None


def is_glibc() -> bool:
    """Whether this process runs on glibc, the only C library whose allocator is tuned here."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _libc():
    if not is_glibc():
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def reuse_freed_memory() -> dict | None:
    """Set glibc's mmap and trim thresholds for this process; the settings applied, or None.

    Idempotent: a second call (the next run of a sweep in the same process) returns the first
    call's settings without touching the allocator again.
    """
    global _applied
    if _applied is not None:
        return _applied
    libc = _libc()
    if libc is None:
        log.debug("not glibc: the allocator is left as it is")
        return None
    mmap = next((v for v in (THRESHOLD, MMAP_FALLBACK) if libc.mallopt(M_MMAP_THRESHOLD, v) == 1), None)
    trim = THRESHOLD if libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1 else None
    if mmap is None and trim is None:
        log.warning("glibc refused the malloc thresholds; the allocator is left as it is")
        return None
    _applied = {"mmap_threshold": mmap, "trim_threshold": trim}
    log.debug("malloc thresholds: %s", _applied)
    return _applied


def applied() -> dict | None:
    """The thresholds `reuse_freed_memory` set in this process, or None (not called, or not glibc)."""
    return _applied
