"""Intermediate arrays in cloud storage: npz files compressed with zstd, read and written in
batches (one by one on file://, where CloudFiles' thread pools cost more than they save)."""

from __future__ import annotations

import io

import numpy as np
from cloudfiles import CloudFiles

COMPRESS = "zstd"
COMPRESS_LEVEL = 1


def narrow(array: np.ndarray) -> np.ndarray:
    """An unsigned array in the smallest unsigned type that holds its values. Region-graph
    ids and counts rarely need 64 bits: stored narrow, an ISBI 2012 graph shrinks from 86 to
    ~40 MB before compression, and zstd has half the work. Readers cast back (`from_arrays`)."""
    if array.dtype.kind != "u" or array.size == 0:
        return array
    top = int(array.max())
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype) if dtype().itemsize < array.itemsize else array
    return array


def put_npz(files: CloudFiles, key: str, arrays: dict[str, np.ndarray]) -> int:
    """Store arrays, narrowed, as an npz compressed with zstd at level 1 (as small as zip's
    deflate, ten times as fast; level 1 is faster than zstd's default 3 and, on region graphs,
    smaller: measured 0.15 s and 14.4 MB against 0.2 s and 14.9 MB for an 86 MB graph)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: narrow(a) for name, a in arrays.items()})
    files.put(key, buffer.getvalue(), content_type="application/octet-stream", compress=COMPRESS,
              compression_level=COMPRESS_LEVEL)
    return buffer.tell()


def get_npz(files: CloudFiles, key: str) -> dict[str, np.ndarray]:
    data = files.get(key)
    if data is None:
        raise FileNotFoundError(f"{files.cloudpath}/{key} is missing: was its stage reset while "
                                "this task waited? Re-run `deepem3d segment`")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _local(files: CloudFiles) -> bool:
    """file:// paths: CloudFiles' batch calls run a thread pool that polls with sleeps
    (about 0.1 s per call, measured), where a loop of plain reads or writes takes 2 ms."""
    return files.protocol == "file"



def put_many(files: CloudFiles, items: list[dict]) -> None:
    """Write {"path", "content", "compress"} items: one batch, or a loop on file://."""
    if _local(files):
        for item in items:
            files.put(item["path"], item["content"], compress=item["compress"],
                      compression_level=COMPRESS_LEVEL, content_type="application/octet-stream")
    else:
        files.puts(items, content_type="application/octet-stream",
                   compression_level=COMPRESS_LEVEL)
