"""`deepem3d export`: layers back out to .npy, HDF5, TIFF and zarr, as ingest reads them."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import tifffile
from cloudvolume import CloudVolume

from deepem3d.axes import xyz_from_zyx
from deepem3d.export import export
from deepem3d.storage.layers import create_layer
from tests.conftest import assert_one_line_error, cli_here, run_cli

SHAPE = (6, 40, 56)  # z, y, x


@pytest.fixture(scope="module")
def layers(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    ids = rng.integers(0, 2**40, SHAPE, dtype=np.uint64)
    affinities = rng.integers(0, 256, (*SHAPE, 3), dtype=np.uint8)
    paths = {}
    for name, array, kind, channels in (("image", image, "image", 1),
                                        ("ids", ids, "segmentation", 1),
                                        ("map", affinities, "image", 3)):
        path = f"file://{root / name}"
        vol = create_layer(path, layer_type=kind, dtype=array.dtype.name, resolution=(4, 4, 40),
                           size=SHAPE[::-1], voxel_offset=(5, 6, 7), chunk_size=(16, 16, 4),
                           num_channels=channels)
        vol[:, :, :] = xyz_from_zyx(array)
        paths[name] = path
    return {"paths": paths, "image": image, "ids": ids, "map": affinities}


def test_every_kind_round_trips_in_slabs(layers, tmp_path):
    """Arrays come out z,y,x (maps z,y,x,c) whatever the slab size, and ingest reads them."""
    paths = layers["paths"]
    export(paths["image"], str(tmp_path / "image.npy"), slab_bytes=1, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "image.npy"), layers["image"])
    export(paths["ids"], f"{tmp_path / 'ids.h5'}:/labels/ids", progress=False)
    with h5py.File(tmp_path / "ids.h5") as f:
        np.testing.assert_array_equal(f["labels/ids"][:], layers["ids"])
    export(paths["image"], str(tmp_path / "image.tif"), slab_bytes=3000, progress=False)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "image.tif"), layers["image"])
    shape, _, axes = export(paths["map"], str(tmp_path / "map.h5"), progress=False)
    with h5py.File(tmp_path / "map.h5") as f:
        np.testing.assert_array_equal(f["data"][:], layers["map"])
    assert shape == (*SHAPE, 3) and axes == "zyxc"
    box = ((5 + 10, 6 + 3, 7 + 1), (5 + 50, 6 + 30, 7 + 5))
    export(paths["ids"], str(tmp_path / "box.npy"), bounds=box, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "box.npy"), layers["ids"][1:5, 3:30, 10:50])
    back = tmp_path / "back"
    run_cli("ingest", tmp_path / "image.tif", back, "--resolution", "4,4,40", check=True)
    done = run_cli("export", back, tmp_path / "again.npy", "--no-progress", check=True)
    assert "6x40x56 (z,y,x) uint8" in done.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), layers["image"])


def test_zarr_exports_are_ome_zarr_images_that_ingest_reads_back(layers, tmp_path):
    """Written in slabs of whole zarr chunks; the voxel size and the box's position in nm are
    the OME-Zarr scale and translation, so ingest needs no --resolution to read it back."""
    import zarr

    paths = layers["paths"]
    box = ((5 + 10, 6 + 3, 7 + 1), (5 + 50, 6 + 30, 7 + 6))
    shape, dtype, axes = export(paths["ids"], str(tmp_path / "ids.zarr"), bounds=box,
                                slab_bytes=1, progress=False)
    assert (shape, dtype, axes) == ((5, 27, 40), np.uint64, "zyx")
    group = zarr.open_group(str(tmp_path / "ids.zarr"), mode="r")
    assert group["0"].chunks == (1, 16, 16)  # a slab of one section: zarr chunks no deeper
    np.testing.assert_array_equal(group["0"][:], layers["ids"][1:6, 3:30, 10:50])
    (level,) = group.attrs["multiscales"][0]["datasets"]
    assert level["coordinateTransformations"] == [
        {"type": "scale", "scale": [40.0, 4.0, 4.0]},
        {"type": "translation", "translation": [320.0, 36.0, 60.0]}]
    done = run_cli("ingest", tmp_path / "ids.zarr", tmp_path / "back", "--layer-type",
                   "segmentation", "--no-progress", check=True)
    assert "at 4,4,40 nm, as the file records it, first voxel at 15,9,8" in done.stdout
    back = CloudVolume(f"file://{tmp_path / 'back'}")  # at the box's place: where it was
    assert list(back.voxel_offset) == [15, 9, 8]
    np.testing.assert_array_equal(np.asarray(back[15:55, 9:36, 8:13])[..., 0],
                                  np.transpose(layers["ids"][1:6, 3:30, 10:50]))
    shape, _, axes = export(paths["map"], str(tmp_path / "map.zarr"), progress=False)
    assert shape == (3, *SHAPE) and axes == "czyx"
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "map.zarr" / "0"))[:],
                                  np.moveaxis(layers["map"], -1, 0))
    assert_one_line_error(cli_here("export", paths["image"], tmp_path / "map.zarr",
                                   "--no-progress"), "map.zarr exists", "--overwrite")
    done = cli_here("export", paths["image"], tmp_path / "map.zarr", "--overwrite",
                    "--no-progress")
    assert done.returncode == 0 and "6x40x56 (z,y,x) uint8" in done.stdout
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "map.zarr" / "0"))[:],
                                  layers["image"])
    (tmp_path / "file.zarr").write_text("mine")
    for flags in ((), ("--overwrite",)):
        assert_one_line_error(cli_here("export", paths["image"], tmp_path / "file.zarr", *flags,
                                       "--no-progress"), "is a file", "zarr export is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "file.zarr", "ids.zarr",
                                                          "map.zarr"]


def test_bad_input_is_one_line_and_writes_nothing(layers, tmp_path):
    paths = layers["paths"]
    (tmp_path / "there.npy").write_bytes(b"mine")
    (tmp_path / "folder.npy").mkdir()
    for args, fragments in (
        ((paths["image"], tmp_path / "there.npy"), ["there.npy exists", "--overwrite"]),
        ((paths["map"], tmp_path / "map.tif"), ["3 channels", "TIFF export holds one",
                                                      "or zarr (c, z, y, x)"]),
        ((paths["image"], tmp_path / "image.png"), ["cannot tell what to write"]),
        ((paths["image"], tmp_path / "a.npy", "--bounds", "0,0,0,10,10,2"), ["reach outside"]),
        ((paths["image"], tmp_path / "no" / "a.npy"), ["no such folder"]),
        ((paths["image"], "s3://bucket/a.npy"), ["s3://bucket/a.npy", "a local file"]),
        ((paths["image"], f"{tmp_path / 'a.h5'}:/"), ["name the HDF5 dataset"]),
        ((paths["image"], tmp_path / "folder.npy", "--overwrite"), ["is a folder"]),
    ):
        assert_one_line_error(cli_here("export", *args, "--no-progress"), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.npy", "there.npy"]
    assert (tmp_path / "there.npy").read_bytes() == b"mine"
    missing = tmp_path / "missing"
    shutil.copytree(paths["image"].removeprefix("file://"), missing)
    next((missing / "4_4_40").iterdir()).unlink()
    assert_one_line_error(run_cli("export", missing, tmp_path / "m.npy", "--no-progress"),
                          "has missing chunks")
    assert not (tmp_path / "m.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.npy", "missing", "there.npy"]
    run_cli("export", missing, tmp_path / "m.npy", "--no-progress", "--fill-missing", check=True)
    filled = np.load(tmp_path / "m.npy")
    differ = filled != layers["image"]
    assert differ.any() and not filled[differ].any()  # the missing chunk, read as zeros
    (tmp_path / "m.npy").unlink()
    run_cli("export", paths["image"], tmp_path / "there.npy", "--overwrite", "--no-progress",
            check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "there.npy"), layers["image"])
    # a zarr folder that holds the layer itself is not replaced (that would delete the layer)
    holder = tmp_path / "w.zarr"
    shutil.copytree(paths["image"].removeprefix("file://"), holder / "img")
    assert_one_line_error(run_cli("export", holder / "img", holder, "--overwrite",
                                  "--no-progress"), "overlaps the exported layer")
    assert (holder / "img" / "info").exists()
    long = tmp_path / ("a" * 251 + ".npy")  # as long as a file name may be
    run_cli("export", paths["image"], long, "--no-progress", check=True)
    np.testing.assert_array_equal(np.load(long), layers["image"])


@pytest.mark.parametrize("damage, fragments", [
    ("not gzip", ["has a chunk in", "cannot be decoded", "DecompressionError"]),
    ("another size", ["has a chunk in", "cannot be decoded", "cannot reshape"]),
    ("a folder", ["has a chunk in", "cannot be decoded", "Is a directory"]),
    ("sharding without its bits", ["scales[0].sharding", "not a sharding specification"]),
])
def test_a_damaged_chunk_or_sharding_spec_is_one_line_and_writes_nothing(
        layers, tmp_path, damage, fragments):
    """A chunk file that does not decode as the info says (not gzip, another dtype's size, a
    folder), or a sharding specification without its keys, failed CloudVolume's read with a
    traceback (DecompressionError, ValueError, IsADirectoryError, TypeError)."""
    import gzip
    import json

    layer = tmp_path / "layer"
    shutil.copytree(layers["paths"]["image"].removeprefix("file://"), layer)
    chunk = sorted((layer / "4_4_40").iterdir())[0]
    if damage == "not gzip":
        chunk.write_bytes(b"garbage")
    elif damage == "another size":
        chunk.write_bytes(gzip.compress(bytes(7)))
    elif damage == "a folder":
        chunk.unlink()
        chunk.mkdir()
    else:
        info = json.loads((layer / "info").read_text())
        info["scales"][0]["sharding"] = {"@type": "neuroglancer_uint64_sharded_v1"}
        (layer / "info").write_text(json.dumps(info))
    before = {p: p.read_bytes() for p in layer.rglob("*") if p.is_file()}
    result = cli_here("export", layer, tmp_path / "out.npy", "--no-progress")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out.npy").exists()
    assert {p: p.read_bytes() for p in layer.rglob("*") if p.is_file()} == before


def test_an_export_larger_than_the_free_disk_is_refused_first(tmp_path, monkeypatch):
    """A 40 TB region made numpy's memmap raise OSError (a traceback) after the command had
    read the layer; the size is now checked against the folder's free space first."""
    from collections import namedtuple

    from deepem3d import export as export_module
    from deepem3d.errors import InputError
    from tests.conftest import make_layer

    layer = make_layer(tmp_path / "layer")  # 256 x 256 x 20 uint8: 1.25 MiB
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(export_module.shutil, "disk_usage", lambda path: usage(0, 0, 2**20))
    with pytest.raises(InputError, match="would take 1.25 MiB .* 1 MiB free"):
        export_module.export(layer, str(tmp_path / "out.npy"), progress=False)
    assert not list(tmp_path.glob("*out.npy*"))


@pytest.mark.parametrize("kind", ["npy", "h5"])
def test_a_disk_that_fills_during_an_export_is_one_line_error_and_leaves_nothing(
        tmp_path, monkeypatch, kind):
    """A write that meets a full disk mid-way is `cannot write OUT: WHY (N free in FOLDER)`,
    the words a training checkpoint uses, and no partial file stays; an OSError that is not a
    write's (a read's) passes unchanged."""
    import errno

    from deepem3d import export as export_module
    from deepem3d.errors import InputError
    from tests.conftest import make_layer

    layer = make_layer(tmp_path / "layer")
    out = tmp_path / f"out.{kind}"
    for failure, expected in ((OSError(errno.ENOSPC, "No space left on device"), InputError),
                              (OSError(errno.ECONNRESET, "Connection reset"), OSError)):
        def fail(*args, failure=failure, **kwargs):
            raise failure

        monkeypatch.setattr(export_module, "zyx_from_xyz", fail)
        with pytest.raises(expected) as caught:
            export_module.export(layer, str(out), progress=False)
        if expected is InputError:
            assert str(caught.value).startswith(
                f"cannot write {out}: No space left on device (")
            assert f"free in {tmp_path})" in str(caught.value)
        else:
            assert caught.value is failure
        assert sorted(p.name for p in tmp_path.iterdir()) == ["layer"]


def test_hdf5_exports_record_the_voxel_size_and_place_that_ingest_takes_back(tmp_path):
    """CREMI's `resolution` and `offset` attributes (z, y, x, nm), at the box's place and at
    --mip: ingest needs no --resolution and puts the layer where it was (it refused the file
    for want of a voxel size). --overwrite replaces the whole file, other datasets too."""
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 2**40, (5, 40, 60), dtype=np.uint64)  # z, y, x
    path = f"file://{tmp_path / 'ids'}"
    vol = create_layer(path, layer_type="segmentation", dtype="uint64", resolution=(4, 6, 40),
                       size=ids.shape[::-1], voxel_offset=(10, 20, 30), chunk_size=(16, 16, 1))
    vol[:, :, :] = xyz_from_zyx(ids)
    vol.add_scale((2, 2, 1), chunk_size=(16, 16, 1))
    vol.commit_info()
    half = ids[:, ::2, ::2]
    CloudVolume(path, mip=1, progress=False)[5:35, 10:30, 30:35] = xyz_from_zyx(half)
    for mip, box, expected in ((0, ((15, 25, 31), (45, 55, 34)), ids[1:4, 5:35, 5:35]),
                               (1, ((6, 12, 32), (30, 29, 35)), half[2:5, 2:19, 1:25])):
        out = tmp_path / f"mip{mip}.h5"
        export(path, str(out), bounds=box, mip=mip, progress=False)
        res = [4.0 * 2**mip, 6.0 * 2**mip, 40.0]
        with h5py.File(out) as f:
            assert f["data"].attrs["resolution"].tolist() == res[::-1]
            assert f["data"].attrs["offset"].tolist() == [
                b * r for b, r in zip(box[0][::-1], res[::-1])]
        back = tmp_path / f"back{mip}"
        run_cli("ingest", out, back, "--layer-type", "segmentation", "--no-progress",
                check=True)
        layer = CloudVolume(f"file://{back}")
        assert layer.resolution.tolist() == res and layer.voxel_offset.tolist() == list(box[0])
        assert layer.volume_size.tolist() == [b - a for a, b in zip(*box)]
        np.testing.assert_array_equal(np.asarray(layer[:, :, :])[..., 0],
                                      xyz_from_zyx(expected))
    with h5py.File(tmp_path / "mip0.h5", "a") as f:
        f["mine"] = np.zeros(3)
    export(path, f"{tmp_path / 'mip0.h5'}:/again", overwrite=True, progress=False)
    with h5py.File(tmp_path / "mip0.h5") as f:
        assert list(f) == ["again"]  # the file is written whole
