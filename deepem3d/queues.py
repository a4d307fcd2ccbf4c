"""Queues: open one by URL, read its counters, and run a stage on local worker processes.

fq://DIR is a file queue (one machine, or a shared file system); sqs://NAME is Amazon SQS
(reach a local endpoint with AWS_ENDPOINT_URL_SQS). Whether a stage is finished is read from
its completion markers (deepem3d.tasks.markers), never from these counters.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from taskqueue import TaskQueue
from tqdm import tqdm

from deepem3d.errors import InputError
from deepem3d.tasks.markers import Stage

SCHEMES = ("fq", "sqs")


def check_queue_url(url: str) -> str:
    """Return the URL, or an InputError naming the schemes deepem3d takes."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES or not rest:
        raise InputError(
            f"unknown queue {url!r}: use fq://DIRECTORY (a file queue) or sqs://QUEUE_NAME"
        )
    return url


def open_queue(url: str) -> TaskQueue:
    return TaskQueue(check_queue_url(url), progress=False)


@dataclass
class QueueCounts:
    """inserted and completed are None where the queue does not keep them (SQS)."""

    inserted: int | None
    enqueued: int
    leased: int
    completed: int | None


def queue_counts(queue: TaskQueue) -> QueueCounts:
    def known(value):
        value = value if value == value else None  # SQS reports NaN
        return None if value is None else int(value)

    return QueueCounts(
        inserted=known(queue.inserted),
        enqueued=int(queue.enqueued),
        leased=int(queue.leased),
        completed=known(queue.completed),
    )


def insert_tasks(url: str, tasks: list) -> int:
    queue = open_queue(url)
    if not tasks:
        return 0
    return queue.insert(tasks, total=len(tasks))


def spawn_workers(url: str, count: int, lease_seconds: int = 600) -> list[subprocess.Popen]:
    """Start `count` `deepem3d worker` processes that exit when the queue is empty."""
    command = [
        sys.executable, "-m", "deepem3d", "worker", url,
        "--exit-when-empty", "--lease-seconds", str(lease_seconds),
    ]
    return [subprocess.Popen(command) for _ in range(count)]


def wait_for_stage(stage: Stage, workers: list[subprocess.Popen], progress: bool = True) -> None:
    """Show the stage's progress (from markers) until the workers exit; fail if incomplete."""
    total = len(stage.task_ids())
    with tqdm(total=total, desc=stage.name, disable=not progress, file=sys.stderr) as bar:
        while True:
            running = [w for w in workers if w.poll() is None]
            done = total - len(stage.remaining())
            bar.update(done - bar.n)
            if not running:
                break
            time.sleep(0.5)
    failed = [w.returncode for w in workers if w.returncode != 0]
    missing = stage.remaining()
    if missing:
        raise InputError(
            f"stage {stage.name} incomplete: {len(missing)} of {total} task(s) without a "
            f"completion marker (worker exit codes {failed or 'all 0'}); see the worker log "
            "above, fix the cause and re-run the same command: finished tasks are skipped"
        )


def run_stage(
    stage: Stage,
    tasks: list,
    *,
    queue: str | None,
    parallel: int | None,
    progress: bool = True,
) -> str:
    """Put the tasks of a stage on a queue; with local workers, run them to completion.

    Without a queue, a temporary file queue is used and `parallel` (default 1) local workers
    drain it. With a queue and no --parallel, the tasks wait there for workers elsewhere.
    Returns a one-line summary.
    """
    if queue is None:
        with tempfile.TemporaryDirectory(prefix="deepem3d-queue-") as tmp:
            return run_stage(
                stage, tasks, queue=f"fq://{tmp}", parallel=parallel or 1, progress=progress
            )
    check_queue_url(queue)
    inserted = insert_tasks(queue, tasks)
    if not parallel:
        return (
            f"{inserted} task(s) of stage {stage.name} on {queue}; run `deepem3d worker "
            f"{queue}` to execute them"
        )
    if queue.startswith("fq://"):
        os.makedirs(queue[len("fq://"):], exist_ok=True)
    workers = spawn_workers(queue, parallel)
    try:
        wait_for_stage(stage, workers, progress=progress)
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
                w.wait()
    return f"stage {stage.name} complete: {len(stage.task_ids())} task(s) ({inserted} run now)"
