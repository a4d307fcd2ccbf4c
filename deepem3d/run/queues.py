"""Queues: open one by URL, read its counters, put tasks on it, start local workers.

fq://DIR is a file queue (one machine, or a shared file system); sqs://NAME is Amazon SQS
(reach a local endpoint with AWS_ENDPOINT_URL_SQS). Whether a stage is finished is read from
its completion markers (deepem3d.stages.frame), never from these counters.

This module imports no task: a worker imports them (deepem3d.run.worker), a command that only
looks at a queue does not pay for them.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from deepem3d.errors import InputError

SCHEMES = ("fq", "sqs")
INSERT_BATCH = 1000  # tasks inserted per call: planning never holds a whole stage's tasks


def check_queue_url(url: str) -> str:
    """Return the URL, or an InputError naming the schemes deepem3d takes."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES or not rest:
        raise InputError(
            f"unknown queue {url!r}: use fq://DIRECTORY (a file queue) or sqs://QUEUE_NAME"
        )
    return url


def check_existing_queue(url: str) -> str:
    """For commands that read a queue (worker, status): a file queue must exist already;
    a mistyped directory would otherwise be created and waited on forever in silence."""
    check_queue_url(url)
    if url.startswith("fq://") and not os.path.isdir(url[len("fq://"):]):
        raise InputError(f"{url}: no such file queue (the directory does not exist); tasks "
                         "create it: check the path, or create the tasks first")
    return url


def open_queue(url: str):
    from taskqueue import TaskQueue

    return TaskQueue(check_queue_url(url), progress=False)


@dataclass
class QueueCounts:
    """inserted and completed are None where the queue does not keep them (SQS)."""

    inserted: int | None
    enqueued: int
    leased: int
    completed: int | None


def queue_counts(queue) -> QueueCounts:
    def known(value):
        value = value if value == value else None  # SQS reports NaN
        return None if value is None else int(value)

    return QueueCounts(
        inserted=known(queue.inserted),
        enqueued=int(queue.enqueued),
        leased=int(queue.leased),
        completed=known(queue.completed),
    )


def insert_tasks(url: str, tasks: Iterable) -> int:
    """Insert tasks in batches (the iterable may be lazy); returns how many."""
    queue = open_queue(url)
    if url.startswith("fq://"):
        os.makedirs(url[len("fq://"):], exist_ok=True)
    total = 0
    iterator = iter(tasks)
    while batch := list(itertools.islice(iterator, INSERT_BATCH)):
        total += queue.insert(batch, total=len(batch))
    return total


#: how often a runner's local workers poll an empty queue (they stay up between stages)
LOCAL_POLL_SECONDS = 0.05


def spawn_workers(url: str, count: int, lease_seconds: int = 600,
                  log_file=None) -> list[subprocess.Popen]:
    """Start `count` `deepem3d worker` processes for a local run: they drain `url` stage
    after stage, and stop when told (SIGTERM) or when the process that started them is gone.
    Their log goes to `log_file` when given (a progress bar owns the terminal meanwhile)."""
    command = [
        sys.executable, "-m", "deepem3d", "worker", url, "--parent-pid", str(os.getpid()),
        "--poll-seconds", str(LOCAL_POLL_SECONDS), "--lease-seconds", str(lease_seconds),
    ]
    return [subprocess.Popen(command, stderr=log_file, stdout=log_file) for _ in range(count)]

