"""The allocator setting CPU inference tasks run under (deepem3d.memory.reusing_freed_memory)."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest
import torch

from deepem3d.memory import reusing_freed_memory
from deepem3d.models import build_model
from deepem3d.models.inference_form import inference_form


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mapped_bytes() -> int:
    """Bytes glibc's malloc holds in blocks of their own mapping (mallinfo2's hblkhd)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_large_blocks_come_from_the_heap_inside_and_from_mappings_after():
    size = 64 * 2**20  # above glibc's largest dynamic mmap threshold (32 MiB)
    with reusing_freed_memory() as reusing:
        assert reusing
        before = _mapped_bytes()
        block = np.ones(size, dtype=np.uint8)
        assert _mapped_bytes() == before  # served from the heap
        del block
    before = _mapped_bytes()
    block = np.ones(size, dtype=np.uint8)
    assert _mapped_bytes() >= before + size  # the defaults again: a mapping of its own
    del block


def test_a_forward_reusing_freed_memory_gives_the_same_floats():
    torch.manual_seed(0)
    form = inference_form(build_model(preset="tiny", head="affinity").eval())
    x = torch.rand(2, 1, form.in_sections, 96, 96)
    with torch.no_grad():
        expected = form(x)
        with reusing_freed_memory():
            got = [form(x) for _ in range(2)]
    assert all(torch.equal(g, expected) for g in got)
