"""The worker loop: lease a task, keep its lease alive, run it, delete it; stop cleanly.

taskqueue's own `poll` neither handles SIGTERM nor renews leases nor counts attempts; this
loop does all three:

- SIGTERM (what Kubernetes sends) or Ctrl-C: finish the task at hand, delete it, exit 0.
  A second Ctrl-C stops at once; the unfinished task comes back when its lease expires.
- A background thread renews the lease of a long task every third of the lease time, so a
  task that outlives its lease is not handed to a second worker.
- On fq:// queues, leases are counted per task; a task leased more than `max_attempts` times
  is moved to DIR/failed/ instead of coming back forever. On SQS, give the queue a redrive
  policy (a dead-letter queue) for the same effect.
- A message that is not a task (not JSON, not a task's shape, a task class nobody registered)
  never stops the worker: on fq:// it is set aside in DIR/failed/ the first time it is leased
  and UNREADABLE_GRACE old (ID.json the message as it was, ID.error why); on SQS it is logged
  and returns after its visibility timeout until the redrive policy moves it to the
  dead-letter queue.
- Every failure of a frame task leaves an error record, LAYER/tasks/STAGE/errors/ID.json (the
  last line of the error, the attempt, the host), since an SQS message cannot carry one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass

from taskqueue import QueueEmptyError
from taskqueue.lib import jsonify
from taskqueue.queueablefns import UnregisteredFunctionError
from taskqueue.queueables import totask

from deepem3d.errors import InputError
from deepem3d.memory import peak_rss
from deepem3d.run.queues import open_queue
from deepem3d.stages.frame import Markers, frame_run, stage_label

log = logging.getLogger("deepem3d.run.worker")

#: the modules whose import registers every deepem3d task (igneous's register lazily, when a
#: MarkedTask runs one)
TASK_MODULES = ("deepem3d.stages.frame", "deepem3d.stages.inference",
                "deepem3d.stages.supervoxels", "deepem3d.stages.graph",
                "deepem3d.stages.octree")


def register_tasks() -> None:
    import importlib

    for module in TASK_MODULES:
        importlib.import_module(module)


#: files of an fq:// queue a lease tries before it reports the queue empty (others may take
#: the same files meanwhile)
LEASE_CANDIDATES = 16
#: seconds an fq:// file that does not parse is given before it is set aside: taskqueue's
#: insert creates the file and then writes it, and a lease in between reads it empty
UNREADABLE_GRACE = 5.0
#: what a message that is not a task raises when taskqueue reads it (JSON, shape, class)
NOT_A_TASK = (ValueError, KeyError, IndexError, TypeError, UnregisteredFunctionError)


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def record_error(task, err: BaseException, attempt: int | None) -> None:
    """The frame task's error record (nothing for a task outside the frame). `attempt` None
    (SQS, where the worker counts nothing): one more than the last record's."""
    run = frame_run(task)
    if run is None:
        return
    try:
        markers = Markers(run["layer"], run["stage"])
        if attempt is None:
            attempt = int((markers.error_record(run["id"]) or {}).get("attempt", 0)) + 1
        markers.record_error(run["id"], {
            "error": _last_line(err), "attempt": attempt, "host": socket.gethostname(),
            "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except Exception as failure:  # the record must not hide the error it records
        log.warning("could not write the error record of task %s: %s", run.get("id"), failure)


def stage_of(task) -> str:
    """`stage LAYER/STAGE TASK-ID` of a frame task (what a log reader needs to know what is
    in flight), or `-` for a task outside the frame."""
    run = frame_run(task)
    return "-" if run is None else f"stage {stage_label(run)} {run.get('id')}"


@dataclass
class WorkerReport:
    executed: int = 0
    errors: int = 0
    given_up: int = 0
    stopped_by_signal: bool = False


class _LeaseKeeper:
    """Renews a task's lease in the background until stopped."""

    def __init__(self, queue, task, seconds: int):
        self._queue, self._task, self._seconds = queue, task, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = max(1.0, self._seconds / 3)
        while not self._stop.wait(interval):
            try:
                self._queue.renew(self._task, self._seconds)
            except Exception as err:  # a failed renewal must not kill the task
                log.warning("could not renew the lease of task %s: %s", self._task.id, err)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    """Drains one queue. `run()` returns a WorkerReport."""

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: int = 600,
        exit_when_empty: bool = False,
        max_tasks: int | None = None,
        max_attempts: int = 5,
        poll_seconds: float = 1.0,
        parent_pid: int | None = None,
    ):
        register_tasks()
        #: a runner's local workers stop when the runner is gone (even SIGKILLed, even before
        #: this worker got this far: the runner passes its own pid)
        self.parent = parent_pid
        self.url = url
        self.queue = open_queue(url)
        self.lease_seconds = int(lease_seconds)
        self.exit_when_empty = exit_when_empty
        self.max_tasks = max_tasks
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self.stop_requested = threading.Event()
        self._file_queue_dir = url[len("fq://"):] if url.startswith("fq://") else None

    # signals -------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("received %s: stopping after the current task", signal.Signals(signum).name)
        self.stop_requested.set()

    def _install_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    # fq:// attempt accounting -------------------------------------------------------
    def _attempts_path(self, task) -> str | None:
        if self._file_queue_dir is None:
            return None
        return os.path.join(self._file_queue_dir, "attempts", str(task.id))

    def _count_attempt(self, task) -> int:
        path = self._attempts_path(task)
        if path is None:
            return 1
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab") as f:
            f.write(b".")
        return os.path.getsize(path)

    def _forget_attempts(self, task) -> None:
        path = self._attempts_path(task)
        if path is not None:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def _give_up(self, task, reason: str) -> None:
        if self._file_queue_dir is None:  # SQS: the redrive policy moves it
            self.queue.cancel(task)
            return
        payload = task.payload()
        self._set_aside(task.id, jsonify(payload if isinstance(payload, dict)
                                         else list(payload)), reason)
        self._forget_attempts(task)

    # the loop -----------------------------------------------------------------------
    def _lease(self):
        if self._file_queue_dir is not None:
            return self._lease_file()
        try:
            return self.queue.lease(seconds=self.lease_seconds, wait_sec=2)
        except NOT_A_TASK as err:  # the redrive policy retires the message
            log.error("a message of %s is not a task (%s): it returns after its visibility "
                      "timeout until the dead-letter queue takes it", self.url, _last_line(err))
            raise QueueEmptyError from None

    def _lease_file(self):
        """One task of an fq:// queue, leased as taskqueue's FileQueueAPI does (the same
        renames and movement log, so its renew, delete and cancel work), but read here so that
        a file that is not a task is set aside instead of coming back forever (the API's own
        lease retries a file that does not parse, hides it for the lease time, and reports
        the queue empty). A file younger than UNREADABLE_GRACE may still be being written by
        an insert: it is left for the next lease instead."""
        from taskqueue.file_queue_api import idfn, set_timestamp, write_lock_file

        api = self.queue.api
        now = int(time.time())
        names = []
        for entry in os.scandir(api.queue_path):
            stamp = entry.name.split("--")[0]
            if "--" in entry.name and stamp.isdigit() and int(stamp) <= now:
                names.append(entry.name)
        random.shuffle(names)
        for name in names[:LEASE_CANDIDATES]:
            leased = set_timestamp(name, now + self.lease_seconds)
            path = os.path.join(api.queue_path, leased)
            try:
                with write_lock_file(open(os.path.join(api.movement_path, idfn(leased)),
                                          "a")) as f:
                    os.rename(os.path.join(api.queue_path, name), path)
                    f.write(leased + "\n")
                with open(path, errors="replace") as f:
                    text = f.read()
            except OSError:  # another worker took it, or its lock is busy: the next one
                continue
            try:
                task = totask(json.loads(text))
                task.id = idfn(leased)  # the file's id, whatever the JSON says
                return task
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as err:  # noqa: BLE001  (taskqueue raises BaseExceptions)
                if time.time() - os.path.getmtime(path) < UNREADABLE_GRACE:
                    api.renew_lease(idfn(leased), 1)  # perhaps half written: look again soon
                    continue
                self._set_aside(idfn(leased), text, f"not a task: {_last_line(err)}")
        raise QueueEmptyError

    def _set_aside(self, task_id: str, text: str, reason: str) -> None:
        failed_dir = os.path.join(self._file_queue_dir, "failed")
        os.makedirs(failed_dir, exist_ok=True)
        with open(os.path.join(failed_dir, f"{task_id}.json"), "w") as f:
            f.write(text)
        with open(os.path.join(failed_dir, f"{task_id}.error"), "w") as f:
            f.write(reason + "\n")
        self.queue.api.delete(task_id)
        log.error("task %s set aside in %s: %s", task_id, failed_dir, reason)

    def run(self) -> WorkerReport:
        report = WorkerReport()
        previous = self._install_handlers()
        idle = 0
        try:
            while not self.stop_requested.is_set():
                if self.parent is not None and os.getppid() != self.parent:
                    log.info("the process that started this worker is gone: stopping")
                    break
                if self.max_tasks is not None and report.executed >= self.max_tasks:
                    break
                try:
                    task = self._lease()
                except QueueEmptyError:
                    if self.exit_when_empty and self.queue.enqueued == 0:
                        break
                    idle += 1
                    # back off while idle, up to ten polls' time
                    self.stop_requested.wait(self.poll_seconds * min(10, idle))
                    continue
                idle = 0
                self._execute(task, report)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        report.stopped_by_signal = self.stop_requested.is_set()
        return report

    def _execute(self, task, report: WorkerReport) -> None:
        attempts = self._count_attempt(task)
        if attempts > self.max_attempts:
            self._give_up(task, f"leased {attempts - 1} times without finishing")
            report.given_up += 1
            return
        name = ".".join(task.key) if hasattr(task, "key") else type(task).__name__
        log.info("running task %s (%s, %s, attempt %d)", task.id, name, stage_of(task),
                 attempts)
        start = time.time()
        keeper = _LeaseKeeper(self.queue, task, self.lease_seconds)
        try:
            task.execute()
        except (InputError, UnregisteredFunctionError) as err:
            # bad input fails the same way on every retry: once, visibly (the task's stage
            # has its failure record, which the runner reports)
            keeper.stop()
            report.errors += 1
            log.error("task %s (%s) failed on its input: %s", task.id, name, err)
            record_error(task, err, attempts if self._file_queue_dir is not None else None)
            self._give_up(task, _last_line(err))
            return
        except Exception as err:
            keeper.stop()
            report.errors += 1
            log.error("task %s raised:\n%s", task.id, traceback.format_exc().rstrip())
            record_error(task, err, attempts if self._file_queue_dir is not None else None)
            try:
                self.queue.cancel(task)  # let it be retried now rather than at lease expiry
            except Exception as err:
                log.warning("could not release task %s: %s", task.id, err)
            return
        keeper.stop()
        self.queue.delete(task, tally=True)
        self._forget_attempts(task)
        report.executed += 1
        log.info("finished task %s (%s) in %.2f s, peak memory %.0f MiB", task.id,
                 stage_of(task), time.time() - start, peak_rss() / 2**20)
