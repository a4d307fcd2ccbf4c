"""Seam-free sliding-window inference: a pure function from an image region to one block's map.

No I/O here: the inference task (deepem3d.stages.inference) reads the region this module asks
for, calls `predict_block` and writes the result; `predict_volume` is the same call on a whole
in-memory array. Why a chunked run gives the whole-array result bit for bit (docs/design.md, "Why
chunked results equal whole-volume results"):

- Patches lie on one grid per axis, a function of the DATASET's size alone (`grid_starts`),
  never of the block: a voxel is covered by the same patches whatever block it falls in.
- A patch reads `size` x `size` pixels around its `output` x `output` window (the margin is
  context the model sees but whose predictions are dropped), `in_sections` sections around its
  section. Outside the dataset the input is the dataset reflected at its own bounds (never at a
  block's), so a patch's input is the same in every task.
- The model runs on batches of a fixed size (the last one padded with zeros): on one device
  and thread setting, a patch's floats do not depend on its slot in the batch, but batches of
  other sizes differ in the last bits.
- Each voxel's value is sum_k(w_k * p_k) / sum_k(w_k) over the patches k covering it, summed
  in the patches' global order (section, then y, then x), with the same window weights w.

Test-time augmentation runs each patch in 1, 8 or 16 dihedral variants (in-plane rotations and
flips, x z-reversal), undoes each and averages. Affinities also need their offsets restored:
after a flip, channel x of the undone map at v is the affinity of v with v + e_x, which is
channel x at v + e_x; after a z-reversal the z channel of section s is the affinity with s + 1,
which is section s + 1's z channel (so a block's first section takes it from the variant run
on the section below). `affinity_channel_fix` derives the in-plane part from `dihedral`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

# the one quantiser (round(255 * p), float64), re-exported for the map writer's importers
from deepem3d.segmentation.maps import quantize

if TYPE_CHECKING:
    import torch

# torch (and deepem3d.models, which imports it) are imported where they are used, so the CLI
# and workers that never predict start without loading torch.

WINDOWS: tuple[str, ...] = ("gaussian", "bump")
TTA_CHOICES: tuple[int, ...] = (1, 8, 16)
#: the largest patch (in-plane px) and batch a plan takes: far past any device's memory, and
#: below what numpy's and torch's index arithmetic holds
MAX_PATCH_SIZE = 2**15
MAX_BATCH = 2**15
HEAD_CHANNELS = {"boundary": 1, "affinity": 3}
WINDOW_FLOOR = 1e-3  # MONAI's floor: every pixel of a window keeps a positive weight
GAUSSIAN_SIGMA = 0.125  # sigma as a fraction of the window (MONAI's and nnU-Net's default)

Triple = tuple[int, int, int]
Box = tuple[Triple, Triple]  # ((z0, y0, x0), (z1, y1, x1)), end exclusive, dataset voxels


class Predictor(Protocol):
    """What the sliding window calls: (B, in_sections, S, S) raw input -> (B, C, S, S) float32
    probabilities for the middle section. `head` is 'boundary' (C = 1) or 'affinity' (C = 3,
    channels x, y, z: affinity of v with v - e_c)."""

    in_sections: int
    head: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass
class FunctionPredictor:
    """Any function as a Predictor (tests use one that returns the affinities of label input)."""

    fn: Callable[[np.ndarray], np.ndarray]
    in_sections: int
    head: str = "boundary"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(batch), dtype=np.float32)


AMP_DTYPES: tuple[str, ...] = ("float16", "bfloat16")


class ModelPredictor:
    """A DeepEM3DNet as a Predictor: normalise uint8 input, forward, probabilities.

    On CUDA the forward runs under autocast (`amp_dtype`, float16 unless told) unless
    `amp=False`, with cuDNN's deterministic algorithms and no autotuning unless `autotune`
    (kernels chosen by timing differ between processes, and so may the last bits of the
    output: docs/gpu.md); `channels_last` stores the 2D part's activations channels-last. On
    the CPU it runs in float32 with whatever thread count the caller set, on the model's
    inference form unless `fused=False` (`deepem3d.models.inference_form`: the same function
    to float32 rounding, about 2-3x faster there).
    """

    def __init__(
        self, model: torch.nn.Module, device: str | torch.device | None = None,
        amp: bool | None = None, *, amp_dtype: str = "float16", channels_last: bool = False,
        autotune: bool = False, fused: bool | None = None,
    ) -> None:
        import torch

        from deepem3d.models.inference_form import inference_form

        if amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp dtype {amp_dtype!r}: choose one of {', '.join(AMP_DTYPES)}")
        self.model = model.eval()
        here = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else here
        if self.device != here:
            self.model.to(self.device)
        self.fused = self.device.type == "cpu" if fused is None else bool(fused)
        if self.fused:
            self.model = inference_form(self.model)
        if channels_last:  # the 2D convs' weights; their outputs follow (the 3D part stays)
            for module in self.model.modules():
                if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                    module.weight.data = module.weight.data.contiguous(
                        memory_format=torch.channels_last)
        self.in_sections = int(model.in_sections)
        self.head = str(model.head)
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        self.amp_dtype = getattr(torch, amp_dtype)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = not autotune
            torch.backends.cudnn.benchmark = bool(autotune)

    def predict_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, in_sections, S, S) uint8 on the model's device -> (B, C, S, S) float32 there."""
        import torch

        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                             enabled=self.amp):
            probs = self.model.probabilities(self.model(self.model.normalize(batch[:, None])))
        return probs.float()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        return self.predict_tensor(x).cpu().numpy()


@dataclass(frozen=True)
class PatchGeometry:
    """How patches tile a section.

    size: network input per patch, in-plane, square (a multiple of the model's divisor, 16).
    output: the window in its middle that the patch contributes; (size - output) / 2 pixels
        on each side are context only. The exact receptive field (230 px) need not fit: the
        grid, not the context, is what makes the result seam-free.
    overlap: pixels shared by neighbouring output windows, blended by `window`.
    batch: patches per forward pass (fixed: part of the determinism contract).
    """

    size: int = 512
    output: int = 384
    overlap: int = 64
    batch: int = 4
    window: str = "gaussian"

    @property
    def margin(self) -> int:
        return (self.size - self.output) // 2

    @property
    def stride(self) -> int:
        return self.output - self.overlap

    def check(self, divisor: int = 16) -> None:
        """Raise ValueError naming the fix for a geometry the sliding window cannot use."""
        if self.size < divisor or self.size % divisor:
            raise ValueError(f"patch size {self.size} must be a positive multiple of {divisor}")
        if self.size > MAX_PATCH_SIZE:
            raise ValueError(f"patch size {self.size} must be at most {MAX_PATCH_SIZE}")
        if not 0 < self.output <= self.size or (self.size - self.output) % 2:
            raise ValueError(f"patch output {self.output} must be at most the patch size "
                             f"{self.size} and differ from it by an even number")
        if not 0 <= self.overlap < self.output:
            raise ValueError(f"overlap {self.overlap} must be at least 0 and less than the "
                             f"patch output {self.output}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise ValueError(f"batch size {self.batch} must be from 1 to {MAX_BATCH}")
        if self.window not in WINDOWS:
            raise ValueError(f"window {self.window!r}: choose one of {', '.join(WINDOWS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def abutting_tiles(extent: int, context: int, *, divisor: int = 16, step: int = 16,
                   tile: int = 2048, batch: int = 1, window: str = "gaussian") -> PatchGeometry:
    """Abutting output tiles of `tile` px rounded up to a multiple of `step` (which the caller
    makes a multiple of the chunk size and of the model's divisor), cut down to the volume's
    in-plane `extent`, each read with a margin of `context` rounded up to `divisor`: every
    voxel sees the whole receptive field and is computed once. A tile that covers the whole
    extent has no chunk border to align with and is cut to the extent rounded up to `divisor`
    (chunks of 128 x 100 px make `step` 3200: a 200 x 100 layer paid for a 3200 px tile)."""
    margin = -(-context // divisor) * divisor
    output = min(-(-tile // step) * step, -(-extent // step) * step)
    if output >= extent:
        output = min(output, -(-extent // divisor) * divisor)
    return PatchGeometry(size=output + 2 * margin, output=output, overlap=0, batch=batch,
                         window=window)


def grid_starts(length: int, geometry: PatchGeometry) -> list[int]:
    """Output-window starts along one dataset axis, a function of the dataset alone, never of
    a block. Overlapping windows (overlap > 0): every `stride` from 0, the last one moved back
    to end at the dataset's end. Abutting tiles (overlap 0): every `output` from 0, the last
    one running past the end (its input there is the reflected dataset, its output dropped),
    so no voxel is computed twice and none is blended."""
    if geometry.overlap == 0:
        return list(range(0, length, geometry.output))
    last = max(length - geometry.output, 0)
    return list(range(0, last, geometry.stride)) + [last]


def touching(length: int, lo: int, hi: int, geometry: PatchGeometry) -> list[int]:
    """The grid starts whose output window overlaps [lo, hi)."""
    return [s for s in grid_starts(length, geometry) if s < hi and s + geometry.output > lo]


def window(geometry: PatchGeometry) -> np.ndarray:
    """(output, output) float32 blending weights, maximum 1, floor WINDOW_FLOOR; all ones for
    abutting tiles (p * 1 / 1 is p exactly: a tile's map is the network's, unblended)."""
    n = geometry.output
    if geometry.overlap == 0:
        return np.ones((n, n), dtype=np.float32)
    i = np.arange(n, dtype=np.float64)
    if geometry.window == "gaussian":
        sigma = GAUSSIAN_SIGMA * n
        w = np.exp(-0.5 * ((i - (n - 1) / 2) / sigma) ** 2)
    elif geometry.window == "bump":  # chunkflow's bump: exp(-1 / (1 - t^2)), t in (-1, 1)
        t = (2 * i + 1) / n - 1
        w = np.exp(1 - 1 / (1 - t**2))
    else:
        raise ValueError(f"window {geometry.window!r}: choose one of {', '.join(WINDOWS)}")
    w2 = np.outer(w, w)
    w2 /= w2.max()
    return np.maximum(w2, WINDOW_FLOOR).astype(np.float32)


def tta_variants(tta: int) -> tuple[int, ...]:
    """The dihedral variants (see augment.dihedral) of 1, 8 (in-plane) or 16 (x z-reversal)."""
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {', '.join(map(str, TTA_CHOICES))}, not {tta}")
    return tuple(range(tta)) if tta > 1 else (0,)


def affinity_channel_fix(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """For variant k, how to read the x and y affinity channels back from an undone map:
    ((source channel, shift) for x, (source channel, shift) for y). Shift 1: the value for v
    is the source channel at v - e_c (the variant predicted the affinity with v + e_c).

    Derived from `dihedral` itself: follow where a pixel's -e_c' neighbour in the variant's
    frame came from in the original frame.
    """
    from deepem3d.models.augment import dihedral

    n = 5
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    coords = np.stack([yy, xx])[:, None]  # (2, z=1, y, x): original (y, x) of every pixel
    moved = dihedral(coords, k % 8)[:, 0]  # variant frame: original coords at each pixel
    centre = moved[:, 2, 2]
    fix: dict[int, tuple[int, int]] = {}
    for src, step in ((0, (2, 1)), (1, (1, 2))):  # channel x: neighbour at x - 1; y: y - 1
        delta = moved[:, step[0], step[1]] - centre  # original (dy, dx) of that neighbour
        axis = 0 if delta[1] != 0 else 1  # which original channel it is: x (0) or y (1)
        sign = int(delta[1] if axis == 0 else delta[0])
        fix[axis] = (src, 0 if sign < 0 else 1)
    return fix[0], fix[1]


def _reflect(coords: np.ndarray, length: int) -> np.ndarray:
    """Indices into [0, length) of coordinates reflected at the bounds (numpy's 'reflect')."""
    if length == 1:
        return np.zeros_like(coords)
    period = 2 * (length - 1)
    r = np.mod(coords, period)
    return np.where(r >= length, period - r, r)


@dataclass
class _Plan:
    """Everything predict_block needs about one predictor and one block, in dataset voxels."""

    half: int
    extra: int  # 1 when the section below the block is needed (affinity z-reversal)
    ys: list[int]
    xs: list[int]
    z_range: tuple[int, int]  # unreflected input coordinates, end exclusive
    y_range: tuple[int, int]
    x_range: tuple[int, int]


def _plan(predictor: Predictor, block: Box, shape: Triple, geometry: PatchGeometry,
          variants: Sequence[int]) -> _Plan:
    (z0, y0, x0), (z1, y1, x1) = block
    half = (int(predictor.in_sections) - 1) // 2
    extra = int(predictor.head == "affinity" and any(k >= 8 for k in variants))
    ys = touching(shape[1], y0, y1, geometry)
    xs = touching(shape[2], x0, x1, geometry)
    m, s = geometry.margin, geometry.size
    return _Plan(half, extra, ys, xs, (z0 - extra - half, z1 + half),
                 (ys[0] - m, ys[-1] - m + s), (xs[0] - m, xs[-1] - m + s))


def _check_block(block: Box, shape: Triple) -> None:
    lo, hi = block
    if any(not 0 <= a < b <= n for a, b, n in zip(lo, hi, shape)):
        raise ValueError(f"block {block} is empty or outside a dataset of shape {shape}")


def input_box(
    predictors: Sequence[Predictor] | Predictor, block: Box, dataset_shape: Triple,
    geometry: PatchGeometry, tta: int = 1,
) -> Box:
    """The part of the dataset (z,y,x, end exclusive) that `predict_block` reads for `block`:
    its patches' input, reflected back into the dataset where it falls outside."""
    predictors = _as_list(predictors)
    _check_block(block, dataset_shape)
    variants = tta_variants(tta)
    lo, hi = list(dataset_shape), [0, 0, 0]
    for predictor in predictors:
        plan = _plan(predictor, block, dataset_shape, geometry, variants)
        for axis, (a, b) in enumerate((plan.z_range, plan.y_range, plan.x_range)):
            idx = _reflect(np.arange(a, b), dataset_shape[axis])
            lo[axis] = min(lo[axis], int(idx.min()))
            hi[axis] = max(hi[axis], int(idx.max()) + 1)
    return (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2])


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class Stats:
    """What a prediction did, for markers and benchmarks."""

    patches: int = 0  # forward-pass items (patch x variant), padding slots excluded
    batches: int = 0
    padded_slots: int = 0
    predict_seconds: float = 0.0  # inside the predictor (the model's forward pass)
    seconds: float = 0.0  # the whole call


def _device_of(predictor: Predictor) -> torch.device:
    import torch

    return getattr(predictor, "device", None) or torch.device("cpu")


def _forward(predictor: Predictor, inputs: torch.Tensor) -> torch.Tensor:
    """The predictor on a batch on its device: tensors stay there for a ModelPredictor, any
    other Predictor gets and returns numpy."""
    import torch

    if hasattr(predictor, "predict_tensor"):
        return predictor.predict_tensor(inputs)
    out = predictor(inputs.cpu().numpy())
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(inputs.device)


#: unsigned image dtypes torch cannot flip or rotate (the TTA variants), widened exactly
WIDENED = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64,
           np.dtype(np.uint64): np.float64}


def _predict_one(
    predictor: Predictor, image: np.ndarray, origin: Triple, block: Box, shape: Triple,
    geometry: PatchGeometry, variants: Sequence[int], stats: Stats,
) -> Iterator[torch.Tensor]:
    """One predictor's map of the block, section by section in order, each float32 (C, y, x)
    on the predictor's device: gathering, variants, undoing them and blending all run there
    (torch ops, each the same float32 operation in the same order as the numpy they
    replaced). Sections are yielded as they complete, so a block never holds its whole float
    map."""
    import torch

    from deepem3d.models.augment import dihedral, undo_dihedral

    device = _device_of(predictor)
    plan = _plan(predictor, block, shape, geometry, variants)
    (z0, y0, x0), (z1, y1, x1) = block
    # the block's input, reflected at the dataset's bounds: one gather, then patches are slices
    region = torch.from_numpy(np.ascontiguousarray(
        image, dtype=WIDENED.get(np.dtype(image.dtype), image.dtype))).to(device)
    for axis, (a, b) in enumerate((plan.z_range, plan.y_range, plan.x_range)):
        idx = _reflect(np.arange(a, b), shape[axis]) - origin[axis]
        if idx.min() < 0 or idx.max() >= image.shape[axis]:
            raise ValueError(f"the image (shape {image.shape} at {origin}) does not cover the "
                             f"input of block {block}: read input_box(...) first")
        region = region.index_select(axis, torch.from_numpy(idx).to(device))
    rz, ry, rx = plan.z_range[0], plan.y_range[0], plan.x_range[0]

    head, half, m = predictor.head, plan.half, geometry.margin
    size, out_w, count = geometry.size, geometry.output, len(variants)
    channels = HEAD_CHANNELS[head]
    affinity = head == "affinity"
    fixes = {k: affinity_channel_fix(k) for k in variants} if affinity else {}
    weights = torch.from_numpy(window(geometry)).to(device)
    patches = [(py, px) for py in plan.ys for px in plan.xs]
    last_variant = variants[-1]

    def jobs() -> Iterator[tuple[int, tuple[int, int], int]]:
        for s in range(z0 - plan.extra, z1):
            ks = variants if s >= z0 else [k for k in variants if k >= 8]
            for p in patches:
                for k in ks:
                    yield s, p, k

    f32 = {"dtype": torch.float32, "device": device}
    acc: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}
    num = torch.zeros((channels, y1 - y0, x1 - x0), **f32)
    den = torch.zeros((y1 - y0, x1 - x0), **f32)
    done_in_section = 0
    inner = slice(m, m + out_w)

    def add(key: tuple[int, tuple[int, int]], channel: slice | int, value: torch.Tensor) -> None:
        if key not in acc:
            acc[key] = torch.zeros((channels, out_w, out_w), **f32)
        acc[key][channel] += value

    inputs = torch.zeros((geometry.batch, predictor.in_sections, size, size),
                         dtype=region.dtype, device=device)
    for batch in _batched(jobs(), geometry.batch):
        inputs.zero_()
        for i, (s, (py, px), k) in enumerate(batch):
            stack = region[s - half - rz: s + half + 1 - rz,
                           py - m - ry: py - m - ry + size, px - m - rx: px - m - rx + size]
            inputs[i] = dihedral(stack, k)
        start = time.perf_counter()
        probs = _forward(predictor, inputs)
        stats.predict_seconds += time.perf_counter() - start
        stats.batches += 1
        stats.patches += len(batch)
        stats.padded_slots += geometry.batch - len(batch)
        if tuple(probs.shape) != (geometry.batch, channels, size, size):
            raise ValueError(f"the predictor returned shape {tuple(probs.shape)}, expected "
                             f"{(geometry.batch, channels, size, size)}")
        for i, (s, p, k) in enumerate(batch):
            pred = undo_dihedral(probs[i][:, None], k)[:, 0]  # (C, S, S), in-plane undone
            if affinity:
                for c, (src, shift) in enumerate(fixes[k]):
                    if s >= z0:
                        if c == 0:
                            add((s, p), 0, pred[src, inner, m - shift: m - shift + out_w])
                        else:
                            add((s, p), 1, pred[src, m - shift: m - shift + out_w, inner])
                # z: a z-reversed variant at s predicted the affinity of s and s + 1
                if k >= 8:
                    if s + 1 < z1:
                        add((s + 1, p), 2, pred[2, inner, inner])
                elif s >= z0:
                    add((s, p), 2, pred[2, inner, inner])
            elif s >= z0:
                add((s, p), slice(None), pred[:, inner, inner])
            if s < z0 or k != last_variant:
                continue
            # patch (s, p) is complete: blend it in, in the patches' global order
            prob = acc.pop((s, p)) / count
            py, px = p
            ay, by = max(py, y0), min(py + out_w, y1)
            ax, bx = max(px, x0), min(px + out_w, x1)
            src = (slice(ay - py, by - py), slice(ax - px, bx - px))
            dst = (slice(ay - y0, by - y0), slice(ax - x0, bx - x0))
            w = weights[src]
            num[(slice(None), *dst)] += prob[(slice(None), *src)] * w
            den[dst] += w
            done_in_section += 1
            if done_in_section == len(patches):
                yield num / den
                num.zero_()
                den.zero_()
                done_in_section = 0


def _as_list(predictors: Sequence[Predictor] | Predictor) -> list[Predictor]:
    if callable(predictors) and hasattr(predictors, "head"):
        return [predictors]  # type: ignore[list-item]
    return list(predictors)  # type: ignore[arg-type]


COMBINE = {
    "boundary": "voxel-wise maximum of boundary probability",
    "affinity": "voxel-wise mean of the affinities",
}


def combine(maps: Sequence[torch.Tensor], head: str) -> torch.Tensor:
    """Several models' maps (tensors on one device) as one (see COMBINE): boundary maps by
    DeepEM3D's maximum; affinities by their mean, which beat the minimum on the ISBI 2012
    validation sections (deepem3d/models/pretrained/README.md)."""
    import torch

    if len(maps) == 1:
        return maps[0]
    out = maps[0].clone()
    if head == "boundary":
        for other in maps[1:]:
            torch.maximum(out, other.to(out.device), out=out)
        return out
    for other in maps[1:]:
        out += other.to(out.device)
    out /= len(maps)
    return out


def quantize_tensor(p: torch.Tensor) -> torch.Tensor:
    """`quantize` on the tensor's own device: the same float64 scaling and half-to-even
    rounding, so the same bytes as quantize(p.cpu().numpy())."""
    import torch

    return torch.round(p.double().clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def predict_block(
    predictors: Sequence[Predictor] | Predictor,
    image: np.ndarray,
    image_origin: Triple,
    block: Box,
    dataset_shape: Triple,
    geometry: PatchGeometry,
    *,
    tta: int = 1,
    stats: Stats | None = None,
    quantized: bool = False,
) -> np.ndarray:
    """The block's map, float32 (C, z, y, x), the same floats whatever block it is cut from;
    with `quantized`, `quantize` of it, computed on the predictors' device (a GPU sends back
    one byte per value instead of four).

    image: z,y,x array (uint8 for a model) holding at least `input_box(...)` of the dataset,
        its first voxel at `image_origin` (dataset voxels).
    block: ((z0, y0, x0), (z1, y1, x1)) in dataset voxels; dataset_shape: (Z, Y, X).
    Several predictors (one head) are combined by `combine`.
    """
    predictors = _as_list(predictors)
    if not predictors:
        raise ValueError("give at least one predictor")
    heads = {p.head for p in predictors}
    if len(heads) != 1 or not heads <= set(HEAD_CHANNELS):
        raise ValueError(f"predictors must share one head (boundary or affinity), got {heads}")
    geometry.check()
    if image.ndim != 3:
        raise ValueError(f"expected a z,y,x image, got shape {image.shape}")
    _check_block(block, dataset_shape)
    variants = tta_variants(tta)
    head = heads.pop()
    if head == "affinity" and tta > 1 and geometry.margin < 1:
        raise ValueError("affinity test-time augmentation needs a patch margin of at least 1 "
                         "(patch size > patch output)")
    stats = stats if stats is not None else Stats()
    start = time.perf_counter()
    (z0, y0, x0), (z1, y1, x1) = block
    out = np.empty((HEAD_CHANNELS[head], z1 - z0, y1 - y0, x1 - x0),
                   dtype=np.uint8 if quantized else np.float32)
    sections = zip(*(_predict_one(p, image, tuple(image_origin), block, tuple(dataset_shape),
                                  geometry, variants, stats) for p in predictors), strict=True)
    for z, maps in enumerate(sections):  # the predictors advance together, section by section
        section = combine(maps, head)
        out[:, z] = (quantize_tensor(section) if quantized else section).cpu().numpy()
    stats.seconds += time.perf_counter() - start
    return out


def predict_volume(
    predictors: Sequence[Predictor] | Predictor, image: np.ndarray, geometry: PatchGeometry,
    *, tta: int = 1, stats: Stats | None = None, quantized: bool = False,
) -> np.ndarray:
    """One in-memory call over a whole z,y,x array: what every chunked run must reproduce."""
    shape = tuple(int(s) for s in image.shape)
    return predict_block(predictors, image, (0, 0, 0), ((0, 0, 0), shape), shape, geometry,
                         tta=tta, stats=stats, quantized=quantized)


def patch_count(dataset_shape: Triple, block: Box, geometry: PatchGeometry) -> int:
    """In-plane patches per section that a block computes (for plans and cost estimates)."""
    (_, y0, x0), (_, y1, x1) = block
    return (len(touching(dataset_shape[1], y0, y1, geometry))
            * len(touching(dataset_shape[2], x0, x1, geometry)))


__all__ = [
    "AMP_DTYPES", "COMBINE", "TTA_CHOICES", "WINDOWS", "FunctionPredictor", "ModelPredictor",
    "PatchGeometry", "Predictor", "Stats", "abutting_tiles", "affinity_channel_fix", "combine",
    "grid_starts", "input_box", "patch_count", "predict_block", "predict_volume", "quantize",
    "quantize_tensor", "touching", "tta_variants", "window",
]
