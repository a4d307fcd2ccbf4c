"""The worker loop: lease a task, check it, keep its lease alive, run it, delete it; stop
cleanly.

taskqueue's own `poll` neither checks what it runs nor handles SIGTERM nor renews leases nor
counts attempts; this loop does all four:

- Every message is checked before it runs (deepem3d.run.admission): one of deepem3d's stage
  tasks or of a module given with --import, igneous's only the few deepem3d creates and only
  wrapped, every write path inside the allow-list when one is given. A message that is not a
  task (not JSON, not a task's shape, a class or function nobody registered) or that is
  refused is set aside on its first attempt, since no retry changes it: on fq:// in
  DIR/failed/ (ID.json the message as it was, ID.error why), on SQS in the queue's
  dead-letter queue (the message as it was, why in its `error` attribute). The worker goes
  on.
- Leases are counted per task (fq://: in DIR/attempts/; SQS: the message's receive count); a
  task leased more than `max_attempts` times is set aside the same way instead of coming back
  forever. On an SQS queue with a redrive policy (`deepem3d queue create`) the policy's
  receive limit is the one limit, so that the queue's setting is not undercut by a worker's.
- Running a task is guarded against BaseException (taskqueue raises some), so nothing a task
  raises stops the worker; a task that raises is released for a retry at once.
- SIGTERM (what Kubernetes sends, also ahead of a Spot preemption): the worker takes no new
  task. The task at hand is finished when its expected time (the longest of its stage's first
  completion markers) fits in the grace period (`grace_seconds`, the pod's
  terminationGracePeriodSeconds, less GRACE_MARGIN); otherwise, or when nothing tells how long
  it takes, its lease is released at once (it goes back to the queue) and the worker exits 0,
  so a preemption loses no time to a lease timeout; a task leased but not yet started goes
  back at once. Ctrl-C finishes the task at hand (one not yet started goes back); a second one
  stops at once (the task comes back when its lease expires).
- A background thread renews the lease of a long task every third of the lease time, so a
  task that outlives its lease is not handed to a second worker. A file lease runs from its
  rename (stamped in whole seconds, so at least MIN_FILE_LEASE_SECONDS).
- Every failure of a frame task leaves an error record, LAYER/tasks/STAGE/errors/ID.json (the
  last line of the error, the attempt, the host), since an SQS message cannot carry one.
- One log line per task: `finished task ID (stage LAYER/STAGE TASK) in S s, peak memory M MiB`;
  errors name the task id. Logs hold no credential: nothing here prints a payload's secrets,
  and payloads hold none (CloudVolume reads its secrets from the environment or files).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

from taskqueue import QueueEmptyError
from taskqueue.lib import jsonify
from taskqueue.queueables import totask

from deepem3d.errors import InputError, ServiceUnavailable
from deepem3d.memory import peak_rss
from deepem3d.run.admission import Refused, admit, normal_path
from deepem3d.run.file_queue import UNREADABLE_GRACE, FileQueue, task_id
from deepem3d.run.queues import (
    SQS_MAX_VISIBILITY,
    QueueMissing,
    check_lease,
    enqueued,
    open_queue,
    sqs_call,
)
from deepem3d.stages.frame import Markers, frame_run, stage_label
from deepem3d.storage.whole_files import task_attempt

if TYPE_CHECKING:
    from taskqueue.queueablefns import FunctionTask
    from taskqueue.registered_task import RegisteredTask

log = logging.getLogger("deepem3d.run.worker")

#: the modules whose import registers every deepem3d task (igneous's register lazily, when a
#: MarkedTask runs one)
TASK_MODULES = ("deepem3d.stages.frame", "deepem3d.stages.inference",
                "deepem3d.stages.supervoxels", "deepem3d.stages.graph",
                "deepem3d.stages.octree", "deepem3d.stages.resample")


def register_tasks() -> None:
    import importlib

    for module in TASK_MODULES:
        importlib.import_module(module)


#: seconds an SQS receive waits for a message (a long poll: fewer empty receives)
SQS_WAIT_SECONDS = 2
#: how long SQS may answer "no such queue" before the worker takes the queue for deleted and
#: stops: AWS asks for at least a second between a queue's creation and its use, and a queue
#: seen at the worker's start that one endpoint does not know yet is that lag, not a deletion
QUEUE_MISSING_SECONDS = 10
#: the termination grace Kubernetes gives a pod by default, and about what a GKE Spot node
#: gives before it goes
GRACE_SECONDS = 30
#: seconds of the grace kept for what follows a task (its marker, deleting its message, exit)
GRACE_MARGIN = 5
#: completion markers of a stage read for a task's expected time
EXPECTED_SAMPLE = 16


class Preempted(BaseException):
    """Raised in the main thread by SIGTERM when the task at hand would outlast the grace
    period: the task stops and its lease is released. A BaseException, so that no `except
    Exception` in a task swallows it."""


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def record_error(task: FunctionTask | RegisteredTask, err: BaseException,
                 attempt: int | None) -> None:
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


def stage_of(task: FunctionTask | RegisteredTask) -> str:
    """`stage LAYER/STAGE TASK-ID` of a frame task (what a log reader needs to know what is
    in flight), or `-` for a task outside the frame."""
    run = frame_run(task)
    return "-" if run is None else f"stage {stage_label(run)} {run.get('id')}"


def expected_seconds(task: FunctionTask | RegisteredTask) -> float | None:
    """How long a frame task takes: the longest of its stage's first EXPECTED_SAMPLE markers
    (None for a task outside the frame, a stage with no marker yet, or markers out of reach)."""
    run = frame_run(task)
    if run is None:
        return None
    try:
        seconds = [r.get("seconds") for r in
                   Markers(run["layer"], run["stage"]).sample_records(EXPECTED_SAMPLE)]
    except Exception:  # noqa: BLE001  (an estimate: a failure only means "unknown")
        return None
    seconds = [float(s) for s in seconds if isinstance(s, int | float)]
    return max(seconds) if seconds else None


@dataclass
class WorkerReport:
    executed: int = 0
    errors: int = 0
    given_up: int = 0
    released: int = 0
    stopped_by_signal: bool = False


@dataclass
class _Message:
    """An SQS message in hand: its id (for logs), receive count, body and when it came."""

    id: str
    count: int
    body: str
    received: float


@dataclass
class _Running:
    """The task at hand, for the SIGTERM handler."""

    task: object
    started: float
    expected: float | None = None
    signalled: bool = False  # the handler has seen it (a stop asked before it was not)


class _LeaseKeeper:
    """Renews a task's lease in the background until stopped."""

    def __init__(self, renew, task, seconds: int):
        self._renew, self._task, self._seconds = renew, task, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = max(0.1, self._seconds / 3)  # within a file lease: MIN_FILE_LEASE_SECONDS
        while not self._stop.wait(interval):
            try:
                self._renew(self._task, self._seconds)
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
        allow_prefixes: tuple[str, ...] = (),
        imported: tuple[str, ...] = (),
        grace_seconds: float = GRACE_SECONDS,
    ):
        register_tasks()
        #: what the worker runs besides deepem3d's stage tasks, and where tasks may write
        self.allow_prefixes = tuple(normal_path(p) for p in allow_prefixes)
        self.imported = tuple(imported)
        self.grace_seconds = float(grace_seconds)
        #: a runner's local workers stop when the runner is gone (even SIGKILLed, even before
        #: this worker got this far: the runner passes its own pid)
        self.parent = parent_pid
        self.url = url
        check_lease(url, lease_seconds)
        self.queue = open_queue(url)
        self.lease_seconds = int(lease_seconds)
        self.exit_when_empty = exit_when_empty
        self.max_tasks = max_tasks
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self.stop_requested = threading.Event()
        self._file_queue_dir = url[len("fq://"):] if url.startswith("fq://") else None
        self._files = FileQueue(self.queue.api) if self._file_queue_dir is not None else None
        if self._files is not None:
            self._files.check_locks(url)
        #: fq://: task id -> the name of the file this worker holds
        self._held: dict[str, str] = {}
        self._running: _Running | None = None
        #: SQS: receipt handle -> the message in hand
        self._messages: dict[str, _Message] = {}
        self._redrive_policy: tuple[str | None, int | None] | None = None
        #: messages set aside as they were leased (not tasks): given up, for the exit status
        self._refused_messages = 0

    # signals -------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_requested.set()
        running = self._running
        if running is not None:
            running.signalled = True
        name = signal.Signals(signum).name
        if signum != signal.SIGTERM or running is None:
            log.info("received %s: stopping after the current task", name)
            return
        elapsed = time.time() - running.started
        left = self.grace_seconds - GRACE_MARGIN
        known = running.expected is not None and elapsed <= running.expected
        if known and running.expected - elapsed <= left:
            log.info("received %s: finishing task %s (expected %.0f s more, grace %.0f s)",
                     name, self._label(running.task), running.expected - elapsed,
                     self.grace_seconds)
            # a task that overruns its estimate is released before the grace runs out
            signal.setitimer(signal.ITIMER_REAL, max(0.1, left))
            return
        expected = ("its time is unknown" if running.expected is None else
                    f"it has run {elapsed:.0f} s, longer than expected" if not known else
                    f"expected {running.expected - elapsed:.0f} s more")
        log.info("received %s: releasing task %s (%s, grace %.0f s)", name,
                 self._label(running.task), expected, self.grace_seconds)
        raise Preempted

    def _on_alarm(self, signum, frame) -> None:
        """The grace is nearly spent and the task it was to finish still runs: release it."""
        if self._running is not None:
            log.info("task %s outlasts the grace period: releasing it",
                     self._label(self._running.task))
            raise Preempted

    def _install_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {signal.SIGALRM: signal.signal(signal.SIGALRM, self._on_alarm)}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    # fq:// attempt accounting -------------------------------------------------------
    def _attempts_path(self, task) -> str | None:
        if self._file_queue_dir is None:
            return None
        return os.path.join(self._file_queue_dir, "attempts", str(task.id))

    def _count_attempt(self, task) -> int:
        if self._file_queue_dir is None:  # SQS counts receives
            message = self._messages.get(task.id)
            return message.count if message else 1
        path = self._attempts_path(task)
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
        """Set the task aside; a failure to do so is logged (the task comes back, and the
        attempt limit or the redrive policy catches it later)."""
        try:
            self._set_aside_task(task, reason)
        except Exception as err:  # noqa: BLE001
            log.error("could not set task %s aside (%s): %s", self._label(task), reason, err)

    def _set_aside_task(self, task, reason: str) -> None:
        if self._file_queue_dir is None:
            message = self._messages.get(task.id)
            self._set_aside(task.id, message.body if message else "", reason)
            return
        payload = task.payload()
        self._set_aside(task.id, jsonify(payload if isinstance(payload, dict)
                                         else list(payload)), reason)
        self._forget_attempts(task)

    def _label(self, task) -> str:
        """The id a log line gives a task: on SQS the message id (its receipt handle is long
        and changes with every receive)."""
        message = self._messages.get(task.id)
        return message.id if message else str(task.id)

    # the loop -----------------------------------------------------------------------
    def _lease(self):
        if self._file_queue_dir is not None:
            return self._lease_file()
        return self._lease_sqs()

    def _lease_sqs(self):
        """One message of an SQS queue, received here (not by taskqueue, which raises on a
        message that does not parse before anything can be done with it) with its receive
        count; a message that is not a task is set aside in the dead-letter queue at once."""
        api = self.queue.api
        self._messages.clear()
        reply = sqs_call(f"receiving from {self.url}", api.sqs.receive_message,
                         QueueUrl=api.qurl, MaxNumberOfMessages=1,
                         VisibilityTimeout=self.lease_seconds, WaitTimeSeconds=SQS_WAIT_SECONDS,
                         AttributeNames=["ApproximateReceiveCount"])
        messages = reply.get("Messages") or []
        if not messages:
            raise QueueEmptyError
        message = messages[0]
        handle, body = message["ReceiptHandle"], message["Body"]
        count = int(message.get("Attributes", {}).get("ApproximateReceiveCount", 1))
        self._messages[handle] = _Message(message["MessageId"], count, body, time.time())
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            data["id"] = handle
            return totask(data)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001  (taskqueue raises BaseExceptions)
            self._set_aside(handle, body, f"not a task: {_last_line(err)}")
            self._refused_messages += 1
        raise QueueEmptyError

    def _lease_file(self):
        """One task of an fq:// queue (deepem3d.run.file_queue), read here so that a file that
        is not a task is set aside instead of coming back forever (taskqueue's own lease
        retries a file that does not parse, hides it for the lease time, and reports the
        queue empty); one young enough to be still being written is looked at again soon."""
        for name in self._files.candidates():
            leased = self._files.lease(name, self.lease_seconds)
            if leased is None:
                continue
            leased, text = leased
            self._held[task_id(leased)] = leased
            try:
                task = totask(json.loads(text))
                task.id = task_id(leased)  # the file's id, whatever the JSON says
                return task
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as err:  # noqa: BLE001  (taskqueue raises BaseExceptions)
                path = os.path.join(self._files.queue_path, leased)
                try:
                    young = time.time() - os.path.getmtime(path) < UNREADABLE_GRACE
                except FileNotFoundError:  # removed meanwhile (taskqueue's tools)
                    self._held.pop(task_id(leased), None)
                    continue
                if young:  # perhaps half written: look again soon
                    self._files.renew(self._held.pop(task_id(leased)), 1)
                    continue
                self._set_aside(task_id(leased), text, f"not a task: {_last_line(err)}")
                self._refused_messages += 1
        failed_dir = os.path.join(self._file_queue_dir, "failed")
        for name in self._files.strays:
            os.makedirs(failed_dir, exist_ok=True)
            if self._files.take_stray(name, os.path.join(failed_dir, f"{name}.json")):
                self._note_set_aside(name, failed_dir, "not a task: an entry of queue/ not "
                                     "named STAMP--ID.json (moved here as it was)")
                self._refused_messages += 1
        raise QueueEmptyError

    def _set_aside(self, identifier: str, text: str, reason: str) -> None:
        if self._file_queue_dir is None:
            self._set_aside_sqs(identifier, text, reason)
            return
        failed_dir = os.path.join(self._file_queue_dir, "failed")
        os.makedirs(failed_dir, exist_ok=True)
        with open(os.path.join(failed_dir, f"{identifier}.json"), "w") as f:
            f.write(text)
        held = self._held.pop(identifier, None)
        if held is not None:
            self._files.delete(held)
        self._note_set_aside(identifier, failed_dir, reason)

    def _note_set_aside(self, identifier: str, failed_dir: str, reason: str) -> None:
        with open(os.path.join(failed_dir, f"{identifier}.error"), "w") as f:
            f.write(reason + "\n")
        log.error("task %s set aside in %s: %s", identifier, failed_dir, reason)

    def _set_aside_sqs(self, handle: str, body: str, reason: str) -> None:
        """The message, as it came, into the queue's dead-letter queue (the target of its
        redrive policy) with why in its `error` attribute, then off the queue. A queue
        without a dead-letter queue keeps it, hidden for SQS_MAX_VISIBILITY."""
        api = self.queue.api
        held = self._messages.get(handle)
        label = held.id if held else handle
        try:
            dead = self._dead_letter()
        except InputError as err:  # (no sqs:GetQueueAttributes, say) the redrive will do it
            log.error("task %s is refused (%s) but cannot be set aside: %s", label, reason,
                      err)
            return
        if dead is None:
            # SQS counts its 12 h limit from the receive: hide it for what is left of that
            hidden = int(SQS_MAX_VISIBILITY - (time.time() - (held.received if held else 0))
                         - 60)
            log.error("task %s is refused (%s), and %s has no dead-letter queue (create it "
                      "with `deepem3d queue create`): hidden for %d s", label, reason,
                      self.url, max(hidden, 0))
            if hidden > 0:
                sqs_call("hiding a message", api.sqs.change_message_visibility,
                         QueueUrl=api.qurl, ReceiptHandle=handle, VisibilityTimeout=hidden)
            return
        try:
            sqs_call("setting a message aside", api.sqs.send_message, QueueUrl=dead,
                     MessageBody=body or "(empty)", MessageAttributes={
                         "error": {"DataType": "String", "StringValue": reason[:1000]},
                         "task": {"DataType": "String", "StringValue": label}})
        except InputError as err:  # (no sqs:SendMessage on it, say) the redrive will do it
            log.error("task %s is refused (%s) but cannot be set aside: %s", label, reason,
                      err)
            return
        sqs_call("deleting a message", api.sqs.delete_message, QueueUrl=api.qurl,
                 ReceiptHandle=handle)
        log.error("task %s set aside in %s: %s", label, dead.rsplit("/", 1)[-1], reason)

    def _redrive(self) -> tuple[str | None, int | None]:
        """The SQS queue's dead-letter queue and receive limit (its redrive policy), read
        once; (None, None) without a policy."""
        if self._redrive_policy is None:
            api = self.queue.api
            attributes = sqs_call("reading the queue's redrive policy",
                                  api.sqs.get_queue_attributes, QueueUrl=api.qurl,
                                  AttributeNames=["RedrivePolicy"]).get("Attributes", {})
            if "RedrivePolicy" not in attributes:
                self._redrive_policy = (None, None)
            else:
                policy = json.loads(attributes["RedrivePolicy"])
                arn = policy["deadLetterTargetArn"]
                url = sqs_call("finding the dead-letter queue", api.sqs.get_queue_url,
                               QueueName=arn.rsplit(":", 1)[-1])["QueueUrl"]
                self._redrive_policy = (url, int(policy["maxReceiveCount"]))
        return self._redrive_policy

    def _dead_letter(self) -> str | None:
        return self._redrive()[0]

    def _attempt_limit(self) -> int:
        """The leases a task gets: on an SQS queue with a redrive policy, the policy's (`queue
        create --max-attempts`: one setting, which SQS applies anyway), else the worker's."""
        if self._file_queue_dir is None:
            try:
                limit = self._redrive()[1]
            except InputError as err:  # (no sqs:GetQueueAttributes, a blip): asked again
                log.warning("%s; counting attempts up to --max-attempts", err)
                limit = None
            if limit is not None:
                return limit
        return self.max_attempts

    def run(self) -> WorkerReport:
        report = WorkerReport()
        previous = self._install_handlers()
        idle = 0
        missing_since = None  # the first of consecutive "no such queue" answers
        try:
            while not self.stop_requested.is_set():
                if self.parent is not None and os.getppid() != self.parent:
                    log.info("the process that started this worker is gone: stopping")
                    break
                if self.max_tasks is not None and report.executed >= self.max_tasks:
                    break
                try:
                    task = self._lease()
                except (QueueEmptyError, InputError, OSError) as err:
                    # the queue was there at start (and took locks): a blip, an NFS hiccup
                    missing_since = ((missing_since or time.monotonic())
                                     if isinstance(err, QueueMissing) else None)
                    if not isinstance(err, QueueEmptyError):
                        if self._queue_gone() or (isinstance(err, QueueMissing) and
                                                  time.monotonic() - missing_since
                                                  >= QUEUE_MISSING_SECONDS):
                            log.error("%s: stopping", err if isinstance(err, QueueMissing)
                                      else f"{self.url}: the queue's folders are gone "
                                      "(deleted?)")
                            report.errors += 1
                            break
                        log.warning("%s; trying again", err)
                    elif self.exit_when_empty and enqueued(self.queue) == 0:
                        break
                    idle += 1
                    # back off while idle, up to ten polls' time
                    self.stop_requested.wait(self.poll_seconds * min(10, idle))
                    continue
                idle, missing_since = 0, None
                if self.stop_requested.is_set():  # stopped while the message came in
                    self._release(task)
                    report.released += 1
                    break
                self._execute(task, report)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        report.stopped_by_signal = self.stop_requested.is_set()
        report.given_up += self._refused_messages
        return report

    def _queue_gone(self) -> bool:
        """Whether a file queue's queue/ or movement/ folder is gone: no blip, for good."""
        return self._files is not None and not (
            os.path.isdir(self._files.queue_path) and os.path.isdir(self._files.movement_path))

    def _execute(self, task, report: WorkerReport) -> None:
        label = self._label(task)
        try:
            name = admit(task, prefixes=self.allow_prefixes, imported=self.imported)
        except Refused as err:
            report.given_up += 1
            self._give_up(task, f"refused: {err}")
            return
        attempts = self._count_attempt(task)
        if attempts > self._attempt_limit():
            self._give_up(task, f"leased {attempts - 1} times without finishing")
            report.given_up += 1
            return
        log.info("running task %s (%s, %s, attempt %d)", label, name, stage_of(task), attempts)
        start = time.time()
        keeper = _LeaseKeeper(self._renew, task, self.lease_seconds)
        running = _Running(task, start)
        threading.Thread(target=self._estimate, args=(running,), daemon=True).start()
        try:
            try:
                self._running = running
                if self.stop_requested.is_set() and not running.signalled:
                    log.info("releasing task %s: stopped before it started", label)
                    raise Preempted
                with task_attempt(label, attempts):  # its id: the same on every attempt
                    task.execute()
            finally:
                self._running = None
                if threading.current_thread() is threading.main_thread():
                    signal.setitimer(signal.ITIMER_REAL, 0)  # the grace's timer, if set
        except Preempted:
            keeper.stop()
            report.released += 1
            self._release(task)
            return
        except KeyboardInterrupt:
            keeper.stop()
            raise
        except InputError as err:
            keeper.stop()
            report.errors += 1
            passing = isinstance(err, ServiceUnavailable)  # a service may answer on a retry
            log.error("task %s (%s) %s: %s", label, name, "met a service that did not answer"
                      if passing else "failed on its input", err)
            record_error(task, err, attempts)
            if passing:
                self._release(task)
            else:  # bad input fails the same way on every retry: once, visibly (the task's
                # stage has its failure record, which the runner reports)
                self._give_up(task, _last_line(err))
            return
        except BaseException as err:  # noqa: BLE001  (taskqueue raises BaseExceptions)
            keeper.stop()
            report.errors += 1
            log.error("task %s (%s) raised:\n%s", label, stage_of(task),
                      traceback.format_exc().rstrip())
            record_error(task, err, attempts)
            self._release(task)  # let it be retried now rather than at lease expiry
            return
        keeper.stop()
        self._forget_attempts(task)  # first: a worker killed after the delete left it behind
        try:
            self._delete(task)
        except Exception as err:  # noqa: BLE001  (it comes back; its marker skips it)
            log.warning("could not delete finished task %s: %s", label, err)
        report.executed += 1
        log.info("finished task %s (%s) in %.2f s, peak memory %.0f MiB", label,
                 stage_of(task), time.time() - start, peak_rss() / 2**20)

    @staticmethod
    def _estimate(running: _Running) -> None:
        running.expected = expected_seconds(running.task)

    # a leased task: on fq:// changed under its lock (taskqueue's own calls truncate the
    # movement log before they lock it), on SQS through taskqueue -------------------------
    # (fq://: only while this worker holds the task, `_held` its file's name)
    def _renew(self, task, seconds: int) -> None:
        if self._files is None:
            self.queue.renew(task, seconds)
            return
        held = self._held.get(task.id)
        if held is None:  # lost before: said so then
            return
        renewed = self._files.renew(held, seconds)
        if renewed is not None:
            self._held[task.id] = renewed
            return
        del self._held[task.id]
        log.warning("task %s: its lease ran out and another worker holds it now, or it is "
                    "gone from the queue; this worker finishes it but no longer renews it",
                    self._label(task))

    def _delete(self, task) -> None:
        if self._files is None:
            self.queue.delete(task, tally=True)
            return
        held = self._held.pop(task.id, None)
        if held is not None and self._files.delete(held):
            self._files.tally()
        else:
            log.info("task %s: not deleted by this worker: another holds it now, or deleted "
                     "it", self._label(task))

    def _release(self, task) -> None:
        try:
            if self._files is None:
                self.queue.cancel(task)
            elif (held := self._held.pop(task.id, None)) is not None:
                self._files.release(held)
        except Exception as err:  # noqa: BLE001  (it comes back at lease expiry anyway)
            log.warning("could not release task %s: %s", self._label(task), err)
