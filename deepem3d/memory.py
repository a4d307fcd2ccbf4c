"""Peak resident memory of one piece of work inside a long-lived process.

A worker runs many tasks; its lifetime peak (ru_maxrss) says nothing about the task at hand.
Linux resets the high-water mark (VmHWM) to the current RSS on `echo 5 > /proc/self/clear_refs`,
so `reset_peak()` before a task and `peak_rss()` after it give that task's own peak.
"""

from __future__ import annotations

import ctypes
import resource
import sys


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
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
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
