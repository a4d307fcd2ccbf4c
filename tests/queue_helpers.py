"""A task for worker tests: stalls on its first attempt so a test can kill or stop the worker
in the middle of it, then runs a real (marked) deepem3d task. Imported by workers through
`deepem3d worker --import tests.queue_helpers`.
"""

from __future__ import annotations

import os
import time

from taskqueue import queueable
from taskqueue.queueables import totask

from deepem3d.errors import ServiceUnavailable
from deepem3d.stages.frame import stage_task


@queueable
def StallOnce(flag_path: str, seconds: float, task: list) -> None:  # noqa: N802
    """First attempt: write flag_path, then sleep `seconds` (the test interrupts here)."""
    if not os.path.exists(flag_path):
        with open(flag_path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(seconds)
    totask(task).execute()


@queueable
def AlwaysFails(message: str) -> None:  # noqa: N802
    """A task with a bug that no retry fixes."""
    raise RuntimeError(message)


@queueable
def Exits(path: str) -> None:  # noqa: N802
    """A task that calls sys.exit(0) (a library's, say) after writing `path`."""
    with open(path, "w") as f:
        f.write("started")
    raise SystemExit(0)


@queueable
def SleepThenTouch(flag_path: str, seconds: float, path: str) -> None:  # noqa: N802
    """Writes flag_path, sleeps `seconds`, writes `path`."""
    with open(flag_path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    with open(path, "w") as f:
        f.write("done")


@queueable
def Touch(path: str) -> None:  # noqa: N802
    """A task that works: writes `path`."""
    with open(path, "w") as f:
        f.write("done")


@stage_task
def FailsInFrame(message: str) -> None:  # noqa: N802
    """A frame task with a bug that no retry fixes."""
    raise RuntimeError(message)


@stage_task
def UnavailableOnceInFrame(flag_path: str) -> None:  # noqa: N802
    """A frame task whose first attempt meets a service that does not answer."""
    if not os.path.exists(flag_path):
        with open(flag_path, "w") as f:
            f.write(str(os.getpid()))
        raise ServiceUnavailable("s3://bucket: the S3 endpoint does not answer")


@stage_task
def SleepInFrame(flag_path: str, seconds: float) -> None:  # noqa: N802
    """A frame task that sleeps `seconds` on its first attempt, after writing flag_path."""
    if not os.path.exists(flag_path):
        with open(flag_path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(seconds)
