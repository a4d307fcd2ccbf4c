"""The runner's bookkeeping at scale, on small stages: waves that keep a stage's queue short,
and a wait that asks for its last few markers one by one instead of listing them all."""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

from taskqueue import TaskQueue
from taskqueue.queueables import totask

from deepem3d.run.runner import Runner
from deepem3d.stages.frame import Markers, Stage
from tests.queue_helpers import SleepInFrame


def flag_stage(tmp_path: Path, count: int) -> Stage:
    """A stage of `count` frame tasks that each write a flag file (and their marker)."""
    flags = tmp_path / "flags"
    flags.mkdir(exist_ok=True)

    def make_tasks():
        return ((f"t{i:03d}", partial(SleepInFrame, flag_path=str(flags / f"{i}"), seconds=0))
                for i in range(count))

    return Stage(name="flags", layer=f"file://{tmp_path / 'layer'}", key="k1", parameters={},
                 make_tasks=make_tasks, task_count=count, memory_bytes=0)


def drain(url: str, stop: threading.Event, depths: list[int]) -> None:
    """A worker in this process: lease, run, delete; records the queue's depth before each
    lease."""
    queue = TaskQueue(url, progress=False)
    while not stop.is_set():
        depths.append(queue.enqueued)
        try:
            leased = queue.lease(seconds=30, num_tasks=1)
        except Exception:  # taskqueue's QueueEmptyError
            stop.wait(0.01)
            continue
        totask(leased).execute()
        queue.delete(leased)


def test_waves_keep_a_stage_queue_short_and_finish_every_task(tmp_path):
    url = f"fq://{tmp_path / 'queue'}"
    stage = flag_stage(tmp_path, 11)
    stop, depths = threading.Event(), []
    worker = threading.Thread(target=drain, args=(url, stop, depths), daemon=True)
    worker.start()
    try:
        lines = []
        runner = Runner(lambda s: url, progress=False, poll=0.01, wave=3, echo=lines.append)
        [summary] = runner.run([stage])
    finally:
        stop.set()
        worker.join(10)
    assert summary.tasks == 11 and summary.ran == 11
    assert len(list((tmp_path / "flags").iterdir())) == 11
    assert stage.is_complete()
    assert depths and max(depths) <= 3, depths  # never more than a wave on the queue
    assert "3 task(s) on" in lines[0] and "(more as they finish)" in lines[0]


def test_the_wait_asks_for_its_last_markers_one_by_one(tmp_path, monkeypatch):
    markers = Markers(f"file://{tmp_path / 'layer'}", "flags")
    ids = [f"t{i}" for i in range(5)]
    for done in ids[:2]:
        markers.mark_done(done, {"seconds": 0})
    listed = []
    real = markers.done_ids
    monkeypatch.setattr(markers, "done_ids", lambda: listed.append(1) or real())
    # 3 left of 5,000: a listing takes 5 requests, asking 3
    assert markers.unfinished(ids, 5000) == ids[2:] and not listed
    # 3 left of 5: one listing beats 3 questions
    assert markers.unfinished(ids, 5) == ids[2:] and listed == [1]
    markers.mark_done("t4", {"seconds": 0})
    assert markers.unfinished(ids[2:], 5000) == ["t2", "t3"]
