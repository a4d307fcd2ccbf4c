"""`deepem3d sample` writes layers equal to the embedded arrays (and to the shared source)."""

from __future__ import annotations

import h5py
import numpy as np
from cloudvolume import CloudVolume

from deepem3d.axes import zyx_from_xyz
from deepem3d.sample import RESOLUTION, load_sample
from tests.conftest import assert_one_line_error, run_cli


def test_sample_layers_equal_embedded_arrays(tmp_path):
    run_cli("sample", tmp_path, check=True)
    image, ids = load_sample()
    assert image.shape == ids.shape == (30, 512, 512)
    img = CloudVolume(f"file://{tmp_path}/image")
    gt = CloudVolume(f"file://{tmp_path}/ground_truth")
    assert img.layer_type == "image" and img.dtype == np.uint8
    assert gt.layer_type == "segmentation" and gt.dtype == np.uint64
    assert gt.info["scales"][0]["encoding"] == "compressed_segmentation"
    assert "mesh" not in gt.info and "skeletons" not in gt.info  # none written
    assert tuple(img.resolution) == RESOLUTION
    assert tuple(img.volume_size) == (512, 512, 30)
    np.testing.assert_array_equal(zyx_from_xyz(img[:, :, :][..., 0]), image)
    np.testing.assert_array_equal(zyx_from_xyz(gt[:, :, :][..., 0]), ids.astype(np.uint64))
    assert img.provenance.processing[-1]["method"]["task"] == "sample"


def test_sample_is_the_shared_isbi_volume(shared_data):
    image, ids = load_sample()
    with h5py.File(shared_data / "isbi2012" / "isbi2012_neuron3d.h5", "r") as f:
        np.testing.assert_array_equal(image, f["raw"][:])
        np.testing.assert_array_equal(ids, f["labels/neuron_ids"][:])


def test_sample_refuses_to_overwrite(tmp_path):
    run_cli("sample", tmp_path, check=True)
    assert_one_line_error(run_cli("sample", tmp_path), "already holds data", "--overwrite")
    stale = tmp_path / "image" / "4_4_50" / "0-1_0-1_0-1.gz"  # a chunk the new layer lacks
    stale.write_bytes(b"old")
    marker = tmp_path / "image" / "tasks" / "old-stage" / "done" / "x.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    run_cli("sample", tmp_path, "--overwrite", check=True)
    assert not stale.exists(), "overwrite removes the old layer's chunks"
    assert not marker.exists(), "and its completion markers"
