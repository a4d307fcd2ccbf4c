"""Real worker processes on a real fq:// queue, running igneous downsampling tasks.

The reference is igneous itself, run in-process on a copy of the same layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from taskqueue import QueueEmptyError, TaskQueue

from deepem3d.stages.downsample import downsample_stage, plan_downsample
from deepem3d.stages.frame import Markers, payload_of
from tests.conftest import (
    MEMORY,
    ROOT,
    assert_one_line_error,
    assert_same_mips,
    file_digests,
    igneous_reference,
    make_layer,
    run_cli,
    start_stage,
)
from tests.queue_helpers import (
    AlwaysFails,
    Exits,
    FailsInFrame,
    SleepInFrame,
    SleepThenTouch,
    StallOnce,
    Touch,
    UnavailableOnceInFrame,
)


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


def test_sigterm_releases_a_task_of_unknown_length_and_loses_nothing(tmp_path):
    """A task whose time nothing tells (no marker of its stage yet) is not waited for on
    SIGTERM: its lease is released at once, the worker exits 0 within seconds, and the next
    worker takes the task straight away; the layer ends as igneous makes it."""
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
    tq.insert([partial(StallOnce, flag_path=str(flag), seconds=300, task=payload_of(first))])
    tq.insert([task for _, task in tasks[1:]])

    worker = start_worker(queue, "--lease-seconds", "600")
    while not flag.exists():  # it may run other tasks before it reaches the stalling one
        assert worker.poll() is None
        time.sleep(0.05)
    done_before = len(stage.markers.done_ids())
    signalled = time.time()
    worker.send_signal(signal.SIGTERM)
    _, log = worker.communicate(timeout=60)
    assert worker.returncode == 0, log
    assert time.time() - signalled < 30, "released, not waited for"
    assert "releasing task" in log and "its time is unknown" in log, log
    assert "1 released" in log, log
    assert not stage.markers.is_done(first_id)
    assert len(stage.markers.done_ids()) == done_before, "no new task taken after SIGTERM"
    assert tq.enqueued == len(tasks) - done_before, "the rest, and the released one, wait"

    drain = start_worker(queue, "--exit-when-empty", "--lease-seconds", "600")
    assert drain.wait(timeout=120) == 0  # a lease of 600 s: the task was released, not lost
    assert stage.is_complete()
    assert_same_mips(layer, reference, range(1, plan.num_mips + 1))


def test_sigterm_finishes_a_task_whose_stage_says_it_fits_the_grace(tmp_path):
    """With markers of its stage saying such tasks take 2 s, a task interrupted by SIGTERM is
    finished (marker written, message deleted) within the grace; with markers saying 100 s it
    is released at once; one that said 1 s but overruns is released when the grace is nearly
    spent (grace 8 s, less 5 s kept for what follows a task)."""
    layer = f"file://{tmp_path / 'layer'}"
    queue = f"fq://{tmp_path / 'queue'}"
    tq = TaskQueue(queue, progress=False)
    for stage, recorded, sleeps in (("short", 2.0, 3), ("long", 100.0, 3),
                                    ("overrun", 1.0, 60)):
        markers = Markers(layer, stage)
        markers.start_run("k", {}, ["earlier", "now"])
        markers.mark_done("earlier", {"seconds": recorded})
        flag = tmp_path / f"{stage}.flag"
        tq.insert([partial(SleepInFrame, flag_path=str(flag), seconds=sleeps,
                           run={"layer": layer, "stage": stage, "id": "now", "key": "k"})])
        worker = start_worker(queue, "--grace-seconds", "8")
        wait_for(flag)
        time.sleep(0.5)  # its expected time is read in the background as it starts
        signalled = time.time()
        worker.send_signal(signal.SIGTERM)
        _, log = worker.communicate(timeout=60)
        assert worker.returncode == 0, log
        assert time.time() - signalled < 8, log  # within the grace, whatever happened
        if stage == "short":
            assert "finishing task" in log and "grace 8 s" in log, log
            assert markers.is_done("now") and tq.enqueued == 0, log
            continue
        if stage == "long":
            assert "releasing task" in log and "expected 9" in log, log
        else:
            assert "finishing task" in log and "outlasts the grace period" in log, log
        assert not markers.is_done("now") and tq.enqueued == 1, log
        drain = start_worker(queue, "--exit-when-empty")
        assert drain.wait(timeout=60) == 0  # the flag exists: no sleep the second time
        assert markers.is_done("now") and tq.enqueued == 0


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


def test_a_service_that_did_not_answer_is_retried_not_set_aside(tmp_path):
    """A task that met a bucket or queue that did not answer (ServiceUnavailable, an
    InputError) was failed as bad input: set aside at once, its stage's failure recorded, the
    run stopped. It is released and runs again."""
    queue_dir = tmp_path / "queue"
    tq = TaskQueue(f"fq://{queue_dir}", progress=False)
    layer = f"file://{tmp_path / 'layer'}"
    markers = Markers(layer, "cloud")
    markers.start_run("k1", {}, ["t1"])
    tq.insert([partial(UnavailableOnceInFrame, flag_path=str(tmp_path / "flag"),
                       run={"layer": layer, "stage": "cloud", "id": "t1", "key": "k1"})])
    worker = start_worker(f"fq://{queue_dir}", "--exit-when-empty", "--max-attempts", "3")
    _, log = worker.communicate(timeout=120)
    assert (tmp_path / "flag").exists() and markers.is_done("t1"), log
    assert "did not answer" in log and not markers.failures(), log
    assert tq.enqueued == 0 and not list((queue_dir / "failed").glob("*")), log


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
    # a file no task's file is named: taskqueue counted it as enqueued (a worker waiting for
    # an empty queue never exited) and its `leased` count raised on it (queue status too)
    stray = queue_dir / "queue" / "notes.txt"
    stray.write_text("a file someone left")
    folder = queue_dir / "queue" / "folder"  # a folder too
    folder.mkdir()
    for path in (stray, folder):
        os.utime(path, (time.time() - 60, time.time() - 60))
    assert "enqueued: 6  leased: 0" in run_cli("queue", "status", f"fq://{queue_dir}",
                                               check=True).stdout
    worker = start_worker(f"fq://{queue_dir}", "--exit-when-empty", "--max-attempts", "2")
    _, log = worker.communicate(timeout=120)
    assert worker.returncode == 1, log  # the frame task raised
    assert done.read_text() == "done"
    assert tq.enqueued == 0
    reasons = {p.stem: p.read_text() for p in (queue_dir / "failed").glob("*.error")}
    assert set(bad) | {"notes.txt", "folder"} <= set(reasons), (reasons, log)
    assert (queue_dir / "failed" / "notes.txt.json").read_text() == "a file someone left"
    assert not list((queue_dir / "queue").iterdir())
    for name in ("not-json", "a-list", "unknown-class"):  # kept as they came
        assert (queue_dir / "failed" / f"{name}.json").read_text() == bad[name]
        assert f"task {name} set aside" in log and "not a task" in reasons[name], log
    assert "JSONDecodeError" in reasons["not-json"]
    # a function nobody registered parses as a task, and is refused before it runs
    assert "not a task this worker runs" in reasons["unknown-function"]
    assert "no.such.module" in (queue_dir / "failed" / "unknown-function.json").read_text()
    assert "Traceback" not in log.split("RuntimeError: bug")[-1]
    record = json.loads((tmp_path / "layer" / "tasks" / "broken" / "errors" / "t1.json")
                        .read_text())
    assert record["error"] == "RuntimeError: bug" and record["attempt"] == 2
    # `deepem3d queue status` lists what was set aside, the frame task with its error record
    shown = run_cli("queue", "status", f"fq://{queue_dir}", check=True).stdout
    assert "set aside: 7" in shown, shown
    assert "layer/broken  RuntimeError: bug (attempt 2 on" in shown, shown
    assert "not-json  -  not a task: JSONDecodeError" in shown, shown


def test_a_worker_on_the_folder_above_a_queue_is_refused_and_the_queue_kept(tmp_path):
    """Pointed at a run's output folder instead of its queue inside, a worker laid out a new
    queue there, took the real queue's folders for stray entries, moved them (and the tasks
    in them) to failed/, and exited 0."""
    queue_dir = tmp_path / "out" / "queue"
    tq = TaskQueue(f"fq://{queue_dir}", progress=False)
    tq.insert([partial(Touch, path=str(tmp_path / "done"))])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert_one_line_error(run_cli("worker", f"fq://{tmp_path / 'out'}", "--exit-when-empty"),
                          "not a file queue", "nothing run")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert tq.enqueued == 1


def test_a_worker_that_set_aside_a_message_or_met_a_task_exiting_exits_1(tmp_path):
    """Exit status 1 when anything was set aside or raised: a message that is not a task
    was set aside with status 0, and a task calling sys.exit(0) stopped the worker with
    status 0, its task left leased."""
    queue_dir = tmp_path / "queue"
    tq = TaskQueue(f"fq://{queue_dir}", progress=False)
    (queue_dir / "queue" / "0--garbage.json").write_text("{not json")
    (queue_dir / "movement" / "garbage").write_text("0--garbage.json\n")
    os.utime(queue_dir / "queue" / "0--garbage.json", (time.time() - 60,) * 2)
    worker = start_worker(f"fq://{queue_dir}", "--exit-when-empty")
    _, log = worker.communicate(timeout=60)
    assert worker.returncode == 1, log
    assert "1 given up" in log and (queue_dir / "failed" / "garbage.json").exists()

    tq.insert([partial(Exits, path=str(tmp_path / "started"))])
    tq.insert([partial(Touch, path=str(tmp_path / "done"))])
    worker = start_worker(f"fq://{queue_dir}", "--exit-when-empty", "--max-attempts", "1")
    _, log = worker.communicate(timeout=60)
    assert worker.returncode == 1, log
    assert "SystemExit" in log and (tmp_path / "done").exists()  # it went on
    assert tq.enqueued == 0  # set aside after its one attempt, not left leased


def test_a_worker_whose_queue_is_deleted_stops(tmp_path):
    """`queue delete` while a worker ran a task: the worker logged 'trying again' forever,
    even with --exit-when-empty."""
    queue_dir = tmp_path / "queue"
    tq = TaskQueue(f"fq://{queue_dir}", progress=False)
    flag = tmp_path / "flag"
    tq.insert([partial(SleepThenTouch, flag_path=str(flag), seconds=3,
                       path=str(tmp_path / "done"))])
    worker = start_worker(f"fq://{queue_dir}", "--exit-when-empty", "--poll-seconds", "0.2")
    wait_for(flag)
    assert run_cli("queue", "delete", f"fq://{queue_dir}", "--yes").returncode == 0
    _, log = worker.communicate(timeout=60)
    assert worker.returncode == 1, log
    assert "the queue's folders are gone" in log
    assert (tmp_path / "done").exists()


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


def test_a_worker_runs_only_its_tasks_and_writes_only_inside_its_allow_list(tmp_path):
    """Forged messages, each set aside on its first attempt while the real tasks run: igneous's
    DeleteTask sent bare (registered in the worker once a downsampling task has imported
    igneous) and wrapped in MarkedTask, a wrapped downsampling of a layer outside the
    allow-list, and a stage task whose output path, given positionally, climbs out of it.
    The layers they name are untouched; `queue status` shows each with why."""
    allowed = tmp_path / "allowed"
    layer = make_layer(allowed / "layer")
    outside = make_layer(tmp_path / "outside" / "layer")
    stage = downsample_stage(plan_downsample(layer, memory_target=MEMORY))
    tasks = start_stage(stage)
    queue_dir = tmp_path / "queue"
    tq = TaskQueue(f"fq://{queue_dir}", progress=False)
    tq.insert([task for _, task in tasks])

    outside_stage = downsample_stage(plan_downsample(outside, memory_target=MEMORY))
    (_, wrapped_outside), *_ = outside_stage.make_tasks()
    before = tree_digests(tmp_path / "outside")
    delete = [["igneous.tasks.image.image", "DeleteTask"], [],
              {"layer_path": outside, "shape": [64, 64, 10], "offset": [0, 0, 0]}, None]
    run = {"layer": layer, "stage": stage.name, "id": "forged", "key": stage.key}
    forged = {
        "bare-delete": delete,
        "wrapped-delete": [["deepem3d.stages.frame", "MarkedTask"], [],
                           {"task": delete, "run": run}, None],
        "wrapped-outside": [["deepem3d.stages.frame", "MarkedTask"], [],
                            {"task": wrapped_outside.keywords["task"], "run": run}, None],
        "climbs-out": [["deepem3d.stages.graph", "RegionGraphTask"],
                       [f"{layer}/../../outside/layer", [0, 0, 0, 1, 1, 1], []],
                       {"run": run}, None],
        # an empty path (the worker's working directory, and no layer)
        "empty-path": [["deepem3d.stages.graph", "RegionGraphTask"],
                       ["", [0, 0, 0, 1, 1, 1], []], {"run": run}, None],
        # a wrapped class whose `payload` key taskqueue would follow to DeleteTask
        "payload-inside": [["deepem3d.stages.frame", "MarkedTask"], [],
                           {"task": {"class": "MeshTask", "payload": delete}, "run": run}, None],
        # an igneous class dressed up with a stage task's key
        "class-as-stage": {"class": "MeshTask", "shape": [64, 64, 10], "offset": [0, 0, 0],
                           "layer_path": outside, "key": ["deepem3d.stages.frame",
                                                          "MarkedTask"]},
        # a stage name that climbs out of the layer's task folder
        "stage-climbs": [["deepem3d.stages.frame", "MarkedTask"], [],
                         {"task": delete, "run": {**run, "stage": "../../../outside"}}, None],
        "bad-key": [["deepem3d.stages.frame", "MarkedTask", "x"], [], {}, None],
    }
    for name, payload in forged.items():
        (queue_dir / "queue" / f"0--{name}.json").write_text(
            json.dumps({"payload": payload, "id": name}))
    worker = subprocess.Popen(
        [sys.executable, "-m", "deepem3d", "worker", f"fq://{queue_dir}", "--exit-when-empty",
         "--allow-prefix", str(allowed)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _, log = worker.communicate(timeout=120)
    assert worker.returncode == 1, log  # tasks were set aside
    assert stage.is_complete() and tq.enqueued == 0, log
    assert tree_digests(tmp_path / "outside") == before
    reasons = {p.stem: p.read_text() for p in (queue_dir / "failed").glob("*.error")}
    assert set(reasons) == set(forged), log
    assert "igneous.tasks.image.image.DeleteTask is not a task this worker runs" in \
        reasons["bare-delete"]
    assert "refuses igneous's DeleteTask" in reasons["wrapped-delete"]
    for name in ("wrapped-outside", "climbs-out", "empty-path"):
        assert "outside the allowed prefixes" in reasons[name], reasons[name]
    assert "with a payload or id key" in reasons["payload-inside"]
    assert "not run directly" in reasons["class-as-stage"] or "not a task" in \
        reasons["class-as-stage"]
    assert "where one plain path component belongs" in reasons["stage-climbs"]
    assert "does not name a function" in reasons["bad-key"]
    shown = run_cli("queue", "status", f"fq://{queue_dir}", check=True).stdout
    assert f"set aside: {len(forged)}" in shown, shown
    assert "climbs-out  layer/downsample-mip0  refused:" in shown, shown


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_worker_runs_every_task_deepem3d_registers():
    """STAGE_TASKS is the whole list: a stage task added without it would be refused."""
    from taskqueue.queueablefns import REGISTRY

    from deepem3d.run.admission import STAGE_TASKS
    from deepem3d.run.worker import register_tasks

    register_tasks()
    registered = {key for key in REGISTRY if key[0].startswith("deepem3d.")}
    assert registered == set(STAGE_TASKS)


def test_a_file_its_insert_has_not_logged_yet_waits_for_its_log(tmp_path):
    """taskqueue's insert writes a task's file, then its movement log: the worker leaves such a
    young file alone until the log names it (a lease line written first would be truncated
    away and the delete would miss the leased file), and leases an old file that has no log
    at all (a lease lost so) afresh; either way the delete leaves the queue empty."""
    from taskqueue import QueueEmptyError

    from deepem3d.run.file_queue import UNREADABLE_GRACE
    from deepem3d.run.worker import Worker

    queue_dir = tmp_path / "queue"
    tq = TaskQueue(f"fq://{queue_dir}", progress=False)
    worker = Worker(f"fq://{queue_dir}", allow_prefixes=(str(tmp_path),))
    for stage in ("logged later", "never logged"):
        tq.insert([partial(Touch, path=str(tmp_path / "done"))])
        [name] = os.listdir(queue_dir / "queue")
        log = queue_dir / "movement" / name.split("--")[1][:-len(".json")]
        log.unlink()  # as it is between the insert's two writes
        try:
            worker._lease_file()
            raise AssertionError(f"{stage}: leased before its log")
        except QueueEmptyError:
            pass
        assert os.listdir(queue_dir / "queue") == [name] and not log.exists()
        if stage == "logged later":
            log.write_text(name + "\n")
        else:
            old = time.time() - UNREADABLE_GRACE - 1
            os.utime(queue_dir / "queue" / name, (old, old))
        task = worker._lease_file()
        assert name not in os.listdir(queue_dir / "queue")  # leased: renamed
        worker._delete(task)
        assert not os.listdir(queue_dir / "queue") and not os.listdir(queue_dir / "movement")


def one_task_queue(tmp_path: Path, *, old: bool = False):
    """A file queue holding one Touch task (written UNREADABLE_GRACE ago when `old`), and an
    in-process worker on it."""
    from deepem3d.run.file_queue import UNREADABLE_GRACE
    from deepem3d.run.queues import insert_tasks
    from deepem3d.run.worker import Worker

    queue_dir = tmp_path / "queue"
    insert_tasks(f"fq://{queue_dir}", [partial(Touch, path=str(tmp_path / "done"))])
    [name] = os.listdir(queue_dir / "queue")
    if old:
        then = time.time() - UNREADABLE_GRACE - 1
        os.utime(queue_dir / "queue" / name, (then, then))
    worker = Worker(f"fq://{queue_dir}", lease_seconds=3, exit_when_empty=True,
                    allow_prefixes=(str(tmp_path),), imported=("tests.queue_helpers",))
    return queue_dir, name, worker


def test_a_lease_is_stamped_when_taken_not_when_the_queue_was_read(tmp_path, monkeypatch):
    """A movement log's lock can take seconds (taskqueue's retries it with back-off): the
    lease runs from the rename, else another worker leases the task while this one runs it."""
    import deepem3d.run.file_queue as fq

    queue_dir, name, worker = one_task_queue(tmp_path)
    real_lock = fq._lock
    monkeypatch.setattr(fq, "_lock", lambda f, wait: time.sleep(2.5) or real_lock(f, wait))
    before = time.time()
    task = worker._lease_file()
    [leased] = os.listdir(queue_dir / "queue")
    assert int(leased.split("--")[0]) >= int(before + 2.5) + 3, (before, leased)
    worker._delete(task)
    assert not os.listdir(queue_dir / "queue") and not os.listdir(queue_dir / "movement")


def test_a_task_finished_while_another_worker_reached_for_it_leaves_no_log(tmp_path,
                                                                           monkeypatch):
    """An old file is leased with its log opened (made if missing). When its task was finished
    and deleted just before, the log that open made is removed again; when another worker
    holds it, its log stays, even emptied (as taskqueue's renewal, which truncates the log
    before it locks it, can leave it)."""
    from deepem3d.run.worker import Worker

    real_mtime = os.path.getmtime
    for meanwhile in ("finished", "leased, its log being renewed"):
        queue_dir, name, worker = one_task_queue(tmp_path / meanwhile, old=True)
        task_id = name.split("--")[1][:-len(".json")]
        log = queue_dir / "movement" / task_id
        reached = []

        def mtime_then_taken_elsewhere(path, queue_dir=queue_dir, log=log, reached=reached,
                                       meanwhile=meanwhile, worker=worker, name=name):
            seconds = real_mtime(path)
            if not reached:
                reached.append(path)
                if meanwhile == "finished":
                    assert worker._files.delete(name)  # as the worker that ran it
                else:
                    Worker(f"fq://{queue_dir}", lease_seconds=3)._lease_file()
                    log.write_text("")  # renew_lease's open(..., "wt"), before its lock
            return seconds

        monkeypatch.setattr(os.path, "getmtime", mtime_then_taken_elsewhere)
        with pytest.raises(QueueEmptyError):
            worker._lease_file()
        monkeypatch.setattr(os.path, "getmtime", real_mtime)
        left = os.listdir(queue_dir / "movement")
        assert left == ([] if meanwhile == "finished" else [task_id]), (meanwhile, left)


def test_a_worker_whose_lease_ran_out_leaves_the_new_holders_lease_alone(tmp_path):
    """Once a lease has run out and another worker holds the task, the first worker's
    renewal, release and delete change nothing: else its renewal would move the second's
    lease, its release free a task the second still runs, its delete take its file."""
    queue_dir, name, worker = one_task_queue(tmp_path)
    files = worker._files
    first, _ = files.lease(name, 0)  # a lease that runs out at once
    [again] = files.candidates()
    second, _ = files.lease(again, 60)
    assert files.renew(first, 30) is None
    assert not files.release(first) and not files.delete(first)
    assert os.listdir(queue_dir / "queue") == [second] and files.candidates() == []
    renewed = files.renew(second, 120)
    assert renewed is not None and files.delete(renewed)
    assert not os.listdir(queue_dir / "queue") and not os.listdir(queue_dir / "movement")
    assert not files.delete(first)  # deleted by its holder: not the first's to count again


def test_a_log_with_nul_bytes_still_names_its_files(tmp_path):
    """taskqueue's renewal truncates a log without its lock; a line written meanwhile lands
    past NUL bytes. The names are read around them, and the task still renews and deletes."""
    queue_dir, name, worker = one_task_queue(tmp_path)
    task = worker._lease_file()
    log = queue_dir / "movement" / str(task.id)
    held = worker._held[task.id]
    log.write_bytes(b"\0" * 11 + held.encode() + b"\n")
    worker._renew(task, 30)
    assert worker._held[task.id] != held and log.read_bytes().startswith(b"\0")
    worker._delete(task)
    assert not os.listdir(queue_dir / "queue") and not os.listdir(queue_dir / "movement")


def test_a_file_system_without_locks_is_an_error_not_an_empty_queue(tmp_path, monkeypatch):
    """Only a busy lock means another worker's task: any other lock failure (NFS without its
    lock daemon, say) is raised, not read as a queue with nothing to lease; a worker started
    on such a file system refuses at once."""
    import errno

    import deepem3d.run.file_queue as fq
    from deepem3d.errors import InputError
    from deepem3d.run.queues import spawn_workers
    from deepem3d.run.worker import Worker

    queue_dir, name, worker = one_task_queue(tmp_path)

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fq.fcntl, "lockf", no_locks)
    with pytest.raises(OSError, match="No locks available"):
        worker._lease_file()
    # a worker started there says so in one line, before it leases anything
    with pytest.raises(InputError, match="takes no file locks .No locks available.; a file "
                       "queue needs them: mount it with locking"):
        Worker(f"fq://{queue_dir}")
    with pytest.raises(InputError, match="takes no file locks"):  # a run's local workers
        spawn_workers(f"fq://{queue_dir}", 2)
    assert os.listdir(queue_dir / "movement") == [name.split("--")[1][:-len(".json")]]


#: holds a lock (argv 4: shared or exclusive) on a file (argv 1) for argv 3 seconds: touches
#: argv 2 once it holds it, and writes there the time just before it lets go
HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "r+")
fcntl.lockf(f.fileno(), fcntl.LOCK_SH if sys.argv[4] == "shared" else fcntl.LOCK_EX)
open(sys.argv[2], "w").close()
time.sleep(float(sys.argv[3]))
with open(sys.argv[2], "w") as note:
    note.write(repr(time.time()))
"""


#: longer than taskqueue's lock retries last (3 waits of up to 1, 2 and 4 s)
PAST_TASKQUEUE_RETRIES = 8


@pytest.mark.parametrize("lock, seconds", [("shared", PAST_TASKQUEUE_RETRIES), ("exclusive", 1)])
def test_a_renewal_waits_for_a_locked_log_and_empties_nothing(tmp_path, lock, seconds):
    """While another process holds a task's movement log (a worker reaching for the task,
    taskqueue reading it), a renewal waits for the lock before it reads or writes the log.
    taskqueue's renewal read the log, then truncated it before locking it; its lock given up,
    it read the log again, empty, and renewed nothing, and the task's delete left its file on
    the queue to run again."""
    queue_dir, name, worker = one_task_queue(tmp_path)
    task = worker._lease_file()
    log = queue_dir / "movement" / str(task.id)
    held = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(log), str(held),
                               str(seconds), lock])
    wait_for(held)
    worker._renew(task, 30)
    renewed_at = time.time()
    assert held.read_text(), "renewed while the log was locked"
    assert float(held.read_text()) <= renewed_at
    assert holder.wait() == 0
    [renewed] = os.listdir(queue_dir / "queue")
    assert int(renewed.split("--")[0]) >= time.time() + 25
    assert log.read_text().split("\n")[-2] == renewed
    worker._delete(task)
    assert not os.listdir(queue_dir / "queue") and not os.listdir(queue_dir / "movement")


def test_sigterm_while_a_task_is_admitted_releases_it_unstarted(tmp_path, monkeypatch):
    """A SIGTERM between the lease and the task's start (admission, the attempt count) is not
    left for after the task: the task goes back to the queue, never started."""
    from deepem3d.run.worker import Worker

    queue_dir, name, worker = one_task_queue(tmp_path)
    real_count = Worker._count_attempt

    def count_then_terminated(self, task):
        attempts = real_count(self, task)
        os.kill(os.getpid(), signal.SIGTERM)
        return attempts

    monkeypatch.setattr(Worker, "_count_attempt", count_then_terminated)
    report = worker.run()
    assert report.released == 1 and report.executed == 0 and report.stopped_by_signal
    assert not (tmp_path / "done").exists()
    [back] = os.listdir(queue_dir / "queue")
    assert int(back.split("--")[0]) <= time.time()  # free to lease again


def test_a_worker_killed_after_deleting_its_finished_task_leaves_no_attempt_count(
        tmp_path, monkeypatch):
    queue_dir, name, worker = one_task_queue(tmp_path)
    real_delete = worker._delete

    def delete_then_killed(task):
        real_delete(task)
        raise KeyboardInterrupt  # stands in for the SIGKILL that could land here

    monkeypatch.setattr(worker, "_delete", delete_then_killed)
    with pytest.raises(KeyboardInterrupt):
        worker.run()
    assert (tmp_path / "done").exists()
    assert not os.listdir(queue_dir / "queue") and not os.listdir(queue_dir / "attempts")


def test_a_file_queue_refuses_a_lease_it_cannot_keep(tmp_path):
    TaskQueue(f"fq://{tmp_path / 'q'}", progress=False)
    assert_one_line_error(run_cli("worker", f"fq://{tmp_path / 'q'}", "--lease-seconds", "2"),
                          "--lease-seconds 2 is too short for a file queue", "at least 3")
    result = run_cli("run", "isbi2012-demo", "--lease-seconds", "2", "--output", tmp_path / "o")
    assert result.returncode == 2 and "2 is not in the range 3<=x<=43200" in result.stderr


def test_queue_create_refuses_a_lease_a_file_queue_cannot_keep(tmp_path):
    """`queue create fq://DIR --lease-seconds 1` made a queue whose workers would all refuse
    that lease; it is refused as the worker refuses it, and nothing is made."""
    queue = tmp_path / "q"
    assert_one_line_error(run_cli("queue", "create", f"fq://{queue}", "--lease-seconds", "1"),
                          "--lease-seconds 1 is too short for a file queue", "at least 3")
    assert not queue.exists()


def test_queue_create_takes_a_long_lease_on_a_file_queue(tmp_path):
    """--visibility-seconds is SQS's: its default (900) refused a file queue's lease of 1000."""
    result = run_cli("queue", "create", f"fq://{tmp_path / 'q'}", "--lease-seconds", "1000")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "q" / "queue").is_dir()


def test_poll_seconds_takes_one_range_in_worker_and_queue_status(tmp_path):
    """`queue status --poll-seconds` refused 0.05, which the runner's own workers poll at."""
    queue = f"fq://{tmp_path / 'q'}"
    TaskQueue(queue, progress=False)
    for command in (("worker", queue, "--exit-when-empty"), ("queue", "status", queue, "--watch")):
        assert_one_line_error(run_cli(*command, "--poll-seconds", "0.001"),
                              "--poll-seconds", "x>=0.01")
        result = run_cli(*command, "--poll-seconds", "0.05")
        assert result.returncode == 0, result.stderr
