"""`deepem3d worker QUEUE` and `deepem3d queue create|status|delete QUEUE`."""

from __future__ import annotations

import importlib
import logging
import sys
import time

import click
from tqdm import tqdm

from deepem3d.cli.options import Number
from deepem3d.errors import InputError
from deepem3d.run.queue_admin import DEAD_LETTER_SUFFIX
from deepem3d.run.queues import (
    MIN_POLL_SECONDS,
    SQS_MAX_VISIBILITY,
    check_existing_queue,
    open_queue,
    queue_counts,
)


@click.command()
@click.argument("queue")
@click.option(
    "--lease-seconds", type=click.IntRange(min=1, max=SQS_MAX_VISIBILITY), default=600,
    show_default=True,
    help="Lease per task; renewed in the background while a task runs (fq://: at least 3).",
)
@click.option("--exit-when-empty", is_flag=True, help="Exit once the queue holds no task.")
@click.option("--max-tasks", type=click.IntRange(min=1), default=None, help="Exit after N tasks.")
@click.option(
    "--max-attempts", type=click.IntRange(min=1), default=5, show_default=True,
    help="Set aside a task leased more often than this (fq://: in DIR/failed/; SQS: in the "
    "dead-letter queue, where the queue's redrive policy, if it has one, sets the limit).",
)
@click.option(
    "--import", "imports", multiple=True, metavar="MODULE",
    help="Also import MODULE, which registers tasks of your own (repeatable).",
)
@click.option("--poll-seconds", type=Number(min=MIN_POLL_SECONDS), default=1.0,
              show_default=True, help="Wait between polls of an empty queue (it grows to ten "
              "times this while the queue stays empty).")
@click.option("--parent-pid", type=int, default=None, hidden=True,
              help="Exit once process PID is no longer this worker's parent (a runner's local "
              "workers: PID is the runner's, checked even if it died before this started).")
@click.option(
    "--allow-prefix", "allow_prefixes", multiple=True, metavar="PREFIX",
    help="Run only tasks that write under PREFIX (repeatable; s3://bucket/runs, "
    "gs://bucket, file:///data; default: DEEPEM3D_ALLOW_PREFIXES, comma-separated, else "
    "anywhere). A task writing elsewhere is set aside.",
)
@click.option(
    "--grace-seconds", type=Number(min=0), default=30, show_default=True,
    envvar="DEEPEM3D_GRACE_SECONDS", show_envvar=True,
    help="The time SIGTERM leaves before the process is killed (the pod's "
    "terminationGracePeriodSeconds): the task at hand is finished only if its expected time "
    "fits, else released to the queue at once.",
)
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only.")
def worker(
    queue: str, lease_seconds: int, exit_when_empty: bool, max_tasks: int | None,
    max_attempts: int, imports: tuple[str, ...], poll_seconds: float, parent_pid: int | None,
    allow_prefixes: tuple[str, ...], grace_seconds: float, quiet: bool,
) -> None:
    """Execute tasks from QUEUE (fq://DIR or sqs://NAME) until stopped.

    Runs deepem3d's stage tasks (igneous's only those deepem3d creates) and those of --import
    modules; anything else, and a message that is not a task, is set aside on its first
    attempt (fq://: DIR/failed/; SQS: the dead-letter queue). SIGTERM: no new task; the task
    at hand is finished if it fits in --grace-seconds, else released; exit 0. Ctrl-C: the
    task at hand is finished (one not yet started is released). Exit status 1 if any task
    raised or was set aside.
    """
    logging.basicConfig(  # other libraries' INFO lines (botocore's) stay out of the log
        level=logging.WARNING,
        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("deepem3d").setLevel(logging.WARNING if quiet else logging.INFO)
    from deepem3d.run.worker import Worker  # imports every task module: only workers need that

    for module in imports:
        try:
            importlib.import_module(module)
        except (ImportError, ValueError) as err:  # ValueError: an empty name
            raise InputError(f"--import {module}: {err}") from None

    check_existing_queue(queue, "nothing run")
    from deepem3d.run.admission import allow_prefixes as normal_prefixes

    report = Worker(
        queue, lease_seconds=lease_seconds, exit_when_empty=exit_when_empty,
        max_tasks=max_tasks, max_attempts=max_attempts, poll_seconds=poll_seconds,
        parent_pid=parent_pid, allow_prefixes=normal_prefixes(allow_prefixes),
        imported=imports, grace_seconds=grace_seconds,
    ).run()
    logging.getLogger("deepem3d.run.worker").info(
        "exiting: %d task(s) executed, %d error(s), %d given up, %d released%s",
        report.executed, report.errors, report.given_up, report.released,
        " (stopped by signal)" if report.stopped_by_signal else "",
    )
    if report.errors or report.given_up:
        sys.exit(1)


SHOWN_SET_ASIDE = 20  # lines of set-aside tasks `status` prints


def _show(value: int | None) -> str:
    return "n/a" if value is None else str(value)


@click.group()
def queue() -> None:
    """Create, inspect and delete task queues (fq://DIR or sqs://NAME)."""


@queue.command()
@click.argument("url")
@click.option("--max-attempts", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="sqs:// only: a message received this many times goes to the dead-letter "
              "queue; workers on it take this limit (fq:// workers count attempts with their "
              "own --max-attempts).")
@click.option("--visibility-seconds", type=click.IntRange(min=1, max=SQS_MAX_VISIBILITY),
              default=900,
              show_default=True,
              help="sqs:// only: the queue's visibility timeout; at least the workers' lease.")
@click.option("--lease-seconds", type=click.IntRange(min=1, max=SQS_MAX_VISIBILITY),
              default=None, help="The lease the workers will take: refused when above "
              "--visibility-seconds (sqs://) or below 3 (fq://, as a worker refuses it).")
def create(url: str, max_attempts: int, visibility_seconds: int,
           lease_seconds: int | None) -> None:
    """Create the queue URL: on SQS with a dead-letter queue (URL-dead-letter), its redrive
    policy and 14-day retention, so that no task is lost to a retention limit or retried
    forever."""
    from deepem3d.run.queue_admin import create_queue

    click.echo("created " + create_queue(url, max_attempts=max_attempts,
                                         visibility_seconds=visibility_seconds,
                                         lease_seconds=lease_seconds))


@queue.command()
@click.argument("url")
@click.option("--yes", is_flag=True, help="Delete without asking (required when not on a "
              "terminal).")
def delete(url: str, yes: bool) -> None:
    """Delete the queue URL and what it holds (on SQS, its dead-letter queue too)."""
    from deepem3d.run.queue_admin import check_deletable, delete_queue

    check_deletable(url)  # before asking: a path that is no queue is said at once
    if not yes:
        if not sys.stdin.isatty():
            raise InputError(f"deleting {url} loses the tasks on it: add --yes")
        click.confirm(f"delete {url} and every task on it?", abort=True)
    click.echo(delete_queue(url))


@queue.command()
@click.argument("url")
@click.option("--watch", is_flag=True, help="Show a progress bar until the queue is empty.")
@click.option(
    "--poll-seconds", type=Number(min=MIN_POLL_SECONDS), default=2.0, show_default=True,
    help="Seconds between polls with --watch."
)
def status(url: str, watch: bool, poll_seconds: float) -> None:
    """Show inserted / enqueued / leased / completed for the queue URL, and the tasks its
    workers set aside (fq://: DIR/failed/; sqs://: its dead-letter queue) with why.

    SQS keeps no inserted or completed counts and its enqueued count is approximate: whether
    a stage is finished is decided by its tasks' completion markers, not by this.
    """
    from deepem3d.run.queue_admin import PEEK_LIMIT, set_aside

    check_existing_queue(url, "nothing read")
    tq = open_queue(url)
    counts = queue_counts(tq)
    click.echo(
        f"inserted: {_show(counts.inserted)}  enqueued: {counts.enqueued}  "
        f"leased: {counts.leased}  completed: {_show(counts.completed)}"
    )
    aside = set_aside(url)
    if aside:
        where = (f"{url[len('fq://'):]}/failed/" if url.startswith("fq://")
                 else f"{url[len('sqs://'):]}{DEAD_LETTER_SUFFIX}")
        capped = url.startswith("sqs://") and len(aside) >= PEEK_LIMIT  # one look's most
        most = "at least " if capped else ""
        click.echo(f"set aside: {most}{len(aside)} (in {where})")
        for task in aside[:SHOWN_SET_ASIDE]:
            click.echo(f"  {task.task_id}  {task.stage}  {task.reason}")
        if len(aside) > SHOWN_SET_ASIDE:
            click.echo(f"  ... and {len(aside) - SHOWN_SET_ASIDE} more")
    if not watch:
        return
    total = counts.inserted if counts.inserted else counts.enqueued
    with tqdm(total=total, desc="tasks done", file=sys.stderr) as bar:
        while True:
            counts = queue_counts(tq)
            bar.update(max(0, total - counts.enqueued) - bar.n)
            if counts.enqueued == 0:
                break
            time.sleep(poll_seconds)
