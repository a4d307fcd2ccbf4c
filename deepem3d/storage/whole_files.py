"""Local files written whole: the old file or the new one, never part of one.

CloudFiles writes a file:// object in place (open the final name, write), so a process killed
mid-write leaves a truncated chunk under its final name, which every later read takes as
whole: a layer's chunk cut short after its task's marker was written by another attempt of the
task (a lease that ran out), or a chunk of a run given up. `install()` makes CloudFiles' local
interface write beside the target, `.NAME.partial-PID-THREAD` (hidden, so no listing of a
prefix takes it for an object), and rename it over the target: atomic on a POSIX file system,
NFS included. Object stores (gs://, s3://) replace an object whole already.

A process killed mid-write leaves its partial file behind. Within a queue task
(`task_attempt(TASK, N)`, which the worker holds around each attempt) the partial is named
after the task and the attempt instead, `.NAME.partial-DIGEST-N`, so that attempt N removes,
before it writes NAME, the partials attempts 1..N-1 may have left (no listing: their names
are known): a killed worker's retry leaves the layer as an undisturbed run does. An attempt
still writing after its lease ran out (its partial removed by the next) writes the same bytes
again under `.NAME.partial-PID-THREAD` (the target may still hold an older file: the next
attempt may not have renamed its own yet, or never will, killed), as does a second writer of
the same attempt's name (an SQS message delivered twice with one receive count, two threads):
an attempt's partial is created exclusively, never written by two.

It replaces `FileInterface.put_file` of cloud-files 6.4 (the version docker/constraints.txt
pins) with the same steps but the write: the test suite checks that the original's source is
still the one this copy follows.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Iterator
from typing import Any

#: a digest of the source of cloud-files' FileInterface.put_file that `_put_file_whole` follows
FOLLOWED_SOURCE_SHA256 = "3defb34baa809142cf292d34ebf4350e02290b107f6421651527a69addf333a3"

_lock = threading.Lock()
_original: Any = None
#: the queue task this process runs now and its attempt (a worker runs one at a time)
_attempt: tuple[str, int] | None = None


@contextlib.contextmanager
def task_attempt(task: str, attempt: int) -> Iterator[None]:
    """Within it, this process's writes are attempt `attempt` (from 1) of the task whose id,
    the same on every attempt, is `task`."""
    global _attempt
    digest = hashlib.sha256(task.encode()).hexdigest()[:16]
    _attempt = (digest, int(attempt))
    try:
        yield
    finally:
        _attempt = None


def _attempt_partial_name(name: str, digest: str, attempt: int) -> str:
    """`.NAME.partial-DIGEST-N`: attempt N's of the task whose id's digest is DIGEST."""
    return f".{name[:200]}.partial-{digest}-{attempt}"


def _remove_earlier_attempts(folder: str, name: str, digest: str, attempt: int) -> None:
    """The partials of NAME attempts 1..ATTEMPT-1 of the task may have left."""
    for earlier in range(1, attempt):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, _attempt_partial_name(name, digest, earlier)))


def _own_partial_name(name: str) -> str:
    """`.NAME.partial-PID-THREAD`: no other writer's."""
    return f".{name[:200]}.partial-{os.getpid()}-{threading.get_ident()}"


def _same_file(path: str, stat: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (stat.st_dev, stat.st_ino)


def install() -> None:
    """Make every file:// write of this process whole (idempotent, thread-safe)."""
    global _original
    from cloudfiles.interfaces import FileInterface

    with _lock:
        if _original is None:
            _original = FileInterface.put_file
            FileInterface.put_file = _put_file_whole


def original_put_file() -> Any:
    """cloud-files' own FileInterface.put_file (after install())."""
    return _original


def _put_file_whole(self: Any, file_path: str, content: Any, content_type: str | None,
                    compress: Any, cache_control: Any = None, storage_class: Any = None) -> Any:
    """FileInterface.put_file's path and content handling, then a write beside and a rename."""
    path = self.get_path_to_file(file_path)
    lock_path = path
    compress_ext = self.get_extension(compress)
    _, ext = os.path.splitext(path)
    if ext != compress_ext:
        path += compress_ext
    if (content and type(content) is str and content_type
            and re.search("json|te?xt", content_type)):
        content = content.encode("utf-8")

    file_like = hasattr(content, "read") and hasattr(content, "seek")
    start = content.tell() if file_like and hasattr(content, "tell") else 0

    def write(partial: str, mode: str) -> None:
        """Content into `partial` (mode "xb": only a partial this call creates), renamed over
        the target; FileNotFoundError when another writer removed it meanwhile."""
        mine = None
        try:
            with open(partial, mode) as f:
                mine = os.fstat(f.fileno())
                if file_like:
                    shutil.copyfileobj(content, f)
                else:
                    f.write(content)
            if not _same_file(partial, mine):  # removed (and made again by another)
                raise FileNotFoundError(2, "removed by another writer", partial)
            os.replace(partial, path)
        finally:
            if mine is not None and _same_file(partial, mine):
                os.remove(partial)

    def put() -> None:
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        own = os.path.join(folder, _own_partial_name(name))
        attempt = _attempt
        if attempt is None:
            write(own, "wb")
            return
        digest, number = attempt
        _remove_earlier_attempts(folder, name, digest, number)
        try:  # exclusive: a name another writer of this attempt holds is not shared (an SQS
            # message delivered twice, its ApproximateReceiveCount the same; two threads)
            write(os.path.join(folder, _attempt_partial_name(name, digest, number)), "xb")
        except FileExistsError:
            write(own, "wb")
        except FileNotFoundError:
            # removed by a later attempt, which may not have written the target yet (or may
            # never: killed): whatever is there could be an older file, so write it again,
            # the same bytes, under this process's own name
            if not os.path.isdir(folder):
                raise
            if file_like:
                content.seek(start)
            write(own, "wb")

    return self.io_with_lock(put, lock_path, exclusive=True)
