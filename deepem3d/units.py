"""Sizes as people write them: one parser for every command option and pipeline key, and one
way to print them."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Protocol

    class _Box(Protocol):  # CloudVolume's Bbox, or anything with minpt and maxpt
        @property
        def minpt(self) -> Iterable[float]: ...
        @property
        def maxpt(self) -> Iterable[float]: ...

#: the largest count the segmentation's kernels (int64) and the provenance's JSON hold
INT64_MAX = 2**63 - 1

#: the most CPU threads torch.set_num_threads takes (a C int)
MAX_THREADS = 2**31 - 1

#: byte units, case-insensitive: SI (powers of 1000, as igneous's --memory counts) and IEC
#: (powers of 1024)
BYTE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BYTES = re.compile(r"^\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value: str | int | float) -> int:
    """3500000000, 3.5e9, '3500MB', '3.5GB', '2GiB' -> bytes; ValueError otherwise."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number, unit = float(value), ""
        except OverflowError:  # an int past a float's range (a YAML key's 400 digits)
            raise ValueError(f"{value!r} is not a finite number of bytes") from None
    else:
        match = _BYTES.match(str(value))
        if not match or match.group(2).lower() not in BYTE_UNITS:
            raise ValueError(f"{value!r} is not a size in bytes (3.5e9, 3500MB, 3.5GB, 2GiB)")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = number * BYTE_UNITS[unit]
    if not math.isfinite(size):
        raise ValueError(f"{value!r} is not a finite number of bytes")
    return round(size)


def format_bytes(n: int) -> str:
    """Bytes for a person: '1.5 GiB', '310 MiB'; '-' for none."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:  # 3 significant digits, without an exponent (1010 GiB, not 1.01e+03)
            value = n / scale
            return f"{value:.0f} {unit}" if value >= 999.5 else f"{value:.3g} {unit}"
    return f"{n} B" if n else "-"


def format_bounds(box: _Box) -> str:
    """A bounding box (CloudVolume's Bbox, or anything with minpt and maxpt) as the
    `x0,y0,z0,x1,y1,z1` that --bounds takes."""
    return ",".join(str(int(v)) for v in (*box.minpt, *box.maxpt))


def format_triple(values: Iterable[float]) -> str:
    """Three numbers (a resolution) as "4,4,40"."""
    return ",".join(f"{float(v):g}" for v in values)


def format_number(value: float) -> str:
    """A number as the shortest text that reads back as the same float (Python's repr), whole
    ones without ".0": 0.4444444, 0.5, 4. For flags that must reproduce a setting exactly
    (`:g` keeps 6 digits: 0.4444444 would print as 0.444444)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)
