"""Renew leased fq:// tasks while other processes keep locking their movement logs, with
taskqueue's renewal and with deepem3d's (run/file_queue.py), side by side; count the tasks
whose log no longer names their file (their delete would leave the file to run again).

The lockers stand in for workers that reach for a task they saw free a moment before (their
lease takes the log's lock, finds the file renamed, and lets go) or for taskqueue reading the
log. Usage:

    python scripts/queue_lock_campaign.py [--tasks 20] [--renewals 10] [--lockers 2]

On a 2-core machine (2026-12-06), five runs: taskqueue's renewal emptied the log of 1 of 6,
5 of 20, 1 of 20, 1 of 2 and 0 of 20 tasks (8 of 68; the first two runs timed it alone),
deepem3d's of none (0 of 48), in under half the time (42 to 45 s against 105 s for 20 tasks:
taskqueue's lock waits out a busy log with back-off).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from taskqueue import TaskQueue, queueable

from deepem3d.run.file_queue import FileQueue, task_id
from deepem3d.run.queues import insert_tasks

#: locks the log (argv 1) for 2 ms at a time, 0.5 ms apart, for argv 2 seconds
LOCKER = r"""
import fcntl, sys, time
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        f = open(sys.argv[1], "a")
    except FileNotFoundError:
        break
    try:
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        time.sleep(0.002)
    except OSError:
        pass
    f.close()
    time.sleep(0.0005)
"""


@queueable
def noop() -> None:
    """A task that does nothing (only its file matters here; none runs)."""


def one_run(renewal: str, renewals: int, lockers: int, seconds: float) -> bool:
    """True when the task's log still names its file after the renewals."""
    folder = Path(tempfile.mkdtemp(prefix="lock-campaign-"))
    url = f"fq://{folder}"
    insert_tasks(url, [partial(noop)])
    queue = TaskQueue(url, progress=False)
    files = FileQueue(queue.api)
    [name] = files.candidates()
    leased, _ = files.lease(name, 3)
    log = folder / "movement" / task_id(leased)
    procs = [subprocess.Popen([sys.executable, "-c", LOCKER, str(log), str(seconds)])
             for _ in range(lockers)]
    time.sleep(0.2)
    for _ in range(renewals):
        try:
            if renewal == "taskqueue":
                queue.renew(task_id(leased), 30)
            else:
                leased = files.renew(leased, 30) or leased
        except OSError:
            pass  # a renewal that gave up: the log is what is checked
    names = [n for n in log.read_text().split("\n") if n] if log.exists() else []
    [current] = os.listdir(folder / "queue")
    for proc in procs:
        proc.kill()
        proc.wait()
    return bool(names) and names[-1] == current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--renewals", type=int, default=10)
    parser.add_argument("--lockers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="each locker's run")
    args = parser.parse_args()
    for renewal in ("taskqueue", "deepem3d"):
        start = time.time()
        lost = sum(not one_run(renewal, args.renewals, args.lockers, args.seconds)
                   for _ in range(args.tasks))
        print(f"{renewal:>9}'s renewal: {lost} of {args.tasks} logs lost their task's file "
              f"({args.renewals} renewals each, {args.lockers} lockers; "
              f"{time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
