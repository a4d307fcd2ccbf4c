"""Draining an fq:// queue with several worker processes: a lease that skips a busy movement
log (deepem3d's) against one that waits it out as taskqueue's lock does (retries with random
exponential back-off), side by side, on the same queues.

Each process leases and deletes tasks (which do nothing) until the queue is empty: what is
timed is the queue's own work, and the time lost when two processes reach for one file.

    python benchmarks/queue_drain.py [--workers 8] [--tasks 16 400 2000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from functools import partial

from taskqueue import TaskQueue, queueable
from taskqueue.file_queue_api import write_lock_file

import deepem3d.run.file_queue as file_queue
from deepem3d.run.queues import insert_tasks


@queueable
def noop() -> None:
    """A task that does nothing (none runs here)."""


def _waiting_lock(f, wait: float) -> bool:
    """taskqueue's lease lock: a busy log is retried with back-off (then given up)."""
    try:
        write_lock_file(f)
        return True
    except OSError:
        return False


def drain(url: str, lock: str, ready, go, counts) -> None:
    """Lease and delete until the queue is empty; put how many this process took."""
    if lock == "waits":
        file_queue._lock = _waiting_lock
    files = file_queue.FileQueue(TaskQueue(url, progress=False).api)
    ready.release()
    go.wait()
    done = 0
    while names := files.candidates():
        for name in names:
            leased = files.lease(name, 60)
            if leased is not None:
                files.delete(leased[0])
                done += 1
    counts.put(done)


def one_drain(lock: str, workers: int, tasks: int) -> float:
    url = f"fq://{tempfile.mkdtemp(prefix='drain-')}"
    insert_tasks(url, [partial(noop) for _ in range(tasks)])
    context = multiprocessing.get_context("fork")
    ready, go, counts = context.Semaphore(0), context.Event(), context.Queue()
    processes = [context.Process(target=drain, args=(url, lock, ready, go, counts))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    for _ in range(workers):
        ready.acquire()
    start = time.perf_counter()
    go.set()
    done = sum(counts.get() for _ in range(workers))
    seconds = time.perf_counter() - start
    for process in processes:
        process.join()
    assert done == tasks, (done, tasks)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tasks", type=int, nargs="+", default=[16, 400, 2000])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    for tasks in args.tasks:
        runs = {lock: sorted(one_drain(lock, args.workers, tasks) for _ in range(args.repeat))
                for lock in ("skips", "waits")}
        median = {lock: times[len(times) // 2] for lock, times in runs.items()}
        print(f"{tasks:>5} tasks, {args.workers} processes, median (worst) of {args.repeat}: "
              f"a lease that skips a busy log {median['skips']:.3f} s "
              f"({runs['skips'][-1]:.3f}), one that waits {median['waits']:.3f} s "
              f"({runs['waits'][-1]:.3f}): {median['waits'] / median['skips']:.1f}x",
              flush=True)

if __name__ == "__main__":
    main()
