"""deepem3d ingest: TIFF / TIFF directory / HDF5 / .npy into real file:// layers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import h5py
import numpy as np
import pytest
import tifffile

from deepem3d import ingest as ingest_module
from deepem3d.errors import InputError
from deepem3d.ingest import ingest, slab_ranges
from deepem3d.sources import natural_key, open_source, split_hdf5
from deepem3d.storage.layers import open_layer
from tests.conftest import assert_one_line_error, run_cli

SHAPE_ZYX = (7, 33, 50)  # non-cubic: any transposition shows


def volume(shape=SHAPE_ZYX, dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is None:
        return rng.random(shape, dtype=np.float32)
    return rng.integers(0, min(info.max, 2**20), size=shape, dtype=dtype, endpoint=True)


def xyz(zyx: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(zyx.transpose(2, 1, 0))


def fingerprint(path) -> list:
    """Bytes and mtime of a file, or of every file under a directory (at any depth)."""
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(top, n) for top, _, names in os.walk(path) for n in names
    )
    return [
        (p, hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
        for p in paths
    ]


def read_back(path) -> np.ndarray:
    vol = open_layer(str(path))
    return vol[:, :, :][..., 0]


def write_npy(tmp_path, data, name="vol.npy"):
    path = tmp_path / name
    np.save(path, data)
    return str(path)


def write_h5(tmp_path, data, dataset="/volumes/raw", name="vol.h5"):
    path = tmp_path / name
    with h5py.File(path, "w") as f:
        f.create_dataset(dataset, data=data, chunks=True, compression="gzip")
    return str(path)


def write_tiff_dir(tmp_path, data, name="slices"):
    folder = tmp_path / name
    folder.mkdir()
    for z, plane in enumerate(data):  # unpadded numbers: natural order != plain sort
        tifffile.imwrite(folder / f"slice_{z}.tif", plane)
    return str(folder)


def cli(*args) -> subprocess.CompletedProcess:
    return run_cli("ingest", *args)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "zlib"])  # memmap path, page-reading path
def test_multipage_tiff_round_trip(tmp_path, compression):
    data = volume()
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, data, compression=compression)
    before = fingerprint(src)
    vol = ingest(str(src), str(tmp_path / "layer"), resolution=(4, 4, 40),
                 chunk_size=(32, 32, 2), progress=False)
    assert tuple(vol.volume_size) == (50, 33, 7)
    got = read_back(tmp_path / "layer")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, xyz(data))
    assert fingerprint(src) == before


def test_tiff_without_metadata_read_page_by_page(tmp_path):
    data = volume(dtype=np.uint16)
    src = tmp_path / "pages.tiff"
    with tifffile.TiffWriter(src) as tif:
        for plane in data:
            tif.write(plane, metadata=None, compression="zlib")
    ingest(str(src), str(tmp_path / "layer"), resolution=(4, 4, 40), chunk_size=(64, 64, 3),
           progress=False)
    got = read_back(tmp_path / "layer")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, xyz(data))


def test_tiff_directory_round_trip_natural_order(tmp_path):
    data = volume(shape=(11, 33, 50), dtype=np.uint16)
    src = write_tiff_dir(tmp_path, data)
    (tmp_path / "slices" / "notes.txt").write_text("not an image")
    before = fingerprint(src)
    ingest(src, str(tmp_path / "layer"), resolution=(4, 4, 40), chunk_size=(64, 64, 4),
           progress=False)
    np.testing.assert_array_equal(read_back(tmp_path / "layer"), xyz(data))
    assert fingerprint(src) == before


def test_hdf5_round_trip(tmp_path):
    data = volume()
    src = write_h5(tmp_path, data)
    before = fingerprint(src)
    ingest(f"{src}:/volumes/raw", str(tmp_path / "layer"), resolution=(4, 4, 40),
           progress=False)
    np.testing.assert_array_equal(read_back(tmp_path / "layer"), xyz(data))
    assert fingerprint(src) == before


def test_npy_round_trip_float32(tmp_path):
    data = volume(dtype=np.float32)
    src = write_npy(tmp_path, data)
    before = fingerprint(src)
    ingest(src, str(tmp_path / "layer"), resolution=(4, 4, 40), progress=False)
    got = read_back(tmp_path / "layer")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, xyz(data))
    assert fingerprint(src) == before


def test_big_endian_npy(tmp_path):
    data = volume(dtype=np.uint16)
    src = write_npy(tmp_path, data.astype(">u2"))
    ingest(src, str(tmp_path / "layer"), resolution=(4, 4, 40), progress=False)
    got = read_back(tmp_path / "layer")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, xyz(data))


@pytest.mark.parametrize("kind", ["npy", "hdf5"])
def test_axes_xyz(tmp_path, kind):
    data_xyz = xyz(volume())  # stored already x,y,z: 50, 33, 7
    src = write_npy(tmp_path, data_xyz) if kind == "npy" else (
        write_h5(tmp_path, data_xyz) + ":/volumes/raw"
    )
    vol = ingest(src, str(tmp_path / "layer"), resolution=(4, 4, 40), axes="xyz",
                 chunk_size=(16, 16, 2), progress=False)
    assert tuple(vol.volume_size) == (50, 33, 7)
    np.testing.assert_array_equal(read_back(tmp_path / "layer"), data_xyz)


def test_segmentation_round_trip(tmp_path):
    labels = volume(dtype=np.int32, seed=3) % 40  # signed but non-negative
    src = write_h5(tmp_path, labels, dataset="labels")
    vol = ingest(f"{src}:labels", str(tmp_path / "seg"), resolution=(4, 4, 40),
                 layer_type="segmentation", chunk_size=(32, 32, 4), progress=False)
    assert vol.layer_type == "segmentation"
    assert vol.encoding == "compressed_segmentation"
    assert "mesh" not in vol.info  # named once meshes are written
    got = read_back(tmp_path / "seg")
    assert got.dtype == np.uint64
    np.testing.assert_array_equal(got, xyz(labels).astype(np.uint64))
    processing = vol.provenance.processing[-1]["method"]
    assert processing["axes"] == "zyx"
    assert processing["shape"] == list(SHAPE_ZYX)
    assert processing["dtype"] == "int32"
    assert processing["source"].endswith("vol.h5:/labels")


def test_segmentation_refuses_negative_labels_and_writes_nothing(tmp_path):
    labels = volume(dtype=np.int16) % 5
    labels[6, 0, 0] = -1  # in the last slab
    src = write_npy(tmp_path, labels)
    with pytest.raises(InputError, match="negative labels"):
        ingest(src, str(tmp_path / "seg"), resolution=(4, 4, 40), layer_type="segmentation",
               chunk_size=(64, 64, 2), progress=False)
    assert not (tmp_path / "seg").exists()


def test_segmentation_uint32_must_fit(tmp_path):
    labels = np.zeros(SHAPE_ZYX, dtype=np.uint64)
    labels[1, 2, 3] = 2**40
    src = write_npy(tmp_path, labels)
    with pytest.raises(InputError, match="store it as uint64"):
        ingest(src, str(tmp_path / "seg"), resolution=(4, 4, 40), layer_type="segmentation",
               dtype="uint32", progress=False)
    labels[1, 2, 3] = 7
    src = write_npy(tmp_path, labels, name="ok.npy")
    vol = ingest(src, str(tmp_path / "seg"), resolution=(4, 4, 40),
                 layer_type="segmentation", dtype="uint32", progress=False)
    assert vol.dtype == np.uint32
    np.testing.assert_array_equal(read_back(tmp_path / "seg"), xyz(labels))


def test_streams_aligned_slabs(tmp_path, monkeypatch):
    data = volume(shape=(11, 33, 50))
    src = write_npy(tmp_path, data)
    calls = []
    real_read = ingest_module.VolumeSource.read

    def spy(self, z0, z1):
        calls.append((z0, z1))
        return real_read(self, z0, z1)

    monkeypatch.setattr(ingest_module.VolumeSource, "read", spy)
    vol = ingest(src, str(tmp_path / "layer"), resolution=(4, 4, 40), chunk_size=(64, 64, 4),
                 voxel_offset=(10, 0, 3), slab_bytes=1, progress=False)
    assert calls == [(0, 4), (4, 8), (8, 11)]  # one chunk row each, the last one short
    assert list(vol.bounds.minpt) == [10, 0, 3] and list(vol.bounds.maxpt) == [60, 33, 14]
    np.testing.assert_array_equal(read_back(tmp_path / "layer"), xyz(data))


def test_slab_ranges():
    assert slab_ranges(11, 4) == [(0, 4), (4, 8), (8, 11)]
    assert slab_ranges(11, 4, 2) == [(0, 8), (8, 11)]
    assert slab_ranges(8, 4, 0) == [(0, 4), (4, 8)]
    assert slab_ranges(3, 16, 5) == [(0, 3)]


def test_default_chunk_clamped_and_encodings(tmp_path):
    src = write_npy(tmp_path, volume())
    vol = ingest(src, str(tmp_path / "layer"), resolution=(4, 4, 40), progress=False)
    assert list(vol.chunk_size) == [32, 32, 7]  # halved to the floor, then clamped
    assert vol.encoding == "raw"
    with pytest.raises(InputError, match="jpeg encoding cannot hold a uint16"):
        ingest(write_npy(tmp_path, volume(dtype=np.uint16), "u16.npy"),
               str(tmp_path / "j"), resolution=(4, 4, 40), encoding="jpeg", progress=False)


def test_default_chunk_leaves_room_for_a_mip_level():
    from deepem3d.ingest import default_chunk_size

    assert default_chunk_size("image", (4096, 4096, 100)) == (128, 128, 16)
    assert default_chunk_size("image", (256, 255, 100)) == (128, 64, 16)
    assert default_chunk_size("segmentation", (200, 90, 5)) == (64, 32, 5)
    assert default_chunk_size("image", (20, 40, 5)) == (20, 32, 5)


def test_hdf5_of_one_dataset_needs_no_name(tmp_path):
    data = volume()
    src = write_h5(tmp_path, data)
    with open_source(src) as source:
        assert source.name.endswith("vol.h5:/volumes/raw")
        np.testing.assert_array_equal(source.read(0, data.shape[0]), xyz(data))


def test_natural_key_and_split_hdf5():
    names = ["z10.tif", "z2.tif", "z1.tif", "Z3.tif"]
    assert sorted(names, key=natural_key) == ["z1.tif", "z2.tif", "Z3.tif", "z10.tif"]
    assert split_hdf5("a/b.h5:/raw/x") == ("a/b.h5", "/raw/x")
    assert split_hdf5("b.HDF5:raw") == ("b.HDF5", "/raw")
    assert split_hdf5("b.h5") == ("b.h5", None)
    assert split_hdf5("b.npy") is None


def not_a_volume(tmp_path, kind: str) -> str:
    if kind == "2d":
        return write_npy(tmp_path, np.zeros((33, 50), np.uint8))
    if kind == "4d":
        return write_npy(tmp_path, np.zeros((2, 3, 4, 1), np.uint8))
    if kind == "empty":
        return write_npy(tmp_path, np.zeros((0, 3, 4), np.uint8))
    if kind == "unknown":
        (tmp_path / "x.zarr").write_text("")
        return str(tmp_path / "x.zarr")
    if kind == "one-page":
        tifffile.imwrite(tmp_path / "one.tif", np.zeros((5, 6), np.uint8))
        return str(tmp_path / "one.tif")
    if kind == "three-sections":  # as tifffile's default stores it: one page of 3 samples
        tifffile.imwrite(tmp_path / "three.tif", np.zeros((3, 40, 50), np.uint16),
                         photometric="rgb", planarconfig="separate")
        return str(tmp_path / "three.tif")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((3, 5, 6, 3), np.uint8))
    return str(tmp_path / "rgb.tif")


@pytest.mark.parametrize(
    "kind, match",
    [
        ("2d", "2D"),
        ("4d", "4D"),
        ("empty", "empty"),
        ("unknown", "cannot tell"),
        ("one-page", "single 2D image"),
        ("rgb", "channels"),
        ("three-sections", "photometric='minisblack'"),
    ],
)
def test_sources_that_are_not_3d_volumes(tmp_path, kind, match):
    with pytest.raises(InputError, match=match):
        open_source(not_a_volume(tmp_path, kind))


def test_tiff_refuses_axes_xyz(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", volume())
    with pytest.raises(InputError, match="always z,y,x"):
        open_source(str(tmp_path / "stack.tif"), axes="xyz")


def test_tiff_directory_with_mismatched_slices(tmp_path):
    src = write_tiff_dir(tmp_path, volume(shape=(3, 8, 9)))
    tifffile.imwrite(tmp_path / "slices" / "slice_3.tif", np.zeros((8, 10), np.uint8))
    with pytest.raises(InputError, match="same size and dtype"):
        open_source(src)


def test_a_multipage_tiff_of_pages_of_two_data_types_says_so(tmp_path):
    """Pages of one shape and two data types were refused as series 'of different shapes
    (10x12, 10x12)'."""
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tif:
        tif.write(np.zeros((10, 12), np.uint8), contiguous=False)
        tif.write(np.zeros((10, 12), np.uint16), contiguous=False)
    with pytest.raises(InputError, match=r"2 image series of different shapes or data types "
                       r"\(10x12 uint8, 10x12 uint16\)"):
        open_source(str(tmp_path / "mixed.tif"))


def test_image_dtype_refused(tmp_path):
    src = write_npy(tmp_path, np.zeros(SHAPE_ZYX, np.int16))
    with pytest.raises(InputError, match="int16: convert it first or store it as uint8 "
                       "with --to-uint8.*segmentation"):
        ingest(src, str(tmp_path / "layer"), resolution=(4, 4, 40), progress=False)
    src = write_npy(tmp_path, np.zeros(SHAPE_ZYX, np.float32), "f.npy")
    with pytest.raises(InputError, match="integer labels"):
        ingest(src, str(tmp_path / "seg"), resolution=(4, 4, 40), layer_type="segmentation",
               progress=False)


# --- the command -----------------------------------------------------------------------------


def test_cli_ingest_and_overwrite(tmp_path):
    data = volume()
    src = write_npy(tmp_path, data)
    dest = tmp_path / "layer"
    result = cli(src, dest, "--resolution", "4,4,40", "--chunk-size", "32,32,4",
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()
    assert len(summary) == 1
    assert f"file://{dest}" in summary[0] and "50,33,7" in summary[0]
    assert "uint8" in summary[0] and "32,32,4" in summary[0]
    np.testing.assert_array_equal(read_back(dest), xyz(data))

    data2 = volume(seed=9)
    src2 = write_npy(tmp_path, data2, "other.npy")
    result = cli(src2, dest, "--resolution", "4,4,40", "--no-progress")
    assert_one_line_error(result, "already holds data", "--overwrite")
    np.testing.assert_array_equal(read_back(dest), xyz(data))  # untouched

    result = cli(src2, dest, "--resolution", "4,4,40", "--overwrite", "--no-progress")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(read_back(dest), xyz(data2))


def test_cli_segmentation(tmp_path):
    labels = volume(dtype=np.uint32, seed=2) % 9
    src = write_npy(tmp_path, xyz(labels))
    result = cli(src, tmp_path / "seg", "--resolution", "8,8,40", "--layer-type",
                 "segmentation", "--axes", "xyz", "--voxel-offset", "0,0,5", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "segmentation" in result.stdout and "uint64" in result.stdout
    vol = open_layer(str(tmp_path / "seg"))
    assert vol.encoding == "compressed_segmentation" and list(vol.voxel_offset) == [0, 0, 5]
    np.testing.assert_array_equal(vol[:, :, :][..., 0], xyz(labels))


def test_cli_errors_are_one_line(tmp_path):
    npy = write_npy(tmp_path, volume())
    h5 = write_h5(tmp_path, volume())
    dest = tmp_path / "layer"
    assert_one_line_error(cli(tmp_path / "missing.npy", dest, "--resolution", "4,4,40"),
                          "missing.npy")
    assert_one_line_error(cli(f"{h5}:/volumes/nope", dest, "--resolution", "4,4,40"),
                          "no dataset /volumes/nope", "/volumes/raw")
    with h5py.File(h5, "a") as f:
        f["/volumes/labels"] = volume()
    assert_one_line_error(cli(h5, dest, "--resolution", "4,4,40"), ":/DATASET",
                          "/volumes/raw", "/volumes/labels")
    assert not dest.exists()
    assert_one_line_error(cli(npy, dest, "--resolution", "4,4"), "--resolution")
    assert_one_line_error(cli(npy, dest, "--resolution", "4,4,40", "--voxel-offset", "a,0,0"),
                          "--voxel-offset")
    assert_one_line_error(cli(npy, dest, "--resolution", "4,4,40", "--axes", "yxz"), "axes")
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, volume())
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(stack.read_bytes()[: stack.stat().st_size // 2])
    assert_one_line_error(cli(truncated, dest, "--resolution", "4,4,40"), "is truncated")
    assert not dest.exists()


def test_a_damaged_file_in_a_tiff_directory_is_one_line_and_leaves_no_layer(tmp_path):
    """A truncated section read while writing raised tifffile's ValueError (exit 1) and left
    the layer's info without its chunks, which later commands read as missing chunks."""
    folder = tmp_path / "stack"
    folder.mkdir()
    for z, section in enumerate(volume()):
        tifffile.imwrite(folder / f"{z:02d}.tif", section)
    damaged = sorted(folder.iterdir())[3]
    damaged.write_bytes(damaged.read_bytes()[:200])
    dest = tmp_path / "layer"
    assert_one_line_error(cli(folder, dest, "--resolution", "4,4,40", "--no-progress"),
                          "cannot read", damaged.name)
    assert not dest.exists()
    assert_one_line_error(cli(write_npy(tmp_path, volume()), dest, "--resolution", "4,4,40",
                              "--voxel-offset", f"{2**31 - 10},0,0"), "at most 2,147,483,647")
    assert not dest.exists()


def test_to_uint8_rescales_16_bit_and_float_images(tmp_path):
    """16-bit and float EM had no way in: infer reads uint8 and ingest kept the source's
    dtype. --to-uint8 maps the 0.1 and 99.9 percentiles onto 0 and 255 (clipped, rounded)."""
    from cloudfiles import CloudFiles

    from deepem3d.axes import xyz_from_zyx
    from deepem3d.ingest import to_uint8

    wide = volume(dtype=np.uint16, seed=3) + 1000
    dest = tmp_path / "wide"
    done = cli(write_npy(tmp_path, wide, "wide.npy"), dest, "--resolution", "4,4,40",
               "--to-uint8", "--no-progress")
    assert done.returncode == 0, done.stderr
    low, high = np.percentile(wide.astype(np.float64), (0.1, 99.9))
    stored = np.asarray(open_layer(f"file://{dest}")[:])[..., 0]
    assert stored.dtype == np.uint8
    np.testing.assert_array_equal(stored, to_uint8(xyz_from_zyx(wide), (low, high)))
    assert stored.min() == 0 and stored.max() == 255 and len(np.unique(stored)) > 200
    method = CloudFiles(f"file://{dest}").get_json("provenance")["processing"][-1]["method"]
    assert method["uint8_window"] == [low, high]
    assert f"(the source's {low:g}..{high:g} mapped onto 0..255)" in done.stdout  # said

    constant = np.full((4, 40, 50), 1234, np.uint16)  # no contrast: all 0, and said so
    done = cli(write_npy(tmp_path, constant, "constant.npy"), tmp_path / "constant",
               "--resolution", "4,4,40", "--to-uint8", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "holds one value, 1234, everywhere: it is written as 0" in done.stderr
    assert not np.asarray(open_layer(f"file://{tmp_path / 'constant'}")[:]).any()

    floats = volume(dtype=np.float32, seed=4)
    floats[0, 0, :3] = (np.nan, -np.inf, np.inf)
    dest = tmp_path / "floats"
    done = cli(write_npy(tmp_path, floats, "floats.npy"), dest, "--resolution", "4,4,40",
               "--to-uint8", "--no-progress")
    assert done.returncode == 0, done.stderr
    stored = np.asarray(open_layer(f"file://{dest}")[:])[..., 0]
    assert tuple(stored[:3, 0, 0]) == (0, 0, 255)  # nan -> 0, infinities clipped

    assert_one_line_error(cli(write_npy(tmp_path, wide, "ids.npy"), tmp_path / "ids",
                              "--resolution", "4,4,40", "--to-uint8", "--layer-type",
                              "segmentation"), "--to-uint8 rescales an image")


def test_the_uint8_window_does_not_depend_on_the_chunks(tmp_path):
    """The window was sampled every n-th voxel of each slab in x,y,z order: which voxels (and
    so the window) depended on where slabs were cut, and with n dividing the slab depth only
    every n-th section was seen."""
    from cloudfiles import CloudFiles

    from deepem3d import ingest as ingest_module

    sections = np.broadcast_to((np.arange(16, dtype=np.uint16) * 1000)[:, None, None],
                               (16, 64, 64)).copy()
    npy = write_npy(tmp_path, sections, "sections.npy")
    windows = []
    for chunk in ("32,32,1", "32,32,3", "64,64,16"):
        dest = tmp_path / f"layer-{chunk.replace(',', '-')}"
        ingest_module.WINDOW_SAMPLE, saved = 4096, ingest_module.WINDOW_SAMPLE  # a sparse grid
        try:
            ingest(npy, str(dest), resolution=(4, 4, 40), chunk_size=[int(c) for c in
                   chunk.split(",")], to_uint8=True, progress=False, slab_bytes=64 * 64 * 2)
        finally:
            ingest_module.WINDOW_SAMPLE = saved
        provenance = CloudFiles(f"file://{dest}").get_json("provenance")
        windows.append(provenance["processing"][-1]["method"]["uint8_window"])
    assert windows[0] == windows[1] == windows[2]
    assert windows[0][1] > 14000  # the last sections were seen


@pytest.mark.parametrize("bad", [
    ("--resolution", "1e19,4,40"),  # OverflowError from CloudVolume
    ("--resolution", "1e-10,4,40"),  # stored as resolution 0
    ("--resolution", "4,4,40", "--chunk-size", "2147483647,64,4"),  # int32 past the grid
])
def test_overwrite_with_a_layer_that_cannot_be_made_keeps_the_old_one(tmp_path, bad):
    """The old layer's chunks were deleted, then making the new one raised (exit 1): the
    new info is checked whole first."""
    source = tmp_path / "in.npy"
    np.save(source, np.zeros((4, 64, 64), np.uint8))
    run_cli("sample", tmp_path / "old", check=True)
    layer = tmp_path / "old" / "image"
    before = sorted(p.name for p in layer.rglob("*"))
    info = (layer / "info").read_bytes()
    assert_one_line_error(cli(source, layer, *bad, "--overwrite", "--no-progress"),
                          "cannot create a layer")
    assert sorted(p.name for p in layer.rglob("*")) == before
    assert (layer / "info").read_bytes() == info


def test_a_layer_inside_another_layer_is_refused(tmp_path):
    source = tmp_path / "in.npy"
    np.save(source, np.zeros((4, 64, 64), np.uint8))
    run_cli("sample", tmp_path / "s", check=True)
    assert_one_line_error(cli(source, tmp_path / "s" / "image" / "sub", "--resolution",
                              "4,4,40"), "lies inside the layer")
    assert not (tmp_path / "s" / "image" / "sub").exists()
    (tmp_path / "notes").mkdir()  # a folder whose `info` is no layer's
    (tmp_path / "notes" / "info").write_text("read me first")
    run_cli("ingest", source, tmp_path / "notes" / "layer", "--resolution", "4,4,40",
            "--no-progress", check=True)


def test_a_destination_that_cannot_be_written_is_one_line(tmp_path):
    source = tmp_path / "in.npy"
    np.save(source, np.zeros((4, 64, 64), np.uint8))
    # /proc takes no new folders, whoever asks (FileNotFoundError from os.makedirs)
    assert_one_line_error(cli(source, "/proc/deepem3d-test", "--resolution", "4,4,40"),
                          "cannot write the layer")
    assert_one_line_error(cli(source, "file://", "--resolution", "4,4,40"), "names no folder")


# --- zarr, OME-Zarr, MRC, recorded voxel sizes ---------------------------------------------------


def write_ome_zarr(tmp_path, data, axes, scale, unit="micrometer", name="img.ome.zarr"):
    """An OME-Zarr 0.4 image of one level, written with zarr's own API."""
    import zarr

    group = zarr.open_group(str(tmp_path / name), mode="w", zarr_format=2)
    group.create_array("0", data=data, chunks=data.shape)
    group.create_array("1", data=data[..., ::2, ::2], chunks=data[..., ::2, ::2].shape)
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": a, "type": "space" if a in "zyx" else "other",
                  **({"unit": unit} if a in "zyx" and unit else {})} for a in axes],
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]},
            {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": scale}]},
        ],
    }]
    return str(tmp_path / name)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_array_round_trip(tmp_path, zarr_format):
    import zarr

    data = volume(dtype=np.uint16)
    path = str(tmp_path / "vol.zarr")
    zarr.create_array(path, data=data, chunks=(3, 16, 16), zarr_format=zarr_format)
    ingest(path, str(tmp_path / "layer"), resolution=(4, 4, 40), progress=False)
    np.testing.assert_array_equal(read_back(tmp_path / "layer"), xyz(data))
    with open_source(path, axes="xyz") as source:  # an array without metadata takes --axes
        assert source.shape == SHAPE_ZYX and source.kind == "zarr"
    from deepem3d.models.data import read_sections  # training reads it as a file source

    np.testing.assert_array_equal(read_sections(path, (2, 5), "--image"), data[2:5])


def test_ome_zarr_reads_its_full_level_axes_and_voxel_size(tmp_path):
    data = volume()
    five = data[None, None]  # t, c, z, y, x
    src = write_ome_zarr(tmp_path, five, "tczyx", [1, 1, 0.04, 0.008, 0.008])
    before = fingerprint(src)
    vol = ingest(src, str(tmp_path / "layer"), progress=False)  # no resolution: the file's
    assert list(vol.resolution) == pytest.approx([8, 8, 40])
    np.testing.assert_array_equal(read_back(tmp_path / "layer"), xyz(data))
    assert fingerprint(src) == before
    # x,y,z order is read from the axes; --axes that disagrees is refused
    src = write_ome_zarr(tmp_path, xyz(data), "xyz", [4, 4, 30], unit="nanometer", name="x.zarr")
    with open_source(src) as source:
        assert source.axes == "xyz" and source.resolution == pytest.approx((4, 4, 30))
        np.testing.assert_array_equal(source.read(0, 7), xyz(data))
    with pytest.raises(InputError, match="drop --axes zyx"):
        open_source(src, axes="zyx")


def test_zarr_that_is_not_one_grayscale_volume(tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    group.create_array("raw", data=volume())
    group.create_array("labels", data=volume(dtype=np.uint32))
    with pytest.raises(InputError, match="name the array to read.*raw 7x33x50 uint8"):
        open_source(str(tmp_path / "two.zarr"))
    with open_source(str(tmp_path / "two.zarr" / "labels")) as source:
        assert source.dtype == np.uint32
    two_channels = np.stack([volume(), volume(seed=1)])[None]
    src = write_ome_zarr(tmp_path, two_channels, "tczyx", [1, 1, 40, 4, 4], name="c.zarr")
    with pytest.raises(InputError, match="one channel and time point"):
        open_source(src)
    (tmp_path / "n5").mkdir()
    (tmp_path / "n5" / "attributes.json").write_text('{"n5": "2.0.0"}')
    with pytest.raises(InputError, match="N5 container or group that holds no dataset"):
        open_source(str(tmp_path / "n5"))


def write_n5(path, data, compression="gzip", block=(16, 16, 3), attributes=None):
    """`data` (z,y,x) as an N5 dataset written by tensorstore (another implementation than
    the one under test), with extra attributes."""
    import tensorstore

    codec = {"type": compression, **({"cname": "zstd", "clevel": 3, "shuffle": 1}
                                     if compression == "blosc" else {})}
    store = tensorstore.open({
        "driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": list(block),
                     "dataType": data.dtype.name, "compression": codec}},
        create=True, delete_existing=True).result()
    store[...] = data.T
    if attributes:
        meta = json.loads((path / "attributes.json").read_text())
        (path / "attributes.json").write_text(json.dumps({**meta, **attributes}))
    return str(path)


@pytest.mark.parametrize("compression", ["raw", "gzip", "bzip2", "xz", "blosc", "zstd"])
def test_n5_datasets_read_as_written(tmp_path, compression):
    data = volume(dtype=np.uint16)
    src = write_n5(tmp_path / "vol.n5" / "raw", data, compression)
    before = fingerprint(src)
    with open_source(src) as source:
        assert source.kind == "n5" and source.shape == SHAPE_ZYX[::-1]
        np.testing.assert_array_equal(source.read(2, 6), xyz(data)[..., 2:6])
        assert source.resolution is None
    assert fingerprint(src) == before


def test_n5_blocks_absent_truncated_and_the_voxel_size_its_attributes_record(tmp_path):
    """An absent block reads as zeros, a far-edge block stored truncated (as N5's Java
    writer stores it) reads as whole; a multiscale's s0 is found, and its group's
    `pixelResolution` gives the voxel size; COSEM's `transform` gives size and position."""
    data = volume(dtype=np.uint16) + 1
    root = tmp_path / "vol.n5"
    src = write_n5(root / "em" / "s0", data, "raw")
    write_n5(root / "em" / "s1", data[:, ::2, ::2], "raw")
    (root / "attributes.json").write_text('{"n5": "4.0.0"}')
    (root / "em" / "attributes.json").write_text(json.dumps(
        {"pixelResolution": {"unit": "nm", "dimensions": [8, 8, 40]}, "scales": [[1, 1, 1]]}))
    os.remove(os.path.join(src, "1", "0", "0"))  # x 16..31, y 0..15, z 0..2
    edge = os.path.join(src, "3", "2", "2")  # x 48..49, y 32, z 6 of a 16 x 16 x 3 block
    block = data[6:7, 32:33, 48:50]
    header = np.array([0, 3], ">u2").tobytes() + np.array([2, 1, 1], ">u4").tobytes()
    with open(edge, "wb") as f:
        f.write(header + block.astype(">u2").tobytes())
    expected = data.copy()
    expected[0:3, 0:16, 16:32] = 0
    vol = ingest(str(root), str(tmp_path / "layer"), progress=False)
    assert list(vol.resolution) == [8, 8, 40] and list(vol.voxel_offset) == [0, 0, 0]
    np.testing.assert_array_equal(read_back(tmp_path / "layer"), xyz(expected))
    cosem = write_n5(tmp_path / "c.n5" / "s0", data, attributes={"transform": {
        "axes": ["z", "y", "x"], "ordering": "C", "scale": [0.04, 0.004, 0.004],
        "translate": [0.4, 0.0, 0.04], "units": ["um", "um", "um"]}})
    with open_source(cosem) as source:
        assert source.resolution == pytest.approx((4, 4, 40))
        assert source.recorded_offset(source.resolution) == (10, 0, 10)


def test_slabs_end_on_the_files_own_blocks_so_each_is_decoded_once(tmp_path, monkeypatch):
    """N5 blocks 6 sections deep, layer chunks 2 deep, room for 4 chunk rows a slab: slabs of 6
    sections (8 would split every other block between two slabs, each read twice)."""
    from deepem3d.sources import n5

    data = volume(shape=(24, 33, 50), dtype=np.uint16)
    src = write_n5(tmp_path / "deep.n5", data, "gzip", block=(16, 16, 6))
    reads = []
    original = n5.N5Array._read_block
    monkeypatch.setattr(n5.N5Array, "_read_block",
                        lambda self, grid: reads.append(tuple(grid)) or original(self, grid))
    plane = 50 * 33 * 2
    ingest(src, str(tmp_path / "layer"), resolution=(4, 4, 40), chunk_size=(16, 16, 2),
           slab_bytes=4 * plane * 2, progress=False)
    assert len(reads) == len(set(reads)) == 4 * 3 * 4  # z, y, x blocks: each once
    np.testing.assert_array_equal(read_back(tmp_path / "layer"), xyz(data))


def test_n5_levels_units_and_choices(tmp_path):
    """A level named explicitly scales its group's voxel size by its `downsamplingFactors`; a
    `resolution` without `units` is nm (Paintera, funlib); a container of two volumes, or of
    a multiscale beside another dataset, is not guessed."""
    data = volume()
    root = tmp_path / "m.n5"
    write_n5(root / "em" / "s0", data)
    write_n5(root / "em" / "s1", data[:, ::2, ::2], attributes={"downsamplingFactors": [2, 2, 1]})
    (root / "em" / "attributes.json").write_text(json.dumps(
        {"pixelResolution": {"unit": "um", "dimensions": [0.004, 0.004, 0.04]}}))
    with open_source(str(root / "em" / "s1")) as source:
        assert source.resolution == pytest.approx((8, 8, 40))
        assert "downsamplingFactors" in source.resolution_from
    with open_source(str(root)) as source:  # one multiscale: its s0
        assert source.name.endswith("em/s0") and source.resolution == pytest.approx((4, 4, 40))
    # n5-spark writes s0's pixelResolution on every level: the N5 viewer scales it too
    write_n5(tmp_path / "spark.n5" / "s1", data[:, ::2, ::2], attributes={
        "downsamplingFactors": [2, 2, 1],
        "pixelResolution": {"unit": "nm", "dimensions": [4, 4, 40]}})
    with open_source(str(tmp_path / "spark.n5" / "s1")) as source:
        assert source.resolution == pytest.approx((8, 8, 40))
    write_n5(root / "raw", data)
    with pytest.raises(InputError, match="name the N5 dataset to read.*em/s0, em/s1, raw"):
        open_source(str(root))
    unitless = write_n5(tmp_path / "p.n5" / "raw", data,
                        attributes={"resolution": [4, 4, 40], "offset": [8, 0, 400]})
    vol = ingest(unitless, str(tmp_path / "layer"), progress=False)
    assert list(vol.resolution) == [4, 4, 40] and list(vol.voxel_offset) == [2, 0, 10]
    write_n5(tmp_path / "p.n5" / "labels", data)
    with pytest.raises(InputError, match="name the N5 dataset to read.*labels, raw"):
        open_source(str(tmp_path / "p.n5"))


def test_n5_refusals(tmp_path):
    data = volume()
    src = write_n5(tmp_path / "a.n5", data)
    assert_one_line_error(cli(src, tmp_path / "layer", "--axes", "xyz"),
                          "N5 orders its dimensions x,y,z", "drop --axes xyz")
    multiset = write_n5(tmp_path / "ms.n5", data, attributes={"isLabelMultiset": True})
    assert_one_line_error(cli(multiset, tmp_path / "layer", "--resolution", "4,4,40"),
                          "label multisets")
    varlength = write_n5(tmp_path / "v.n5", data, "raw")
    block = os.path.join(varlength, "0", "0", "0")
    header = (np.array([1, 3], ">u2").tobytes() + np.array([16, 16, 3], ">u4").tobytes()
              + np.array([40], ">u4").tobytes())
    with open(block, "wb") as f:  # 40 elements of something else than 16 x 16 x 3 voxels
        f.write(header + bytes(40))
    assert_one_line_error(cli(varlength, tmp_path / "layer", "--resolution", "4,4,40",
                              "--no-progress"), "a varlength block")
    lz4 = write_n5(tmp_path / "l.n5", data, attributes={"compression": {"type": "lz4"}})
    assert_one_line_error(cli(lz4, tmp_path / "layer", "--resolution", "4,4,40"),
                          "N5 compression 'lz4' is not read here")
    zero = write_n5(tmp_path / "z.n5", data, attributes={"blockSize": [16, 0, 3]})
    assert_one_line_error(cli(zero, tmp_path / "layer", "--resolution", "4,4,40"),
                          "with blocks [16, 0, 3] is not a volume deepem3d reads")
    broken = write_n5(tmp_path / "b.n5", data, "gzip")
    with open(os.path.join(broken, "0", "0", "0"), "r+b") as f:
        f.truncate(40)  # the header and a part of the gzip stream
    assert_one_line_error(cli(broken, tmp_path / "layer", "--resolution", "4,4,40",
                              "--no-progress"),
                          "cannot read the N5 block")
    assert not (tmp_path / "layer").exists()


@pytest.mark.parametrize("keep", [-5, 60])
def test_a_blosc_n5_block_cut_short_is_refused_not_read_as_garbage(tmp_path, keep):
    """A block file cut short (an interrupted copy): c-blosc trusts its header's sizes and
    decoded such a stream without a word, into other values than the file's."""
    src = write_n5(tmp_path / "cut.n5", volume(dtype=np.uint16), "blosc")
    block = os.path.join(src, "0", "0", "0")
    with open(block, "rb") as f:
        whole = f.read()
    with open(block, "wb") as f:
        f.write(whole[:keep])
    assert_one_line_error(cli(src, tmp_path / "layer", "--resolution", "4,4,40",
                              "--no-progress"), "cannot read the N5 block", "cut short")
    assert not (tmp_path / "layer").exists()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_blosc_zarr_chunk_cut_short_is_refused_not_read_as_garbage(tmp_path, zarr_format):
    """The same for zarr: a chunk of zarr 2's default lz4 blosc cut 3 bytes short decoded,
    through zarr, to other values without a word. Whole chunks read as they are."""
    import numcodecs
    import zarr

    data = (volume() // 64) * 64  # compressible: blosc stores it compressed
    path = str(tmp_path / "vol.zarr")
    compressor = (numcodecs.Blosc(cname="lz4") if zarr_format == 2
                  else zarr.codecs.BloscCodec(cname="lz4", shuffle="shuffle"))
    zarr.create_array(path, data=data, chunks=(3, 16, 16), zarr_format=zarr_format,
                      compressors=compressor)
    ingest(path, str(tmp_path / "whole"), resolution=(4, 4, 40), progress=False)
    np.testing.assert_array_equal(read_back(tmp_path / "whole"), xyz(data))
    chunk = zarr.open_array(path, mode="r").metadata.encode_chunk_key((1, 0, 0))
    file = os.path.join(path, *chunk.split("/"))
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 3)
    assert_one_line_error(cli(path, tmp_path / "layer", "--resolution", "4,4,40",
                              "--no-progress"), "cannot read the zarr chunk", "cut short")
    assert not (tmp_path / "layer").exists()


def write_mrc(tmp_path, data, voxel_size_angstrom=None, name="vol.mrc"):
    import mrcfile

    path = str(tmp_path / name)
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        if voxel_size_angstrom is not None:
            mrc.voxel_size = voxel_size_angstrom
    return path


def test_mrc_round_trip_with_its_voxel_size(tmp_path):
    data = volume(dtype=np.uint16)
    src = write_mrc(tmp_path, data, (40.0, 40.0, 300.0))  # x, y, z in angstrom
    result = cli(src, tmp_path / "layer", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "at 4,4,30 nm, as the file records it" in result.stdout
    np.testing.assert_array_equal(read_back(tmp_path / "layer"), xyz(data))
    assert list(open_layer(str(tmp_path / "layer")).resolution) == [4, 4, 30]
    # an explicit --resolution wins over the header
    vol = ingest(src, str(tmp_path / "other"), resolution=(5, 5, 50), progress=False)
    assert list(vol.resolution) == [5, 5, 50]
    assert_one_line_error(cli(src, tmp_path / "xyz", "--axes", "xyz"), "MRC", "drop --axes")


def test_an_mrc_file_is_placed_at_its_start_and_its_origin_is_said_not_applied(tmp_path):
    """nxstart, nystart, nzstart (voxels) place the layer; the origin, whose sign programs
    read differently, is not applied, and ingest says so where it takes the file's place."""
    import mrcfile

    data = volume(dtype=np.uint16)
    src = write_mrc(tmp_path, data, (40.0, 40.0, 300.0))
    with mrcfile.open(src, mode="r+") as mrc:
        mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = 10, -3, 2
    result = cli(src, tmp_path / "start", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    vol = open_layer(str(tmp_path / "start"))
    assert list(vol.voxel_offset) == [10, -3, 2]
    np.testing.assert_array_equal(read_back(tmp_path / "start"), xyz(data))
    with mrcfile.open(src, mode="r+") as mrc:
        mrc.header.origin = (400.0, 0.0, -600.0)
    result = cli(src, tmp_path / "origin", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("deepem3d: warning: ") == 1
    assert "origin 400,0,-600 A is not applied" in result.stderr
    assert "starts at voxel 10,-3,2" in result.stderr
    assert list(open_layer(str(tmp_path / "origin")).voxel_offset) == [10, -3, 2]
    result = cli(src, tmp_path / "given", "--no-progress", "--voxel-offset", "0,0,0")
    assert result.returncode == 0 and "warning" not in result.stderr  # placed by the user
    assert list(open_layer(str(tmp_path / "given")).voxel_offset) == [0, 0, 0]


def test_mrc_bytes_imod_wrote_unsigned(tmp_path):
    import mrcfile

    data = volume()  # uint8, values up to 255
    src = write_mrc(tmp_path, data.view(np.int8), (10.0, 10.0, 10.0))
    with mrcfile.open(src, mode="r+") as mrc:  # IMOD's stamp, flag bit 0 clear: unsigned
        extra = bytearray(mrc.header.extra2.tobytes())
        extra[40:48] = np.array([1146047817, 0], "<i4").tobytes()  # bytes 152..159
        mrc.header.extra2 = bytes(extra)
    with open_source(src) as source:
        assert source.dtype == np.uint8
        np.testing.assert_array_equal(source.read(0, 7), xyz(data))
    plain = write_mrc(tmp_path, data.view(np.int8), name="signed.mrc")
    with open_source(plain) as source:  # no stamp: the standard's signed bytes
        assert source.dtype == np.int8 and source.resolution is None


def test_a_file_without_its_voxel_size_needs_resolution(tmp_path):
    src = write_npy(tmp_path, volume())
    assert_one_line_error(cli(src, tmp_path / "layer"), "does not record its voxel size",
                          "--resolution")
    assert not (tmp_path / "layer").exists()
    h5 = write_h5(tmp_path, volume())
    with h5py.File(h5, "a") as f:  # CREMI's attribute, in the dataset's z,y,x order
        f["/volumes/raw"].attrs["resolution"] = (40.0, 4.0, 4.0)
    vol = ingest(h5, str(tmp_path / "cremi"), progress=False)
    assert list(vol.resolution) == [4, 4, 40] and list(vol.voxel_offset) == [0, 0, 0]


def test_ingest_places_the_volume_where_the_file_does(tmp_path):
    """A CREMI label volume's `offset` (nm, z,y,x) and an OME-Zarr translation (the level's,
    then the multiscale's) give the voxel offset; --voxel-offset overrides them, and a
    position that is no whole number of voxels is refused in one line."""
    h5 = write_h5(tmp_path, volume())
    with h5py.File(h5, "a") as f:
        f["/volumes/raw"].attrs["resolution"] = (40.0, 4.0, 4.0)
        f["/volumes/raw"].attrs["offset"] = (80.0, 48.0, -16.0)
    vol = ingest(h5, str(tmp_path / "cremi"), progress=False)
    assert list(vol.voxel_offset) == [-4, 12, 2]
    vol = ingest(h5, str(tmp_path / "mine"), voxel_offset=(1, 2, 3), progress=False)
    assert list(vol.voxel_offset) == [1, 2, 3]
    # another voxel size given: the position still counts the file's own voxels
    vol = ingest(h5, str(tmp_path / "told"), resolution=(5, 5, 50), progress=False)
    assert list(vol.voxel_offset) == [-4, 12, 2]
    src = write_ome_zarr(tmp_path, volume(), "zyx", [0.04, 0.004, 0.004], name="t.zarr")
    import zarr

    group = zarr.open_group(src, mode="r+")
    meta = group.attrs["multiscales"]
    meta[0]["datasets"][0]["coordinateTransformations"].append(
        {"type": "translation", "translation": [0.08, 0.0, 0.008]})
    meta[0]["coordinateTransformations"] = [{"type": "scale", "scale": [1, 2, 2]},
                                            {"type": "translation", "translation": [0, 0.4, 0]}]
    group.attrs["multiscales"] = meta
    vol = ingest(src, str(tmp_path / "ome"), progress=False)
    assert list(vol.resolution) == pytest.approx([8, 8, 40])
    assert list(vol.voxel_offset) == [2, 50, 2]  # x 16 nm, y 400 nm, z 80 nm
    with h5py.File(h5, "a") as f:
        f["/volumes/raw"].attrs["offset"] = (80.0, 50.0, 0.0)
    assert_one_line_error(cli(h5, tmp_path / "half"), "places its first voxel at 0,50,80 nm",
                          "not a whole number of 4,4,40 nm voxels", "--voxel-offset")
    assert not (tmp_path / "half").exists()


def test_an_ome_zarr_level_named_by_its_path_takes_that_levels_voxel_size(tmp_path):
    """`img.zarr/1` is the image's level 1 with its own scale and translation (a user who
    wants a coarser level than the full-resolution one); an array no image lists has none."""
    import zarr

    data = volume()
    src = write_ome_zarr(tmp_path, data, "zyx", [0.04, 0.004, 0.004], name="l.zarr")
    group = zarr.open_group(src, mode="r+")
    meta = group.attrs["multiscales"]
    meta[0]["datasets"][1]["coordinateTransformations"] = [
        {"type": "scale", "scale": [0.04, 0.008, 0.008]},
        {"type": "translation", "translation": [0.0, 0.016, 0.008]}]
    group.attrs["multiscales"] = meta
    group.create_array("loose", data=data, chunks=data.shape)
    vol = ingest(f"{src}/1", str(tmp_path / "coarse"), progress=False)
    assert list(vol.resolution) == pytest.approx([8, 8, 40])
    assert list(vol.voxel_offset) == [1, 2, 0]  # x 8 nm, y 16 nm: in voxels of level 1
    np.testing.assert_array_equal(read_back(tmp_path / "coarse"), xyz(data[:, ::2, ::2]))
    with open_source(f"{src}/0") as source:
        assert source.resolution == pytest.approx((4, 4, 40))
    # the voxel-centre convention (ngff-zarr's): level 1 moved by half its voxel less level 0's
    meta[0]["datasets"][1]["coordinateTransformations"][1]["translation"] = [0, 0.018, 0.002]
    group.attrs["multiscales"] = meta
    with open_source(f"{src}/1") as source:
        assert source.recorded_offset(source.resolution) == (0, 2, 0)  # y 16 nm, x 0
    with open_source(f"{src}/loose") as source:
        assert source.resolution is None


def test_damaged_files_and_a_layer_inside_its_source_are_one_line_and_leave_no_layer(tmp_path):
    """A chunk that does not decompress is a one-line error and the layer is removed, also one
    --overwrite had emptied; a layer inside the source's folder or container is refused before
    anything is written; a zarr 3 array's dimension_names give its axes."""
    import zarr

    data = volume()
    path = str(tmp_path / "vol.zarr")
    zarr.create_array(path, data=data, chunks=(3, 16, 16), zarr_format=3,
                      dimension_names=["z", "y", "x"])
    run_cli("ingest", path, tmp_path / "layer", "--resolution", "4,4,40", check=True)
    chunk = max((p for p in (tmp_path / "vol.zarr").rglob("*") if p.is_file()
                 and p.name != "zarr.json"), key=lambda p: str(p))
    chunk.write_bytes(b"not a chunk" * 10)
    assert_one_line_error(cli(path, tmp_path / "layer", "--resolution", "4,4,40",
                              "--overwrite", "--no-progress"), "cannot read sections",
                          "vol.zarr")
    assert not (tmp_path / "layer").exists()  # not left with an info and part of the chunks
    xyz_array = str(tmp_path / "xyz.zarr")
    zarr.create_array(xyz_array, data=xyz(data), zarr_format=3, dimension_names=["x", "y", "z"])
    with open_source(xyz_array) as source:
        assert source.axes == "xyz" and source.shape == xyz(data).shape
    assert_one_line_error(cli(xyz_array, tmp_path / "l", "--axes", "zyx"), "drop --axes zyx")
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=2)
    group.create_array("raw", data=data, chunks=data.shape)
    slices = write_tiff_dir(tmp_path, data)
    before = fingerprint(str(tmp_path / "g.zarr")), fingerprint(slices)
    for src, dest in ((f"{tmp_path / 'g.zarr'}/raw", tmp_path / "g.zarr" / "layer"),
                      (slices, slices), (slices, tmp_path)):
        assert_one_line_error(cli(src, dest, "--resolution", "4,4,40", "--overwrite"),
                              "inside the source")
    assert (fingerprint(str(tmp_path / "g.zarr")), fingerprint(slices)) == before


def test_recorded_voxel_sizes_are_rounded_and_defaults_refused(tmp_path):
    """A float32 header's 13.7 A is 1.37 nm, as a user would type it; a 1 A MRC (what programs
    write when the size is unknown) and an OME-Zarr scale without a unit are not taken."""
    with open_source(write_mrc(tmp_path, volume(), (13.7, 13.7, 27.4))) as source:
        assert source.resolution == (1.37, 1.37, 2.74)
    unknown = write_mrc(tmp_path, volume(), (1.0, 1.0, 1.0), name="one.mrc")
    assert_one_line_error(cli(unknown, tmp_path / "layer"), "gives 1 A on every axis",
                          "--resolution")
    no_unit = write_ome_zarr(tmp_path, volume(), "zyx", [40, 4, 4], unit=None)
    with pytest.raises(InputError, match="scale names no unit of length"):
        ingest(no_unit, str(tmp_path / "layer"), progress=False)
    assert not (tmp_path / "layer").exists()


def test_an_ome_zarr_image_inside_a_bioformats2raw_container(tmp_path):
    import zarr

    root = zarr.open_group(str(tmp_path / "plate.zarr"), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    write_ome_zarr(tmp_path / "plate.zarr", volume(), "zyx", [50, 4, 4], unit="nanometer",
                   name="0")
    with open_source(str(tmp_path / "plate.zarr")) as source:
        assert source.name.endswith("plate.zarr/0")  # the image group
        assert source.resolution == (4, 4, 50)
        np.testing.assert_array_equal(source.read(0, 7), xyz(volume()))


def test_a_layer_folder_is_not_a_file_source_whatever_its_name(tmp_path):
    from deepem3d.models.data import is_file_source

    layer = tmp_path / "em.zarr"
    ingest(write_npy(tmp_path, volume()), str(layer), resolution=(4, 4, 40), progress=False)
    assert not is_file_source(str(layer)) and not is_file_source(f"gs://b/{layer.name}")
    assert is_file_source(write_npy(tmp_path, volume(), "v.npy"))
    assert is_file_source(f"{write_h5(tmp_path, volume())}:/volumes/raw")


def test_canonical_dtype_is_numpys_own_by_name():
    """tifffile's uint64 is code 'Q', numpy's 'L': equal dtypes that CloudVolume's
    np.issubdtype tells apart; a source hands out numpy's own, in native byte order."""
    from deepem3d.sources import canonical_dtype

    for code in ("Q", "q", "I", "i", "L", "l", ">u8", "<i8", ">f4", "?"):
        found = canonical_dtype(code)
        assert found == np.dtype(code).newbyteorder("=") and found.isnative
        assert found.type is np.dtype(np.dtype(code).name).type, code
    assert canonical_dtype("U5") == np.dtype("U5")  # not a number: as it is


def test_every_reader_hands_out_numpys_own_uint64(tmp_path):
    """A uint64 segmentation from any reader ingests (the TIFF's failed with CloudVolume's
    "Volume: uint64 Image: uint64"), and every reader's dtype is numpy's own."""
    labels = volume(dtype=np.uint64, seed=5) + np.uint64(2**40)
    tifffile.imwrite(tmp_path / "seg.tif", labels)
    sources = {
        "tiff": str(tmp_path / "seg.tif"),
        "tiff-directory": write_tiff_dir(tmp_path, labels),
        "npy": write_npy(tmp_path, labels),
        "hdf5": write_h5(tmp_path, labels) + ":/volumes/raw",
        "n5": write_n5(tmp_path / "seg.n5" / "ids", labels),
    }
    for kind, src in sources.items():
        with open_source(src) as source:
            assert source.dtype.type is np.uint64, (kind, source.dtype.char)
            assert source.read(0, 2).dtype.type is np.uint64, kind
    vol = ingest(sources["tiff"], str(tmp_path / "layer"), resolution=(4, 4, 40),
                 layer_type="segmentation", progress=False)
    assert vol.dtype == "uint64"
    np.testing.assert_array_equal(read_back(tmp_path / "layer"), xyz(labels))


def test_a_16_bit_layer_is_refused_by_infer_with_a_way_to_uint8_that_works(tmp_path):
    """infer's advice for a uint16 layer (ingest --to-uint8 reads files, not layers): export
    the layer, then ingest the export with --to-uint8; the result keeps the layer's place."""
    from deepem3d.storage.layers import create_layer

    image = f"file://{tmp_path / 'img16'}"
    vol = create_layer(image, layer_type="image", dtype="uint16", resolution=(4, 4, 50),
                       size=(64, 64, 6), voxel_offset=(8, 16, 2), chunk_size=(32, 32, 6))
    vol[:, :, :] = np.random.default_rng(0).integers(0, 4000, (64, 64, 6), dtype=np.uint16)
    assert_one_line_error(run_cli("infer", image, f"file://{tmp_path / 'map'}", "--dry-run"),
                          "holds uint16", "`deepem3d export LAYER OUT.zarr` writes first")
    run_cli("export", image, tmp_path / "img16.zarr", check=True)
    image8 = f"file://{tmp_path / 'img8'}"
    run_cli("ingest", tmp_path / "img16.zarr", image8, "--to-uint8", check=True)
    converted = open_layer(image8)
    assert converted.dtype == np.uint8 and list(converted.resolution) == [4, 4, 50]
    assert list(converted.voxel_offset) == [8, 16, 2]
    run_cli("infer", image8, f"file://{tmp_path / 'map'}", "--dry-run", check=True)
