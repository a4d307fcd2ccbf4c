"""Models as inference tasks name them, and the devices they run on.

A task names a checkpoint by location (a shipped model's name, an absolute path or a URL) and
the sha256 of its bytes when the tasks were made: a worker loads it once per process
(`cached_model`, `cached_predictor`) and refuses other bytes. A run is planned for a device
class and torch version (`device_class`); a worker of another refuses its tasks
(`check_worker`), since its bytes would differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from deepem3d.errors import InputError
from deepem3d.models.sliding import ModelPredictor

if TYPE_CHECKING:
    import torch

    from deepem3d.models.network import DeepEM3DNet

# torch and deepem3d.models load inside the functions that need them: every worker imports
# this module (through the inference stage, which registers InferenceTask), most never predict.


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint as tasks name it: a shipped model's name, an absolute path or a URL, and
    the sha256 of its bytes when the tasks were made (a task refuses other weights)."""

    location: str
    sha256: str
    meta: dict = field(compare=False, hash=False, repr=False, default_factory=dict)

    def to_json(self) -> list:
        return [self.location, self.sha256]


def model_location(name: str) -> str:
    """What a task should load: shipped names stay names (each worker has its own copy),
    local paths become absolute, URLs stay as given."""
    from deepem3d.models.shipped import PRETRAINED

    if name in PRETRAINED or "://" in name:
        return name
    return os.path.abspath(os.path.expanduser(name))


def _build(payload: dict) -> DeepEM3DNet:
    from deepem3d.models import build_model

    meta = payload["meta"]
    try:
        model = build_model(**meta["model"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{payload['location']}: weights do not fit the network its meta "
                         f"describes ({reason[:200]}): the checkpoint is corrupted") from None
    return model.eval()


def inspect_model(name: str) -> tuple[ModelRef, DeepEM3DNet]:
    """Load and check a checkpoint (InputError when missing, corrupted or incompatible)."""
    from deepem3d.models.checkpoint import load_checkpoint

    payload = load_checkpoint(name)
    model = _build(payload)
    location = model_location(name)
    return ModelRef(location, payload["sha256"], payload["meta"]), model


@lru_cache(maxsize=4)
def cached_model(location: str, sha256: str, device: str) -> torch.nn.Module:
    """The model at `location` on `device`, loaded once per worker process; the bytes must
    still hash to `sha256` (weights changed after the tasks were made are refused)."""
    from deepem3d.models.checkpoint import load_checkpoint

    payload = load_checkpoint(location)
    if payload["sha256"] != sha256:
        raise InputError(f"checkpoint {location} changed since the tasks were created (sha256 "
                         f"{payload['sha256'][:12]}, expected {sha256[:12]}): create them again")
    return _build(payload).to(device)


@lru_cache(maxsize=4)
def cached_predictor(location: str, sha256: str, device: str, amp: bool) -> ModelPredictor:
    """The model's predictor (on the CPU, its inference form), built once per worker."""
    import torch

    return ModelPredictor(cached_model(location, sha256, device), torch.device(device), amp=amp)


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but this worker has no CUDA device")
    return torch.device(device)


def device_label(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def device_class(device: str) -> str:
    """The class of hardware a device setting runs on: what the run key holds. `auto` is
    resolved where the tasks are planned (cuda when that machine has it): plan with
    `device: cuda` for GPU workers from a machine without one."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_release() -> str:
    """This torch's release, without its build tag ("2.13.0" of "2.13.0+cu128"): what a run
    records and its workers must match. The tag names the build (CPU, a CUDA version), which
    the device class already separates, and a run planned on a laptop's CPU build for GPU
    workers (`device: cuda`) must be taken by their CUDA build of the same release."""
    import torch

    return release_of(str(torch.__version__))


def release_of(version: str) -> str:
    """A torch version without its build tag: "2.13.0" of "2.13.0+cu128"."""
    return version.split("+", 1)[0]


def check_worker(device: str, torch_version: str) -> None:
    """InputError unless this worker is of the class and torch release the run was made for."""
    import torch

    here = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and here != "cuda" or torch_release() != release_of(torch_version):
        raise InputError(f"this worker ({here}, torch {torch.__version__}) is not of the class "
                         f"the inference run was made for ({device}, torch {torch_version}): "
                         "route the inference stage to such workers, or plan the run again "
                         "for these")
