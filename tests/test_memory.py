"""The allocator setting CPU inference tasks run under (deepem3d.memory.reusing_freed_memory)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from deepem3d.memory import reusing_freed_memory
from deepem3d.models import build_model
from deepem3d.models.inference_form import inference_form
from tests.conftest import ROOT


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_large_blocks_come_from_the_heap_inside_and_from_mappings_after():
    """In a fresh process: one that ran other tests may hold a freed block of that size in its
    heap, which malloc reuses whatever the setting."""
    done = subprocess.run([sys.executable, "-c", HEAP_OR_MAPPING], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr


HEAP_OR_MAPPING = """
import ctypes
import numpy as np
from deepem3d.memory import reusing_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def _mapped_bytes():  # bytes glibc's malloc holds in blocks of their own mapping
    return libc.mallinfo2().hblkhd

size = 64 * 2**20  # above glibc's largest dynamic mmap threshold (32 MiB)
with reusing_freed_memory() as reusing:
    assert reusing
    before = _mapped_bytes()
    block = np.ones(size, dtype=np.uint8)
    assert _mapped_bytes() == before, "not served from the heap"
    del block
before = _mapped_bytes()
block = np.ones(size, dtype=np.uint8)
assert _mapped_bytes() >= before + size, "the defaults again: a mapping of its own"
"""


def test_a_forward_reusing_freed_memory_gives_the_same_floats():
    torch.manual_seed(0)
    form = inference_form(build_model(preset="tiny", head="affinity").eval())
    x = torch.rand(2, 1, form.in_sections, 96, 96)
    with torch.no_grad():
        expected = form(x)
        with reusing_freed_memory():
            got = [form(x) for _ in range(2)]
    assert all(torch.equal(g, expected) for g in got)
