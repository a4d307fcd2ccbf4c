"""file:// writes whole (deepem3d.storage.whole_files): a write that fails, or a process killed
while it writes, leaves the file that was there (or none), never part of the new one."""

from __future__ import annotations

import hashlib
import inspect
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume

from deepem3d.storage import whole_files
from deepem3d.storage.layers import create_layer
from tests.conftest import ROOT

OLD = b"old chunk " * 1000


class FailingContent:
    """File-like content (CloudFiles copies it block by block) whose third read fails."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads > 2:
            raise OSError(5, "Input/output error")
        return b"x" * 65536

    def seek(self, *args: object) -> int:
        return 0


def test_the_copied_put_file_is_the_one_cloud_files_has():
    """_put_file_whole repeats cloud-files' put_file but for the write: a cloud-files whose
    put_file changed needs the copy read again (and FOLLOWED_SOURCE_SHA256 updated)."""
    source = inspect.getsource(whole_files.original_put_file())
    assert hashlib.sha256(source.encode()).hexdigest() == whole_files.FOLLOWED_SOURCE_SHA256


def test_a_write_that_fails_midway_leaves_the_old_file_and_nothing_else(tmp_path):
    files = CloudFiles(f"file://{tmp_path}")
    files.put("chunk", OLD, raw=True, compress=None)
    with pytest.raises(OSError, match="Input/output error"):
        files.put("chunk", FailingContent(), raw=True, compress=None)
    assert (tmp_path / "chunk").read_bytes() == OLD  # cloud-files' own: 128 KiB of the new
    assert sorted(os.listdir(tmp_path)) == ["chunk"]
    files.put_json("chunk.json", {"a": 1}, compress=None)  # a str (JSON) and compressed bytes
    files.put("gz", b"abc" * 100, compress="gzip")
    assert files.get_json("chunk.json") == {"a": 1} and files.get("gz") == b"abc" * 100
    assert sorted(os.listdir(tmp_path)) == ["chunk", "chunk.json", "gz.gz"]


KILLED_WRITER = """
import sys, time
from cloudfiles import CloudFiles
import deepem3d.storage.layers  # installs whole_files

class Stalls:
    reads = 0
    def read(self, size=-1):
        self.reads += 1
        if self.reads > 1:
            open(sys.argv[2], "w").close()  # half written: tell the test, wait to be killed
            time.sleep(120)
        return b"x" * 65536
    def seek(self, *args):
        return 0

CloudFiles(sys.argv[1]).put("chunk", Stalls(), raw=True, compress=None)
"""


def kill_mid_write(script: str, folder, tmp_path) -> None:
    """Run the writer SCRIPT on FOLDER and SIGKILL it in the middle of its write."""
    flag = tmp_path / "half-written"
    writer = subprocess.Popen([sys.executable, "-c", script, f"file://{folder}", str(flag)],
                              cwd=ROOT)
    deadline = time.time() + 60
    while not flag.exists() and writer.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), "the writer did not reach the middle of its write"
    writer.send_signal(signal.SIGKILL)
    writer.wait()


def test_a_writer_killed_midway_leaves_the_old_chunk_which_reads_whole(tmp_path):
    """SIGKILL in the middle of a write (a worker's pod evicted, a lease's second attempt
    killed after the first marked the task done): the chunk is the old one, and a layer's
    chunk read afterwards decodes; what is left is a hidden partial file no listing of a
    chunk's name takes for it."""
    layer = f"file://{tmp_path / 'layer'}"
    vol = create_layer(layer, layer_type="image", dtype="uint8", resolution=(4, 4, 40),
                       size=(32, 32, 4), chunk_size=(32, 32, 4))
    data = np.arange(32 * 32 * 4, dtype=np.uint8).reshape(32, 32, 4)
    vol[:, :, :] = data
    folder = tmp_path / "layer" / "4_4_40"
    (chunk,) = os.listdir(folder)
    before = (folder / chunk).read_bytes()
    kill_mid_write(KILLED_WRITER.replace('put("chunk"', f'put("{chunk}"'), folder, tmp_path)
    assert (folder / chunk).read_bytes() == before
    np.testing.assert_array_equal(
        np.asarray(CloudVolume(layer, progress=False)[:, :, :])[..., 0], data)
    left = [name for name in os.listdir(folder) if name != chunk]
    assert len(left) == 1 and left[0].startswith(f".{chunk}.partial-"), left
    assert list(CloudFiles(f"file://{folder}").list(prefix=chunk)) == [chunk.removesuffix(".gz")]


def test_a_tasks_next_attempt_removes_the_partial_a_killed_attempt_left(tmp_path):
    """A worker killed mid-write within its task's attempt 1 leaves that attempt's partial;
    attempt 2 of the same task removes it before it writes the chunk: the folder then holds
    what an undisturbed run leaves (the fault campaign found `.NAME.partial-PID-THREAD` files
    of killed workers in a finished run's layer)."""
    folder = tmp_path / "objects"
    kill_mid_write(KILLED_WRITER.replace(
        'CloudFiles(sys.argv[1]).put("chunk", Stalls(), raw=True, compress=None)',
        'from deepem3d.storage.whole_files import task_attempt\n'
        'with task_attempt("task-7", 1):\n'
        '    CloudFiles(sys.argv[1]).put("chunk", Stalls(), raw=True, compress=None)'),
        folder, tmp_path)
    (left,) = os.listdir(folder)
    assert left.startswith(".chunk.partial-") and left.endswith("-1"), left
    files = CloudFiles(f"file://{folder}")
    with whole_files.task_attempt("task-8", 2):  # another task's attempt: not its partial
        files.put("other", b"y", raw=True, compress=None)
    assert sorted(os.listdir(folder)) == [left, "other"]
    with whole_files.task_attempt("task-7", 2):
        files.put("chunk", OLD, raw=True, compress=None)
    assert sorted(os.listdir(folder)) == ["chunk", "other"]
    assert (folder / "chunk").read_bytes() == OLD


class Meanwhile:
    """File-like content, NEW, whose second read (its first copy read whole) runs `then`:
    what another writer does while this one writes."""

    def __init__(self, then) -> None:
        self.data, self.then, self.reads = io.BytesIO(NEW), then, 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads == 2:
            first = whole_files._attempt
            self.then()
            whole_files._attempt = first  # back in this writer's attempt
        return self.data.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.data.seek(offset, whence)

    def tell(self) -> int:
        return self.data.tell()


NEW = b"new chunk " * 1000


def test_an_attempt_overtaken_by_the_next_keeps_the_same_bytes(tmp_path):
    """Attempt 1 still writing after attempt 2 wrote the object (and removed attempt 1's
    partial): attempt 1 raises nothing, the object is whole, and no partial is left."""
    folder = tmp_path / "objects"
    files = CloudFiles(f"file://{folder}")

    def next_attempt() -> None:
        with whole_files.task_attempt("task-7", 2):
            files.put("chunk", NEW, raw=True, compress=None)

    with whole_files.task_attempt("task-7", 1):
        files.put("chunk", Meanwhile(next_attempt), raw=True, compress=None)
    assert os.listdir(folder) == ["chunk"]
    assert (folder / "chunk").read_bytes() == NEW


def test_an_overtaken_attempt_does_not_take_an_older_file_for_the_next_attempts(tmp_path):
    """Attempt 2 removed attempt 1's partial, then was killed before it wrote its own: the
    target still held an older file, which attempt 1 took for attempt 2's and reported
    written (its task's marker would then have said done over the old chunk)."""
    folder = tmp_path / "objects"
    files = CloudFiles(f"file://{folder}")
    files.put("chunk", OLD, raw=True, compress=None)

    def next_attempt_killed() -> None:
        with whole_files.task_attempt("task-7", 2):
            whole_files._remove_earlier_attempts(str(folder), "chunk", *whole_files._attempt)

    with whole_files.task_attempt("task-7", 1):
        files.put("chunk", Meanwhile(next_attempt_killed), raw=True, compress=None)
    assert (folder / "chunk").read_bytes() == NEW
    assert os.listdir(folder) == ["chunk"]


def test_two_writers_of_one_attempt_never_share_a_partial(tmp_path):
    """An SQS message delivered twice at once can carry one ApproximateReceiveCount: both
    writers of the same task and attempt named the same partial, the second truncated the
    first's file and, failing, removed it; the first then took the older file for its own."""
    folder = tmp_path / "objects"
    files = CloudFiles(f"file://{folder}")
    files.put("chunk", OLD, raw=True, compress=None)

    def duplicate_that_fails() -> None:
        with whole_files.task_attempt("task-7", 1), pytest.raises(OSError):
            files.put("chunk", FailingContent(), raw=True, compress=None)

    with whole_files.task_attempt("task-7", 1):
        files.put("chunk", Meanwhile(duplicate_that_fails), raw=True, compress=None)
    assert (folder / "chunk").read_bytes() == NEW
    assert os.listdir(folder) == ["chunk"]


def test_write_whole_names_its_partial_after_the_process_unless_shared(tmp_path):
    """Two processes writing one file at once (two `tune --write` on one pipeline) never share
    a partial (one would truncate, then remove, the other's); a training run's files, written
    by one process at a time, share `.NAME.partial`, so a preempted run leaves one at most."""
    from deepem3d.storage.paths import write_whole

    seen = []

    def write(partial) -> None:
        seen.append(partial.name)
        partial.write_text("new")

    write_whole(tmp_path / "p.yaml", write)
    write_whole(tmp_path / "last.pt", write, shared=True)
    assert seen == [f".p.yaml.partial-{os.getpid()}", ".last.pt.partial"]
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "p.yaml"]
