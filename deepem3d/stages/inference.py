"""image -> map: the network over an image layer as queue tasks, one per output block.

Each InferenceTask reads its block plus the context the model's patches need (reflected only
at the dataset's own bounds), runs the pure sliding window of deepem3d.models.sliding and
writes the block (aligned to the output layer's chunk grid), one chunk-deep slab at a time
with the next slab's input read and the last one's map written meanwhile (`predict_slabs`:
a GPU does not wait for I/O between slabs). Because the patch grid belongs to
the dataset, not to the task, the output is the same bytes whatever the task shape, on one
device class, torch version and thread setting (docs/design.md). That is why the stage's run
key holds the device class and the torch version: a worker of another class or version refuses
the task (an input error: the run stops and says so) instead of writing bytes that differ.

`deepem3d.stages.inference_plan` works out a run (geometry, tasks, memory) before anything is
written; `deepem3d.stages.model_refs` names the models and checks the workers' devices.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from functools import partial

import numpy as np
from cloudvolume import CloudVolume
from cloudvolume.lib import Bbox

from deepem3d.axes import xyzc_from_czyx, zyx_from_xyz
from deepem3d.memory import reusing_freed_memory
from deepem3d.models.sliding import (
    COMBINE,
    PatchGeometry,
    Predictor,
    Stats,
    input_box,
    predict_block,
    quantize,
)
from deepem3d.stages.blocks import block_id, bounds_list
from deepem3d.stages.frame import Markers, Stage, digest, stage_task
from deepem3d.stages.inference_plan import STAGE, InferencePlan
from deepem3d.stages.model_refs import (
    cached_predictor,
    check_worker,
    device_class,
    device_label,
    resolve_device,
    torch_release,
)
from deepem3d.storage.layers import (
    create_layer,
    open_layer,
    read_block,
    record_provenance,
    write_block,
)

# torch and deepem3d.models load inside the functions that need them: every worker imports
# this module (it registers InferenceTask), most never predict.


# ---------------------------------------------------------------------------------------------
# The task


@stage_task
def InferenceTask(  # noqa: N802  (taskqueue registers tasks by function name)
    image_path: str,
    output_path: str,
    bounds: list[int],
    models: list[list[str]],
    mip: int = 0,
    tta: int = 1,
    patch: dict | None = None,
    dtype: str = "uint8",
    fill_missing: bool = False,
    threads: int = 1,
    device: str = "auto",
    amp: bool = True,
    mask: str | None = None,
    mask_mip: int = 0,
    torch_version: str = "",
) -> dict:
    """Predict one output block (bounds: x0,y0,z0,x1,y1,z1 in absolute voxels at `mip`).

    `device` is the run's device class (cpu or cuda) and `torch_version` the version it was
    planned for: a worker of another refuses the task. A retried or duplicated task rewrites
    the same bytes.
    """
    import torch

    check_worker(device, torch_version)
    bbox = Bbox(bounds[:3], bounds[3:])
    start = time.perf_counter()
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(int(threads))
    geometry = PatchGeometry(**(patch or {}))
    out_vol = CloudVolume(output_path, mip=0, progress=False, non_aligned_writes=False)
    stats = Stats()
    masked = mask is not None and not has_tissue(mask, mask_mip, bbox, image_path, mip)
    waits = {"input_wait_seconds": 0.0, "write_wait_seconds": 0.0}
    slabs = 1
    if masked:  # no tissue: no objects here (boundary everywhere, no affinity)
        write_background(out_vol, bbox, dtype)
    else:
        predictors = [cached_predictor(loc, sha, str(dev), amp and dev.type == "cuda")
                      for loc, sha in models]
        vol = CloudVolume(image_path, mip=mip, fill_missing=fill_missing, progress=False)
        # a CPU forward's activations reuse freed pages: the same floats, 1.6-1.7x faster
        reuse = reusing_freed_memory() if dev.type == "cpu" else contextlib.nullcontext()
        with reuse:
            slabs, waits = predict_slabs(predictors, vol, out_vol, bbox, geometry, tta=tta,
                                         dtype=dtype, stats=stats)
    seconds = time.perf_counter() - start
    return {
        "device": device_label(dev),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "amp": bool(amp and dev.type == "cuda"),
        "torch": torch.__version__,
        "masked": masked,
        "patches": stats.patches,
        "batches": stats.batches,
        "slabs": slabs,
        "seconds": round(seconds, 3),
        # a GPU's kernels run after their calls return: the calls' time is not the forward's
        "forward_seconds": round(stats.predict_seconds, 3) if dev.type == "cpu" else None,
        "forward_share": round(stats.predict_seconds / seconds, 4)
        if seconds and dev.type == "cpu" else None,
        **{key: round(value, 3) for key, value in waits.items()},
    }


def slab_ranges(out_vol: CloudVolume, z0: int, z1: int) -> list[tuple[int, int]]:
    """The z ranges [z0, z1) is predicted and written in: the map's chunk depth each, or the
    whole range for a sharded map (a shard file cannot be written in parts)."""
    sharded = out_vol.meta.sharding(out_vol.mip) is not None
    depth = z1 - z0 if sharded else int(out_vol.chunk_size[2])
    return [(z, min(z + depth, z1)) for z in range(z0, z1, depth)]


def write_background(out_vol: CloudVolume, bbox: Bbox, dtype: str) -> None:
    """A block without tissue: boundary probability 1 or affinity 0 everywhere, written slab
    by slab (a deep block is never held whole)."""
    channels = int(out_vol.num_channels)
    value = np.float32(1.0 if channels == 1 else 0.0)
    value = quantize(value) if dtype == "uint8" else value
    (x0, y0, z0), (x1, y1, z1) = (tuple(int(v) for v in p) for p in (bbox.minpt, bbox.maxpt))
    for bottom, top in slab_ranges(out_vol, z0, z1):
        slab = np.full((channels, top - bottom, y1 - y0, x1 - x0), value, dtype=dtype)
        write_block(out_vol, (x0, y0, bottom), xyzc_from_czyx(slab))


class _Sections:
    """The z range [lo, hi) of one in-plane input box, read in pieces along the image's chunk
    grid by one background thread, in order and ahead of need: a slab's input is assembled
    from the pieces while the next slab's are read, and each image chunk is decoded once per
    task, not once per slab whose context reaches it."""

    def __init__(self, vol: CloudVolume, yx_lo, yx_hi, lo: int, hi: int, executor) -> None:
        chunk = int(vol.chunk_size[2])
        cuts = sorted({lo, hi, *range((lo // chunk + 1) * chunk, hi, chunk)})
        self.pieces = list(zip(cuts[:-1], cuts[1:]))
        self.vol, self.yx_lo, self.yx_hi, self.executor = vol, yx_lo, yx_hi, executor
        self.futures: dict[tuple[int, int], object] = {}
        self.asked = 0  # pieces[:asked] were submitted, in order
        self.waited = 0.0

    def _read(self, z0: int, z1: int) -> np.ndarray:
        vol, offset = self.vol, np.asarray(self.vol.voxel_offset, dtype=int)
        lo = offset + np.asarray((self.yx_lo[1], self.yx_lo[0], z0))
        hi = offset + np.asarray((self.yx_hi[1], self.yx_hi[0], z1))
        cutout = read_block(vol, lo, hi, "re-create the tasks with --fill-missing to read "
                            "them as zeros")
        return np.ascontiguousarray(zyx_from_xyz(cutout[..., 0]))

    def prefetch(self, hi: int) -> None:
        """Start reading every piece below section `hi` not asked for yet."""
        while self.asked < len(self.pieces) and self.pieces[self.asked][0] < hi:
            piece = self.pieces[self.asked]
            self.futures[piece] = self.executor.submit(self._read, *piece)
            self.asked += 1

    def get(self, lo: int, hi: int, keep_from: int) -> np.ndarray:
        """Sections [lo, hi) (z,y,x); pieces that end at or below `keep_from` are let go."""
        self.prefetch(hi)
        start = time.perf_counter()
        parts = [(a, self.futures[(a, b)].result()) for a, b in self.pieces
                 if a < hi and b > lo]
        self.waited += time.perf_counter() - start
        for piece in [p for p in self.futures if p[1] <= keep_from]:
            del self.futures[piece]
        if len(parts) == 1:
            a, data = parts[0]
            return data[lo - a:hi - a]
        return np.concatenate([data[max(lo - a, 0):hi - a] for a, data in parts])


def predict_slabs(predictors: Sequence[Predictor] | Predictor, vol: CloudVolume,
                  out_vol: CloudVolume, bbox: Bbox, geometry: PatchGeometry, *, tta: int,
                  dtype: str, stats: Stats) -> tuple[int, dict]:
    """Predict and write the block one output-chunk-deep slab at a time, as a pipeline: the
    next slab's input is read and the last slab's map written (each in a thread of its own)
    while this slab is predicted. A GPU waits for no I/O between slabs; each slab's bytes are
    those of a task of that slab alone (predict_block's contract). A sharded map is one slab
    (slab_ranges), written once, whole. Returns the slab count and the
    seconds the prediction waited for input and for writes."""
    from concurrent.futures import ThreadPoolExecutor

    offset = np.asarray(vol.voxel_offset, dtype=int)
    dataset = tuple(int(s) for s in vol.volume_size[::-1])  # z,y,x
    lo = np.asarray(bbox.minpt, dtype=int) - offset
    hi = np.asarray(bbox.maxpt, dtype=int) - offset
    slabs = [((bottom, int(lo[1]), int(lo[0])), (top, int(hi[1]), int(hi[0])))
             for bottom, top in slab_ranges(out_vol, int(lo[2]), int(hi[2]))]
    boxes = [input_box(predictors, slab, dataset, geometry, tta) for slab in slabs]
    (_, y0, x0), (_, y1, x1) = boxes[0]
    quantized = dtype == "uint8"
    write_wait = 0.0
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        sections = _Sections(vol, (y0, x0), (y1, x1), min(b[0][0] for b in boxes),
                             max(b[1][0] for b in boxes), reader)
        writing = None
        for k, (slab, (box_lo, box_hi)) in enumerate(zip(slabs, boxes)):
            if k + 1 < len(slabs):  # the next slab's input, read while this one computes
                sections.prefetch(boxes[k + 1][1][0])
            keep_from = min(b[0][0] for b in boxes[k + 1:]) if k + 1 < len(slabs) else hi[2]
            image = sections.get(box_lo[0], box_hi[0], keep_from)
            # uint8 maps come back quantised (on the model's device)
            data = predict_block(predictors, image, box_lo, slab, dataset, geometry, tta=tta,
                                 stats=stats, quantized=quantized)
            if writing is not None:
                start = time.perf_counter()
                writing.result()
                write_wait += time.perf_counter() - start
            minpt = offset + np.asarray(slab[0][::-1])
            writing = writer.submit(write_block, out_vol, minpt, xyzc_from_czyx(data))
        start = time.perf_counter()
        if writing is not None:
            writing.result()
        write_wait += time.perf_counter() - start
    return len(slabs), {"input_wait_seconds": sections.waited,
                        "write_wait_seconds": write_wait}


def has_tissue(mask: str, mask_mip: int, bbox: Bbox, image_path: str, mip: int) -> bool:
    """Whether the mask layer holds a non-zero voxel in the block's physical region."""
    image = CloudVolume(image_path, mip=mip, progress=False)
    res = np.asarray(image.resolution, dtype=float)
    mvol = CloudVolume(mask, mip=mask_mip, fill_missing=True, bounded=False, progress=False)
    mres = np.asarray(mvol.resolution, dtype=float)
    lo = np.floor(np.asarray(bbox.minpt) * res / mres).astype(int)
    hi = np.maximum(np.ceil(np.asarray(bbox.maxpt) * res / mres).astype(int), lo + 1)
    return bool(np.any(mvol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]))


# ---------------------------------------------------------------------------------------------
# The stage of a plan


#: patch FLOP/s (2 x conv multiply-adds) that one task reaches, by hardware class and preset,
#: for --dry-run's hours. CPU: measured on the demo's run (`deepem3d demo`: small preset, one
#: thread per task, two tasks side by side on this project's 2-core machine, the CPU inference
#: form, freed pages reused: 30 forwards of 992 px, 38.1 G multiply-adds each, in 31.4 task
#: seconds with the tasks' I/O: 73 GFLOP/s). GPU: the patch grid on an NVIDIA H200 (torch
#: 2.11, float16 autocast, deterministic cuDNN, 512 px patches, batch 4, 30 ISBI sections):
#: small 2.4 TFLOP/s (7.6 Mvoxel/s), full 13.5 TFLOP/s (4.7 Mvoxel/s) against 767 TFLOP/s of
#: the same run's float16 matmul; the default tiles' rate is the `--dry-run's rate` row of
#: `python benchmarks/gpu.py --parts inference`, not yet run on a GPU. Presets not measured
#: take the small one's figure.
EFFECTIVE_FLOPS = {"cpu": {"small": 73e9}, "gpu": {"small": 2.4e12, "full": 13.5e12}}


def _mean_task_seconds(plan: InferencePlan, hardware: str) -> float:
    """Seconds of a task's forward passes, on average (every patch, every TTA variant)."""
    rates = EFFECTIVE_FLOPS[hardware]
    seconds = sum(2.0 * count_macs(m.meta["model"], plan.geometry.size)
                  / rates.get(m.meta["model"].get("preset"), rates["small"])
                  for m in plan.models)
    return seconds * plan.patches * plan.tta / max(plan.task_count, 1)


def count_macs(config: dict, size: int) -> int:
    from deepem3d.models.network import count_macs as macs

    return macs(config, size)


def inference_stage(plan: InferencePlan, *, overwrite: bool = False) -> Stage:
    """The inference stage of a plan: one InferenceTask per output block."""

    import torch

    device = device_class(plan.device)
    torch_version = torch_release()

    def run_key(torch_version: str) -> str:
        # the blocks are part of the run: a run over wider bounds is another run
        return digest({**plan.values(), "device": device, "torch": torch_version,
                       "threads": plan.threads, "amp": plan.amp,
                       "task_shape": list(plan.task_shape), "bounds": bounds_list(plan.bounds),
                       "blocks": [bounds_list(plan.blocks[0]), len(plan.blocks)]})

    key = run_key(torch_version)
    # a run planned before runs recorded the release alone holds the full version in its key:
    # it is the same run, resumed, not another
    legacy = run_key(str(torch.__version__))
    if legacy != key and Markers(plan.output_path, "inference").current_key() == legacy:
        key = legacy
    common = dict(
        image_path=plan.image_path, output_path=plan.output_path,
        models=[m.to_json() for m in plan.models], mip=plan.mip, tta=plan.tta,
        patch=plan.geometry.to_dict(), dtype=plan.dtype, fill_missing=plan.fill_missing,
        threads=plan.threads, device=device, amp=plan.amp, mask=plan.mask,
        mask_mip=plan.mask_mip, torch_version=torch_version,
    )

    def make_tasks() -> Iterator[tuple[str, partial]]:
        for block in plan.blocks:
            yield block_id(block), partial(InferenceTask, bounds=bounds_list(block), **common)

    def prepare() -> None:
        if not plan.output_exists:
            create_layer(
                plan.output_path, layer_type="image", dtype=plan.dtype,
                resolution=plan.resolution, size=plan.size, voxel_offset=plan.voxel_offset,
                chunk_size=plan.chunk_size, num_channels=plan.channels, overwrite=overwrite,
                provenance=provenance(plan), sharding=plan.sharding,
            )
        elif Markers(plan.output_path, STAGE).current_key() != key:
            # another run over the layer (other bounds, threads, device): said beside the
            # first's record, not left to it
            record_provenance(open_layer(plan.output_path), provenance(plan))

    hardware = "gpu" if device == "cuda" else "cpu"
    voxels = math.prod(int(s) for s in plan.bounds.size3())
    return Stage(
        name=STAGE, layer=plan.output_path, key=key,
        parameters={**plan.parameters(), "device": device, "torch": torch_version},
        make_tasks=make_tasks, task_count=plan.task_count, memory_bytes=plan.memory_bytes,
        hardware=hardware, seconds_per_task=_mean_task_seconds(plan, hardware),
        output_bytes=voxels * plan.channels * np.dtype(plan.dtype).itemsize, prepare=prepare,
    )


def provenance(plan: InferencePlan) -> dict:
    return {
        **plan.parameters(),
        "models": [
            {"location": m.location, "sha256": m.sha256, "model": m.meta.get("model"),
             "resolution": m.meta.get("resolution")}
            for m in plan.models
        ],
        "combine": COMBINE[plan.head] if len(plan.models) > 1 else None,
        "value": "round(255 * p)" if plan.dtype == "uint8" else "p",
        "segmentation": plan.segmentation,
        "devices": "each task records its device, threads and precision in its marker, "
                   f"tasks/{STAGE}/done/<block>.json",
    }
