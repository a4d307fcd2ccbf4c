"""The runner's bookkeeping at scale, on small stages: waves that keep a stage's queue short,
and a wait that asks for its last few markers one by one instead of listing them all."""

from __future__ import annotations

import os
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest
from taskqueue import TaskQueue
from taskqueue.queueables import totask

from deepem3d.errors import InputError
from deepem3d.run.queues import insert_tasks
from deepem3d.run.runner import Runner
from deepem3d.stages.frame import Markers, Stage
from tests.queue_helpers import SleepInFrame, Touch


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


def test_a_task_leased_while_its_insert_runs_leaves_nothing_behind(tmp_path):
    """A worker leasing as fast as tasks arrive: each task runs once and its file is deleted
    whole (taskqueue's own insert writes a task's file, then logs it: a lease taken in between
    was lost, or read half a file, and the leased file stayed on the queue until its lease
    expired)."""
    url = f"fq://{tmp_path / 'queue'}"
    insert_tasks(url, [])
    inserting, ran = threading.Event(), []

    def lease_at_once():
        queue = TaskQueue(url, progress=False)
        while inserting.is_set() or queue.enqueued:
            try:
                task = queue.lease(seconds=600, num_tasks=1)
            except Exception:  # noqa: BLE001  (empty, or a file half written: both lost here)
                continue
            task.execute()
            ran.append(1)
            queue.delete(task)

    inserting.set()
    worker = threading.Thread(target=lease_at_once, daemon=True)
    worker.start()
    for i in range(100):
        insert_tasks(url, [partial(Touch, path=str(tmp_path / f"t{i}"))])
    inserting.clear()
    worker.join(30)
    assert not worker.is_alive(), os.listdir(tmp_path / "queue" / "queue")
    assert len(ran) == 100 and len(list(tmp_path.glob("t*"))) == 100
    assert not os.listdir(tmp_path / "queue" / "queue")
    assert not os.listdir(tmp_path / "queue" / "movement")
    assert TaskQueue(url, progress=False).inserted == 100


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


def test_a_cuda_stage_is_refused_to_local_workers_without_cuda_only_while_unfinished(
        tmp_path, monkeypatch):
    """Refused before it ran (its tasks would fail on every local worker), but a pipeline
    whose CUDA inference finished elsewhere goes on with local workers for the rest."""
    import pytest
    import torch

    from deepem3d.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stage = flag_stage(tmp_path, 2)
    stage.hardware = "gpu"
    runner = Runner(lambda s: f"fq://{tmp_path / 'q'}", parallel=1, echo=lambda line: None)
    with pytest.raises(InputError, match="planned for CUDA"):
        runner.run([stage])
    assert not (tmp_path / "layer").exists()  # nothing recorded or prepared
    stage.start()  # run elsewhere, say on GPU workers
    for task in stage.tasks():
        task()
    assert stage.is_complete()
    (summary,) = runner.run([stage])
    assert summary.tasks == 2 and summary.ran == 0


def test_a_file_queue_emptied_while_a_run_waits_says_so_not_that_tasks_failed(tmp_path,
                                                                              monkeypatch):
    """Its tasks removed (the queue emptied or deleted and made again) while the run waits:
    the message said they failed, with nothing in failed/ to see."""
    url = f"fq://{tmp_path / 'queue'}"
    stage = flag_stage(tmp_path, 2)
    unfinished = stage.markers.unfinished

    def emptied_then_unfinished(*args):
        for task in (tmp_path / "queue" / "queue").iterdir():
            task.unlink()
        return unfinished(*args)

    monkeypatch.setattr(stage.markers, "unfinished", emptied_then_unfinished)
    with pytest.raises(InputError, match="2 task.* holds none: the queue was emptied or "
                                         "deleted while the run waited; run the same command"):
        Runner(lambda s: url, progress=False, poll=0.01, echo=lambda line: None).run([stage])


def test_a_file_queue_deleted_while_a_run_waits_is_a_one_line_error(tmp_path, monkeypatch):
    """The queue's folder removed while the run waits for workers: an InputError (it was a
    FileNotFoundError's traceback from the count of its tasks)."""
    url = f"fq://{tmp_path / 'queue'}"
    stage = flag_stage(tmp_path, 2)
    unfinished = stage.markers.unfinished

    def deleted_then_unfinished(*args):
        shutil.rmtree(tmp_path / "queue", ignore_errors=True)
        return unfinished(*args)

    monkeypatch.setattr(stage.markers, "unfinished", deleted_then_unfinished)
    with pytest.raises(InputError, match="is gone .*run the same command again"):
        Runner(lambda s: url, progress=False, poll=0.01, echo=lambda line: None).run([stage])


def test_a_finished_stage_run_again_lists_no_tasks(tmp_path):
    """Listing a stage's tasks is no free read: igneous's task creators append the layer's
    provenance each time (a finished run started again grew the input image's)."""
    url = f"fq://{tmp_path / 'queue'}"
    stop, depths = threading.Event(), []
    worker = threading.Thread(target=drain, args=(url, stop, depths), daemon=True)
    worker.start()
    try:
        Runner(lambda s: url, progress=False, poll=0.01).run([flag_stage(tmp_path, 2)])
    finally:
        stop.set()
        worker.join(10)
    again, listed = flag_stage(tmp_path, 2), []
    make_tasks = again.make_tasks
    again.make_tasks = lambda: listed.append(1) or make_tasks()
    [summary] = Runner(lambda s: url, progress=False, poll=0.01).run([again])
    assert summary.ran == 0 and again.is_complete()
    assert listed == []
