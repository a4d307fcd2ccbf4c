"""The cloud path against a real local endpoint: moto's S3 + SQS server on 127.0.0.1.

A layer ingested to s3://, downsampled by tasks on sqs:// drained by two local workers, equals
igneous run in-process on a local copy.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from functools import partial

import boto3
import numpy as np
import pytest
from cloudvolume import CloudVolume
from taskqueue import TaskQueue

from deepem3d.sample import load_sample
from deepem3d.stages.frame import Markers
from tests.conftest import ROOT, assert_one_line_error, igneous_reference, run_cli
from tests.queue_helpers import FailsInFrame, Touch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_endpoint(monkeypatch):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            assert server.poll() is None, "moto server exited"
            assert time.time() < deadline, "moto server did not start"
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
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


def test_queue_create_sets_a_dead_letter_queue_that_takes_a_poison_task(tmp_path,
                                                                      moto_endpoint):
    """`queue create`: retention, visibility and redrive as asked; a frame task that always
    raises ends in the dead-letter queue after its attempts while the good task runs and the
    worker stays up; `queue status` shows it with its stage's error record; `queue delete`
    removes both queues. Settings that would lose tasks are refused in one line."""
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

    layer = f"file://{tmp_path / 'layer'}"
    Markers(layer, "broken").start_run("k1", {}, ["t1"])
    done = tmp_path / "done"
    tq = TaskQueue("sqs://work")
    tq.insert([partial(FailsInFrame, message="bug",
                       run={"layer": layer, "stage": "broken", "id": "t1", "key": "k1"}),
               partial(Touch, path=str(done))])
    worker = subprocess.Popen(
        [sys.executable, "-m", "deepem3d", "worker", "sqs://work", "--import",
         "tests.queue_helpers", "--lease-seconds", "1", "--poll-seconds", "0.2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while not (done.exists() and run_cli("queue", "status", "sqs://work").stdout.count(
                "RuntimeError: bug")):
            assert worker.poll() is None, worker.communicate()[0]
            assert time.time() < deadline, "the poison task never reached the dead letters"
            time.sleep(1)
    finally:
        worker.terminate()
        log = worker.communicate(timeout=60)[0]
    assert log.count("RuntimeError: bug") == 2, log  # both attempts, then the redrive
    shown = run_cli("queue", "status", "sqs://work", check=True).stdout
    assert "set aside: 1 (in work-dead-letter)" in shown, shown
    assert "layer/broken  RuntimeError: bug (attempt 2 on" in shown, shown
    assert "AWS_SECRET_ACCESS_KEY" not in log and "testing" not in shown
    assert "deleted work and work-dead-letter" in run_cli(
        "queue", "delete", "sqs://work", "--yes", check=True).stdout
    assert_one_line_error(run_cli("queue", "delete", "sqs://work", "--yes"), "no such SQS")
