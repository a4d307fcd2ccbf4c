"""The stage frame: what every stage declares, and the one wrapper every task runs in.

A stage is a set of independent tasks that write one output layer (or files under it). Each
stage declares, as data (`Stage`):

- `name`: its folder under the layer, `LAYER/tasks/NAME/`;
- `key`: a digest of the parameters that define its output. Every task carries the key of the
  run that made it, and a task whose key is not the stage's current one (a task left on a queue
  by an earlier run since overwritten) refuses to write;
- `needs`: the stages that must be complete before its tasks are created;
- `tasks()`: a lazy iterator of its tasks that have no completion marker yet;
- `memory_bytes`: the peak memory of its largest task (for `--dry-run` and queue routing).

Every task runs inside `run_in_frame` (tasks are declared with `@stage_task`): skip when its
marker exists, refuse a stale key, reset the process's memory high-water mark, time the task,
write the marker with the task's own peak memory. A task that fails on bad input (InputError)
writes a failure record instead, which the runner reports and stops on: such a task fails the
same way on every retry.

Layout under `LAYER/tasks/NAME/`:

    run.json         {"key", "parameters"} of the current run (small: every task reads it)
    manifest.json    every task id of the stage
    done/ID.json     completion markers (seconds, peak memory, host, what the task counted)
    failed/ID.json   tasks that failed on an input error, with the one-line message
    errors/ID.json   the last error of a task that raised (written by the worker: an SQS
                     message cannot carry it)

A stage is complete when every id of its manifest has a marker. Queue counters are never used
for that (SQS's are approximate). Re-running a stage skips the tasks whose marker exists.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from cloudfiles import CloudFiles
from taskqueue import queueable
from taskqueue.lib import jsonify
from taskqueue.queueables import totask

from deepem3d.errors import InputError, ServiceUnavailable
from deepem3d.memory import peak_rss, reset_peak
from deepem3d.storage.layers import cloudpath, info_naming
from deepem3d.storage.paths import put_json_whole

if TYPE_CHECKING:
    from taskqueue.queueablefns import FunctionTask
    from taskqueue.registered_task import RegisteredTask

log = logging.getLogger("deepem3d.stages")

def digest(value: object) -> str:
    """A short, stable digest of plain JSON data (run keys, task ids)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


#: the run key Markers.outdate leaves: no stage's
OUTDATED = "outdated"


class Markers:
    """The bookkeeping files of one stage under `LAYER/tasks/NAME/`."""

    def __init__(self, layer_path: str, name: str):
        self.layer_path = cloudpath(layer_path).rstrip("/")
        self.name = name
        self.prefix = f"tasks/{name}"
        self._files = CloudFiles(self.layer_path)

    def __repr__(self) -> str:
        return f"Markers({self.layer_path!r}, {self.name!r})"

    # the run ------------------------------------------------------------------------------
    def run_record(self) -> dict | None:
        """The stage's run, or None: none started, or its record unreadable (written whole
        since, but an older version wrote it in place), which resets the stage."""
        record = self._record(f"{self.prefix}/run.json")
        return record if isinstance(record, dict) else None

    def current_key(self) -> str | None:
        record = self.run_record()
        return None if record is None else record.get("key")

    def parameters(self) -> dict:
        return (self.run_record() or {}).get("parameters", {})

    def outdate(self) -> None:
        """Keep the record of the stage's run but not its key: what it read was replaced, so
        its next run starts over whatever its key, while the layer still records that a run
        of deepem3d made its files (which that run then deletes, not refuses)."""
        record = self.run_record()
        if record is not None:
            put_json_whole(f"{self.layer_path}/{self.prefix}", "run.json",
                           {**record, "key": OUTDATED})

    def start_run(self, key: str, parameters: dict, task_ids: list[str]) -> None:
        """Record a run: its task ids, then its key (tasks check the key, so it goes last),
        each file replaced whole (a stop while writing one left it cut short, and every
        later run failed on it)."""
        folder = f"{self.layer_path}/{self.prefix}"
        put_json_whole(folder, "manifest.json", {"stage": self.name, "tasks": sorted(task_ids)})
        put_json_whole(folder, "run.json", {"key": key, "parameters": parameters})

    def _delete_under(self, prefix: str) -> None:
        keys = list(self._files.list(prefix=prefix))
        if keys:  # deleting nothing still starts a thread pool
            self._files.delete(keys)

    def reset(self) -> None:
        """Forget every run, marker and failure of this stage."""
        self._delete_under(f"{self.prefix}/")

    # tasks --------------------------------------------------------------------------------
    def marker_key(self, task_id: str) -> str:
        return f"{self.prefix}/done/{task_id}.json"

    def is_done(self, task_id: str) -> bool:
        return self._files.exists(self.marker_key(task_id))

    def mark_done(self, task_id: str, record: dict) -> None:
        self._files.put_json(self.marker_key(task_id), record, compress=None)

    def mark_failed(self, task_id: str, message: str) -> None:
        self._files.put_json(f"{self.prefix}/failed/{task_id}.json",
                             {"error": message, "host": socket.gethostname(),
                              "finished": _now()}, compress=None)

    def error_record(self, task_id: str) -> dict | None:
        return self._record(f"{self.prefix}/errors/{task_id}.json")

    def record_error(self, task_id: str, record: dict) -> None:
        self._files.put_json(f"{self.prefix}/errors/{task_id}.json", record, compress=None)

    def _listed(self, folder: str) -> set[str]:
        prefix = f"{self.prefix}/{folder}/"
        return {os.path.basename(key)[: -len(".json")]
                for key in self._files.list(prefix=prefix) if key.endswith(".json")}

    def done_ids(self) -> set[str]:
        return self._listed("done")

    def failures(self) -> dict[str, str]:
        """task id -> the input error it failed on."""
        ids = sorted(self._listed("failed"))
        records = [self._record(f"{self.prefix}/failed/{i}.json") or {} for i in ids]
        return {i: r.get("error", "") for i, r in zip(ids, records)}

    def clear_failures(self) -> None:
        self._delete_under(f"{self.prefix}/failed/")

    def records(self) -> list[dict]:
        """Every completion marker (for the run's summary)."""
        keys = [self.marker_key(i) for i in sorted(self.done_ids())]
        return [self._record(k) or {} for k in keys]

    def sample_records(self, count: int) -> list[dict]:
        """Up to `count` completion markers, the first listed (an estimate of a task's time
        without reading a whole stage's markers)."""
        keys = itertools.islice((k for k in self._files.list(prefix=f"{self.prefix}/done/")
                                 if k.endswith(".json")), count)
        return [r for r in (self._record(k) for k in keys) if r]

    def _record(self, key: str) -> dict | None:
        """A task's record, or None while another attempt of the task is writing it (a file://
        write is not atomic: a task run again after a lease ran out rewrites its marker, and a
        read in between finds it empty; the fault campaign hit this once in 6 runs)."""
        try:
            return self._files.get_json(key)
        except ValueError:
            return None

    def task_ids(self) -> list[str]:
        manifest = self._files.get_json(f"{self.prefix}/manifest.json")
        return [] if manifest is None else manifest["tasks"]

    def remaining(self, task_ids: list[str] | None = None) -> list[str]:
        """Task ids of the manifest (or of `task_ids`, read from it once by a caller that
        asks again and again) that have no marker yet."""
        done = self.done_ids()
        return [t for t in (self.task_ids() if task_ids is None else task_ids)
                if t not in done]

    def unfinished(self, task_ids: list[str], total: int) -> list[str]:
        """Those of `task_ids` (a stage of `total` tasks: the unfinished at the last look)
        that still have no marker. Asked one by one while they are fewer than the requests a
        listing of the stage's markers takes (1,000 keys per request), else from one listing:
        a wait near its end no longer lists millions of markers per poll."""
        pages = (total - len(task_ids)) // LIST_PAGE + 1
        if len(task_ids) > pages:
            done = self.done_ids()
            return [t for t in task_ids if t not in done]
        keys = [self.marker_key(t) for t in task_ids]
        if self._files.protocol == "file":  # a batch call's thread pool costs ~0.1 s here
            found = {k for k in keys if self._files.exists(k)}
        else:  # markers are small: fetched in parallel (CloudFiles' exists on gs:// is one
            # batch request, which the storage emulator of the tests does not answer)
            found = {r["path"] for r in self._files.get(keys) if r["content"] is not None}
        return [t for t, k in zip(task_ids, keys) if k not in found]

    def is_complete(self) -> bool:
        return self.run_record() is not None and not self.remaining()


#: keys per list request of S3 and GCS
LIST_PAGE = 1000


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------
# The one task wrapper


def run_in_frame(fn: Callable, run: dict, args: tuple, kwargs: dict) -> None:
    """Run one task of a stage: skip it when done, refuse it when stale, time it, record its
    own peak memory and write its marker (or its failure record, on an input error)."""
    markers = Markers(run["layer"], run["stage"])
    task_id = run["id"]
    if markers.is_done(task_id):
        return
    current = markers.current_key()
    if current != run["key"]:
        log.warning("task %s of stage %s belongs to another run (its key %s, the stage's %s): "
                    "not run", task_id, run["stage"], run["key"], current)
        return
    before = reset_peak()
    started = time.time()
    start = time.perf_counter()
    try:
        record = fn(*args, **kwargs) or {}
    except InputError as err:
        if not isinstance(err, ServiceUnavailable):  # that one may pass: the task is retried
            markers.mark_failed(task_id, str(err))
        raise
    seconds = time.perf_counter() - start
    markers.mark_done(task_id, {
        "task": fn.__name__,
        "key": run["key"],
        "seconds": round(seconds, 4),
        **record,
        "peak_mib": round(peak_rss() / 2**20, 1),
        "peak_added_mib": round(max(0, peak_rss() - before) / 2**20, 1),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": round(started, 3),
        "finished": _now(),
    })


def stage_task(fn: Callable) -> Callable:
    """Declare `fn` a queue task of the frame: registered with taskqueue under its own module
    and name, called with one more keyword, `run` ({"layer", "stage", "id", "key"}), which the
    frame consumes. `fn` returns a dict of what it counted (kept in its marker) or None."""

    @functools.wraps(fn)
    def task(*args: Any, run: dict, **kwargs: Any) -> None:
        run_in_frame(fn, run, args, kwargs)

    signature = inspect.signature(fn)
    task.__signature__ = signature.replace(parameters=[
        *signature.parameters.values(),
        inspect.Parameter("run", inspect.Parameter.KEYWORD_ONLY),
    ])
    return queueable(task)


# ---------------------------------------------------------------------------------------------
# Third-party tasks (igneous's) inside the frame


def frame_run(task: FunctionTask | RegisteredTask | list | dict) -> dict | None:
    """The frame's `run` ({"layer", "stage", "id", "key"}) of a task or its JSON payload, or
    None for a task outside the frame."""
    if isinstance(task, list | dict):
        payload = task.get("payload", task) if isinstance(task, dict) else task
        kwargs = payload[2] if isinstance(payload, list) and len(payload) > 2 else None
    else:
        kwargs = getattr(task, "kwargs", None)
    run = kwargs.get("run") if isinstance(kwargs, dict) else None
    return run if isinstance(run, dict) and run.get("layer") else None


def stage_label(run: dict) -> str:
    """`LAYER/STAGE` of a frame run, LAYER the layer's last path component."""
    return f"{str(run['layer']).rstrip('/').rsplit('/', 1)[-1]}/{run.get('stage')}"


def payload_of(task: FunctionTask | RegisteredTask | partial) -> list | dict:
    """A task as its plain-JSON payload: a list for a queueable function (taskqueue's
    FunctionTask), a dict with its "class" for a RegisteredTask (igneous's MeshTask...)."""
    payload = totask(task).payload()
    return json.loads(jsonify(payload if isinstance(payload, dict) else list(payload)))


def task_id_of(payload: list | dict) -> str:
    """A stable id from what the task does (its function and arguments), not from the queue."""
    if isinstance(payload, dict):
        return digest(payload)
    key, args, kwargs = payload[0], payload[1], payload[2]
    return digest([key, args, kwargs])


#: the igneous tasks deepem3d's stages create (downsampling, meshes, skeletons), by name, with
#: the arguments that name where each writes (deepem3d.run.admission checks them against a
#: worker's allow-list): MarkedTask runs nothing else of igneous, not its DeleteTask or
#: TransferTask
WRAPPED_TASKS = {
    "DownsampleTask": ("layer_path", "dest_path"),
    "ImageShardDownsampleTask": ("src_path",),
    "MeshTask": ("layer_path", "frag_path"),
    "MeshManifestPrefixTask": ("layer_path",),
    "MeshManifestFilesystemTask": ("layer_path",),
    "MultiResShardedMeshMergeTask": ("cloudpath",),
    "MultiResUnshardedMeshMergeTask": ("cloudpath",),
    "SkeletonTask": ("cloudpath", "frag_path"),
    "UnshardedSkeletonMergeTask": ("cloudpath",),
    "ShardedSkeletonMergeTask": ("cloudpath",),
}
#: the package igneous's task functions live in
WRAPPED_MODULE = "igneous.tasks"


def wrapped_name(task: object) -> str:
    """The name of the igneous task a MarkedTask payload wraps; an InputError for anything
    but one of WRAPPED_TASKS."""
    if isinstance(task, dict):  # a RegisteredTask (MeshTask, SkeletonTask...)
        name = str(task.get("class"))
        if "payload" in task or "id" in task:  # keys taskqueue would read as another task
            raise InputError(f"MarkedTask refuses a {name} payload with a payload or id key")
    elif (isinstance(task, list) and len(task) >= 3 and isinstance(task[0], list)
          and len(task[0]) == 2):
        module, name = (str(part) for part in task[0])
        if module != WRAPPED_MODULE and not module.startswith(WRAPPED_MODULE + "."):
            raise InputError(f"MarkedTask refuses {module}.{name}: only igneous's tasks "
                             f"({', '.join(sorted(WRAPPED_TASKS))}) run wrapped")
    else:
        raise InputError("MarkedTask wraps something that is not a task")
    if name not in WRAPPED_TASKS:
        raise InputError(f"MarkedTask refuses igneous's {name}: deepem3d runs "
                         f"{', '.join(sorted(WRAPPED_TASKS))}")
    return name


@stage_task
def MarkedTask(task: list | dict, names: dict | None = None) -> dict:  # noqa: N802
    """Run a third-party task (igneous's DownsampleTask, MeshTask...) inside the frame.
    `names` ({"layer", "info": {key: directory}}) is what the task reads in that layer's info
    before the stored info names it (a mesh or skeleton directory: see stages/objects.py).
    (taskqueue registers tasks by their function's name, hence the capitals.)"""
    if names:
        with info_naming(names["layer"], names["info"]):
            return _run_marked(task)
    return _run_marked(task)


def _run_marked(task: list | dict) -> dict:
    import importlib

    from taskqueue.queueablefns import FunctionTask
    from taskqueue.registered_task import deserialize

    name = wrapped_name(task)
    importlib.import_module(WRAPPED_MODULE)  # registers igneous's tasks (lazily imported)
    # built here, not by taskqueue's totask (which would follow a `payload` key elsewhere)
    wrapped = deserialize(dict(task)) if isinstance(task, dict) else FunctionTask(*task[:3])
    module = type(wrapped).__module__ if isinstance(task, dict) else wrapped.key[0]
    if module != WRAPPED_MODULE and not module.startswith(WRAPPED_MODULE + "."):
        raise InputError(f"MarkedTask refuses {name} of {module}: not igneous's")
    from cloudfiles.exceptions import DecompressionError
    from cloudvolume.exceptions import DecodingError, EmptyVolumeException

    try:
        wrapped.execute()
    except EmptyVolumeException as err:  # the same on every retry: bad input, failed once
        raise InputError(f"{name} met a missing chunk ({str(err).splitlines()[0]}): finish "
                         "writing the layer, or read missing chunks as 0 with --fill-missing "
                         "where the command has it") from None
    except (DecompressionError, DecodingError) as err:  # a chunk not as its info says: too
        raise InputError(f"{name} met a chunk that cannot be decoded as its layer's info says "
                         f"({type(err).__name__}: {str(err).splitlines()[0]}): write the "
                         "layer again") from None
    return {"wrapped": name if isinstance(task, dict) else task[0]}


def marked(task: RegisteredTask | partial, names: dict | None = None) -> tuple[str, partial]:
    """(task id, the third-party task wrapped in MarkedTask), without the frame's `run`."""
    payload = payload_of(task)
    if names:
        return task_id_of(payload), partial(MarkedTask, task=payload, names=names)
    return task_id_of(payload), partial(MarkedTask, task=payload)


# ---------------------------------------------------------------------------------------------
# What a stage declares


TaskList = Callable[[], Iterator[tuple[str, partial]]]


@dataclass
class Stage:
    """One stage of a run, as data: the frame runs it, the runner orders and routes it.

    `make_tasks` yields (task id, task without `run`) lazily; `tasks()` adds the frame's `run`
    and leaves out the tasks already done. `prepare` runs once before the stage's tasks are
    created (create layers, apply resets), `finish` once it is complete (delete intermediates).
    `seconds_per_task` is the planning estimate behind `--dry-run`'s core- or GPU-hours.
    """

    name: str
    layer: str
    key: str
    parameters: dict
    make_tasks: TaskList
    task_count: int
    memory_bytes: int
    needs: tuple[str, ...] = ()
    hardware: str = "cpu"
    seconds_per_task: float = 0.0
    output_bytes: int = 0
    prepare: Callable[[], None] | None = None
    finish: Callable[[], None] | None = None
    #: shown instead of running, for a stage that has nothing to do in this run
    note: str | None = None
    #: the label runners and reports use (several stages may share a name on different layers)
    label: str = ""
    #: its markers are deleted before it runs, whatever its key (a segmentation redone by
    #: --overwrite: its own stages, and its levels', meshes' and skeletons')
    starts_over: bool = False
    markers: Markers = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.layer = cloudpath(self.layer).rstrip("/")
        self.markers = Markers(self.layer, self.name)
        self.label = self.label or self.name

    def start(self) -> None:
        """Record this run (task ids, key) unless it is already the stage's current run."""
        if self.markers.current_key() == self.key:  # run.json is written after the manifest
            self.markers.clear_failures()
            return
        self.markers.reset()
        self.markers.start_run(self.key, self.parameters, [i for i, _ in self.make_tasks()])

    def tasks(self) -> Iterator[partial]:
        """The tasks without a marker, each carrying this run's key; none listed when every
        task has its marker (listing is no free read: igneous's task creators append the
        layer's provenance)."""
        done = self.markers.done_ids()
        if done.issuperset(self.markers.task_ids()):
            return
        for task_id, task in self.make_tasks():
            if task_id not in done:
                yield partial(task, run={"layer": self.layer, "stage": self.name,
                                         "id": task_id, "key": self.key})

    def is_complete(self) -> bool:
        return self.markers.current_key() == self.key and not self.markers.remaining()

    def tasks_to_run(self) -> int:
        """How many of its tasks a run would run now (--dry-run's count): those without a
        marker when its markers are this run's and kept, else all."""
        if self.starts_over or self.markers.current_key() != self.key:
            return self.task_count
        return len(self.markers.remaining())
