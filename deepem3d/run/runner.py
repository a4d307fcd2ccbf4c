"""The runner: take stages in order, put each one's tasks on its queue, wait for its markers.

A stage's tasks are created only once every stage it needs is complete (read from their
markers, never from queue counters), so a stage is a barrier. With `parallel`, local worker
processes drain each stage's queue (their log goes to a file, so that the progress bar keeps
the terminal); without, the tasks wait for workers elsewhere (Kubernetes pods) and the runner
only watches the markers. A task that fails on an input error leaves a failure record, and the
runner stops with its message at once instead of letting every retry fail the same way.

Re-running the same stages after any interruption continues where they stopped: finished
tasks have markers and are not created again; a task created twice writes the same bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from deepem3d.errors import InputError, warn
from deepem3d.run.queues import (
    check_queue,
    check_queue_url,
    enqueued,
    insert_tasks,
    open_queue,
    spawn_workers,
    worker_command,
)
from deepem3d.stages.frame import Stage, stage_label
from deepem3d.storage.cloud import answered

POLL_SECONDS = 1.0  # how often a run waiting for workers elsewhere reads the markers
#: the same with local workers (the demo's short stages took 1 s each at 1.0)
LOCAL_MARKER_POLL_SECONDS = 0.1
# A wait with nothing finished polls less and less often: x1.5 per idle poll, up to this many
# times the first interval (1 s -> 30 s: a stage of 6e7 tasks lists its markers, 60,000 list
# requests, a few times a minute instead of every second); a finished task resets it
POLL_BACKOFF = 30
# Tasks a stage keeps on its queue ahead of its markers: the runner inserts this many, then
# tops the queue up as they finish, so a stage of 1e8 tasks never sits on SQS for longer than
# its retention (4 days on a queue made elsewhere with SQS's default; `deepem3d queue create`
# sets 14) and planning streams rather than holds them
WAVE_TASKS = 1_000_000
LOG_TAIL = 20  # lines of the workers' log shown when a stage fails
#: how often a run waiting on an SQS queue looks into its dead-letter queue for this stage's
#: tasks (a task set aside there never gets its marker: without the look the run would wait
#: for ever); a look is a list, up to PEEK_LIMIT / 10 receives and as many releases
DEAD_LETTER_CHECK_SECONDS = 30
SENT_CLOCK_MARGIN_MS = 60_000  # a laptop's clock ahead of the queue's by up to a minute
MAX_RESTARTS = 3  # per local worker and run: more deaths than that stop the run

Route = Callable[[Stage], str]
Execute = Callable[[Stage, Iterator], int]


class _DeadLetterWatch:
    """On an sqs:// queue, every DEAD_LETTER_CHECK_SECONDS: an InputError naming a task of the
    stage that is still unfinished and was sent since this run sent the stage's tasks (older
    entries are earlier runs', whose tasks this run has sent again)."""

    def __init__(self, url: str, stage: Stage, since_ms: int):
        self.url, self.label, self.since_ms = url, stage.label, since_ms
        self.set_aside_as = stage_label({"layer": stage.layer, "stage": stage.name})
        self.next_look = time.monotonic() + DEAD_LETTER_CHECK_SECONDS
        self.blind = not url.startswith("sqs://")

    def check(self, remaining: Iterable[str]) -> None:
        if self.blind or time.monotonic() < self.next_look:
            return
        from deepem3d.run.queue_admin import DEAD_LETTER_SUFFIX, set_aside

        self.next_look = time.monotonic() + DEAD_LETTER_CHECK_SECONDS
        try:
            found = set_aside(self.url)
        except InputError as err:
            if "AccessDenied" not in str(err) and "not authorized" not in str(err):
                return  # a passing failure (throttled, a timeout): look again next time
            self.blind = True  # no right to look: say so once, and wait as before
            warn(f"cannot read the dead-letter queue ({err}): a task set aside there would "
                 "leave this run waiting")
            return
        unfinished = set(remaining)
        for entry in found:
            if (entry.stage == self.set_aside_as and entry.run_id in unfinished
                    and (entry.sent_ms or 0) >= self.since_ms):
                raise InputError(
                    f"stage {self.label}: task {entry.run_id} was set aside in "
                    f"{self.url}{DEAD_LETTER_SUFFIX}: {entry.reason}; fix the cause and run "
                    "the same command again (finished stages are kept; it sends the "
                    "unfinished tasks again)")


@dataclass
class StageSummary:
    """One stage of a run, from its markers."""

    label: str
    tasks: int
    ran: int
    seconds: float
    task_seconds: float = 0.0
    slowest: float = 0.0
    peak_mib: float = 0.0
    peak_added_mib: float = 0.0
    note: str | None = None
    #: from its first task's start to its last task's end, by the markers' clocks: the time a
    #: stage took whichever invocation ran it (a run stopped and started again)
    span: float = 0.0
    #: its first task's start, by the markers' clock (None: no marker says): which run of the
    #: stage its markers hold, for a report's seconds of an earlier invocation to be its own
    began: float | None = None

    def line(self) -> str:
        if self.note:
            return f"stage {self.label}: {self.note}"
        return (f"stage {self.label}: {self.tasks} task(s) ({self.ran} run now) in "
                f"{self.seconds:.1f} s; task seconds {self.task_seconds:.1f}, slowest "
                f"{self.slowest:.2f} s, largest task peak {self.peak_mib:.0f} MiB "
                f"(+{self.peak_added_mib:.0f} over its worker's baseline)")


def summarise(stage: Stage, ran: int, seconds: float) -> StageSummary:
    records = stage.markers.records()
    times = [float(r.get("seconds", 0)) for r in records]
    peaks = [float(r.get("peak_mib", 0)) for r in records]
    added = [float(r.get("peak_added_mib", 0)) for r in records]
    starts = [float(r["started"]) for r in records if "started" in r]
    ends = [float(r["started"]) + float(r.get("seconds", 0)) for r in records if "started" in r]
    return StageSummary(stage.label, len(records), ran, seconds, sum(times),
                        max(times, default=0.0), max(peaks, default=0.0),
                        max(added, default=0.0),
                        span=max(ends) - min(starts) if starts else 0.0,
                        began=min(starts) if starts else None)


def execute_here(stage: Stage, tasks: Iterator) -> int:
    """Run a stage's tasks in this process, each through its JSON payload and the worker's
    admission checks as a worker would (tests and benchmarks)."""
    from taskqueue.queueables import totask

    from deepem3d.run.admission import admit
    from deepem3d.stages.frame import payload_of

    count = 0
    for task in tasks:
        received = totask(payload_of(task))
        admit(received)
        received.execute()
        count += 1
    return count


class Runner:
    """Runs stages in order. `route(stage)` names the queue of each stage; `parallel` local
    workers drain it (None: workers elsewhere do); `execute` replaces the queue altogether.
    The local workers are stopped when `run` returns, or with `keep_workers` when the caller
    calls `stop_workers` (a pipeline runs its stages in several calls: a worker's start, its
    imports and its model cost about 3 s)."""

    def __init__(
        self, route: Route, *, parallel: int | None = None, echo: Callable[[str], None] = print,
        progress: bool = True, execute: Execute | None = None, poll: float | None = None,
        log_path: str | None = None, lease_seconds: int = 60, wait: bool = True,
        wave: int = WAVE_TASKS, keep_workers: bool = False,
        local_queues: set[str] | None = None,
    ):
        if wave < 1:
            raise ValueError(f"wave must be at least 1 task, got {wave}")
        self.wave = wave
        self.wait = wait
        self.keep_workers = keep_workers
        self.route = route
        self.lease_seconds = lease_seconds
        self._workers: dict[str, list] = {}  # queue url -> its local worker processes
        self._restarts = 0
        self._done: set[str] = set()  # stage names and labels completed by this runner
        self.parallel = parallel
        # the queues `parallel` local workers drain (None: every one); the others' workers are
        # elsewhere (a pipeline's GPU pool while local workers drain the queue it was given)
        self.local_queues = local_queues
        self.echo = echo
        self.progress = progress
        self.execute = execute
        if poll is None:
            poll = LOCAL_MARKER_POLL_SECONDS if parallel else POLL_SECONDS
        self.poll = poll
        self.log_path = log_path

    def run(self, stages: Iterable[Stage]) -> list[StageSummary]:
        with self._log() as (log, path):
            self._log_file, self._log_path = log, path
            try:
                ran = self._run(stages)
            except BaseException:
                self.stop_workers()
                raise
            if not self.keep_workers:
                self.stop_workers()
            return ran

    def stop_workers(self) -> None:
        """SIGTERM every local worker (each finishes its task at hand), then wait."""
        procs = [p for group in self._workers.values() for p in group]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait()
        self._workers.clear()

    def _run(self, stages: Iterable[Stage]) -> list[StageSummary]:
        done = self._done
        ran = []
        for stage in stages:
            missing = [n for n in stage.needs if n not in done]
            if missing:
                raise InputError(f"stage {stage.label} needs {', '.join(missing)}, which this "
                                 "run has not completed: list the stages in order")
            with answered(f"stage {stage.label}"):  # an endpoint lost: exit 75, a rerun
                summary = self.run_stage(stage)
            ran.append(summary)
            self.echo(summary.line())
            done.add(stage.name)
            done.add(stage.label)
        return ran

    def run_stage(self, stage: Stage) -> StageSummary:
        if (self.parallel and stage.hardware == "gpu" and self._drained_here(self.route(stage))
                and stage.task_count and not stage.is_complete()):
            _check_local_gpu(stage)  # before prepare, which may replace an old layer
        if stage.prepare is not None:
            stage.prepare()
        stage.start()
        if stage.note:
            return StageSummary(stage.label, 0, 0, 0.0, note=stage.note)
        start = time.perf_counter()
        if self.execute is not None:
            ran = self.execute(stage, stage.tasks())
        elif not self.wait and not self.parallel:
            url = check_queue_url(self.route(stage))
            ran = insert_tasks(url, stage.tasks())
            return StageSummary(stage.label, ran, 0, 0.0, note=(
                f"{ran} task(s) on {url}; run `{worker_command(url)}` to execute them"))
        else:
            ran = self._queue_stage(stage)
        if not stage.is_complete():
            remaining = stage.markers.remaining()
            raise InputError(f"stage {stage.label} is incomplete: {len(remaining)} task(s) "
                             "without a completion marker; run the same command again: "
                             "finished tasks are kept")
        if stage.finish is not None:
            stage.finish()
        return summarise(stage, ran, time.perf_counter() - start)

    # ------------------------------------------------------------------------------------
    def _queue_stage(self, stage: Stage) -> int:
        url = check_queue_url(self.route(stage))
        wave = _Wave(url, stage.tasks(), self.wave, len(stage.markers.remaining()))
        if self._drained_here(url):
            if url not in self._workers:  # started once per queue, kept for later stages
                self._workers[url] = spawn_workers(url, self.parallel, self.lease_seconds,
                                                   log_file=self._log_file)
            self._wait(stage, url, self._workers[url], self._log_path, wave)
        else:
            if wave.inserted:
                more = "" if wave.exhausted else " (more as they finish)"
                self.echo(f"stage {stage.label}: {wave.inserted} task(s) on {url}{more}; "
                          f"waiting for workers (`{worker_command(url)}`)")
            self._wait(stage, url, None, None, wave)
        return wave.inserted

    def _drained_here(self, url: str | None) -> bool:
        """Whether local workers drain the queue at `url`."""
        return bool(self.parallel) and (self.local_queues is None or url in self.local_queues)

    @contextlib.contextmanager
    def _log(self):
        if self.execute is not None or not self.parallel:
            yield None, None
            return
        if self.log_path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            with open(self.log_path, "ab") as log:
                yield log, self.log_path
            return
        with tempfile.NamedTemporaryFile(prefix="deepem3d-workers-", suffix=".log",
                                         delete=False) as log:
            yield log, log.name

    def _wait(self, stage: Stage, url: str, procs, log_path: str | None,
              wave: _Wave | None = None) -> None:
        """Until every task of the stage has its marker, topping its queue up a wave at a
        time (none: every task is on it already); InputError on a failure record, on local
        workers that all exited, or on a file queue emptied with tasks unmarked."""
        from tqdm import tqdm

        wave = wave or _Wave(url, iter(()), self.wave, 0)

        markers = stage.markers
        remaining = markers.task_ids()  # read once; then only the unfinished are followed
        total = len(remaining)
        queue = open_queue(url) if url.startswith("fq://") else None
        dead_letters = _DeadLetterWatch(url, stage, wave.started_ms)
        poll = self.poll
        with tqdm(total=total, desc=stage.label, disable=None if self.progress else True,
                  file=sys.stderr, leave=False) as bar:
            while True:
                before = len(remaining)
                remaining = markers.unfinished(remaining, total)
                bar.update(total - len(remaining) - bar.n)
                if not remaining:
                    return
                wave.top_up(len(remaining))
                poll = self.poll if len(remaining) < before else min(
                    poll * 1.5, self.poll * POLL_BACKOFF)
                failures = markers.failures()
                if failures:
                    task_id, message = next(iter(failures.items()))
                    raise InputError(f"stage {stage.label}: task {task_id} failed: {message}")
                if procs is not None:
                    self._replace_dead(stage, url, procs, log_path)
                dead_letters.check(remaining)
                if queue is not None and enqueued(queue) == 0:
                    wave.top_up(len(remaining), empty=True)
                    remaining = markers.unfinished(remaining, total)  # marked, then left
                    if remaining and wave.exhausted and enqueued(queue) == 0:
                        if log_path and os.path.exists(log_path):
                            self._show_log(log_path)
                        where = f"the workers' log {log_path}" if log_path else "the worker logs"
                        failed = os.path.join(url[len("fq://"):], "failed")
                        why = (f"they failed (see {failed}/ and {where}); fix the cause and "
                               if os.path.isdir(failed) and os.listdir(failed) else
                               f"{failed}/ holds none: the queue was emptied or deleted while "
                               "the run waited; ")
                        raise InputError(
                            f"stage {stage.label}: {url} is empty but {len(remaining)} task(s) "
                            f"have no completion marker: {why}run the same command again: "
                            "finished stages are kept")
                time.sleep(poll)

    def _replace_dead(self, stage: Stage, url: str, procs: list, log_path: str | None) -> None:
        """A local worker that died (killed, out of memory) is replaced, a few times: its task
        comes back to the queue when its lease expires and another worker redoes it."""
        for k, proc in enumerate(procs):
            if proc.poll() is None:
                continue
            if self._restarts >= MAX_RESTARTS * max(1, self.parallel or 1):
                raise InputError(self._incomplete(stage, procs, log_path))
            self._restarts += 1
            self.echo(f"a local worker exited (status {proc.returncode}) during stage "
                      f"{stage.label}: starting another; its task returns to the queue when "
                      f"its lease ({self.lease_seconds} s) expires")
            procs[k] = spawn_workers(url, 1, self.lease_seconds, log_file=self._log_file)[0]

    @staticmethod
    def _show_log(log_path: str) -> None:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()[-LOG_TAIL:]
        sys.stderr.write("\n".join(lines) + "\n")

    def _incomplete(self, stage: Stage, procs, log_path: str | None) -> str:
        codes = [p.returncode for p in procs]
        tail = ""
        if log_path and os.path.exists(log_path):
            self._show_log(log_path)
            tail = f"; the workers' log is {log_path} (its end is above)"
        return (f"stage {stage.label} incomplete: {len(stage.markers.remaining())} task(s) "
                f"without a completion marker (worker exit codes {codes}){tail}; fix the cause "
                "and run the same command again: finished tasks are kept")


class _Wave:
    """A stage's lazy tasks on their queue, at most `size` ahead of their markers: the first
    wave goes on at once, the rest as tasks finish (`unfinished`: the stage's tasks without a
    marker before any was inserted)."""

    def __init__(self, url: str, tasks: Iterator, size: int, unfinished: int):
        self.url, self.size = url, size
        self._tasks = iter(tasks)
        self._unfinished = unfinished
        self.inserted = 0
        self.exhausted = False
        #: when the first task was sent (ms since the epoch, less SENT_CLOCK_MARGIN_MS for
        #: the queue's clock against this machine's)
        self.started_ms = int(time.time() * 1000) - SENT_CLOCK_MARGIN_MS
        self.top_up(unfinished)

    def top_up(self, unfinished: int, *, empty: bool = False) -> None:
        """Once at most half a wave is left ahead of the markers, insert up to a whole one;
        a whole one when the queue is `empty` (tasks that failed never get their marker)."""
        if self.exhausted:
            return
        ahead = 0 if empty else self.inserted - (self._unfinished - unfinished)
        if ahead > self.size // 2:
            return
        want = self.size - ahead
        added = insert_tasks(self.url, itertools.islice(self._tasks, want))
        self.inserted += added
        self.exhausted = added < want


def _check_local_gpu(stage: Stage) -> None:
    """A stage planned for CUDA workers, run by local workers here: refused at once when this
    machine has no CUDA device (its tasks would each fail on it)."""
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"stage {stage.label} was planned for CUDA (--device cuda; a "
                         "pipeline's inference.device) and this machine, where its local "
                         "workers run, has none: leave its tasks to GPU workers on a queue, or "
                         "plan it for cpu or auto")


def run_stages(
    stages: Iterable[Stage], *, queue: str | None = None, parallel: int | None = None,
    echo: Callable[[str], None] = print, progress: bool = True,
    execute: Execute | None = None, wait: bool = True,
) -> list[StageSummary]:
    """Run stages on one queue (a command's --queue): without one, a temporary file queue with
    `parallel` (default 1) local workers; with one and no `parallel`, workers elsewhere, which
    the run waits for (or, with `wait` False, only puts the tasks there: one stage, no
    barrier to keep)."""
    if execute is not None:
        return Runner(lambda s: "", echo=echo, progress=progress, execute=execute).run(stages)
    if queue is None:
        tmp = tempfile.mkdtemp(prefix="deepem3d-queue-")
        runner = Runner(lambda s: f"fq://{tmp}", parallel=parallel or 1, echo=echo,
                        progress=progress, log_path=os.path.join(tmp, "workers.log"))
        keep = False
        try:
            return runner.run(stages)
        except InputError as err:
            keep = tmp in str(err)  # it names the queue's failed/ or the workers' log: kept
            raise
        finally:
            if not keep:
                shutil.rmtree(tmp, ignore_errors=True)
    check_queue(queue)
    return Runner(lambda s: queue, parallel=parallel, echo=echo, progress=progress,
                  wait=wait).run(stages)
