"""Neuroglancer's compressed_segmentation encoding, compiled with numba.

The remap stage writes the whole segmentation layer, and encoding its chunks with the
reference encoder (the `compressed_segmentation` package CloudVolume calls) was a third of
that stage: it hashes every voxel's value twice. Here one scan of a block finds its distinct
values (skipping runs; a linear search among up to 8, else a hash table) and notes each
voxel's slot among them; the slots' ranks are then packed a word at a time. The output is the
reference encoder's, byte for byte (tests compare them), so nothing reading the layer can
tell: per block, the sorted distinct values as the lookup table, indices packed at 0, 1, 2,
4, 8, 16 or 32 bits (padding past the volume's end as index 0), and a table already written
in the channel reused by offset. Format:
https://github.com/google/neuroglancer/tree/master/src/sliceview/compressed_segmentation
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

__all__ = ["MAX_BLOCK_VOXELS", "encode"]

#: the largest block encoded here: at most 2^16 values, indices of at most 16 bits
MAX_BLOCK_VOXELS = 2**16

#: distinct values in a block up to which a linear scan finds them; more go through a hash table
_FEW = 8
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True)
def _table_hash(table, n):
    h = np.uint64(n)
    for i in range(n):
        h = (h ^ np.uint64(table[i])) * _GOLDEN
        h ^= h >> np.uint64(29)
    return h


@njit(cache=True)
def _word(value, w):
    """The w-th 32-bit word of a table value, little end first."""
    return np.uint32((np.uint64(value) >> np.uint64(32 * w)) & np.uint64(0xFFFFFFFF))


@njit(cache=True)
def _slot(v, keys, slots, shift):
    """Where v is, or would go, in the open-addressing table (`keys`, `slots`; free: -1)."""
    mask = slots.size - 1
    i = np.int64((np.uint64(v) * _GOLDEN) >> shift)
    while slots[i] >= 0 and keys[i] != v:
        i = (i + 1) & mask
    return i


@njit(cache=True)
def _distinct(flat, p0, sy, sz, ax, ay, az, bx, by, table, slot_of, keys, slots, shift):
    """The block's distinct values into table[:n], in order of first sight, and each voxel's
    position there into slot_of (by offset in the block; padding is left as is). Values are
    looked up by a linear search while there are at most `_FEW`, then through the
    open-addressing table (`keys`, `slots`: a power of two, at least twice the block, `slots`
    all -1, and left so). Returns n and whether the table was used."""
    n = 0
    k = 0
    hashed = False
    prev = flat[p0]
    for z in range(az):
        for y in range(ay):
            row = bx * (y + by * z)
            p = p0 + y * sy + z * sz
            for x in range(ax):
                v = flat[p + x]
                if n == 0 or v != prev:
                    prev = v
                    if not hashed:
                        k = -1
                        for i in range(n):
                            if table[i] == v:
                                k = i
                                break
                        if k < 0 and n == _FEW:  # too many to search: hash those seen
                            hashed = True
                            for j in range(n):
                                i = _slot(table[j], keys, slots, shift)
                                keys[i] = table[j]
                                slots[i] = j
                    if hashed:
                        i = _slot(v, keys, slots, shift)
                        if slots[i] < 0:
                            keys[i] = v
                            slots[i] = n
                            table[n] = v
                            n += 1
                        k = slots[i]
                    elif k < 0:
                        table[n] = v
                        k = n
                        n += 1
                slot_of[row + x] = k
    if hashed:  # free the slots used, last inserted first: the probes before each are intact
        for j in range(n - 1, -1, -1):
            slots[_slot(table[j], keys, slots, shift)] = -1
    return n, hashed


@njit(cache=True)
def _encode_channel(flat, nx, ny, nz, bx, by, bz, out, base):
    """Encode one channel (`flat`: x, y, z raveled x fastest) into out[base:], which must be
    zeros; returns the end (words), or -1 when a table offset outgrows the format's 24 bits."""
    gx, gy, gz = -(-nx // bx), -(-ny // by), -(-nz // bz)
    words = (flat.itemsize + 3) // 4
    block_voxels = bx * by * bz
    top = base + 2 * gx * gy * gz
    cap = 16
    while cap < 2 * gx * gy * gz:
        cap *= 2
    cache_hash = np.zeros(cap, np.uint64)
    cache_offset = np.full(cap, -1, np.int64)
    cache_size = np.zeros(cap, np.int64)
    table = np.empty(block_voxels, flat.dtype)
    scratch = np.empty(block_voxels, flat.dtype)
    slot_of = np.empty(block_voxels, np.int64)
    rank = np.empty(block_voxels + 1, np.int64)
    size = 2
    while size < 2 * block_voxels:
        size *= 2
    keys = np.empty(size, flat.dtype)
    slots = np.full(size, -1, np.int64)
    bits = 0
    while (1 << bits) < size:
        bits += 1
    shift = np.uint64(64 - bits)
    rank[block_voxels] = 0
    for kz in range(gz):
        for ky in range(gy):
            for kx in range(gx):
                x0, y0, z0 = kx * bx, ky * by, kz * bz
                ax, ay, az = min(bx, nx - x0), min(by, ny - y0), min(bz, nz - z0)
                if ax < bx or ay < by or az < bz:
                    slot_of[:] = block_voxels  # padding: rank 0, the lowest value
                p0 = x0 + nx * (y0 + ny * z0)
                n, hashed = _distinct(flat, p0, nx, nx * ny, ax, ay, az, bx, by, table,
                                      slot_of, keys, slots, shift)
                if not hashed:  # rank the few values (distinct): a voxel's index is its slot's
                    for i in range(n):
                        r = 0
                        for j in range(n):
                            if table[j] < table[i]:
                                r += 1
                        rank[i] = r
                        scratch[r] = table[i]
                else:
                    order = np.argsort(table[:n])
                    for i in range(n):
                        rank[order[i]] = i
                        scratch[i] = table[order[i]]
                table[:n] = scratch[:n]
                bits = 0
                if n != 1:
                    bits = 1
                    while (1 << bits) < n:
                        bits *= 2
                encoded = (bits * block_voxels + 31) // 32
                values_at = top - base
                h = _table_hash(table, n)
                slot = np.int64(h & np.uint64(cap - 1))
                table_at = -1
                while cache_offset[slot] >= 0:
                    if cache_hash[slot] == h and cache_size[slot] == n:
                        at = base + cache_offset[slot]
                        same = True
                        for i in range(n):
                            for w in range(words):
                                if out[at + i * words + w] != _word(table[i], w):
                                    same = False
                                    break
                            if not same:
                                break
                        if same:
                            table_at = cache_offset[slot]
                            break
                    slot = (slot + 1) & (cap - 1)
                if table_at < 0:
                    table_at = values_at + encoded
                    at = top + encoded
                    for i in range(n):
                        for w in range(words):
                            out[at + i * words + w] = _word(table[i], w)
                    cache_hash[slot] = h
                    cache_size[slot] = n
                    cache_offset[slot] = table_at
                    end = at + n * words
                else:
                    end = top + encoded
                if table_at >= 1 << 24:
                    return -1
                if bits:  # a word at a time
                    per_word = 32 // bits
                    for wi in range(encoded):
                        word = np.uint32(0)
                        first = wi * per_word
                        for j in range(min(per_word, block_voxels - first)):
                            word |= np.uint32(rank[slot_of[first + j]] << (j * bits))
                        out[top + wi] = word
                header = base + 2 * (kx + gx * (ky + gy * kz))
                out[header] = np.uint32(table_at | (bits << 24))
                out[header + 1] = np.uint32(values_at)
                top = end
    return top


def encode(array: np.ndarray, block_size: Sequence[int]) -> bytes:
    """`array` (x, y, z[, 1], uint32 or uint64) in compressed_segmentation encoding: the bytes
    of `cloudvolume.chunks.encode(array, "compressed_segmentation", block_size)`."""
    if array.dtype not in (np.uint32, np.uint64):
        raise ValueError(f"compressed_segmentation encodes uint32 or uint64, not {array.dtype}")
    if array.ndim == 4 and array.shape[3] != 1 or array.ndim not in (3, 4):
        raise ValueError(f"compressed_segmentation encodes x, y, z[, 1] here, not {array.shape}")
    volume = array if array.ndim == 3 else array[..., 0]
    bx, by, bz = (int(b) for b in block_size)
    if bx * by * bz > MAX_BLOCK_VOXELS:
        raise ValueError(f"compressed_segmentation blocks of {bx} x {by} x {bz} voxels: at most "
                         f"{MAX_BLOCK_VOXELS} here (more could need 32-bit indices, on which the "
                         "reference encoder hangs and its decoder misreads)")
    blocks = int(np.prod([-(-int(s) // b) for s, b in zip(volume.shape, (bx, by, bz))]))
    words = volume.dtype.itemsize // 4
    per_block = 2 + bx * by * bz * (1 + words)  # header, 32-bit indices, a table entry each
    out = np.zeros(1 + blocks * per_block, np.uint32)
    out[0] = 1  # the channel's offset
    top = _encode_channel(np.ravel(volume, order="F"), *volume.shape, bx, by, bz, out, 1)
    if top < 0:
        raise ValueError("compressed_segmentation: a table offset exceeds 24 bits; use smaller "
                         "chunks")
    return out[:top].astype("<u4", copy=False).tobytes()
