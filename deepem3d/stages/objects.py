"""What meshes and skeletons share: a segmentation at a mip, igneous's tasks, and an info that
names a product's directory only once the product is written.

Both products are made by igneous in two stages (forge fragments per block, then merge them
per segment), at a mip near isotropy. Two pieces of bookkeeping are shared:

- **Naming.** igneous finds a product's own info (`mesh/info`: its mip, spatial index,
  sharding) through the segmentation's info key (`mesh`, `skeletons`); without the key
  CloudVolume hands it a default one. Neuroglancer asks for a product as soon as the key is
  there, and shows nothing where files are missing. So the stored info names the directory
  only once the merge is complete (`set_info_name`), while igneous, in the runner (task
  creation) and in the worker (`MarkedTask(..., names=...)`), reads the info through
  `storage.layers.info_naming`, which adds the key in memory for that layer only.
- **Sharding.** Sharded merges find each segment's fragments through the spatial index that
  the forge writes: sharded without a spatial index is refused before anything runs.

A product has one forge stage (`mesh-forge`, `skeleton-forge`) whose key covers every setting,
the mip included: a run of other settings deletes the product's files before it forges (the
merge would take in the fragments of the earlier settings). Products deepem3d did not make
are never deleted: files in the product's directory, with no forge or merge run of deepem3d
recorded on the layer, or an info key naming another directory, are refused when the run is
planned (`check_products`), before anything is written.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from cloudfiles import CloudFiles

from deepem3d.errors import InputError
from deepem3d.stages.frame import Markers, Stage, digest, marked
from deepem3d.storage.layers import cloudpath, info_naming, open_layer, put_info

if TYPE_CHECKING:
    from cloudvolume import CloudVolume

#: the voxel size products are made at, when no mip is given: the first mip whose in-plane
#: resolution reaches this fraction of z (near isotropic; EM sections are thick)
ISOTROPY = 0.3


def near_isotropic_mip(vol: CloudVolume) -> int:
    """The first mip whose in-plane resolution reaches ISOTROPY of its z resolution; with
    none, the coarsest mip the layer has."""
    for mip in vol.available_mips:
        x, y, z = (float(r) for r in vol.meta.resolution(mip))
        if min(x, y) >= ISOTROPY * z:
            return mip
    return max(vol.available_mips)


def segmentation_at(layer_path: str, mip: int | None, product: str, noun: str
                    ) -> tuple[str, CloudVolume, int]:
    """(normalised layer path, the layer, the mip) after checking that the layer is a
    segmentation and has the mip (default: the first near-isotropic one). `product` and
    `noun` spell it in messages: "meshes", "mesh"."""
    layer_path = cloudpath(layer_path).rstrip("/")
    vol = open_layer(layer_path)
    if vol.layer_type != "segmentation":
        raise InputError(f"{layer_path} is an {vol.layer_type} layer: {product} are made of a "
                         "segmentation layer")
    if mip is None:
        mip = near_isotropic_mip(vol)
    if mip not in vol.available_mips:
        raise InputError(f"{noun} mip {mip} does not exist in {layer_path} (its mips: "
                         f"{', '.join(map(str, vol.available_mips))}): downsample it first or "
                         "pick one of those")
    return layer_path, vol, mip


@dataclass
class ObjectPlan:
    """Where and how a product is forged, worked out from the layer's info alone."""

    layer_path: str
    mip: int
    task_shape: tuple[int, int, int]
    task_count: int
    resolution: tuple[float, float, float]
    sharded: bool = False
    spatial_index: bool = False
    #: voxels of the layer at `mip` (the unsharded merge's task count follows from it)
    voxels: int = 0
    #: the forge reads missing chunks as zeros (meshes only: CloudVolume's renumbering read,
    #: which igneous's SkeletonTask uses, fails on a missing chunk, cloud-volume 12.15.2)
    fill_missing: bool = False

    #: spelled by subclasses: the forge task's name, what the merge makes, where; the stage
    #: names' prefix, the info key and the product in messages ("mesh", "mesh", "meshes")
    TASK = ""
    MERGED = ("", "")  # (unsharded, sharded)
    DIRECTORY = ""
    KIND = ""
    INFO_KEY = ""
    PRODUCT = ""

    def describe(self) -> str:
        shape = " x ".join(map(str, self.task_shape))
        res = "x".join(f"{r:g}" for r in self.resolution)
        return (f"{self.task_count} {self.TASK}(s) of {shape} voxels at mip {self.mip} ({res} "
                f"nm), then their merge into {self.MERGED[self.sharded]} under "
                f"{self.layer_path}/{self.DIRECTORY}")

    def check_products(self) -> None:
        """Refuse (InputError) products of the layer that deepem3d did not make: the run
        would delete or unname them. Called where the run is planned, on the layer written."""
        check_products(self.layer_path, self.KIND, self.INFO_KEY, self.DIRECTORY,
                       self.PRODUCT)


_PlanT = TypeVar("_PlanT", bound=ObjectPlan)  # plan_objects returns the subclass it is given


def plan_objects(cls: type[_PlanT], layer_path: str, mip: int | None,
                 task_shape: Sequence[int] | None, default_shape: Sequence[int],
                 sharded: bool, spatial_index: bool | None, product: str, noun: str,
                 fill_missing: bool = False, **extra: Any) -> _PlanT:
    """A `cls` plan after checking the layer, its mip and the sharding. Reads the info only."""
    layer_path, vol, mip = segmentation_at(layer_path, mip, product, noun)
    index = spatial_index_for(product, sharded, spatial_index)
    size = [int(s) for s in vol.meta.volume_size(mip)]
    shape = tuple(min(int(t), s) for t, s in zip(task_shape or default_shape, size))
    count = math.prod(-(-s // t) for s, t in zip(size, shape))
    resolution = tuple(float(r) for r in vol.meta.resolution(mip))
    return cls(layer_path, mip, shape, count, resolution, sharded, index, math.prod(size),
               fill_missing, **extra)


#: voxels per segment at the mip meshes and skeletons are made at, for planning their merge:
#: the demo's segmentation at mip 2 (128 x 128 x 30 voxels) has 1,753 meshed segments
VOXELS_PER_SEGMENT = 280
#: segments one task of an unsharded merge should take (it lists its prefix's fragments)
SEGMENTS_PER_MERGE_TASK = 2000


def prefix_digits(voxels: int) -> int:
    """How many leading digits of a segment id split an unsharded merge into tasks (igneous's
    `magnitude`: 10**digits - 1 tasks): 1 for up to about 5 million voxels, then one more per
    factor of ten, at most igneous's default 3 (999 tasks). A small volume no longer makes
    999 tasks that each list the same few files."""
    tasks = voxels / VOXELS_PER_SEGMENT / SEGMENTS_PER_MERGE_TASK
    return min(3, max(1, math.ceil(math.log10(tasks + 1))))


def spatial_index_for(product: str, sharded: bool, spatial_index: bool | None) -> bool:
    """Whether the forge writes a spatial index: on for sharded products (their merge needs
    it), off otherwise unless asked for."""
    if sharded and spatial_index is False:
        raise InputError(f"sharded {product} need the spatial index: igneous's sharded merge "
                         "finds each segment's fragments through it (drop --no-spatial-index "
                         "/ `spatial_index: false`)")
    return bool(sharded or spatial_index)


def set_info_name(layer_path: str, key: str, directory: str | None) -> None:
    """Name (or, with None, stop naming) a product's directory in the stored info."""
    files = CloudFiles(layer_path)
    info = files.get_json("info")
    if directory is None:
        if key not in info:
            return
        info.pop(key)
    elif info.get(key) == directory:
        return
    else:
        info[key] = directory
    put_info(layer_path, info)


def made_here(layer_path: str, kind: str, mips: int) -> bool:
    """Whether a forge or merge run of `kind` is recorded on the layer (before the forge
    stage's key covered the mip, its name did: `mesh-forge-mip2`)."""
    names = [f"{kind}-forge", f"{kind}-merge", *(f"{kind}-forge-mip{m}" for m in range(mips))]
    return any(Markers(layer_path, name).run_record() is not None for name in names)


def check_products(layer_path: str, kind: str, info_key: str, directory: str,
                   product: str) -> None:
    """An InputError for what the run's prepare would delete or unname and deepem3d did not
    make: files under `directory` with no run of `kind` recorded on the layer (igneous's
    meshes in mesh/), or an info key naming another directory (deepem3d names only its own)."""
    files = CloudFiles(layer_path)
    info = files.get_json("info") or {}
    named = str(info.get(info_key) or directory).rstrip("/")
    if named != directory:
        raise InputError(f"{layer_path}/info names {product} in {named}/ that deepem3d did "
                         f"not make, and this run would unname them: remove the info's "
                         f"\"{info_key}\" key first (their files are left as they are)")
    # igneous writes DIR/info as its task creation starts: a first run stopped before it
    # recorded itself leaves that file alone, which is no product
    held = next((k for k in files.list(prefix=f"{directory}/") if k != f"{directory}/info"),
                None)
    if held is not None and not made_here(layer_path, kind, len(info.get("scales", []))):
        raise InputError(f"{layer_path}/{directory} holds files that no {kind} run of "
                         f"deepem3d made (none is recorded under {layer_path}/tasks), and "
                         f"this run would delete them: move or delete them first")


@contextlib.contextmanager
def creating(layer_path: str, names: dict[str, str]) -> Iterator[None]:
    """Around an igneous task-creation function: the info named in memory, its progress bars
    and prints kept off the terminal, and the stored info as it was (igneous commits the key
    it set when the key was missing)."""
    before = CloudFiles(layer_path).get_json("info")
    with info_naming(layer_path, names), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        yield
    for key in names:
        set_info_name(layer_path, key, before.get(key))


#: ObjectStages' kinds: their stages are KIND-forge and KIND-merge
OBJECT_KINDS = ("mesh", "skeleton")


def outdate_objects(layer_path: str, above_mip: int) -> None:
    """Mark the meshes and skeletons made of the layer's levels above `above_mip` outdated
    (those levels are being replaced): their next run makes them again, deleting the old
    files first, though their settings did not change."""
    for kind in OBJECT_KINDS:
        forged = Markers(layer_path, f"{kind}-forge")
        if int(forged.parameters().get("mip", 0)) > above_mip:
            forged.outdate()


@dataclass
class ObjectStages:
    """What the forge and merge stages of one product declare; `forge` and `merge` create
    igneous's tasks (called once, lazily, when the stage is started)."""

    kind: str  # "mesh" or "skeleton": the stage names and labels
    info_key: str  # the segmentation info's key for the product: "mesh", "skeletons"
    directory: str
    product: str  # in messages: "meshes", "skeletons"
    layer_path: str
    parameters: dict  # the mip among them: the forge's key covers it
    forge: Callable[[], Iterable]
    merge: Callable[[], Iterable]
    forge_count: int
    merge_count: int
    forge_memory: int
    merge_memory: int
    forge_seconds: float

    def stages(self, needs: tuple[str, ...] = ()) -> list[Stage]:
        names = {self.info_key: self.directory}
        merge_key = digest({**self.parameters, "merge": 1})

        def prepare() -> None:
            """Before the forge: a product already merged by this same run stays named; one
            of other settings (another mip, task shape, sharding) is removed with its files,
            whose fragments the merge would otherwise take in. One that deepem3d did not
            make is refused (planning refused it already, unless it came since)."""
            check_products(self.layer_path, self.kind, self.info_key, self.directory,
                           self.product)
            merged = Markers(self.layer_path, f"{self.kind}-merge")
            if (merged.current_key() == merge_key and merged.is_complete()
                    and forge.markers.current_key() == forge.key):
                return
            set_info_name(self.layer_path, self.info_key, None)
            if forge.markers.current_key() != forge.key:
                # the merge's record goes first: it would stand, complete, for files deleted
                # here (a run of other settings stopped, then these settings again)
                merged.reset()
                files = CloudFiles(self.layer_path)
                stale = list(files.list(prefix=f"{self.directory}/"))
                if stale:
                    files.delete(stale)

        forge = Stage(
            name=f"{self.kind}-forge", layer=self.layer_path,
            key=digest(self.parameters), parameters=self.parameters,
            make_tasks=self._created(self.forge, names), task_count=self.forge_count,
            memory_bytes=self.forge_memory, needs=needs, label=f"{self.kind} forge",
            seconds_per_task=self.forge_seconds,
            prepare=prepare,
        )
        merge = Stage(
            name=f"{self.kind}-merge", layer=self.layer_path,
            key=merge_key, parameters=self.parameters,
            make_tasks=self._created(self.merge, names), task_count=self.merge_count,
            memory_bytes=self.merge_memory, needs=(forge.label,), label=f"{self.kind} merge",
            finish=lambda: set_info_name(self.layer_path, self.info_key, self.directory),
        )
        return [forge, merge]

    def _created(self, create: Callable[[], Iterable], names: dict[str, str]):
        """A stage's make_tasks: igneous's tasks, created once with the info named in memory,
        each wrapped in MarkedTask with the same names for the worker."""
        tasks: list = []
        in_worker = {"layer": self.layer_path, "info": names}

        def make_tasks() -> Iterator[tuple[str, partial]]:
            if not tasks:
                with creating(self.layer_path, names):
                    tasks.extend(marked(task, in_worker) for task in create())
            return iter(tasks)

        return make_tasks
