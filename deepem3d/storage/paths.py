"""Local folders and the layers they lie in, looked at without a layer library (cheap enough
for a command's first checks), and small files written whole."""

from __future__ import annotations

import json
import os


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
    """folder/name as JSON, which a reader finds old or new, never cut short: locally written
    beside and renamed over (CloudFiles writes a local file in place); an object store
    replaces an object whole."""
    if "://" in folder and not folder.startswith("file://"):
        from cloudfiles import CloudFiles

        CloudFiles(folder).put_json(name, content, compress=None)
        return
    from cloudfiles.lib import jsonify  # CloudFiles' own JSON (numpy numbers too)

    data = jsonify(content)
    where = os.path.abspath(folder.removeprefix("file://"))
    os.makedirs(where, exist_ok=True)
    target = os.path.join(where, name)
    partial = f"{target}.partial"
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
