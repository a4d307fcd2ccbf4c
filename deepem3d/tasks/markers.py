"""Completion markers: how a stage knows it is finished, whatever the queue says.

A stage is a set of independent tasks writing one output layer. Each task writes a small
marker after its outputs, at

    {layer}/tasks/{stage}/done/{task_id}.json

and the stage's manifest lists every task id at {layer}/tasks/{stage}/manifest.json. The stage
is complete when every id in the manifest has its marker. Queue counters are never used for
this (SQS's are approximate). Re-running a stage skips tasks whose marker exists.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import time
from functools import partial

from cloudfiles import CloudFiles
from taskqueue import queueable
from taskqueue.lib import jsonify
from taskqueue.queueables import totask

from deepem3d.layers import cloudpath


class Stage:
    """The markers and manifest of one stage of tasks that write `layer_path`."""

    def __init__(self, layer_path: str, name: str):
        self.layer_path = cloudpath(layer_path).rstrip("/")
        self.name = name
        self.prefix = f"tasks/{name}"
        self._files = CloudFiles(self.layer_path)

    def __repr__(self) -> str:
        return f"Stage({self.layer_path!r}, {self.name!r})"

    def marker_key(self, task_id: str) -> str:
        return f"{self.prefix}/done/{task_id}.json"

    def is_done(self, task_id: str) -> bool:
        return self._files.exists(self.marker_key(task_id))

    def mark_done(self, task_id: str, record: dict) -> None:
        self._files.put_json(self.marker_key(task_id), record, compress=None)

    def done_ids(self) -> set[str]:
        done = f"{self.prefix}/done/"
        return {
            os.path.basename(key)[: -len(".json")]
            for key in self._files.list(prefix=done)
            if key.endswith(".json")
        }

    def write_manifest(self, task_ids: list[str], parameters: dict) -> None:
        manifest = {"stage": self.name, "tasks": sorted(task_ids), "parameters": parameters}
        self._files.put_json(f"{self.prefix}/manifest.json", manifest, compress=None)

    def manifest(self) -> dict | None:
        return self._files.get_json(f"{self.prefix}/manifest.json")

    def task_ids(self) -> list[str]:
        manifest = self.manifest()
        return [] if manifest is None else manifest["tasks"]

    def remaining(self) -> list[str]:
        """Task ids of the manifest that have no marker yet."""
        done = self.done_ids()
        return [t for t in self.task_ids() if t not in done]

    def is_complete(self) -> bool:
        return self.manifest() is not None and not self.remaining()


def payload_of(task) -> list:
    """A task (partial of a queueable function) as its plain-JSON payload."""
    return json.loads(jsonify(list(totask(task).payload())))


def task_id_of(payload: list) -> str:
    """A stable id from what the task does (its function and arguments), not from the queue."""
    key, args, kwargs = payload[0], payload[1], payload[2]
    canonical = json.dumps([key, args, kwargs], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


@queueable
def MarkedTask(layer_path: str, stage: str, task_id: str, task: list) -> None:  # noqa: N802
    """Run a third-party task (e.g. igneous's DownsampleTask), then write its marker.

    A duplicate or retried copy whose marker exists does nothing: its outputs are complete.
    """
    markers = Stage(layer_path, stage)
    if markers.is_done(task_id):
        return
    start = time.time()
    importlib.import_module(task[0][0])  # registers the task's function (igneous's, lazily)
    totask(task).execute()
    markers.mark_done(
        task_id,
        {
            "task": task[0],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": "cpu",
            "seconds": round(time.time() - start, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


def marked(layer_path: str, stage: str, task) -> tuple[str, object]:
    """Wrap a task so it writes its marker in `stage`; returns (task_id, wrapped task)."""
    payload = payload_of(task)
    task_id = task_id_of(payload)
    return task_id, partial(
        MarkedTask, layer_path=layer_path, stage=stage, task_id=task_id, task=payload
    )
