"""Local folders and the layers they lie in, looked at without a layer library (cheap enough
for a command's first checks), and small files written whole."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from deepem3d.errors import InputError, write_errors_reported


def cloudpath(path: str) -> str:
    """A CloudVolume path: `precomputed://` dropped, local paths (plain or file://, relative
    or not) absolute file:// paths."""
    path = str(path).removeprefix("precomputed://")
    if not path.strip():  # would name the working directory
        raise InputError("an empty path where a layer goes: give the layer's path")
    if path.startswith("file://"):
        path = path[len("file://"):]
        if not path.strip():
            raise InputError("file:// names no folder: give the layer's path")
    elif "://" in path:
        return path
    return "file://" + os.path.abspath(os.path.expanduser(path))


def enclosing_layer(folder: str, *, itself: bool = True) -> str | None:
    """The local folder of a layer that `folder` is (with `itself`) or lies in: the nearest
    folder above, or the folder, whose info file is a layer's (JSON with scales). Remote
    paths: None (not looked up)."""
    if "://" in folder and not folder.startswith("file://"):
        return None
    where = os.path.abspath(folder.removeprefix("file://"))
    if not itself:
        where = os.path.dirname(where)
    while True:
        if _is_layer_info(os.path.join(where, "info")):
            return where
        above = os.path.dirname(where)
        if above == where:
            return None
        where = above


def _is_layer_info(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read(2**20))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "scales" in info


def put_json_whole(folder: str, name: str, content: object) -> None:
    """folder/name as JSON, which a reader finds old or new, never cut short: CloudFiles' local
    writes made whole by `whole_files` (it writes a local file in place); an object store
    replaces an object whole."""
    from cloudfiles import CloudFiles

    from deepem3d.storage import whole_files

    whole_files.install()
    if "://" not in folder:
        folder = f"file://{os.path.abspath(folder)}"
    CloudFiles(folder).put_json(name, content, compress=None)


def write_whole(path: str | os.PathLike, write: Callable[[Path], object], *,
                also: tuple[type[Exception], ...] = (), shared: bool = False) -> None:
    """write(a hidden partial file beside PATH), then rename it to PATH: a process stopped
    mid-write leaves the previous file whole, not a truncated one; a full disk is one line
    (`write_errors_reported`, with ALSO). The partial is `.NAME.partial-PID`, no other
    process's; with `shared` (a file one process at a time writes: a training run's, whose
    checkpoints a preempted run would otherwise leave behind one per kill) `.NAME.partial`,
    which the next write replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial" + ("" if shared else f"-{os.getpid()}"))
    try:
        with write_errors_reported(path, also=also):
            write(partial)
            os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
