"""Putting tasks on a file queue: deepem3d's insert against taskqueue's own, same tasks.

    python benchmarks/queue_insert.py [--tasks 20000] [--repeats 3]

`insert_tasks` writes each task's movement log first and renames its whole file into
`queue/` (a lease taken meanwhile is never lost; see docs/design.md); taskqueue's insert
writes the file, then the log, from a thread pool. Both fill a fresh fq:// folder with the
same tasks (a frame task's payload: a partial of a registered function with a run record),
alternating, and the script prints each one's tasks per second and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from functools import partial

from taskqueue import TaskQueue, queueable

from deepem3d.run.queues import insert_tasks


@queueable
def BenchTask(bounds: list, run: dict) -> None:  # noqa: N802  (taskqueue's task style)
    """Never run: only its payload's size matters here."""


def tasks(count: int):
    run = {"layer": "file:///data/layer", "stage": "segment/chunks", "key": "0123456789abcdef"}
    return [partial(BenchTask, bounds=[i * 64, 0, 0, i * 64 + 64, 64, 64],
                    run={**run, "id": f"c{i:06d}"}) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batch = tasks(args.tasks)
    times: dict[str, list[float]] = {"taskqueue insert": [], "deepem3d insert_tasks": []}
    for _ in range(args.repeats):
        for name in times:
            folder = tempfile.mkdtemp(prefix="deepem3d-bench-queue-")
            url = f"fq://{folder}"
            start = time.perf_counter()
            if name == "taskqueue insert":
                TaskQueue(url, progress=False).insert(batch, total=len(batch))
            else:
                insert_tasks(url, batch)
            times[name].append(time.perf_counter() - start)
            shutil.rmtree(folder)
    best = {name: min(t) for name, t in times.items()}
    for name, seconds in best.items():
        print(f"{name:24s} {args.tasks / seconds:9.0f} tasks/s  (best of {args.repeats}: "
              f"{seconds:.2f} s)")
    print(f"deepem3d / taskqueue: {best['taskqueue insert'] / best['deepem3d insert_tasks']:.2f}x"
          " the rate")


if __name__ == "__main__":
    main()
