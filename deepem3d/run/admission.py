"""What a worker agrees to run: an explicit list of tasks, and where they may write.

A queue message names a function (or a task class) and its arguments, and taskqueue runs any
function its process has registered: once igneous is imported, that includes its DeleteTask
and TransferTask. So a worker checks every message before it runs it:

- the task is one of deepem3d's stage tasks (`STAGE_TASKS`), or a task of a module the worker
  was told to import (`deepem3d worker --import MODULE`);
- a `MarkedTask` wraps one of the igneous tasks deepem3d creates (`WRAPPED_TASKS`), by name;
- given an allow-list of prefixes (`--allow-prefix`, or DEEPEM3D_ALLOW_PREFIXES separated by
  commas), every path the task writes lies under one of them. A stage task writes under its
  `output_path` and its run's layer (the frame's markers); a wrapped igneous task under the
  arguments `WRAPPED_TASKS` names; a task of an imported module under every argument whose
  name ends in `path`. Paths are compared normalised (`..` resolved, local paths made
  file:// and absolute), at path-component boundaries.

A message that fails a check is refused (`Refused`): the worker sets it aside on its first
attempt, since it would fail the same way on every retry.
"""

from __future__ import annotations

import inspect
import os
import posixpath
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from deepem3d.errors import InputError
from deepem3d.stages.frame import WRAPPED_MODULE, WRAPPED_TASKS, wrapped_name
from deepem3d.storage.layers import cloudpath

if TYPE_CHECKING:
    from taskqueue.queueablefns import FunctionTask
    from taskqueue.registered_task import RegisteredTask

#: (module, function) of every deepem3d task a worker runs; tests/test_workers.py checks that
#: this is every queueable function deepem3d registers
STAGE_TASKS = frozenset({
    ("deepem3d.stages.frame", "MarkedTask"),
    ("deepem3d.stages.inference", "InferenceTask"),
    ("deepem3d.stages.supervoxels", "SmoothTask"),
    ("deepem3d.stages.supervoxels", "HaloTask"),
    ("deepem3d.stages.supervoxels", "SupervoxelTask"),
    ("deepem3d.stages.supervoxels", "ReduceNodeTask"),
    ("deepem3d.stages.supervoxels", "ReduceDownTask"),
    ("deepem3d.stages.graph", "RegionGraphTask"),
    ("deepem3d.stages.octree", "OctreeNodeTask"),
    ("deepem3d.stages.octree", "OctreeDownTask"),
    ("deepem3d.stages.octree", "RemapTask"),
    ("deepem3d.stages.resample", "ResampleTask"),
})
#: the arguments of a stage task that name where it writes (besides its run's layer)
STAGE_WRITES = ("output_path",)

#: the environment variable a worker reads its allow-list from when given no --allow-prefix
ALLOW_PREFIXES_ENV = "DEEPEM3D_ALLOW_PREFIXES"


class Refused(Exception):
    """A message the worker will not run; the message is one line saying why."""


def normal_path(path: str) -> str:
    """A path as compared: CloudVolume's form (file:// for local paths), `..` resolved, no
    trailing slash; `precomputed://` dropped."""
    path = str(path)
    if path.startswith("precomputed://"):
        path = path[len("precomputed://"):]
    scheme, _, rest = cloudpath(path).partition("://")
    rest = posixpath.normpath(rest) if rest else rest
    if scheme != "file":
        rest = rest.lstrip("/")
    return f"{scheme}://{rest}".rstrip("/")


def allow_prefixes(given: Iterable[str] = ()) -> tuple[str, ...]:
    """The allow-list: `given`, else DEEPEM3D_ALLOW_PREFIXES (comma-separated); empty means
    no restriction."""
    prefixes = list(given) or [p for p in os.environ.get(ALLOW_PREFIXES_ENV, "").split(",")
                               if p.strip()]
    return tuple(normal_path(p.strip()) for p in prefixes)


def _inside(path: str, prefixes: tuple[str, ...]) -> bool:
    path = normal_path(path)
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _check_writes(what: str, paths: Iterable, prefixes: tuple[str, ...]) -> None:
    if not prefixes:
        return
    for path in paths:
        if path is None:
            continue
        if not isinstance(path, str) or not path.strip() or not _inside(path, prefixes):
            raise Refused(f"{what} writes to {path!r}, outside the allowed prefixes "
                          f"({', '.join(prefixes)})")


def _arguments(name: str, fn: Callable | None, args, kwargs) -> dict:
    """The task's arguments by name, positional ones included (a path passed positionally is
    checked like one passed by keyword)."""
    if fn is None:
        raise Refused(f"{name} is not registered in this worker")
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise Refused(f"{name}: its arguments are not a list and a mapping")
    try:
        return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)
    except TypeError as err:
        raise Refused(f"{name}: its arguments do not fit it ({err})") from None


def _registered(key: tuple[str, str]) -> Callable | None:
    from taskqueue.queueablefns import REGISTRY

    return REGISTRY.get(key)


#: a name a task joins onto a path (a stage, a task id, a product's directory): one plain
#: path component, so that it cannot climb out of the layer or name another bucket; a block id
#: begins with "-" where the block starts below x = 0 ("-16-0_0-16_0-4")
COMPONENT = re.compile(r"-?[A-Za-z0-9_][A-Za-z0-9._:-]*")
#: arguments of stage tasks that name such a component (the octree's work folders)
STAGE_COMPONENTS = ("table", "sweep")
#: arguments of wrapped igneous tasks that name a directory under their layer
WRAPPED_COMPONENTS = ("mesh_dir", "skel_dir")


def _check_components(what: str, values: Iterable) -> None:
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str) or not COMPONENT.fullmatch(value) or ".." in value:
            raise Refused(f"{what} names {value!r} where one plain path component belongs")


def _wrapped(inner, prefixes: tuple[str, ...]) -> None:
    """The task a MarkedTask wraps: one of WRAPPED_TASKS, writing inside the allow-list."""
    try:
        name = wrapped_name(inner)
    except InputError as err:
        raise Refused(str(err)) from None
    if isinstance(inner, dict):
        arguments = inner  # a RegisteredTask is built from its payload's keys
        info = inner.get("info")
        if isinstance(info, dict):  # SkeletonTask writes under the info's directory
            _check_components(name, [info.get("skeletons"), info.get("mesh")])
        elif info is not None:
            raise Refused(f"{name}: its info is not a mapping")
    else:
        import importlib

        importlib.import_module(WRAPPED_MODULE)  # registers igneous's task functions
        arguments = _arguments(name, _registered(tuple(inner[0])), inner[1], inner[2])
    _check_writes(name, (arguments.get(arg) for arg in WRAPPED_TASKS[name]), prefixes)
    _check_components(name, (arguments.get(arg) for arg in WRAPPED_COMPONENTS))


def admit(task: FunctionTask | RegisteredTask, *, prefixes: tuple[str, ...] = (),
          imported: Iterable[str] = ()) -> str:
    """Check a deserialised task (taskqueue's FunctionTask or RegisteredTask) before it runs;
    returns its name, or raises Refused. `imported`: modules whose tasks the worker was told
    to run as well. Whatever a malformed message makes the checks raise is a refusal too."""
    try:
        return _admit(task, prefixes, tuple(imported))
    except Refused:
        raise
    except Exception as err:  # noqa: BLE001  (a message of no task's shape)
        raise Refused(f"not a task's shape ({type(err).__name__}: {err})") from None


def _admit(task, prefixes: tuple[str, ...], imported: tuple[str, ...]) -> str:
    from taskqueue.queueablefns import FunctionTask

    if not isinstance(task, FunctionTask):  # igneous's classes run only inside MarkedTask
        raise Refused(f"task class {type(task).__name__} is not run directly (deepem3d runs "
                      "igneous's tasks wrapped in MarkedTask)")
    key = task.key
    if len(key) != 2 or not all(isinstance(part, str) for part in key):
        raise Refused(f"{key!r} does not name a function")
    module, name = key
    if (module, name) in STAGE_TASKS or module in imported:
        kwargs = _arguments(name, _registered((module, name)), task.args, task.kwargs)
    if (module, name) in STAGE_TASKS:
        run = kwargs.get("run")
        if not isinstance(run, dict) or not isinstance(run.get("layer"), str):
            raise Refused(f"{name} carries no run (its layer, stage, id and key)")
        _check_components(name, [run.get("stage"), run.get("id")])
        _check_components(name, (kwargs.get(arg) for arg in STAGE_COMPONENTS))
        _check_writes(name, [run["layer"], *(kwargs.get(arg) for arg in STAGE_WRITES)],
                      prefixes)
        if name == "MarkedTask":
            names = kwargs.get("names")
            if names is not None:
                if not isinstance(names, dict) or not isinstance(names.get("info"), dict):
                    raise Refused(f"{name}: its names are not a layer and an info mapping")
                _check_writes(name, [names.get("layer")], prefixes)
                _check_components(name, names["info"].values())
            _wrapped(kwargs.get("task"), prefixes)
        return name
    if module in imported:
        _check_writes(name, (value for arg, value in kwargs.items() if arg.endswith("path")),
                      prefixes)
        return name
    raise Refused(f"{module}.{name} is not a task this worker runs (deepem3d's stage tasks"
                  f"{' and those of ' + ', '.join(imported) if imported else ''})")
