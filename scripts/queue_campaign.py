"""The queue campaign: real `deepem3d worker` processes on one file queue, with tasks inserted
while they run, SIGKILLs and SIGTERMs; every task must run, no two runs of one task may
overlap, and the queue must be left empty.

    python scripts/queue_campaign.py [--workers 4] [--tasks 500] [--seconds 0] [--lease 600]
        [--kill S] [--term S] [--timeout 300] [--dir DIR]

The first task goes on the queue, the workers start (`--exit-when-empty`), and the rest go on
in batches of 25 while they run. `--kill S` SIGKILLs a random worker every S seconds on
average, `--term S` SIGTERMs one (grace 0: its task goes back unfinished); either way a
replacement starts. Each task appends `pid start end` to a record of its own (`--seconds`
long), so a task that ran twice at once shows as two overlapping lines.

Checks, and exit status 1 when one fails: every task ran; without kills or SIGTERMs, exactly
once; no two runs of one task overlap; nothing is left in the queue's `queue/`, `movement/`
or `attempts/`; no worker hung or exited other than by a signal or, at the end, with 0.

Runs on the final code of 2026-12-06, 2-core machine, each clean: 4 workers with 500 tasks;
300 tasks on a 3 s lease with SIGKILLs every second; 40 tasks of 4 s on a 3 s lease (only the
renewals keep them); 200 tasks of 0.2 s with SIGTERMs every 2 s. With the renewal made a no-op,
12 tasks of 4 s on a 3 s lease ran up to 94 times, overlapping, and left files: exit 1.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from taskqueue import queueable

ROOT = Path(__file__).resolve().parent.parent
INSERT_BATCH = 25


@queueable
def record_run(records: str, key: str, seconds: float = 0.0) -> None:
    """Sleep `seconds`, then append `pid start end` to RECORDS/KEY."""
    start = time.time()
    time.sleep(seconds)
    line = f"{os.getpid()} {start:.3f} {time.time():.3f}\n".encode()
    fd = os.open(os.path.join(records, key), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def start_worker(queue: str, lease: int, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deepem3d", "worker", f"fq://{queue}", "--import",
         "scripts.queue_campaign", "--lease-seconds", str(lease), "--poll-seconds", "0.05",
         "--exit-when-empty", "--max-attempts", "1000", "--grace-seconds", "0"],
        cwd=ROOT, stdout=log, stderr=log)


def check(records: Path, queue: Path, tasks: int, disturbed: bool) -> dict:
    runs, overlaps = {}, []
    for k in range(tasks):
        path = records / f"t{k:05d}"
        lines = path.read_text().splitlines() if path.exists() else []
        runs[k] = len(lines)
        spans = sorted((float(start), float(end)) for _, start, end in map(str.split, lines))
        overlaps += [k for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    left = {d: len(os.listdir(queue / d)) for d in ("queue", "movement", "attempts")
            if (queue / d).is_dir()}
    counts = collections.Counter(runs.values())
    return {"runs per task": {str(n): c for n, c in sorted(counts.items())},
            "never ran": [k for k, n in runs.items() if n == 0][:10],
            "overlapping": overlaps[:10], "left": left,
            "ok": not overlaps and 0 not in counts and not any(left.values())
            and (disturbed or set(counts) == {1})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=0.0, help="each task's length")
    parser.add_argument("--lease", type=int, default=600)
    parser.add_argument("--kill", type=float, default=0.0, help="mean seconds between kills")
    parser.add_argument("--term", type=float, default=0.0,
                        help="mean seconds between SIGTERMs")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from deepem3d.run.queues import insert_tasks
    from scripts.queue_campaign import record_run as task  # the name workers import

    base = Path(args.dir or tempfile.mkdtemp(prefix="queue-campaign-"))
    queue, records = base / "queue", base / "records"
    records.mkdir(parents=True)
    tasks = [partial(task, records=str(records), key=f"t{k:05d}", seconds=args.seconds)
             for k in range(args.tasks)]
    insert_tasks(f"fq://{queue}", tasks[:1])
    log = open(base / "workers.log", "ab")
    workers = [start_worker(str(queue), args.lease, log) for _ in range(args.workers)]

    def insert_rest() -> None:
        for k in range(1, len(tasks), INSERT_BATCH):
            insert_tasks(f"fq://{queue}", tasks[k:k + INSERT_BATCH])

    inserting = threading.Thread(target=insert_rest)
    inserting.start()
    rng = random.Random(0)
    next_at = {sig: time.time() + rng.expovariate(1 / every)
               for sig, every in ((signal.SIGKILL, args.kill), (signal.SIGTERM, args.term))
               if every}
    sent = collections.Counter()
    failures = []
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        pending = bool(os.listdir(queue / "queue")) or inserting.is_alive()
        for i, worker in enumerate(workers):
            code = worker.poll()
            if code is None:
                continue
            if code not in (0, -signal.SIGKILL, -signal.SIGTERM):
                failures.append(f"a worker exited with status {code}")
            if pending:  # a worker ends early when it finds the queue empty between inserts
                workers[i] = start_worker(str(queue), args.lease, log)
        if not pending and all(w.poll() is not None for w in workers):
            break
        for sig, at in next_at.items():
            if time.time() >= at and pending:
                alive = [w for w in workers if w.poll() is None]
                if alive:
                    rng.choice(alive).send_signal(sig)
                    sent[sig.name] += 1
                every = args.kill if sig == signal.SIGKILL else args.term
                next_at[sig] = time.time() + rng.expovariate(1 / every)
        time.sleep(0.02)
    inserting.join()
    hung = sum(w.poll() is None for w in workers)
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    result = check(records, queue, args.tasks, disturbed=bool(args.kill or args.term))
    result.update(signals=dict(sent), hung=hung, failures=failures, dir=str(base))
    result["ok"] = result["ok"] and not hung and not failures
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
