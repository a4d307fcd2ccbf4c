"""Checkpoints: the weights and everything needed to rebuild and run the model.

A checkpoint is a torch file holding only tensors, numbers, strings, lists and dicts, so it is
loaded with `torch.load(weights_only=True)` and never unpickles arbitrary objects: checkpoints
may come from a cloud path. Its `meta` (a JSON string) records the model config (preset, head,
input sections), the input normalisation, the context the model needs, the voxel resolution
it was trained at, and the training provenance.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
import zipfile
from importlib import resources
from typing import TYPE_CHECKING

import torch

import deepem3d
from deepem3d.errors import InputError
from deepem3d.models.shipped import DEFAULT_MODEL, ENSEMBLES, PRETRAINED, expand_models
from deepem3d.storage.paths import write_whole

if TYPE_CHECKING:
    from deepem3d.models.network import DeepEM3DNet

FORMAT = "deepem3d-checkpoint"
VERSION = 1
__all__ = ["DEFAULT_MODEL", "ENSEMBLES", "PRETRAINED", "expand_models"]  # re-exported


def save_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, meta: dict, *,
    optimizer: torch.optim.Optimizer | None = None, iteration: int = 0,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write a training checkpoint (`write_atomically`: a failed save leaves the old file)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "deepem3d": deepem3d.__version__,
        "meta": json.dumps(meta, sort_keys=True),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "iteration": int(iteration),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if scaler is not None:  # mixed precision's loss scale: a resume continues from it
        payload["scaler"] = scaler.state_dict()
    write_atomically(payload, path)


def write_atomically(payload: dict, path: str | os.PathLike) -> None:
    """torch.save, whole (`write_whole`): an interrupted or failed write leaves the old file.
    A full disk (torch's writer raises a RuntimeError, Python's an OSError) is a one-line
    InputError, as `deepem3d export` reports it."""
    write_whole(path, lambda partial: torch.save(payload, partial), also=(RuntimeError,),
                shared=True)


def export_checkpoint(src: str, dest: str | os.PathLike, *, half: bool = True) -> None:
    """A shippable copy of a training checkpoint: weights (float16 by default, loaded back
    into float32) and meta, without the optimizer state."""
    payload = load_checkpoint(src)
    state = {
        k: (v.half() if half and v.is_floating_point() else v)
        for k, v in payload["state_dict"].items()
    }
    # a checkpoint saved by other code may lack the iteration (a bare KeyError before)
    out = {key: payload[key] for key in ("format", "version", "deepem3d", "iteration")
           if key in payload}
    meta = dict(payload["meta"], exported_from={"sha256": payload["sha256"], "half": half})
    out.update(meta=json.dumps(meta, sort_keys=True), state_dict=state)
    write_atomically(out, dest)  # a failed export leaves no truncated model


def resolve_model(name_or_path: str | None) -> str:
    """A shipped model's name (e.g. isbi2012-small) or a path/URL -> a loadable location."""
    name = name_or_path or DEFAULT_MODEL
    if name in ENSEMBLES:
        raise InputError(f"{name} is an ensemble of {', '.join(ENSEMBLES[name])}: "
                         "give one of them here (infer --model and a pipeline's inference "
                         "model take the ensemble)")
    if name in PRETRAINED:
        ref = resources.files("deepem3d") / "models" / "pretrained" / PRETRAINED[name]
        return str(ref)
    return name


def absolute_location(name_or_path: str) -> str:
    """A checkpoint as a run records it, one spelling per file (a resume compares them): a
    shipped name or cloud path as given, a local path (plain or file://) absolute and plain."""
    if name_or_path in PRETRAINED or name_or_path in ENSEMBLES or (
            "://" in name_or_path and not name_or_path.startswith("file://")):
        return name_or_path
    return os.path.abspath(os.path.expanduser(name_or_path.removeprefix("file://")))


def read_bytes(location: str) -> bytes:
    if "://" in location and not location.startswith("file://"):
        from cloudfiles import CloudFile

        from deepem3d.storage.cloud import check_bucket

        check_bucket(location)

        data = CloudFile(location).get()
        if data is None:
            raise InputError(f"no checkpoint at {location}")
        return data
    # `~` too: a pipeline file's model (YAML expands none) passed the checks that expand it
    path = os.path.expanduser(location.removeprefix("file://"))
    if not os.path.isfile(path):
        known = ", ".join(sorted({*PRETRAINED, *ENSEMBLES}))
        raise InputError(f"no checkpoint at {path}: give a file, a cloud path or one of {known}")
    with open(path, "rb") as f:
        return f.read()


def _unreadable(data: bytes, err: Exception) -> str:
    """Why torch.load refused the bytes, in the user's terms (torch's own message advises
    loading with weights_only=False, which a deepem3d checkpoint never needs)."""
    if not data.startswith((b"PK\x03\x04", b"\x80")):  # a zip archive, or torch's legacy
        return "not a file torch.save wrote"               # format (a pickle)
    text = str(err)
    if "Weights only load failed" in text:
        return "it holds objects besides tensors and plain values"
    return text.splitlines()[0][:200] if text else type(err).__name__


def _damage(data: bytes) -> str | None:
    """Why a torch zip archive is not whole, or None: torch reads a truncated one with an
    internal error and a changed byte in a tensor's record not at all (it checks no
    checksum), so such a checkpoint loaded other weights without a word."""
    if not data.startswith(b"PK\x03\x04"):
        return None  # torch's legacy format (a pickle) records no checksums
    try:
        bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except Exception:  # BadZipFile, or whatever a cut or changed directory makes zipfile raise
        return "truncated or damaged: not a whole zip archive (an interrupted copy?)"
    if bad is not None:
        return f"damaged: its record {bad} fails its checksum"
    return None


def load_checkpoint(name_or_path: str | None) -> dict:
    """The checkpoint's contents, `meta` parsed, plus its `sha256` and `location`."""
    location = resolve_model(name_or_path)
    data = read_bytes(location)
    damage = _damage(data)
    if damage:
        raise InputError(f"{location} is not a readable deepem3d checkpoint ({damage})")
    try:
        with warnings.catch_warnings():  # torch's on a foreign pickle: the error says it all
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holding disallowed objects
        raise InputError(f"{location} is not a readable deepem3d checkpoint "
                         f"({_unreadable(data, err)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{location} is not a deepem3d checkpoint")
    if payload.get("version") != VERSION:
        raise InputError(
            f"{location} is checkpoint format {payload.get('version')}; this deepem3d "
            f"({deepem3d.__version__}) reads format {VERSION}: retrain or use a matching version"
        )
    try:
        payload["meta"] = json.loads(payload["meta"])
    except (KeyError, TypeError, ValueError):
        payload["meta"] = None
    if not isinstance(payload["meta"], dict) or not isinstance(
            payload["meta"].get("model"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise InputError(f"{location} is not a deepem3d checkpoint (it records no network "
                         "settings or weights)")
    resolution = payload["meta"].get("resolution")
    if resolution is not None and not _voxel_size(resolution):
        raise InputError(f"{location} records the training resolution {resolution!r}: "
                         "expected three positive numbers (nm, x,y,z), or none")
    payload["sha256"] = hashlib.sha256(data).hexdigest()
    payload["location"] = location
    return payload


def _voxel_size(value: object) -> bool:
    """Three finite positive numbers (not true or false)."""
    return (isinstance(value, list | tuple) and len(value) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool)
                    and math.isfinite(v) and v > 0 for v in value))


def load_model(name_or_path: str | None = None, device: str = "cpu"
               ) -> tuple[DeepEM3DNet, dict]:
    """(model in eval mode, meta) from a checkpoint."""
    from deepem3d.models import build_model

    payload = load_checkpoint(name_or_path)
    meta = payload["meta"]
    try:
        model = build_model(**meta["model"])
    except (TypeError, ValueError) as err:
        raise InputError(f"{payload['location']}: its network settings {meta['model']} are "
                         f"not one deepem3d builds ({err})") from None
    load_weights(model, payload)
    model.to(device).eval()
    return model, meta


def load_weights(model: torch.nn.Module, payload: dict) -> None:
    """The checkpoint's weights into `model`; a one-line InputError where they do not fit."""
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise InputError(
            f"{payload['location']}: weights do not fit the {payload['meta']['model']} "
            f"network ({str(err).splitlines()[0]})"
        ) from None
