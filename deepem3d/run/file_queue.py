"""The file queue, fq://DIR: taskqueue's layout, every change to a task made under its lock.

The layout is taskqueue's, so that its counters (`enqueued`, `completed`, `inserted`) and its
tools read a deepem3d queue as their own:

    queue/STAMP--ID.json   a task; free to lease once STAMP (unix seconds) <= now
    movement/ID            the names the task's file has had, one per line; the delete removes
                           each (a lease renames the file, and a worker whose lease expired
                           may delete a file another worker holds under a newer name)
    insertions, completions  the counters

Every change here locks the task's movement log before it reads it: the lease, the renewal,
the release and the delete. taskqueue's own insert writes the file before its log (a lease
between the two writes has its line truncated away), and its renewal and delete read the log,
then reopen it with mode 'wt', truncating it, before they lock it: a worker that locks the
log in between (its lease reached for the task) keeps the lock, and the renewal, retried,
reads the emptied log and renews nothing; the task's delete then misses its file, which runs
again once its lease runs out. Two processes locking logs as stale lease attempts do emptied
the log of 8 of 68 tasks renewed 10 times each, and of none of 48 with this module's renewal
(scripts/queue_lock_campaign.py, five runs on a 2-core machine).

A lease never waits for a lock: a busy log is another worker's, and the next file is tried
(taskqueue's lock retries with back-off, which held a lease 6.6 to 9.6 s with 4 logs held, and
made 8 processes draining 400 tasks 7 to 12 times slower: benchmarks/queue_drain.py).
A renewal, release or delete waits for it, up to LOCK_WAIT_SECONDS: the holder keeps it for
a rename and a line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import re
import time
import uuid
from collections.abc import Iterator

from taskqueue.lib import jsonify
from taskqueue.queueables import totask

from deepem3d.errors import InputError

#: files a lease tries before it reports the queue empty (others may take the same files)
LEASE_CANDIDATES = 16
#: seconds a young file is taken to be still being inserted: one that does not parse is
#: given this long before it is set aside (taskqueue's insert creates the file, then writes
#: it), one whose movement log does not name it is left alone (it writes the log after)
UNREADABLE_GRACE = 5.0
#: seconds a renewal, release or delete waits for a task's lock (held for a rename and a line)
LOCK_WAIT_SECONDS = 30.0
LOCK_POLL_SECONDS = 0.005
#: a task's file in queue/: STAMP--ID.json
TASK_FILE = re.compile(r"(\d+)--(.+)\.json")


def task_id(name: str) -> str:
    """A task's id from its file's name (STAMP--ID.json) or from the id itself."""
    if "--" in name:
        name = name.split("--", 1)[1]
    return name[:-len(".json")] if name.endswith(".json") else name


def _stamped(name: str, stamp: int) -> str:
    return f"{stamp}--{name.split('--', 1)[1]}"


def _names(text: str, identifier: str) -> list[str]:
    """The names a movement log lists, in order. Lines that are not this task's names are
    skipped: taskqueue's renewal truncates a log without its lock, and a line written
    meanwhile at the old offset leaves NUL bytes before it."""
    name = re.compile(rf"\d+--{re.escape(identifier)}\.json")
    return [line for line in text.replace("\0", "\n").split("\n") if name.fullmatch(line)]


def _lock(f, wait: float) -> bool:
    """`f` under its exclusive lock, waited for up to `wait` seconds; False when it stayed
    busy (any other failure, a file system without locks say, raises). The lock goes with
    the file's closing: POSIX locks are the process's, and closing any descriptor of the file
    releases them, so one process must not open a log twice."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL_SECONDS)


@contextlib.contextmanager
def _locked_log(path: str) -> Iterator:
    """A task's movement log, open and locked; None when it is gone (the task deleted).
    OSError when its lock stays busy LOCK_WAIT_SECONDS."""
    try:
        f = open(path, "r+")  # an exclusive lock needs a file open for writing
    except FileNotFoundError:
        yield None
        return
    with f:
        if not _lock(f, LOCK_WAIT_SECONDS):
            raise OSError(f"{path}: still locked after {LOCK_WAIT_SECONDS:g} s")
        yield f


def _open_log(path: str, young: bool):
    """(file, made here): a young task's log must exist already (taskqueue's insert writes it
    after the file); an old one's is made when missing (a lease lost so)."""
    if young:
        return open(path, "r+"), False
    try:
        return open(path, "x+"), True
    except FileExistsError:
        return open(path, "r+"), False


class FileQueue:
    """The tasks of one fq:// queue, read and changed in place. `api` is taskqueue's
    FileQueueAPI of the same folder (its paths and counters).

    A worker changes a task only while it holds it: its renewal, release and delete name the
    file it holds (what `lease` and `renew` returned), and do nothing when the log's last name
    is another, a lease a second worker took once this one's ran out. Else that worker's own
    renewal would move the second's lease, its release free a task the second still runs,
    and its delete take the file from under it."""

    def __init__(self, api):
        self.api = api
        self.queue_path = api.queue_path
        self.movement_path = api.movement_path
        self.strays: list[str] = []  # what the last `candidates` found that is no task's file

    def _log(self, name: str) -> str:
        return os.path.join(self.movement_path, task_id(name))

    def check_locks(self, url: str) -> None:
        """InputError when the queue's folder cannot be written or its file system takes no
        file locks (Lustre mounted without `flock`, NFS without its lock daemon): every change
        here needs them. Locks kept within one machine (NFS's `local_lock=all`, Lustre's
        `localflock`) pass, and do not hold between workers on several machines."""
        probe = os.path.join(self.movement_path, f"lock-probe-{uuid.uuid4()}")
        try:
            f = open(probe, "x")
        except OSError as err:
            raise InputError(f"{url}: cannot write in it ({err.strerror})") from None
        try:
            with f:
                fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):  # a fresh file cannot be busy
                raise
            raise InputError(f"{url}: its file system takes no file locks ({err.strerror}); "
                             "a file queue needs them: mount it with locking (Lustre: -o "
                             "flock; NFS: with its lock daemon), or use an SQS queue") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(probe)

    # inserting ---------------------------------------------------------------------------
    def insert(self, tasks: list, queue_name: str) -> int:
        """Each task's movement log first, then its file, whole, renamed into queue/: a lease
        running meanwhile finds the file complete and its log naming it."""
        for task in tasks:
            identifier = str(uuid.uuid4())
            name = f"0--{identifier}.json"  # stamp 0: free to lease at once
            body = {"payload": totask(task).payload(), "queueName": queue_name,
                    "id": identifier}
            with open(self._log(identifier), "x") as log:
                log.write(name + "\n")
            incoming = os.path.join(self.movement_path, f"incoming-{identifier}")
            with open(incoming, "w") as f:
                f.write(jsonify(body))
            os.replace(incoming, os.path.join(self.queue_path, name))
        self.api.add_insert_count(len(tasks))
        return len(tasks)

    # leasing -----------------------------------------------------------------------------
    def candidates(self) -> list[str]:
        """Up to LEASE_CANDIDATES names of files free to lease now, in random order (so that
        workers reaching at once seldom reach for the same file)."""
        now = int(time.time())
        names, self.strays = [], []
        for entry in os.scandir(self.queue_path):
            match = TASK_FILE.fullmatch(entry.name)
            if match is None:
                self.strays.append(entry.name)  # no task's name: see `take_stray`
            elif int(match[1]) <= now:
                names.append(entry.name)
        random.shuffle(names)
        return names[:LEASE_CANDIDATES]

    def take_stray(self, name: str, destination: str) -> bool:
        """Move `name`, an entry of queue/ that no task's file is named (taskqueue counts it
        as enqueued), to `destination` as it is; False when it is young (an editor's, a copy
        under way: looked at again later) or gone (another worker moved it)."""
        path = os.path.join(self.queue_path, name)
        try:
            if time.time() - os.path.getmtime(path) < UNREADABLE_GRACE:
                return False
            os.replace(path, destination)
        except FileNotFoundError:
            return False
        return True

    def counts(self) -> tuple[int, int]:
        """(enqueued, leased) of the task files in queue/ (taskqueue's own counts fail on a
        file that no task's file is named). An InputError when queue/ is gone (the queue
        deleted while a run waits on it): a run stopped so is run again, and queues anew."""
        now, enqueued, leased = int(time.time()), 0, 0
        try:
            entries = list(os.scandir(self.queue_path))
        except FileNotFoundError:
            raise InputError(f"{self.queue_path} is gone (the file queue deleted?): run the "
                             "same command again: finished tasks are kept, the rest are "
                             "queued anew") from None
        for entry in entries:
            match = TASK_FILE.fullmatch(entry.name)
            if match is not None:
                enqueued += 1
                leased += int(match[1]) > now
        return enqueued, leased

    def lease(self, name: str, seconds: int) -> tuple[str, str] | None:
        """(the leased name, the file's text) of the queued file `name`, renamed to expire
        `seconds` from now; None when another worker holds or took it, it is done, or it is a
        young file its log does not name yet."""
        queued = os.path.join(self.queue_path, name)
        log_path = self._log(name)
        try:
            young = time.time() - os.path.getmtime(queued) < UNREADABLE_GRACE
            log_file, made = _open_log(log_path, young)
        except FileNotFoundError:  # taken or done meanwhile
            return None
        with log_file as log:
            if not _lock(log, wait=0):  # another worker's: the next file
                return None
            if young and name not in _names(log.read(), task_id(name)):
                return None
            # stamped now, not when queue/ was read: a lock can take a while
            leased = _stamped(name, int(time.time()) + int(seconds))
            path = os.path.join(self.queue_path, leased)
            try:
                os.rename(queued, path)
            except FileNotFoundError:  # another worker took it, or it is done
                if made:  # its delete had removed the log: this open made it again
                    os.remove(log_path)
                return None
            log.seek(0, os.SEEK_END)
            log.write(leased + "\n")
            log.flush()
            try:  # read under the lock: no worker moves it meanwhile
                with open(path, errors="replace") as f:
                    return leased, f.read()
            except FileNotFoundError:  # taskqueue's tools move files without the lock
                return None

    # changing a held task -------------------------------------------------------------------
    def renew(self, held: str, seconds: float) -> str | None:
        """The held file renamed to expire `seconds` from now: its new name, or None when this
        worker no longer holds it (another leased it, or it is done)."""
        identifier = task_id(held)
        with _locked_log(self._log(identifier)) as log:
            if log is None or _names(log.read(), identifier)[-1:] != [held]:
                return None
            renewed = _stamped(held, int(time.time()) + int(seconds))
            try:
                os.rename(os.path.join(self.queue_path, held),
                          os.path.join(self.queue_path, renewed))
            except FileNotFoundError:  # removed by hand, or by taskqueue's tools
                return None
            log.seek(0, os.SEEK_END)
            log.write(renewed + "\n")
            return renewed

    def release(self, held: str) -> bool:
        """The held task free to lease again now; False when this worker no longer held it."""
        return self.renew(held, 0) is not None

    def delete(self, held: str) -> bool:
        """Every file the task's log names, then the log, all under its lock; False (nothing
        removed) when this worker no longer held it: the worker that does deletes it (or did:
        a leased task has a log until its delete, so one gone was another's to count)."""
        identifier = task_id(held)
        path = self._log(identifier)
        with _locked_log(path) as log:
            if log is None:
                return False
            names = _names(log.read(), identifier)
            if names[-1:] != [held]:
                return False
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.queue_path, name))
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return True

    def tally(self) -> None:
        """One more task completed, in taskqueue's counter."""
        self.api.tally()
