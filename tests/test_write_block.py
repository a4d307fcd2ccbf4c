"""write_block: the chunk files CloudVolume writes, gzipped at GZIP_LEVEL instead of 9."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
from cloudvolume import CloudVolume
from cloudvolume.exceptions import AlignmentError

from deepem3d.storage.layers import GZIP_LEVEL, create_layer, write_block

LAYERS = [
    ("segmentation", "uint64", 1),  # compressed_segmentation
    ("image", "uint8", 3),  # raw, an affinity map
    ("image", "float32", 1),
]


def _pair(tmp_path, layer_type: str, dtype: str, channels: int):
    kw = dict(layer_type=layer_type, dtype=dtype, resolution=(4, 4, 40), size=(70, 50, 23),
              chunk_size=(32, 32, 8), num_channels=channels, voxel_offset=(5, 6, 7))
    ours = create_layer(f"file://{tmp_path}/ours", **kw)
    theirs = create_layer(f"file://{tmp_path}/theirs", **kw)
    return ours, theirs


@pytest.mark.parametrize(("layer_type", "dtype", "channels"), LAYERS)
def test_blocks_write_the_chunks_cloudvolume_writes(tmp_path, layer_type, dtype, channels):
    ours, theirs = _pair(tmp_path, layer_type, dtype, channels)
    data = np.random.default_rng(0).integers(0, 5, (70, 50, 23, channels)).astype(dtype)
    theirs[:, :, :] = data
    # blocks of whole chunks, the last ones clipped at the layer's end (x 69..75, z 23..30)
    write_block(ours, (5, 6, 7), data[:64, :32, :16])
    write_block(ours, (69, 6, 7), data[64:, :32, :16])
    write_block(ours, (5, 38, 7), data[:, 32:, :])
    write_block(ours, (5, 6, 23), data[:, :32, 16:])
    np.testing.assert_array_equal(np.asarray(CloudVolume(ours.cloudpath)[:, :, :]), data)
    files = sorted(os.listdir(tmp_path / "ours" / "4_4_40"))
    assert files == sorted(os.listdir(tmp_path / "theirs" / "4_4_40"))
    assert len(files) == 3 * 2 * 3 and all(f.endswith(".gz") for f in files)
    # same encoded chunk under the gzip: only the deflate level differs
    for name in files:
        a = (tmp_path / "ours" / "4_4_40" / name).read_bytes()
        b = (tmp_path / "theirs" / "4_4_40" / name).read_bytes()
        assert gzip.decompress(a) == gzip.decompress(b)
        # gzip's XFL byte: 2 for deflate's slowest levels (8, 9), 0 for the middle ones
        assert 2 <= GZIP_LEVEL <= 7
        assert (a[8], b[8]) == (0, 2)


def test_unaligned_blocks_go_through_cloudvolume(tmp_path):
    ours, _ = _pair(tmp_path, "image", "uint8", 1)
    with pytest.raises(AlignmentError):
        write_block(ours, (6, 6, 7), np.zeros((9, 5, 3, 1), np.uint8))


def test_a_local_cache_is_written_by_cloudvolume(tmp_path):
    ours, _ = _pair(tmp_path, "image", "uint8", 1)
    cached = CloudVolume(ours.cloudpath, cache=str(tmp_path / "cache"), progress=False)
    data = np.arange(32 * 32 * 8, dtype=np.uint8).reshape(32, 32, 8, 1)
    write_block(cached, (5, 6, 7), data)
    assert any((tmp_path / "cache").rglob("5-37_6-38_7-15*"))  # CloudVolume kept its copy
    np.testing.assert_array_equal(np.asarray(CloudVolume(ours.cloudpath)[5:37, 6:38, 7:15]), data)


def test_an_empty_box_read_is_the_callers_error_not_a_damaged_chunk(tmp_path):
    """read_block took every ValueError for a chunk its info does not describe: an empty box
    (CloudVolume's SubvoxelVolumeError, a ValueError), a caller's bug, was reported as bad
    input ("has a chunk ... that cannot be decoded: write the layer again")."""
    from cloudvolume.exceptions import SubvoxelVolumeError

    from deepem3d.storage.layers import read_block

    vol = create_layer(f"file://{tmp_path}/layer", layer_type="image", dtype="uint8",
                       resolution=(4, 4, 40), size=(32, 32, 8), chunk_size=(32, 32, 8))
    vol[:, :, :] = np.ones((32, 32, 8, 1), np.uint8)
    with pytest.raises(SubvoxelVolumeError):
        read_block(vol, (10, 0, 0), (10, 32, 8), "fix")
