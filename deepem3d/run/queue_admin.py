"""Creating, deleting and inspecting queues: what `deepem3d queue` does.

    create sqs://NAME    NAME and NAME-dead-letter: 14-day retention on both (SQS's default,
                         4 days, silently drops what a long stage leaves waiting), a redrive
                         policy that moves a message received `max_attempts` times to the
                         dead-letter queue, a visibility timeout of at least the workers' lease
    create fq://DIR      the directory (workers count attempts there and set tasks aside in
                         DIR/failed/)
    delete               the queue (and its dead-letter queue); a directory only when it holds
                         a file queue
    set_aside            what the workers gave up on (DIR/failed/, or the dead-letter queue),
                         each joined with its stage's error record when it is a frame task

The AWS endpoint and region come from the usual places (AWS_ENDPOINT_URL_SQS for a local
endpoint such as moto, AWS_DEFAULT_REGION, credentials from the environment or the instance's
role); nothing here prints them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass

from deepem3d.errors import InputError
from deepem3d.run.queues import (
    SQS_MAX_NAME,
    SQS_MAX_VISIBILITY,
    check_file_queue,
    check_lease,
    check_queue_url,
    sqs_call,
    sqs_client,
)

RETENTION_SECONDS = 14 * 24 * 3600  # SQS's maximum; its default (4 days) loses slow stages
DEAD_LETTER_SUFFIX = "-dead-letter"
# `set_aside` on a dead-letter queue: it reads up to PEEK_LIMIT messages, each hidden from
# other readers for PEEK_HIDE_SECONDS so that the next receive returns new ones (a receive
# that hides nothing returns the same ten again and again: at most 100 were ever seen), then
# shows them all again at once. A look that dies midway leaves them hidden that long. It ends
# within half that time, before the first it hid can come round again, or on a reply of
# messages it has seen.
PEEK_LIMIT = 2000
PEEK_HIDE_SECONDS = 60


def create_queue(url: str, *, max_attempts: int = 5, visibility_seconds: int = 900,
                 lease_seconds: int | None = None) -> str:
    """Create the queue (see the module docstring); returns what was made, in words."""
    check_queue_url(url)
    name = url.removeprefix("sqs://")
    if url.startswith("sqs://") and len(name + DEAD_LETTER_SUFFIX) > SQS_MAX_NAME:
        raise InputError(f"{url}: a name of at most {SQS_MAX_NAME - len(DEAD_LETTER_SUFFIX)} "
                         f"characters leaves room for its dead-letter queue's "
                         f"({DEAD_LETTER_SUFFIX}) within SQS's {SQS_MAX_NAME}")
    if lease_seconds is not None:
        check_lease(url, lease_seconds)  # the workers of a file queue would refuse it
    if (url.startswith("sqs://") and lease_seconds is not None
            and visibility_seconds < lease_seconds):  # a file queue has no visibility timeout
        raise InputError(f"--visibility-seconds {visibility_seconds} is below the workers' "
                         f"lease ({lease_seconds} s): a task would be handed to a second "
                         "worker while the first still runs it")
    if not 1 <= visibility_seconds <= SQS_MAX_VISIBILITY:
        raise InputError(f"--visibility-seconds {visibility_seconds}: SQS takes 1 to "
                         f"{SQS_MAX_VISIBILITY}")
    if url.startswith("fq://"):
        from deepem3d.run.queues import open_queue

        os.makedirs(url[len("fq://"):], exist_ok=True)
        open_queue(url)  # taskqueue lays out its folders
        return f"file queue {url}"
    name = url[len("sqs://"):]
    sqs = sqs_client()
    dead = sqs_call(f"creating {name}{DEAD_LETTER_SUFFIX}", sqs.create_queue,
                 QueueName=f"{name}{DEAD_LETTER_SUFFIX}",
                 Attributes={"MessageRetentionPeriod": str(RETENTION_SECONDS)})["QueueUrl"]
    arn = sqs_call("reading the dead-letter queue", sqs.get_queue_attributes, QueueUrl=dead,
                AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sqs_call(f"creating {name}", sqs.create_queue, QueueName=name, Attributes={
        "MessageRetentionPeriod": str(RETENTION_SECONDS),
        "VisibilityTimeout": str(visibility_seconds),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": arn,
                                     "maxReceiveCount": str(max_attempts)}),
    })
    return (f"SQS queue {name} (visibility {visibility_seconds} s, 14-day retention) and "
            f"{name}{DEAD_LETTER_SUFFIX}, which takes a message received {max_attempts} times")


#: what a file queue's folder holds: taskqueue's (queue/, movement/, the counters), the
#: workers' lease counts (attempts/), the tasks they set aside (failed/) and, in a local run's
#: temporary queue, their log
FILE_QUEUE_ENTRIES = ("queue", "movement", "completions", "insertions", "attempts", "failed",
                      "workers.log")


def check_deletable(url: str) -> None:
    """InputError unless URL is a queue that `delete_queue` may remove: said before a user
    is asked to confirm (a file queue's folder is checked here; an SQS queue when deleted)."""
    check_queue_url(url)
    if url.startswith("fq://"):
        folder = url[len("fq://"):]
        if os.path.islink(folder.rstrip("/")):  # rmtree refuses a link, or empties its target
            raise InputError(f"{url} is a symbolic link: give the folder it points to "
                             f"({os.path.realpath(folder)}): nothing deleted")
        check_file_queue(url, "nothing deleted")
        others = sorted(set(os.listdir(folder)) - set(FILE_QUEUE_ENTRIES))
        if others:  # a layer or a run's folder that a queue was opened on: not ours to delete
            raise InputError(f"{url} holds more than a file queue ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}): nothing deleted")


def delete_queue(url: str) -> str:
    check_deletable(url)
    if url.startswith("fq://"):
        shutil.rmtree(url[len("fq://"):])
        return f"deleted {url}"
    name = url[len("sqs://"):]
    sqs = sqs_client()
    urls = {}
    for queue in (name, f"{name}{DEAD_LETTER_SUFFIX}"):
        found = sqs_call("listing queues", sqs.list_queues,
                      QueueNamePrefix=queue).get("QueueUrls", [])
        for queue_url in found:
            if queue_url.rstrip("/").rsplit("/", 1)[-1] == queue:
                urls[queue] = queue_url
    if name not in urls:  # before any delete: a mistyped name must not cost a dead-letter
        # queue (NAME-dead-letter of a queue deleted by other means keeps what it holds)
        raise InputError(f"{url}: no such SQS queue: nothing deleted")
    for queue, queue_url in urls.items():
        sqs_call(f"deleting {queue}", sqs.delete_queue, QueueUrl=queue_url)
    return f"deleted {' and '.join(urls)}"


@dataclass
class SetAside:
    """A task the workers gave up on, with why."""

    task_id: str
    stage: str  # LAYER/STAGE of a frame task, "-" for others
    reason: str
    #: when the message was sent (SQS, ms since the epoch; a worker's set-aside is a new
    #: message, a redrive keeps the time the runner sent it), None on a file queue
    sent_ms: int | None = None
    #: a frame task's id in its stage (what its completion marker is named by)
    run_id: str | None = None


def _joined(task_id: str, text: str, reason: str) -> SetAside:
    """A set-aside task with its stage and, for a frame task, its stage's error record."""
    from deepem3d.stages.frame import Markers, frame_run, stage_label

    try:
        run = frame_run(json.loads(text))
    except ValueError:
        run = None
    if run is None:
        return SetAside(task_id, "-", reason or "no reason recorded")
    try:
        record = Markers(run["layer"], run.get("stage")).error_record(run.get("id"))
    except Exception:  # noqa: BLE001  (the listing must not fail on one unreadable record)
        record = None
    if record:
        reason = f"{record.get('error')} (attempt {record.get('attempt')} on {record.get('host')})"
    return SetAside(task_id, stage_label(run), reason or "no reason recorded",
                    run_id=str(run.get("id")))


def set_aside(url: str) -> list[SetAside]:
    """The tasks in DIR/failed/ of an fq:// queue, or (a look that leaves them there, up to
    PEEK_LIMIT of them) in the dead-letter queue of an sqs:// one."""
    if url.startswith("sqs://"):
        return _dead_letters(url[len("sqs://"):])
    folder = os.path.join(url[len("fq://"):], "failed")
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".json"):
            continue
        task_id = name[: -len(".json")]
        error = os.path.join(folder, f"{task_id}.error")
        reason = open(error).read().strip() if os.path.exists(error) else ""
        path = os.path.join(folder, name)
        if os.path.isdir(path):  # a folder a worker found in queue/ and moved here
            found.append(_joined(task_id, "", reason))
            continue
        with open(path, errors="replace") as f:
            found.append(_joined(task_id, f.read(2**20), reason))
    return found


def _dead_letters(name: str) -> list[SetAside]:
    sqs = sqs_client()
    found = sqs_call("listing queues", sqs.list_queues,
                  QueueNamePrefix=f"{name}{DEAD_LETTER_SUFFIX}").get("QueueUrls", [])
    dead = next((u for u in found if u.endswith(f"/{name}{DEAD_LETTER_SUFFIX}")), None)
    if dead is None:
        return []
    seen: dict[str, SetAside] = {}
    handles: list[str] = []
    until = time.monotonic() + PEEK_HIDE_SECONDS / 2
    try:
        wait = 0
        while len(seen) < PEEK_LIMIT and time.monotonic() < until:
            reply = sqs_call("reading the dead-letter queue", sqs.receive_message,
                             QueueUrl=dead, MaxNumberOfMessages=10,
                             VisibilityTimeout=PEEK_HIDE_SECONDS, WaitTimeSeconds=wait,
                             MessageAttributeNames=["All"], AttributeNames=["SentTimestamp"])
            messages = reply.get("Messages", [])
            if not messages:
                if wait:
                    break
                wait = 1  # a short poll can miss messages: a long one asks every server
                continue
            handles += [message["ReceiptHandle"] for message in messages]
            if all(message["MessageId"] in seen for message in messages):
                break  # come round again: every message is seen
            for message in messages:
                seen.setdefault(message["MessageId"], _dead_letter(message))
    finally:
        _show_again(sqs, dead, handles)
    return sorted(seen.values(), key=lambda s: s.task_id)


def _dead_letter(message: dict) -> SetAside:
    # a worker's set-aside carries why and the task's id; a redrive carries nothing
    attributes = message.get("MessageAttributes", {})
    reason = attributes.get("error", {}).get("StringValue", "in the dead-letter queue")
    task_id = attributes.get("task", {}).get("StringValue", message["MessageId"])
    found = _joined(task_id, message["Body"], reason)
    sent = message.get("Attributes", {}).get("SentTimestamp")
    found.sent_ms = int(sent) if sent is not None else None
    return found


def _show_again(sqs, queue_url: str, handles: list[str]) -> None:
    """Make peeked messages visible again; where that fails they reappear when their
    PEEK_HIDE_SECONDS end."""
    for start in range(0, len(handles), 10):
        entries = [{"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0}
                   for i, h in enumerate(handles[start:start + 10])]
        try:
            sqs_call("showing the dead-letter queue's messages again",
                     sqs.change_message_visibility_batch, QueueUrl=queue_url, Entries=entries)
        except InputError:
            return
