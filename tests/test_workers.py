"""Real worker processes on a real fq:// queue, running igneous downsampling tasks.

The reference is igneous itself, run in-process on a copy of the same layer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from taskqueue import TaskQueue

from deepem3d.stages.downsample import downsample_stage, plan_downsample
from deepem3d.stages.frame import Markers, payload_of
from tests.conftest import (
    MEMORY,
    ROOT,
    assert_same_mips,
    file_digests,
    igneous_reference,
    make_layer,
    run_cli,
    start_stage,
)
from tests.queue_helpers import AlwaysFails, FailsInFrame, StallOnce, Touch


def start_worker(queue: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deepem3d", "worker", queue, "--import", "tests.queue_helpers",
         *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_killed_worker_task_is_redone_and_result_is_exact(tmp_path):
    layer = make_layer(tmp_path / "layer")
    plan = plan_downsample(layer, memory_target=MEMORY)
    assert plan.task_count == 8 and plan.task_shape == (128, 128, 10)
    reference = igneous_reference(tmp_path / "layer", tmp_path / "reference", plan.num_mips,
                                  plan.factor)
    full_res = file_digests(tmp_path / "layer" / "4_4_50")

    stage = downsample_stage(plan)
    tasks = start_stage(stage)
    assert len(tasks) == 8
    queue = f"fq://{tmp_path / 'queue'}"
    tq = TaskQueue(queue, progress=False)
    flag = tmp_path / "stalled"
    first_id, first = tasks[0]
    tq.insert([partial(StallOnce, flag_path=str(flag), seconds=120, task=payload_of(first))])

    doomed = start_worker(queue, "--lease-seconds", "3")
    wait_for(flag)  # the worker is now in the middle of the task
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    assert not stage.markers.is_done(first_id)

    tq.insert([task for _, task in tasks[1:]])
    workers = [start_worker(queue, "--lease-seconds", "3", "--exit-when-empty")
               for _ in range(2)]
    logs = [w.communicate(timeout=120)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    # every task ran to completion exactly once more: 7 fresh ones and the killed one, redone
    assert sum(log.count("finished task") for log in logs) == 8, logs
    assert tq.enqueued == 0
    assert stage.is_complete()
    assert_same_mips(layer, reference, range(1, plan.num_mips + 1))
    assert file_digests(tmp_path / "layer" / "4_4_50") == full_res


def test_sigterm_finishes_the_task_at_hand_and_loses_nothing(tmp_path):
    layer = make_layer(tmp_path / "layer", "segmentation")
    plan = plan_downsample(layer, memory_target=MEMORY)
    reference = igneous_reference(tmp_path / "layer", tmp_path / "reference", plan.num_mips,
                                  plan.factor)
    stage = downsample_stage(plan)
    tasks = start_stage(stage)
    queue = f"fq://{tmp_path / 'queue'}"
    tq = TaskQueue(queue, progress=False)
    flag = tmp_path / "stalled"
    first_id, first = tasks[0]
    tq.insert([partial(StallOnce, flag_path=str(flag), seconds=2, task=payload_of(first))])
    tq.insert([task for _, task in tasks[1:]])

    worker = start_worker(queue, "--lease-seconds", "60")
    while not flag.exists():  # it may run other tasks before it reaches the stalling one
        assert worker.poll() is None
        time.sleep(0.05)
    done_before = len(stage.markers.done_ids())
    worker.send_signal(signal.SIGTERM)
    _, log = worker.communicate(timeout=60)
    assert worker.returncode == 0, log
    assert "stopping after the current task" in log
    assert stage.markers.is_done(first_id), "the interrupted task was finished, not dropped"
    finished = len(stage.markers.done_ids())
    assert finished == done_before + 1, "no new task taken after SIGTERM"
    assert tq.enqueued == len(tasks) - finished, "the rest are still on the queue"

    drain = start_worker(queue, "--exit-when-empty")
    assert drain.wait(timeout=120) == 0
    assert stage.is_complete()
    assert_same_mips(layer, reference, range(1, plan.num_mips + 1))


def test_a_task_that_always_fails_is_set_aside(tmp_path):
    queue_dir = tmp_path / "queue"
    tq = TaskQueue(f"fq://{queue_dir}", progress=False)
    tq.insert([partial(AlwaysFails, message="boom")])
    worker = start_worker(f"fq://{queue_dir}", "--exit-when-empty", "--max-attempts", "2")
    _, log = worker.communicate(timeout=60)
    assert worker.returncode == 1
    assert log.count("RuntimeError: boom") == 2
    assert "Traceback" not in log.split("RuntimeError: boom")[-1], log
    assert tq.enqueued == 0
    (failed,) = (queue_dir / "failed").glob("*.json")
    assert "AlwaysFails" in failed.read_text()
    assert "2 times" in failed.with_suffix(".error").read_text()
    assert os.listdir(queue_dir / "attempts") == []


def test_messages_that_are_not_tasks_are_set_aside_and_the_worker_goes_on(tmp_path):
    """Not JSON, JSON of no task's shape, a task class and a function nobody registered: each
    set aside on its first attempt with its reason, while the good task runs and the worker
    stays up; a frame task that raises leaves an error record under its stage."""
    queue_dir = tmp_path / "queue"
    tq = TaskQueue(f"fq://{queue_dir}", progress=False)
    done = tmp_path / "done"
    tq.insert([partial(Touch, path=str(done))])
    layer = f"file://{tmp_path / 'layer'}"
    markers = Markers(layer, "broken")
    markers.start_run("k1", {}, ["t1"])
    tq.insert([partial(FailsInFrame, message="bug",
                       run={"layer": layer, "stage": "broken", "id": "t1", "key": "k1"})])
    bad = {"not-json": "{not json", "a-list": "[1, 2]",
           "unknown-class": json.dumps({"class": "NoSuchTask", "id": "unknown-class"}),
           "unknown-function": json.dumps({"payload": [["no.such.module", "fn"], [], {}, None],
                                           "id": "unknown-function"})}
    for name, text in bad.items():
        (queue_dir / "queue" / f"0--{name}.json").write_text(text)
    worker = start_worker(f"fq://{queue_dir}", "--exit-when-empty", "--max-attempts", "2")
    _, log = worker.communicate(timeout=120)
    assert worker.returncode == 1, log  # the frame task raised
    assert done.read_text() == "done"
    assert tq.enqueued == 0
    reasons = {p.stem: p.read_text() for p in (queue_dir / "failed").glob("*.error")}
    assert set(bad) <= set(reasons), (reasons, log)
    for name in ("not-json", "a-list", "unknown-class"):  # kept as they came
        assert (queue_dir / "failed" / f"{name}.json").read_text() == bad[name]
        assert f"task {name} set aside" in log and "not a task" in reasons[name], log
    assert "JSONDecodeError" in reasons["not-json"]
    # a function nobody registered parses as a task, and fails once on running
    assert "UnregisteredFunctionError" in reasons["unknown-function"]
    assert "no.such.module" in (queue_dir / "failed" / "unknown-function.json").read_text()
    assert "Traceback" not in log.split("RuntimeError: bug")[-1]
    record = json.loads((tmp_path / "layer" / "tasks" / "broken" / "errors" / "t1.json")
                        .read_text())
    assert record["error"] == "RuntimeError: bug" and record["attempt"] == 2
    # `deepem3d queue status` lists what was set aside, the frame task with its error record
    shown = run_cli("queue", "status", f"fq://{queue_dir}", check=True).stdout
    assert "set aside: 5" in shown, shown
    assert "layer/broken  RuntimeError: bug (attempt 2 on" in shown, shown
    assert "not-json  -  not a task: JSONDecodeError" in shown, shown


def test_a_marker_being_rewritten_reads_as_an_empty_record(tmp_path):
    """A task run again after its lease ran out rewrites its marker; a run summarising the
    stage meanwhile finds the file empty, and must not stop on it (the fault campaign's run
    3 of 6 did)."""
    markers = Markers(f"file://{tmp_path}", "stage")
    markers.mark_done("a", {"seconds": 1.5})
    empty = tmp_path / markers.marker_key("b")
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_bytes(b"")  # what a read sees between the rewrite's open and its write
    assert markers.done_ids() == {"a", "b"}
    assert markers.records() == [{"seconds": 1.5}, {}]
