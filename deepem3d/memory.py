"""The memory of one piece of work inside a long-lived process: its peak, and how its
allocations are served.

A worker runs many tasks; its lifetime peak (ru_maxrss) says nothing about the task at hand.
Linux resets the high-water mark (VmHWM) to the current RSS on `echo 5 > /proc/self/clear_refs`,
so `reset_peak()` before a task and `peak_rss()` after it give that task's own peak.
`reusing_freed_memory()` has a CPU forward reuse the pages it frees instead of faulting in
fresh ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import resource
import sys
from collections.abc import Iterator


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, for malloc_trim and mallopt; None elsewhere (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak() -> int:
    """Start a fresh peak-memory measurement here; returns the resident bytes now.

    malloc_trim first hands freed heap back, so what the next task allocates shows as growth.
    Where /proc/self/clear_refs is missing (macOS) the process's lifetime peak is all there is.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS") or peak_rss()


def peak_rss() -> int:
    """Peak resident bytes since the last `reset_peak` (or since the process began)."""
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def available_bytes() -> int | None:
    """The memory Linux says a new allocation can take now (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# glibc's mallopt parameters and their defaults (malloc/malloc.c)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB free at the heap's top


@contextlib.contextmanager
def reusing_freed_memory() -> Iterator[bool]:
    """Within the block, glibc's malloc serves large blocks from its heap and keeps what is
    freed for the next allocation, instead of mapping fresh pages for each and unmapping them
    on free (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB); after it, the default limits again and the
    freed memory handed back (the mmap threshold then stays where it was: glibc stops adapting
    it once a trim threshold is set). Yields whether it could (glibc only; elsewhere nothing
    changes).

    Why: a CPU forward allocates and frees activations of hundreds of MB layer after layer,
    and with fresh mappings every one of their pages faults in again. On a 2528 px tile, one
    thread, a forward ran 1.56x faster with the tiny preset and 1.73x with the small one
    (benchmarks/inference_form.py); the freed blocks fragment the heap, so a task's peak grows
    by about half (the README's inference table; the plan counts it).
    """
    libc = _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
    try:
        yield True
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
