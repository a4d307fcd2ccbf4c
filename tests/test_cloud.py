"""The cloud path against real local endpoints: moto's S3 + SQS server on 127.0.0.1, and the
GCS emulator for gs://.

The whole pipeline (inference, segmentation, downsampling, meshes) runs with its image, model
and outputs in S3 buckets and its tasks on two SQS queues routed as the pipeline file says,
drained by `deepem3d worker` processes of which one is SIGKILLed and one sent SIGTERM in the
middle of a task: its layers equal a local file:// run's, no message is lost or left behind,
and no log, payload, marker or provenance holds the credentials. A layer ingested to s3://,
downsampled through sqs://, equals igneous run in-process on a local copy. Queues are made
with their dead-letter queues, and a poison task ends there.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from functools import partial
from pathlib import Path

import boto3
import numpy as np
import pytest
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from taskqueue import TaskQueue

from deepem3d.axes import xyz_from_zyx
from deepem3d.errors import InputError, ServiceUnavailable
from deepem3d.models.checkpoint import resolve_model
from deepem3d.run.worker import QUEUE_MISSING_SECONDS
from deepem3d.sample import load_sample
from deepem3d.stages.frame import Markers
from deepem3d.storage.layers import create_layer
from tests.conftest import ROOT, assert_one_line_error, igneous_reference, run_cli
from tests.queue_helpers import FailsInFrame, Touch

#: credentials the tests set, searched for in everything a run leaves
ACCESS_KEY = "AKIAE2ELEAKCHECK0042"
SECRET_KEY = "e2e-leak-check-secret-9f8e7d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_endpoint(module: str, *args: str, probe: str) -> tuple[subprocess.Popen, str]:
    """Start `python -m MODULE ARGS` (with --port PORT appended) on 127.0.0.1 and wait until
    URL/PROBE answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", module, *args, str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/{probe}", timeout=1)
            return server, url
        except OSError:
            assert server.poll() is None, f"{module} exited"
            assert time.time() < deadline, f"{module} did not start"
            time.sleep(0.2)


@pytest.fixture
def moto_endpoint(monkeypatch):
    server, url = local_endpoint("moto.server", "-H", "127.0.0.1", "-p", probe="moto-api/")
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": "", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": url, "AWS_ENDPOINT_URL_SQS": url,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # subprocesses (the CLI, workers) inherit these
    yield url
    server.terminate()
    server.wait(timeout=10)


def test_s3_layer_downsampled_through_sqs(tmp_path, moto_endpoint):
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="em-data")
    boto3.client("sqs", endpoint_url=moto_endpoint).create_queue(QueueName="deepem3d-test")

    image, _ = load_sample()
    npy = tmp_path / "crop.npy"
    np.save(npy, image[:20, :256, :192])
    layer = "s3://em-data/crop/image"
    run_cli("ingest", npy, layer, "--resolution", "4,4,50", "--chunk-size", "64,64,10",
            check=True)

    local = tmp_path / "local"
    run_cli("ingest", npy, local, "--resolution", "4,4,50", "--chunk-size", "64,64,10",
            check=True)
    reference = igneous_reference(local, tmp_path / "reference", 2, (2, 2, 1),
                                  memory_target=3500 * 10**6)

    out = run_cli("downsample", layer, "--queue", "sqs://deepem3d-test", "--parallel", "2",
                  "--num-mips", "2", check=True)
    assert "stage downsample-mip0: 2 task(s) (2 run now)" in out.stdout, out.stdout
    assert Markers(layer, "downsample-mip0").is_complete()
    mips = CloudVolume(layer).available_mips
    assert mips == CloudVolume(reference).available_mips and len(mips) >= 2
    for mip in mips:
        np.testing.assert_array_equal(
            CloudVolume(layer, mip=mip)[:, :, :], CloudVolume(reference, mip=mip)[:, :, :]
        )
    assert "enqueued: 0" in run_cli("queue", "status", "sqs://deepem3d-test", check=True).stdout


def worker_until(queue: str, tmp_path, finished, timeout: float = 90) -> str:
    """Run a worker on `queue` (test tasks allowed, writing under tmp_path) until
    `finished()`; its log."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "deepem3d", "worker", queue, "--import", "tests.queue_helpers",
         "--lease-seconds", "1", "--poll-seconds", "0.2", "--allow-prefix", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while not finished():
            assert worker.poll() is None, worker.communicate()[0]
            assert time.time() < deadline, f"{queue}: not finished in {timeout} s"
            time.sleep(1)
    finally:
        worker.terminate()
        log = worker.communicate(timeout=60)[0]
    return log


def test_queue_create_sets_a_dead_letter_queue_that_takes_a_poison_task(tmp_path,
                                                                      moto_endpoint):
    """`queue create`: retention, visibility and redrive as asked; a frame task that always
    raises ends in the dead-letter queue after its attempts, and a malformed message, one
    naming an unknown task and one writing outside the allow-list on their first, while the
    good task runs and the worker stays up; `queue status` shows each with its error;
    `queue delete` removes both queues. Settings that would lose tasks are refused in one
    line."""
    assert_one_line_error(run_cli("queue", "create", "sqs://q", "--visibility-seconds", "60",
                                  "--lease-seconds", "600"), "below the workers' lease")
    out = run_cli("queue", "create", "sqs://work", "--max-attempts", "2",
                  "--visibility-seconds", "60", check=True).stdout
    assert "work-dead-letter" in out
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint)
    url = sqs.get_queue_url(QueueName="work")["QueueUrl"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["MessageRetentionPeriod"] == "1209600"
    assert attributes["VisibilityTimeout"] == "60"
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"].endswith(":work-dead-letter")
    assert int(redrive["maxReceiveCount"]) == 2
    assert_one_line_error(run_cli("queue", "create", "sqs://work", "--max-attempts", "3",
                                  "--visibility-seconds", "60"), "exists with other settings")

    layer = f"file://{tmp_path / 'layer'}"
    Markers(layer, "broken").start_run("k1", {}, ["t1"])
    done = tmp_path / "done"
    tq = TaskQueue("sqs://work")
    tq.insert([partial(FailsInFrame, message="bug",
                       run={"layer": layer, "stage": "broken", "id": "t1", "key": "k1"}),
               partial(Touch, path=str(done))])
    # a message that is not JSON, one naming a task nobody runs, one writing outside the
    # allow-list: each goes to the dead letters on its first receive
    outside = [["igneous.tasks.image.image", "DownsampleTask"], [],
               {"layer_path": "s3://em-data/elsewhere", "mip": 0, "shape": [64, 64, 10],
                "offset": [0, 0, 0]}, None]
    forged = {
        "malformed": "{not json",
        "unknown": json.dumps({"payload": [["no.such.module", "fn"], [], {}, None]}),
        "outside": json.dumps({"payload": [["deepem3d.stages.frame", "MarkedTask"], [],
                                           {"task": outside, "run": {
                                               "layer": layer, "stage": "broken", "id": "t2",
                                               "key": "k1"}}, None]}),
    }
    for body in forged.values():
        sqs.send_message(QueueUrl=url, MessageBody=body)
    log = worker_until("sqs://work", tmp_path, lambda: done.exists() and "set aside: 4" in
                       run_cli("queue", "status", "sqs://work").stdout)
    assert log.count("RuntimeError: bug") == 2, log  # both attempts, then the redrive
    for reason in ("not a task: JSONDecodeError", "no.such.module.fn is not a task",
                   "outside the allowed prefixes"):
        assert log.count(reason) == 1, log  # once: set aside on the first receive
    shown = run_cli("queue", "status", "sqs://work", check=True).stdout
    assert "set aside: 4 (in work-dead-letter)" in shown, shown
    assert "layer/broken  RuntimeError: bug (attempt 2 on" in shown, shown
    assert "  -  not a task: JSONDecodeError" in shown, shown
    assert "  -  refused: no.such.module.fn is not a task this worker runs" in shown, shown
    assert "layer/broken  refused: DownsampleTask writes to 's3://em-data/elsewhere'" in shown
    assert queue_depth(sqs, "work") == 0
    assert SECRET_KEY not in log + shown and ACCESS_KEY not in log + shown
    assert "deleted work and work-dead-letter" in run_cli(
        "queue", "delete", "sqs://work", "--yes", check=True).stdout
    assert_one_line_error(run_cli("queue", "delete", "sqs://work", "--yes"), "no such SQS")


def test_an_sqs_endpoint_lost_while_a_queue_is_counted_is_exit_75(moto_endpoint, monkeypatch):
    """The queue found, then its endpoint gone (`queue status --watch`, a worker with
    --exit-when-empty between an empty receive and its count): ServiceUnavailable, exit 75
    (it was botocore's EndpointConnectionError with a traceback)."""
    from deepem3d.run import queues

    boto3.client("sqs", endpoint_url=moto_endpoint).create_queue(QueueName="work")
    found = queues.open_queue("sqs://work")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{free_port()}")
    found.api.sqs = queues.sqs_client()
    for count in (queues.enqueued, queues.queue_counts):
        with pytest.raises(ServiceUnavailable, match="counting the tasks of sqs://work"):
            count(found)


def test_an_sqs_endpoint_lost_while_tasks_go_on_is_exit_75(tmp_path, moto_endpoint,
                                                           monkeypatch):
    """The endpoint answers the queue's look-up, then not the insert (lost mid-stage, or
    while a run's later wave goes on): ServiceUnavailable, which the CLI turns into exit 75
    (it was botocore's EndpointConnectionError with a traceback, exit 1, which a driver Job
    does not retry)."""
    from deepem3d.run import queues

    boto3.client("sqs", endpoint_url=moto_endpoint).create_queue(QueueName="work")
    found = queues.open_queue("sqs://work")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{free_port()}")
    found.api.sqs = queues.sqs_client()  # the endpoint gone after the look-up
    monkeypatch.setattr(queues, "open_queue", lambda url: found)
    with pytest.raises(ServiceUnavailable, match="inserting tasks into sqs://work"):
        queues.insert_tasks("sqs://work", [partial(Touch, path=str(tmp_path / "t"))])


def test_a_run_on_sqs_stops_on_its_task_in_the_dead_letter_queue(tmp_path, moto_endpoint,
                                                                  monkeypatch):
    """A task SQS's redrive moves to the dead-letter queue never gets its marker: the runner
    waiting on the stage finds it there and stops in one line, instead of waiting for ever;
    an entry from before the wait (an earlier run's) does not stop it."""
    from deepem3d.run import runner as runner_module
    from deepem3d.run.runner import Runner
    from deepem3d.stages.frame import Stage

    run_cli("queue", "create", "sqs://stuck", "--max-attempts", "2", "--visibility-seconds",
            "60", check=True)
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint)
    dead = sqs.get_queue_url(QueueName="stuck-dead-letter")["QueueUrl"]
    layer = f"file://{tmp_path / 'layer'}"
    old = {"payload": [["tests.queue_helpers", "FailsInFrame"], [], {"message": "old", "run": {
        "layer": layer, "stage": "broken", "id": "t1", "key": "k0"}}, None]}
    sqs.send_message(QueueUrl=dead, MessageBody=json.dumps(old))  # an earlier run's
    stage = Stage(name="broken", layer=layer, key="k1", parameters={}, task_count=1,
                  memory_bytes=0, make_tasks=lambda: iter(
                      [("t1", partial(FailsInFrame, message="bug"))]))
    monkeypatch.setattr(runner_module, "DEAD_LETTER_CHECK_SECONDS", 0.5)
    monkeypatch.setattr(runner_module, "SENT_CLOCK_MARGIN_MS", 0)  # one clock here
    worker = subprocess.Popen(
        [sys.executable, "-m", "deepem3d", "worker", "sqs://stuck", "--import",
         "tests.queue_helpers", "--lease-seconds", "1", "--poll-seconds", "0.2"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runner = Runner(lambda s: "sqs://stuck", progress=False, poll=0.2, echo=lambda _: None)
        started = time.time()
        with pytest.raises(InputError) as raised:
            runner.run([stage])
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    message = str(raised.value)
    assert "task t1 was set aside in sqs://stuck-dead-letter" in message, message
    assert "RuntimeError: bug" in message and "\n" not in message, message
    assert time.time() - started < 60


def test_a_run_whose_s3_endpoint_is_lost_while_it_waits_is_exit_75(moto_endpoint, monkeypatch):
    """The bucket and queue found, the stage queued, then the endpoint gone while the run
    reads the stage's markers: ServiceUnavailable (exit 75, which the driver Job retries); it
    was botocore's EndpointConnectionError with a traceback, exit 1."""
    from deepem3d.run.runner import Runner
    from deepem3d.stages.frame import Stage

    server, url = local_endpoint("moto.server", "-H", "127.0.0.1", "-p", probe="moto-api/")
    try:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SQS"):
            monkeypatch.setenv(name, url)
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="em-lost")
        boto3.client("sqs", endpoint_url=url).create_queue(QueueName="lost")
        stage = Stage(name="waits", layer="s3://em-lost/layer", key="k1", parameters={},
                      task_count=1, memory_bytes=0, make_tasks=lambda: iter(
                          [("t1", partial(FailsInFrame, message="never run"))]))

        def echo(line):  # the stage's tasks are on the queue: the endpoint goes
            if "waiting for workers" in line:
                server.kill()
                server.wait()

        runner = Runner(lambda s: "sqs://lost", progress=False, poll=0.2, echo=echo)
        with pytest.raises(ServiceUnavailable, match="stage waits: Could not connect"):
            runner.run([stage])
    finally:
        server.kill()
        server.wait()


def test_a_look_into_a_dead_letter_queue_reads_all_and_leaves_them_there(moto_endpoint):
    """Past a hundred messages (a receive that hides nothing returns the same ones again),
    every one is listed once; afterwards all are visible again, at once."""
    from deepem3d.run.queue_admin import set_aside

    run_cli("queue", "create", "sqs://many", check=True)
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint)
    dead = sqs.get_queue_url(QueueName="many-dead-letter")["QueueUrl"]
    for start in range(0, 130, 10):
        sqs.send_message_batch(QueueUrl=dead, Entries=[
            {"Id": str(i), "MessageBody": "{}", "MessageAttributes": {
                "task": {"DataType": "String", "StringValue": f"t{i:03d}"},
                "error": {"DataType": "String", "StringValue": "bug"}}}
            for i in range(start, start + 10)])
    found = set_aside("sqs://many")
    assert [f.task_id for f in found] == [f"t{i:03d}" for i in range(130)]
    assert {f.reason for f in found} == {"bug"}
    again = set_aside("sqs://many")  # not hidden by the first look
    assert len(again) == 130
    shown = run_cli("queue", "status", "sqs://many", check=True).stdout
    assert "set aside: 130 (in many-dead-letter)" in shown, shown


def test_a_queues_redrive_limit_is_the_workers_limit(tmp_path, moto_endpoint):
    """A queue made with more attempts than a worker's default (5) gets them all: the worker
    takes the queue's receive limit instead of setting the task aside after its own 5."""
    run_cli("queue", "create", "sqs://patient", "--max-attempts", "7",
            "--visibility-seconds", "60", check=True)
    layer = f"file://{tmp_path / 'layer'}"
    Markers(layer, "broken").start_run("k1", {}, ["t1"])
    TaskQueue("sqs://patient").insert([partial(
        FailsInFrame, message="bug", run={"layer": layer, "stage": "broken", "id": "t1",
                                          "key": "k1"})])
    log = worker_until("sqs://patient", tmp_path, lambda: "set aside: 1" in run_cli(
        "queue", "status", "sqs://patient").stdout)
    assert log.count("RuntimeError: bug") == 7, log
    assert "layer/broken  RuntimeError: bug (attempt 7 on" in run_cli(
        "queue", "status", "sqs://patient", check=True).stdout


def test_deleting_a_missing_sqs_queue_deletes_nothing(moto_endpoint):
    """`queue delete sqs://NAME` of a NAME that does not exist is one line, exit 2, and
    leaves NAME-dead-letter and what it holds alone (it deleted it, then said "no such SQS
    queue")."""
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint)
    dead = sqs.create_queue(QueueName="lone-dead-letter")["QueueUrl"]
    sqs.send_message(QueueUrl=dead, MessageBody="a task set aside")
    assert_one_line_error(run_cli("queue", "delete", "sqs://lone", "--yes"),
                          "sqs://lone: no such SQS queue", "nothing deleted")
    assert sqs.get_queue_url(QueueName="lone-dead-letter")["QueueUrl"] == dead


def test_a_worker_stops_when_its_sqs_queue_is_deleted(moto_endpoint):
    """A queue deleted under a polling worker is gone for good: the worker says so in one
    line and exits 1 (it used to poll the missing queue forever, warning each time), once SQS
    has said so for QUEUE_MISSING_SECONDS (one answer may be a new queue not yet known)."""
    run_cli("queue", "create", "sqs://doomed", check=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "deepem3d", "worker", "sqs://doomed", "--poll-seconds", "0.2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(3)  # polling
        assert worker.poll() is None, worker.communicate()[0]
        run_cli("queue", "delete", "sqs://doomed", "--yes", check=True)
        deleted = time.monotonic()
        status = worker.wait(timeout=60)
        waited = time.monotonic() - deleted
    finally:
        worker.kill()
        log = worker.communicate()[0]
    assert status == 1, log
    assert "no such SQS queue in region us-east-1" in log and "stopping" in log, log
    assert "Traceback" not in log, log
    assert waited >= QUEUE_MISSING_SECONDS, waited  # retried meanwhile ("trying again")


def test_a_failed_read_of_the_redrive_policy_is_asked_again_not_taken_for_none(
        moto_endpoint, monkeypatch):
    """One failed read of the queue's policy (a throttled call) falls back to the worker's
    own limit for that task only: it is not remembered as "no policy", which would have the
    worker hide refused messages for 12 h instead of setting them aside."""
    from botocore.exceptions import ClientError

    from deepem3d.run.worker import Worker

    run_cli("queue", "create", "sqs://blip", "--max-attempts", "7", check=True)
    worker = Worker("sqs://blip")
    sqs = worker.queue.api.sqs
    real_read = sqs.get_queue_attributes
    failures = [ClientError({"Error": {"Code": "Throttling", "Message": "slow down"}},
                            "GetQueueAttributes")]

    def read_once_throttled(**kwargs):
        if failures:
            raise failures.pop()
        return real_read(**kwargs)

    monkeypatch.setattr(sqs, "get_queue_attributes", read_once_throttled)
    assert worker._attempt_limit() == 5  # the worker's own, this once
    assert worker._attempt_limit() == 7  # the queue's, read again
    assert worker._dead_letter().endswith("/blip-dead-letter")


# ---------------------------------------------------------------------------------------------
# The whole pipeline on S3 + SQS

CROP = (128, 128, 10)  # x, y, z
PIPELINE = """\
version: 1
output: {output}
image: {image}
products: [map, segmentation, downsample, meshes]
inference:
  model: {model}
  tta: 8
  patch_size: 64
  patch_output: 32
  overlap: 8
  chunk_size: [32, 32, 2]
  task_shape: [64, 64, 2]
  queue: gpu
segmentation:
  method: mean
  threshold: 0.5
  task_shape: [64, 64, 4]
downsample:
  layers: [segmentation]
meshes:
  mip: 1
queues:
  default: {cpu}
  gpu: {gpu}
"""
#: the workers' lease: how soon the SIGKILLed worker's task goes to another
LEASE = 8


def write_crop(path: str) -> None:
    image, _ = load_sample()
    cut = image[: CROP[2], 100:100 + CROP[1], 200:200 + CROP[0]]
    vol = create_layer(path, layer_type="image", dtype="uint8", resolution=(4, 4, 50),
                       size=CROP, chunk_size=(64, 64, 10))
    vol[:, :, :] = xyz_from_zyx(cut)


def download(prefix: str, folder: Path) -> None:
    """Every object under `prefix`, decoded, as files under `folder`."""
    files = CloudFiles(prefix)
    for key in files.list():
        target = folder / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files.get(key))


class Workers:
    """`deepem3d worker` processes, each logging to its own file."""

    def __init__(self, folder: Path):
        self.folder, self.started = folder, []

    def start(self, queue: str) -> tuple[subprocess.Popen, Path]:
        log = self.folder / f"worker-{len(self.started)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "deepem3d", "worker", queue, "--lease-seconds", str(LEASE),
             "--poll-seconds", "0.2", "--allow-prefix", "s3://em-output/run"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        self.started.append((process, log))
        return process, log

    def stop(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                process.terminate()
        for process, _ in self.started:
            process.wait(timeout=120)

    def logs(self) -> str:
        return "".join(log.read_text() for _, log in self.started)


def interrupt_mid_task(process: subprocess.Popen, log: Path, task: str, signum: int,
                       timeout: float = 300) -> str:
    """Send `signum` to the worker while it runs a task of kind `task`; returns that task's
    id (the test then checks the worker had not finished it)."""
    deadline = time.time() + timeout
    while True:
        assert process.poll() is None, log.read_text()
        assert time.time() < deadline, f"no {task} started: {log.read_text()[-2000:]}"
        running = re.findall(rf"running task (\S+) \({task}, ", log.read_text())
        if running:
            process.send_signal(signum)
            return running[-1]
        time.sleep(0.02)


def queue_depth(sqs, name: str) -> int:
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return sum(int(attributes[k]) for k in ("ApproximateNumberOfMessages",
                                            "ApproximateNumberOfMessagesNotVisible",
                                            "ApproximateNumberOfMessagesDelayed"))


def test_whole_pipeline_on_s3_and_sqs_equals_the_local_run(tmp_path, moto_endpoint):
    from scripts.fault_campaign import contents

    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint)
    for bucket in ("em-input", "em-output"):
        s3.create_bucket(Bucket=bucket)
    for name in ("gpu", "cpu"):
        run_cli("queue", "create", f"sqs://{name}", "--visibility-seconds", "60",
                "--max-attempts", "4", check=True)
    checkpoint = Path(resolve_model("isbi2012-small-affinity"))
    s3.upload_file(str(checkpoint), "em-input", "models/small-affinity.pt")
    write_crop("s3://em-input/image")
    local_image = f"file://{tmp_path / 'image'}"
    write_crop(local_image)

    # the local run: file:// layers, a file queue, two local workers
    local = tmp_path / "local"
    (tmp_path / "local.yaml").write_text(PIPELINE.format(
        output=local, image=local_image, model=checkpoint, cpu=f"fq://{tmp_path / 'fq-cpu'}",
        gpu=f"fq://{tmp_path / 'fq-gpu'}"))
    run_cli("run", tmp_path / "local.yaml", "--parallel", "2", check=True, timeout=900)

    # the cloud run: the runner creates tasks and waits; workers elsewhere drain the queues
    (tmp_path / "cloud.yaml").write_text(PIPELINE.format(
        output="s3://em-output/run", image="s3://em-input/image",
        model="s3://em-input/models/small-affinity.pt", cpu="sqs://cpu", gpu="sqs://gpu"))
    runner_log = tmp_path / "runner.log"
    runner = subprocess.Popen(
        [sys.executable, "-m", "deepem3d", "run", str(tmp_path / "cloud.yaml")], cwd=ROOT,
        stdout=open(runner_log, "w"), stderr=subprocess.STDOUT)
    workers = Workers(tmp_path)
    try:
        deadline = time.time() + 120
        while queue_depth(sqs, "gpu") == 0:  # the inference stage's tasks, as sent
            assert runner.poll() is None, runner_log.read_text()
            assert time.time() < deadline, runner_log.read_text()
            time.sleep(0.2)
        gpu_url = sqs.get_queue_url(QueueName="gpu")["QueueUrl"]
        bodies = [m["Body"] for m in sqs.receive_message(
            QueueUrl=gpu_url, MaxNumberOfMessages=10, VisibilityTimeout=0).get("Messages", [])]
        assert bodies and all("InferenceTask" in b for b in bodies)

        doomed, doomed_log = workers.start("sqs://gpu")
        killed = interrupt_mid_task(doomed, doomed_log, "InferenceTask", signal.SIGKILL)
        doomed.wait(timeout=30)
        assert f"finished task {killed} " not in doomed_log.read_text()
        workers.start("sqs://gpu")
        stopped, stopped_log = workers.start("sqs://cpu")
        interrupt_mid_task(stopped, stopped_log, "SupervoxelTask", signal.SIGTERM)
        assert stopped.wait(timeout=60) == 0, stopped_log.read_text()
        assert "received SIGTERM" in stopped_log.read_text()
        workers.start("sqs://cpu")
        workers.start("sqs://cpu")
        assert runner.wait(timeout=900) == 0, runner_log.read_text()[-3000:]
    finally:
        runner.kill() if runner.poll() is None else None
        workers.stop()
    logs = workers.logs()
    assert "attempt 2)" in logs, "the killed worker's task was leased again"
    for name in ("gpu", "cpu", "gpu-dead-letter", "cpu-dead-letter"):
        assert queue_depth(sqs, name) == 0, f"{name} holds messages"

    cloud = tmp_path / "cloud"
    download("s3://em-output/run", cloud)
    assert (cloud / "segmentation" / "tasks").is_dir() and (cloud / "report.json").exists()
    expected = contents(local)
    assert len(expected) > 100 and any("mesh" in key for key in expected)
    assert contents(cloud) == expected

    # no credential anywhere: logs, the messages as sent, markers, provenance, report
    searched = [logs, runner_log.read_text(), *bodies]
    searched += [p.read_text(errors="replace") for p in cloud.rglob("*") if p.is_file()]
    assert not [text for text in searched if ACCESS_KEY in text or SECRET_KEY in text]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, in seconds


def test_cloud_mistakes_are_one_line_within_seconds(tmp_path, moto_endpoint, monkeypatch):
    """A queue or bucket that does not exist, an endpoint that does not answer, missing
    credentials: each a one-line error with exit status 2 (75 for a service that does not
    answer, which may a minute later) after a bounded retry, in seconds (botocore's and
    CloudFiles' own retries take minutes)."""
    # a bucket of its own: CloudFiles keeps one connection pool per bucket in a process, and
    # an earlier test's pool for the same name points at that test's server
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="em-mistakes")
    npy = tmp_path / "crop.npy"
    np.save(npy, np.zeros((4, 32, 32), np.uint8))
    ingest = ("ingest", npy, "--resolution", "4,4,40")

    def quick(*args, fragments, status=2):
        started = time.time()
        assert_one_line_error(run_cli(*args), *fragments, status=status)
        assert time.time() - started < 30, args

    quick("worker", "sqs://nope", fragments=["sqs://nope", "no such SQS queue"])
    quick("queue", "status", "sqs://nope", fragments=["no such SQS queue in region us-east-1"])
    quick(*ingest, "s3://no-such-bucket/image", fragments=["s3://no-such-bucket",
                                                           "no such bucket"])
    quick("downsample", "s3://no-such-bucket/image", fragments=["no such bucket"])
    local = tmp_path / "image"  # a task command's queue is looked up before it writes
    np.save(tmp_path / "wide.npy", np.zeros((4, 256, 256), np.uint8))
    run_cli("ingest", tmp_path / "wide.npy", local, "--resolution", "4,4,40", check=True)
    quick("downsample", local, "--queue", "sqs://nope", fragments=["no such SQS queue"])
    assert not (local / "8_8_40").exists() and "8_8_40" not in (local / "info").read_text()
    pipeline = tmp_path / "misspelt.yaml"  # named by its key; a dry run (which may size the
    pipeline.write_text(f"version: 1\noutput: {tmp_path / 'out'}\nimage: {local}\n"  # pools
                        "products: [map]\ninference:\n  model: isbi2012-small-affinity\n"
                        "  force: true\n"
                        "queues:\n  default: sqs://deepem3d-defualt\n")  # first) warns
    quick("run", pipeline, fragments=["queues.default", "no such SQS queue"])
    assert not (tmp_path / "out").exists()
    for key, text in (("output", f"output: {tmp_path / 'out'}"), ("image", f"image: {local}")):
        elsewhere = tmp_path / f"no-bucket-{key}.yaml"  # named by its own key, not a stage's
        elsewhere.write_text(pipeline.read_text().replace(
            text, f"{key}: s3://no-such-bucket/x").replace("sqs://deepem3d-defualt", "fq://q"))
        quick("run", elsewhere, "--dry-run",
              fragments=[f"{elsewhere}: {key}: s3://no-such-bucket", "no such bucket"])
    dry = run_cli("run", pipeline, "--dry-run", check=True)
    assert "deepem3d: warning:" in dry.stderr and "queues.default" in dry.stderr, dry.stderr

    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", closed)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    # a service that does not answer: exit 75, which the driver Job retries (2 ends it)
    quick("worker", "sqs://work", fragments=["sqs://work", "Could not connect"], status=75)
    quick("queue", "create", "sqs://work", fragments=["Could not connect"], status=75)
    quick(*ingest, "s3://em-mistakes/image", fragments=["s3://em-mistakes", "does not answer"],
          status=75)
    quick("infer", f"{closed}/image", tmp_path / "map", "--dry-run",
          fragments=[closed, "does not answer"], status=75)  # http(s) layers and models
    unanswered = tmp_path / "unanswered.yaml"  # a pipeline's key keeps the exit status
    unanswered.write_text(pipeline.read_text().replace(
        f"image: {local}", "image: s3://em-mistakes/image").replace("sqs://deepem3d-defualt",
                                                                    "fq://q"))
    quick("run", unanswered, "--dry-run", fragments=["image: s3://em-mistakes",
                                                     "does not answer"], status=75)

    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # no CloudVolume secrets either
    quick("worker", "sqs://work", fragments=["no AWS credentials found"])
    quick(*ingest, "s3://em-mistakes/image", fragments=["no AWS credentials found"])

    # long-lived keys without a session token (CloudFiles alone fails on that with a KeyError)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    run_cli(*ingest, "s3://em-mistakes/image", check=True)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "")  # for this process's own CloudVolume
    assert CloudVolume("s3://em-mistakes/image").shape[:3] == (32, 32, 4)


def test_view_of_a_bucket_out_of_reach_is_one_line_within_seconds(tmp_path, moto_endpoint,
                                                                    monkeypatch):
    """`view` first looks for a run's report.json under each path: for a bucket that does
    not exist or an endpoint that does not answer, that look was CloudFiles' own retries
    (22 s and 28 s here) before the one-line error."""
    def quick(*fragments, status=2):
        started = time.time()
        assert_one_line_error(run_cli("view", "s3://no-such-bucket/run"), *fragments,
                              status=status)
        assert time.time() - started < 10

    quick("s3://no-such-bucket", "no such bucket")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    quick("does not answer", status=75)


def test_an_s3_layer_on_an_endpoint_of_its_own_is_viewed_through_that_endpoint(
        tmp_path, moto_endpoint, monkeypatch):
    """Neuroglancer reads an s3:// source from AWS: a layer on MinIO or moto is handed to it
    as the endpoint's path-style URL, from which its info reads unsigned, as the browser's."""
    import urllib.request

    from deepem3d.viewer import browser_url

    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="em-view")
    s3.put_bucket_policy(Bucket="em-view", Policy=json.dumps({  # anonymous reads, as the docs
        "Version": "2012-10-17", "Statement": [{  # say a bucket viewed so needs
            "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
            "Resource": "arn:aws:s3:::em-view/*"}]}))
    np.save(tmp_path / "crop.npy", np.zeros((4, 32, 32), np.uint8))
    run_cli("ingest", tmp_path / "crop.npy", "s3://em-view/image", "--resolution", "4,4,40",
            check=True)
    url = browser_url("s3://em-view/image")
    assert url == f"{moto_endpoint}/em-view/image"
    with urllib.request.urlopen(f"{url}/info", timeout=10) as answer:  # no signature
        assert json.loads(answer.read())["scales"][0]["resolution"] == [4, 4, 40]
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    assert browser_url("s3://em-view/image") == "s3://em-view/image"  # AWS's own
    assert browser_url("gs://b/image") == "gs://b/image"


# ---------------------------------------------------------------------------------------------
# gs:// on the GCS emulator


@pytest.fixture
def gcs_endpoint(monkeypatch):
    server, url = local_endpoint("tests.gcs_emulator", "start", "--host", "127.0.0.1",
                                 "--in-memory", "--default-bucket", "em-gcs", "--port",
                                 probe="storage/v1/b")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    yield url
    server.terminate()
    server.wait(timeout=10)


def test_a_gs_endpoint_lost_after_its_check_is_service_unavailable(monkeypatch):
    """As on S3 (above), a gs:// endpoint lost after its bucket was checked: what CloudFiles
    raises once its retries are spent (requests' ConnectionError for a lookup, within
    seconds; Google's RetryError for a read, after Google's own retries, minutes) is
    ServiceUnavailable within `answered` (a run: exit 75), not a traceback."""
    from google.api_core.exceptions import RetryError
    from google.api_core.exceptions import ServiceUnavailable as GoogleUnavailable

    from deepem3d.storage.cloud import answered

    server, url = local_endpoint("tests.gcs_emulator", "start", "--host", "127.0.0.1",
                                 "--in-memory", "--default-bucket", "em-lost", "--port",
                                 probe="storage/v1/b")
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        files = CloudFiles("gs://em-lost/layer")
        files.put("tasks/a", b"x")
        server.kill()
        server.wait()
        with pytest.raises(ServiceUnavailable,
                           match="stage s: the storage endpoint does not answer"):
            with answered("stage s"):
                files.exists("tasks/a")
    finally:
        server.kill()
        server.wait()
    for spent in (RetryError("Timeout of 120.0s exceeded", cause=None),
                  GoogleUnavailable("503 backend")):
        with pytest.raises(ServiceUnavailable, match="stage s: .*does not answer"):
            with answered("stage s"):
                raise spent
    import requests

    for other in (KeyError("a bug"), requests.exceptions.SSLError("certificate verify failed")):
        with pytest.raises(type(other)):  # anything else passes unchanged (a certificate
            with answered("stage s"):     # refused is refused on every retry)
                raise other


def test_gs_layer_round_trips_and_downsamples_as_igneous_does(tmp_path, gcs_endpoint):
    """A layer ingested to gs:// reads back as written, and its mip levels, made by queue
    tasks that read and write gs://, equal igneous's run in-process on a local copy; a bucket
    that does not exist is one line."""
    image, _ = load_sample()
    crop = image[:20, :256, :192]
    npy = tmp_path / "crop.npy"
    np.save(npy, crop)
    layer = "gs://em-gcs/crop/image"
    options = ("--resolution", "4,4,50", "--chunk-size", "64,64,10")
    run_cli("ingest", npy, layer, *options, check=True)
    np.testing.assert_array_equal(CloudVolume(layer)[:, :, :][..., 0],
                                  xyz_from_zyx(crop))
    local = tmp_path / "local"
    run_cli("ingest", npy, local, *options, check=True)
    reference = igneous_reference(local, tmp_path / "reference", 2, (2, 2, 1),
                                  memory_target=3500 * 10**6)
    run_cli("downsample", layer, "--queue", f"fq://{tmp_path / 'queue'}", "--parallel", "2",
            "--num-mips", "2", check=True)
    mips = CloudVolume(layer).available_mips
    assert mips == CloudVolume(reference).available_mips and len(mips) >= 2
    for mip in mips:
        np.testing.assert_array_equal(CloudVolume(layer, mip=mip)[:, :, :],
                                      CloudVolume(reference, mip=mip)[:, :, :])
    assert_one_line_error(run_cli("ingest", npy, "gs://no-such-bucket/image", *options),
                          "gs://no-such-bucket", "no such bucket")
