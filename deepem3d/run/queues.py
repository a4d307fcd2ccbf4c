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
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from deepem3d.errors import InputError
from deepem3d.storage.cloud import boto_config
from deepem3d.storage.paths import enclosing_layer

if TYPE_CHECKING:
    from botocore.client import BaseClient
    from taskqueue import TaskQueue

SCHEMES = ("fq", "sqs")
INSERT_BATCH = 1000  # tasks inserted per call: planning never holds a whole stage's tasks
#: a file lease is stamped in whole seconds, so one of L seconds may last only L - 1; renewed
#: every third of L, 3 s is the shortest that leaves a renewal a second to spare (at 1 s, two
#: workers ran one task at once in 9 of 17 runs of a 4-task, 2-worker queue)
MIN_FILE_LEASE_SECONDS = 3
#: SQS's longest visibility timeout (12 h), and so the longest lease (a file lease stamps its
#: end in its file's name, where 10^17 s overflowed the clock)
SQS_MAX_VISIBILITY = 12 * 3600


#: SQS's longest queue name (`queue create` leaves room in it for the dead-letter queue's suffix)
SQS_MAX_NAME = 80
#: an SQS queue's name: 1 to SQS_MAX_NAME letters, digits, - and _
SQS_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{SQS_MAX_NAME}}}")


class QueueMissing(InputError):
    """An SQS queue that does not exist (not yet, or no longer: deleted while workers poll
    it), which no retry brings back."""


def check_queue_url(url: str) -> str:
    """Return the URL, or an InputError naming the schemes deepem3d takes."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES or not rest:
        raise InputError(
            f"unknown queue {url!r}: use fq://DIRECTORY (a file queue) or sqs://QUEUE_NAME"
        )
    if scheme == "sqs" and not SQS_NAME.fullmatch(rest):
        raise InputError(f"{url}: an SQS queue's name is 1 to {SQS_MAX_NAME} letters, digits, "
                         "- and _")
    if scheme == "fq":
        where = enclosing_layer(rest)
        if where is not None:
            raise InputError(f"{url} is or lies in the precomputed layer {where}, not a "
                             "file queue: give the queue a folder of its own (a run's is "
                             "OUTPUT/queue)")
    return url


def worker_command(url: str) -> str:
    """`deepem3d worker URL` to paste: the path shell-quoted, and a file queue's made absolute
    (a worker started in another folder would drain another queue)."""
    if url.startswith("fq://"):
        url = "fq://" + os.path.abspath(os.path.expanduser(url[len("fq://"):]))
    return f"deepem3d worker {shlex.quote(url)}"


def check_queue(url: str) -> str:
    """check_queue_url, and an SQS queue looked up: before a command writes anything, so that
    a queue that does not exist or cannot be reached leaves no output behind."""
    check_queue_url(url)
    if url.startswith("sqs://"):
        look_up_sqs_queue(url)
    return url


def look_up_sqs_queue(url: str) -> BaseClient:
    """The SQS client that found the queue sqs://NAME; a missing queue, an endpoint that does
    not answer or missing credentials are one-line InputErrors within seconds."""
    sqs = sqs_client()
    sqs_call(url, sqs.get_queue_url, QueueName=url[len("sqs://"):])
    return sqs


def check_existing_queue(url: str, done: str) -> str:
    """For commands that read a queue (worker, status): a file queue must exist already;
    a mistyped directory would otherwise be created and waited on forever in silence."""
    check_queue_url(url)
    if url.startswith("fq://"):
        if not os.path.isdir(url[len("fq://"):]):
            raise InputError(f"{url}: no such file queue (the directory does not exist); "
                             "tasks create it: check the path, or create the tasks first")
        check_file_queue(url, done)
    return url


def check_file_queue(url: str, done: str) -> None:
    """InputError unless the fq:// folder holds a file queue's queue/ and movement/ (opening
    one lays them out: a command that reads a queue must not make one of any folder, and a
    worker opened on the folder above a queue would take the queue's own folders for stray
    tasks)."""
    folder = url[len("fq://"):]
    if not os.path.isdir(os.path.join(folder, "queue")) or not os.path.isdir(
            os.path.join(folder, "movement")):
        raise InputError(f"{url}: not a file queue (no queue/ and movement/ inside): {done}")


def sqs_client() -> BaseClient:
    """A boto3 SQS client with bounded timeouts; endpoint, region and credentials from the
    usual places (AWS_ENDPOINT_URL_SQS, AWS_DEFAULT_REGION, the environment, the pod's role)."""
    import boto3

    try:
        return boto3.client("sqs", config=boto_config())
    except Exception as err:  # noqa: BLE001  (botocore's NoRegionError and kin)
        raise InputError(f"cannot reach SQS: {err} (set AWS_DEFAULT_REGION)") from None


def sqs_call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """One SQS call (or taskqueue's, which makes them), its failures (no credentials, no
    answer, no such queue) as one-line InputErrors that name no credential
    (ServiceUnavailable where SQS did not answer)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    from deepem3d.storage.cloud import unavailable

    try:
        return fn(**kwargs)
    except ClientError as err:
        unavailable(what, err)
        error = err.response.get("Error", {})
        code = str(error.get("Code"))
        region = getattr(getattr(getattr(fn, "__self__", None), "meta", None), "region_name",
                         None)
        if "NonExistentQueue" in code or "QueueDoesNotExist" in code:
            raise QueueMissing(f"{what}: no such SQS queue in region {region} (check "
                             "AWS_DEFAULT_REGION, or create it with `deepem3d queue create`)"
                             ) from None
        if "QueueAlreadyExists" in code or "QueueNameExists" in code:
            raise InputError(f"{what}: the queue exists with other settings: keep it, or "
                             "`deepem3d queue delete` it first (its messages go with it)"
                             ) from None
        raise InputError(f"{what}: {code}: {error.get('Message')}") from None
    except NoCredentialsError:
        raise InputError(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, a profile, or the pod's role)") from None
    except BotoCoreError as err:
        unavailable(what, err)
        raise InputError(f"{what}: {err}") from None


def check_lease(url: str, seconds: int) -> None:
    """InputError for a lease a file queue cannot keep."""
    if url.startswith("fq://") and seconds < MIN_FILE_LEASE_SECONDS:
        raise InputError(f"--lease-seconds {seconds} is too short for a file queue, whose "
                         f"leases are stamped in whole seconds: give at least "
                         f"{MIN_FILE_LEASE_SECONDS}")


def open_queue(url: str) -> TaskQueue:
    """taskqueue's TaskQueue for the URL; an SQS queue is looked up first (look_up_sqs_queue)."""
    from taskqueue import TaskQueue

    check_queue_url(url)
    if not url.startswith("sqs://"):
        return TaskQueue(url, progress=False)
    sqs = look_up_sqs_queue(url)
    return TaskQueue(url, progress=False, config=boto_config(),
                     region_name=sqs.meta.region_name)


@dataclass
class QueueCounts:
    """inserted and completed are None where the queue does not keep them (SQS)."""

    inserted: int | None
    enqueued: int
    leased: int
    completed: int | None


def enqueued(queue: TaskQueue) -> int:
    """Tasks on the queue, leased or not; of a file queue, its task files only (taskqueue
    counts any entry in queue/, so a stray file or folder kept it from ever emptying)."""
    if queue.path.protocol == "fq":
        from deepem3d.run.file_queue import FileQueue

        return FileQueue(queue.api).counts()[0]
    # an endpoint lost since the queue was opened: one line and exit 75, not a traceback
    return int(sqs_call(f"counting the tasks of sqs://{queue.path.path}",
                        lambda: queue.enqueued))


def queue_counts(queue: TaskQueue) -> QueueCounts:
    def known(value: float) -> int | None:
        value = value if value == value else None  # SQS reports NaN
        return None if value is None else int(value)

    if queue.path.protocol == "fq":  # taskqueue's counts fail on a file not a task's
        from deepem3d.run.file_queue import FileQueue

        waiting, leased = FileQueue(queue.api).counts()
    else:
        waiting, leased = sqs_call(f"counting the tasks of sqs://{queue.path.path}",
                                   lambda: (int(queue.enqueued), int(queue.leased)))
    return QueueCounts(inserted=known(queue.inserted), enqueued=waiting, leased=leased,
                       completed=known(queue.completed))


def insert_tasks(url: str, tasks: Iterable) -> int:
    """Insert tasks in batches (the iterable may be lazy); returns how many."""
    from deepem3d.run.file_queue import FileQueue

    queue = open_queue(url)
    if url.startswith("fq://"):
        os.makedirs(url[len("fq://"):], exist_ok=True)
    total = 0
    iterator = iter(tasks)
    while batch := list(itertools.islice(iterator, INSERT_BATCH)):
        if url.startswith("fq://"):
            total += FileQueue(queue.api).insert(batch, queue.path.path)
        else:
            # an endpoint lost after the look-up: exit 75 and a rerun, not a traceback
            total += sqs_call(f"inserting tasks into {url}", queue.insert, tasks=batch,
                              total=len(batch))
    return total


#: how often a runner's local workers poll an empty queue (they stay up between stages)
WORKER_IDLE_POLL_SECONDS = 0.05
#: the shortest --poll-seconds a command takes (`worker`, `queue status --watch`): below the
#: runner's own WORKER_IDLE_POLL_SECONDS
MIN_POLL_SECONDS = 0.01


def spawn_workers(url: str, count: int, lease_seconds: int = 600,
                  log_file: IO[bytes] | None = None) -> list[subprocess.Popen]:
    """Start `count` `deepem3d worker` processes for a local run: they drain `url` stage
    after stage, and stop when told (SIGTERM) or when the process that started them is gone.
    Their log goes to `log_file` when given (a progress bar owns the terminal meanwhile)."""
    check_lease(url, lease_seconds)
    if url.startswith("fq://"):  # the run's own one-line error, before any worker starts
        from deepem3d.run.file_queue import FileQueue

        FileQueue(open_queue(url).api).check_locks(url)
    command = [
        sys.executable, "-m", "deepem3d", "worker", url, "--parent-pid", str(os.getpid()),
        "--poll-seconds", str(WORKER_IDLE_POLL_SECONDS), "--lease-seconds", str(lease_seconds),
    ]
    return [subprocess.Popen(command, stderr=log_file, stdout=log_file) for _ in range(count)]

