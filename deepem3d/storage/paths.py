"""Local folders and the layers they lie in, looked at without a layer library (cheap enough
for a command's first checks)."""

from __future__ import annotations

import os


def enclosing_layer(folder: str, *, itself: bool = True) -> str | None:
    """The local folder of a layer that `folder` is (with `itself`) or lies in: the nearest
    folder above, or the folder, holding an info file. Remote paths: None (not looked up)."""
    if "://" in folder and not folder.startswith("file://"):
        return None
    where = os.path.abspath(folder.removeprefix("file://"))
    if not itself:
        where = os.path.dirname(where)
    while True:
        if os.path.isfile(os.path.join(where, "info")):
            return where
        above = os.path.dirname(where)
        if above == where:
            return None
        where = above
