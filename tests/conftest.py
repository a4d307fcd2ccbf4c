"""Shared fixtures and helpers: the repository root, the shared data folder, running the CLI;
chunk invariance, segment tasks on file:// map layers, downsampling layers and igneous.

Test modules import helpers from here (never from one another)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from igneous.task_creation.image import create_downsampling_tasks
from taskqueue import LocalTaskQueue

from deepem3d.axes import xyz_from_zyx
from deepem3d.run.runner import execute_here, run_stages
from deepem3d.sample import load_sample
from deepem3d.segmentation.pipeline import segment, segment_chunked
from deepem3d.segmentation.synthetic import affinity_map, boundary_map, bowl_map
from deepem3d.stages.frame import Stage
from deepem3d.stages.segmentation import plan_segment, segment_stages
from deepem3d.storage.layers import create_layer

ROOT = Path(__file__).resolve().parent.parent
# The real EM volumes with ground truth (isbi2012/, gala_fib_small/, vnc_gerhard2013/): the
# folder DEEPEM3D_DATA names, else a `shared/data` beside the repository.
SHARED_DATA = Path(os.environ.get("DEEPEM3D_DATA", ROOT.parent / "shared" / "data"))


def run_cli(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m deepem3d ARGS` from the repository root, capturing text output."""
    result = subprocess.run(
        [sys.executable, "-m", "deepem3d", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def cli_here(*args: object) -> subprocess.CompletedProcess:
    """`deepem3d ARGS` through the same entry point, in this process: no interpreter start-up
    (about 2 s with torch's import) per call. run_cli where a real process matters: what is
    written below Python (a library's own prints), worker processes, signals."""
    from deepem3d.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str,
                          status: int = 2) -> None:
    """Exit status 2 (or `status`: 75 for a service that did not answer), a single
    `deepem3d: error: ` line on stderr, no traceback, naming the problem."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("deepem3d: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def demo_output(tmp_path_factory) -> Path:
    """The output of `deepem3d demo` (the README's main job), made once per session."""
    folder = tmp_path_factory.mktemp("demo") / "demo"
    run_cli("demo", folder, check=True, timeout=900)
    return folder


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present: the EM volumes with ground truth are not on "
                    "this machine (DEEPEM3D_DATA names their folder)")
    return SHARED_DATA


def check_objects(path: str, min_voxels: int = 500, slack: float = 3.0,
                  skeleton_share: float = 0.5) -> None:
    """Every segment of at least `min_voxels` (at mip 0) has a mesh that loads through
    CloudVolume, its bounding box within `slack` voxels of the mesh mip of the segment's own;
    `skeleton_share` of them at least have a skeleton (the merge drops short ones), every
    vertex within the same margin of the segment."""
    vol = CloudVolume(path, progress=False)
    assert vol.info.get("mesh") == "mesh", "the info names the meshes once they are written"
    assert vol.info.get("skeletons") == "skeletons", "and the skeletons"
    labels = np.asarray(vol[:, :, :])[..., 0]
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    big = ids[counts >= min_voxels]
    assert len(big) >= 5, counts.max()
    resolution = np.asarray(vol.resolution, dtype=float)
    mesh_margin = slack * np.asarray(vol.meta.resolution(vol.mesh.meta.mip), dtype=float)
    skeleton_margin = slack * np.asarray(vol.meta.resolution(vol.skeleton.meta.mip), float)
    skeletons = 0
    for label in big:
        where = np.argwhere(labels == label)
        lo, hi = where.min(0) * resolution, (where.max(0) + 1) * resolution  # nm
        mesh = vol.mesh.get(int(label))
        mesh = mesh[int(label)] if isinstance(mesh, dict) else mesh
        assert len(mesh.vertices) > 0, label
        assert np.all(np.abs(mesh.vertices.min(0) - lo) <= mesh_margin), (label, lo)
        assert np.all(np.abs(mesh.vertices.max(0) - hi) <= mesh_margin), (label, hi)
        skeleton = vol.skeleton.get(int(label))
        if len(skeleton.vertices):
            skeletons += 1
            assert np.all(skeleton.vertices >= lo - skeleton_margin), label
            assert np.all(skeleton.vertices <= hi + skeleton_margin), label
    assert skeletons >= skeleton_share * len(big), (skeletons, len(big))


def start_stage(stage) -> list[tuple[str, object]]:
    """Prepare a stage and record its run (as the runner does); its tasks as (task id, task)."""
    if stage.prepare is not None:
        stage.prepare()
    stage.start()
    return [(task.keywords["run"]["id"], task) for task in stage.tasks()]


# ---------------------------------------------------------------------------------------------
# Chunk invariance (test_seg_chunked, test_seg_compare, test_seg_smoothing)

THRESHOLDS = {"mean": [0.25, 0.55, 0.83], "watershed": [0.05, 0.19]}


def isbi_labels(x: int = 64, y: int = 64, z: int = 10) -> np.ndarray:
    """Ground-truth neuron ids of the embedded ISBI 2012 sample's corner, x, y, z (0 = membrane)."""
    _, ids = load_sample()
    return np.ascontiguousarray(ids[:z, :y, :x]).transpose(2, 1, 0)


def check_invariance(
    m: np.ndarray, chunk_shapes: list[tuple[int, int, int]], **kwargs: object
) -> None:
    """segment_chunked equals segment bit for bit, for every method, threshold and chunk shape."""
    for method, thresholds in THRESHOLDS.items():
        whole = segment(m, method, thresholds, **kwargs)
        for seg in whole:
            assert seg.dtype == np.uint64 and seg.shape == m.shape[:3]
            if kwargs.get("dust_mode") != "zero":
                assert seg.min() > 0  # 0 is background only, and nothing here is background
        for shape in chunk_shapes:
            chunked = segment_chunked(m, shape, method, thresholds, **kwargs)
            for t, a, b in zip(thresholds, whole, chunked):
                assert b.dtype == np.uint64
                assert np.array_equal(a, b), f"{method} {t} differs with chunks {shape}"


def synthetic_maps() -> dict[str, np.ndarray]:
    """Maps with plateaus and ties, by name: constant, two-valued, stripes, few-valued, bowls."""
    rng = np.random.default_rng(0)
    shape = (15, 11, 7)
    two = np.where(rng.random(shape) < 0.5, 40, 200).astype(np.uint8)
    stripes = np.zeros(shape, np.uint8)
    stripes[::3] = 255  # flat walls between flat slabs
    bowls, _ = bowl_map((24, 20, 9), 8, seed=1)
    return {
        "constant": np.full(shape, 128, np.uint8),
        "two-valued": two,
        "stripes": stripes,
        "few-valued": rng.integers(0, 3, shape).astype(np.uint8) * 100,
        "bowls": bowls,
        "affinity-constant": np.full(shape + (3,), 255, np.uint8),
        "affinity-two-valued": np.where(rng.random(shape + (3,)) < 0.7, 250, 10).astype(np.uint8),
        "affinity-of-stripes": affinity_map(stripes),
        "affinity-of-two-valued": affinity_map(two),
    }


# ---------------------------------------------------------------------------------------------
# Segment tasks on file:// map layers (test_segment_tasks, test_seg_smoothing): a 96 x 80 x 10
# (x, y, z) crop of the embedded ISBI 2012 sample, ground truth turned into a noisy boundary map

SHAPE = (96, 80, 10)  # x, y, z
CHUNK = (8, 8, 2)


@pytest.fixture(scope="module")
def maps(tmp_path_factory) -> dict[str, tuple[str, np.ndarray]]:
    """Map layers by name: (path, the array in it), with the provenance `deepem3d infer`
    records (a map without one is not kept under `segment --overwrite`)."""
    root = tmp_path_factory.mktemp("maps")
    _, ids = load_sample()
    labels = np.asfortranarray(xyz_from_zyx(ids[: SHAPE[2], : SHAPE[1], : SHAPE[0]]))
    b = boundary_map(labels, noise=0.1, seed=3)
    arrays = {"boundary": b, "affinity": affinity_map(b),
              "float32": (b / np.float32(255)).astype(np.float32)}
    out = {}
    for name, array in arrays.items():
        path = f"file://{root / name}"
        vol = create_layer(path, layer_type="image", dtype=str(array.dtype), resolution=(4, 4, 40),
                           size=SHAPE, chunk_size=CHUNK, num_channels=1 if array.ndim == 3 else 3,
                           provenance={"task": "InferenceTask"})
        vol[:, :, :] = array
        out[name] = (path, array)
    return out


class InProcess:
    """Runs a stage's tasks here, each from its JSON payload; counts them per stage."""

    def __init__(self) -> None:
        self.ran: dict[str, int] = {}

    def __call__(self, stage: Stage, tasks) -> int:
        count = execute_here(stage, tasks)
        if count:
            self.ran[stage.name] = self.ran.get(stage.name, 0) + count
        return count


def run(map_path: str, output: str, method: str, threshold: float, task_shape=None,
        **kwargs) -> InProcess:
    """Plan `deepem3d segment` and run its stages' tasks in this process (InProcess)."""
    plan = plan_segment(map_path, output, method=method, threshold=threshold,
                        task_shape=task_shape, chunk_size=CHUNK, **kwargs)
    runner = InProcess()
    run_stages(segment_stages(plan), execute=runner, echo=lambda line: None)
    return runner


def read(path: str) -> np.ndarray:
    """A segmentation layer's voxels, x, y, z (checking it is compressed_segmentation uint64)."""
    vol = CloudVolume(path, progress=False, fill_missing=True)
    assert vol.dtype == np.uint64 and vol.encoding == "compressed_segmentation"
    return np.asarray(vol[:, :, :])[..., 0]


def chunk_files(path: str) -> dict[str, bytes]:
    """A layer's chunk files at 4 x 4 x 40 nm, by name."""
    files = CloudFiles(path)
    return {k: files.get(k) for k in files.list(prefix="4_4_40/")}


# ---------------------------------------------------------------------------------------------
# Downsampling (test_workers, test_downsample, test_cloud): sample layers and igneous in-process

MEMORY = 200_000  # bytes: small tasks (128 x 128 x 10), so there are 8 of them


def make_layer(path: Path, layer_type: str = "image", voxel_offset=(0, 0, 0)) -> str:
    """A 256 x 256 x 20 layer of the embedded sample (image or ground truth) at PATH."""
    image, ids = load_sample()
    array = image[:20, :256, :256] if layer_type == "image" else ids[:20, :256, :256]
    dtype = "uint8" if layer_type == "image" else "uint64"
    vol = create_layer(
        f"file://{path}", layer_type=layer_type, dtype=dtype, resolution=(4, 4, 50),
        size=(256, 256, 20), chunk_size=(64, 64, 10), voxel_offset=voxel_offset,
    )
    vol[vol.bounds] = xyz_from_zyx(array.astype(dtype))
    return f"file://{path}"


def igneous_reference(
    src: Path, dest: Path, num_mips: int, factor, memory_target: int = MEMORY
) -> str:
    """A copy of SRC at DEST, downsampled by igneous's own tasks in this process."""
    shutil.copytree(src, dest)
    tq = LocalTaskQueue(parallel=1, progress=False)
    tq.insert(create_downsampling_tasks(
        f"file://{dest}", mip=0, num_mips=num_mips, factor=factor, memory_target=memory_target,
    ))
    tq.execute(progress=False)
    return f"file://{dest}"


def assert_same_mips(a: str, b: str, mips: range) -> None:
    for mip in mips:
        va, vb = CloudVolume(a, mip=mip), CloudVolume(b, mip=mip)
        assert tuple(va.volume_size) == tuple(vb.volume_size)
        np.testing.assert_array_equal(va[:, :, :], vb[:, :, :], err_msg=f"mip {mip}")


def file_digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
    }
