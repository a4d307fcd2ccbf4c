"""Precomputed layers through CloudVolume: open, create, check, and record provenance.

Everything that touches a layer's info file goes through here, so the conventions of
docs/design.md (dtypes, encodings, mesh/skeleton directories, provenance) live in one place.
"""

from __future__ import annotations

import contextlib
import getpass
import math
import os
import platform
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from cloudvolume.exceptions import InfoUnavailableError, ScaleUnavailableError
from python_jsonschema_objects.validators import ValidationError  # (cloudvolume's provenance)

import deepem3d
from deepem3d.errors import InputError
from deepem3d.storage import whole_files
from deepem3d.storage.cloud import check_bucket
from deepem3d.storage.paths import cloudpath
from deepem3d.units import format_triple

whole_files.install()  # every layer this process writes locally: chunks whole or absent

IMAGE_DTYPES = ("uint8", "uint16", "uint32", "float32")
SEGMENTATION_DTYPES = ("uint32", "uint64")
DEFAULT_ENCODING = {"image": "raw", "segmentation": "compressed_segmentation"}


def same_place(a: str, b: str) -> bool:
    """Whether two layer paths name one folder or one lies inside the other, however spelled
    (`precomputed://`, relative, symbolic links, a trailing slash): writing one with
    --overwrite would then delete the other."""
    def where(path: str) -> str:
        path = cloudpath(path)
        if path.startswith("file://"):
            path = "file://" + os.path.realpath(path[len("file://"):])
        return path.rstrip("/") + "/"

    a, b = where(a), where(b)
    return a.startswith(b) or b.startswith(a)


def check_output_apart(output_path: str, inputs: dict[str, str | None],
                       name: str = "OUTPUT") -> None:
    """InputError when the output (`name` in the message) is, holds or lies inside one of the
    command's input layers (`inputs`: what each is called in the message -> its path)."""
    for what, path in inputs.items():
        if path and same_place(output_path, path):
            raise InputError(f"{name} {output_path} is or overlaps the {what} layer {path}: "
                             "give a path of its own")


def put_info(path: str, info: dict) -> None:
    """PATH/info written as CloudVolume's commit_info writes it (keys sorted, indented): the
    same info is the same bytes whichever writer, CloudVolume's or deepem3d's, came last and
    in whatever order the keys were added (a run resumed after its runner was killed added a
    product's key to an info CloudVolume had sorted; the undisturbed run, to one it had not)."""
    from cloudvolume.lib import jsonify

    CloudFiles(cloudpath(path)).put(
        "info", jsonify(info, sort_keys=True, indent=2, separators=(",", ": ")),
        cache_control="no-cache", content_type="application/json", compress=None)


def info_exists(path: str) -> bool:
    check_bucket(path)
    return CloudFiles(cloudpath(path)).exists("info")


def open_layer(path: str, mip: int = 0, **kwargs: Any) -> CloudVolume:
    """Open an existing layer, or fail with a one-line InputError that says what to do."""
    path = cloudpath(path)
    check_bucket(path)
    try:
        vol = CloudVolume(path, mip=mip, progress=False, **kwargs)
    except InfoUnavailableError:
        raise InputError(
            f"no precomputed layer at {path} (no info file): check the path, or create the "
            "layer with `deepem3d ingest` or `deepem3d sample`"
        ) from None
    except ScaleUnavailableError as err:  # "MIP N not found. M available: ..."
        raise InputError(f"cannot open {path} at mip {mip}: {err}") from None
    except IsADirectoryError as err:  # (a file in the way, no permission: cli.main's words)
        raise InputError(f"cannot read {path}/info: {err}") from None
    except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError, OverflowError,
            ValidationError) as err:  # an info, or a provenance, CloudVolume cannot read
        info = _stored_info(path)
        problem = info_problem(info) if isinstance(info, dict) else "not a JSON object"
        damaged = None if problem else provenance_problem(path)  # read after the info
        if damaged:
            raise InputError(f"{path}/provenance is not a provenance file CloudVolume can "
                             f"read: {damaged}; correct it, or remove the file") from None
        raise InputError(f"{path}/info is not a precomputed info CloudVolume can read: "
                         f"{problem or f'{type(err).__name__}: {err}'}") from None
    problem = info_problem(vol.meta.info)
    if problem:
        raise InputError(f"{path}/info is not a valid precomputed info: {problem}")
    return vol


#: chunk encodings CloudVolume reads (cloudvolume.chunks.decode)
ENCODINGS = ("raw", "jpeg", "jxl", "png", "compressed_segmentation", "compresso", "crackle",
             "fpzip", "kempressed", "zfpc", "npz")
INT32_MAX = 2**31 - 1


def info_problem(info: dict) -> str | None:
    """What makes `info` no precomputed image or segmentation layer, in a few words (None
    when nothing does): the keys every reader of the layer relies on, checked up front so
    that a damaged info is one line, not a traceback later."""
    if info.get("type") not in ("image", "segmentation"):
        return f"type {info.get('type')!r} is not image or segmentation"
    data_type = info.get("data_type")
    try:
        numeric = isinstance(data_type, str) and np.dtype(data_type).kind in "uif"
    except (TypeError, ValueError):
        numeric = False
    if not numeric:
        return f"data_type {data_type!r} is not a numeric type"
    channels = info.get("num_channels")
    if not _whole(channels) or isinstance(channels, bool) or channels < 1:
        return f"num_channels {channels!r} is not a positive whole number"
    scales = info.get("scales")
    if not isinstance(scales, list) or not scales:
        return "scales is not a list of at least one scale"
    for i, scale in enumerate(scales):
        where = f"scales[{i}]"
        if not isinstance(scale, dict) or not isinstance(scale.get("key"), str) \
                or not scale["key"]:
            return f"{where} has no key"
        checks = (("resolution", lambda v: isinstance(v, int | float) and 0 < v < math.inf,
                   "positive numbers"),
                  ("size", lambda v: _whole(v) and 0 < v <= INT32_MAX,
                   f"whole numbers from 1 to {INT32_MAX}"),
                  ("voxel_offset", lambda v: _whole(v) and abs(v) <= INT32_MAX,
                   "whole numbers"))
        for name, good, what in checks:
            values = scale.get(name)
            if not isinstance(values, list) or len(values) != 3 or not all(
                    good(v) and not isinstance(v, bool) for v in values):
                return f"{where}.{name} {values!r} is not 3 {what}"
        chunks = scale.get("chunk_sizes")
        if not isinstance(chunks, list) or not chunks or not all(
                isinstance(c, list) and len(c) == 3 and all(
                    _whole(v) and not isinstance(v, bool) and 0 < v <= INT32_MAX
                    for v in c) for c in chunks):
            return f"{where}.chunk_sizes {chunks!r} is not a list of x,y,z chunk sizes"
        # CloudVolume's boxes are int32, and it rounds a box out to the chunk grid and a
        # chunk beyond: that must fit too
        grid_end = [int(o) + (-(-int(s) // int(c)) + 1) * int(c) for o, s, c in
                    zip(scale["voxel_offset"], scale["size"], chunks[0])]
        if max(grid_end) > INT32_MAX:
            return (f"{where}: its chunk grid and a chunk beyond end at "
                    f"{','.join(map(str, grid_end))}, past {INT32_MAX} (chunks larger than "
                    "the volume?)")
        if scale.get("encoding") not in ENCODINGS:
            return f"{where}.encoding {scale.get('encoding')!r} is none CloudVolume reads"
        if "sharding" in scale and not _sharding_spec(scale["sharding"]):
            return (f"{where}.sharding {scale['sharding']!r} is not a sharding specification "
                    "CloudVolume reads")
    return None


def _sharding_spec(spec: object) -> bool:
    """Whether `spec` is a neuroglancer_uint64_sharded_v1 specification CloudVolume's
    ShardingSpecification takes (it fails on a missing key with a TypeError, and loops a
    minishard_bits times)."""
    bits = ("preshift_bits", "minishard_bits", "shard_bits")
    encodings = ("minishard_index_encoding", "data_encoding")  # optional: raw
    return (isinstance(spec, dict)
            and spec.get("@type") == "neuroglancer_uint64_sharded_v1"
            and {"@type", *bits, "hash"} <= set(spec) <= {"@type", *bits, "hash", *encodings}
            and all(isinstance(spec[b], int | np.integer) and not isinstance(spec[b], bool)
                    and 0 <= spec[b] <= 64
                    for b in bits)
            and spec["minishard_bits"] + spec["shard_bits"] <= 64
            and spec["hash"] in ("identity", "murmurhash3_x86_128")
            and all(spec.get(e, "raw") in ("raw", "gzip") for e in encodings))


def _whole(value: object) -> bool:
    return isinstance(value, int) or isinstance(value, float) and value.is_integer()


def _stored_info(path: str) -> object:
    """The info as stored (JSON), or None when it cannot be read as JSON."""
    try:
        return CloudFiles(path).get_json("info")
    except Exception:  # noqa: BLE001 - only for a message: the caller refuses the layer anyway
        return None


#: what each key of a layer's provenance file holds (CloudVolume's schema, cloudvolume.provenance)
PROVENANCE_KEYS = {"description": "a string", "sources": "a list of distinct strings",
                   "processing": "a list of objects", "owners": "a list of distinct strings"}


def provenance_problem(path: str) -> str | None:
    """What makes the layer's provenance file one CloudVolume refuses to open the layer with,
    in a few words; None when it has none, or CloudVolume reads it."""
    import json

    import json5
    from cloudvolume.provenance import DataLayerProvenance

    try:
        raw = CloudFiles(path).get("provenance")
        if not raw:
            return None
        text = raw.decode("utf-8")
    except Exception:  # noqa: BLE001 - only for a message: the caller refuses the layer anyway
        return "it cannot be read as text"
    try:
        provenance = json.loads(text)
    except ValueError:
        try:
            provenance = json5.loads(text)  # as CloudVolume falls back to
        except ValueError:
            return "it is not JSON"
    if not isinstance(provenance, dict):
        return "it is not a JSON object"
    for key, value in provenance.items():
        try:
            DataLayerProvenance(**{key: value}).validate()
        except Exception:  # noqa: BLE001 - the schema's errors, for a message
            what = PROVENANCE_KEYS.get(key, "what the provenance schema allows")
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return f"its {key!r} is {shown}, not {what}"
    return None


#: gzip level of the chunks `write_block` writes: zlib's default. CloudVolume's own upload
#: always uses 9 (it drops `compress_level` before compressing), four times as slow as 6 for
#: chunks 1% smaller (measured on compressed_segmentation chunks of ISBI 2012).
GZIP_LEVEL = 6


def read_block(vol: CloudVolume, lo: Sequence[int], hi: Sequence[int], fix: str,
               what: str = "") -> np.ndarray:
    """`vol[lo:hi]` (absolute voxels, x,y,z) as an x,y,z,c array. A missing chunk (a layer not
    finished, read without fill_missing) is the same on every retry: bad input, the one-line
    InputError that names the box and says `fix`, not CloudVolume's traceback."""
    from cloudvolume.exceptions import EmptyVolumeException

    try:
        return np.asarray(vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    except EmptyVolumeException:
        box = ",".join(str(int(v)) for v in (*lo, *hi))
        raise InputError(f"{what + ' ' if what else ''}{vol.cloudpath} has missing chunks in "
                         f"{box}: {fix}") from None
    except Exception as err:
        if not damaged_chunk(err):
            raise
        box = ",".join(str(int(v)) for v in (*lo, *hi))
        raise InputError(f"{what + ' ' if what else ''}{vol.cloudpath} has a chunk in {box} "
                         f"that cannot be decoded as its info says "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                         "): write the layer again") from None


def damaged_chunk(err: Exception) -> bool:
    """Whether CloudVolume's error reading a box is a chunk file its info does not describe
    (not gzip, truncated, another dtype or shape, a folder), not a bug: the same on every
    retry, bad input."""
    from cloudfiles.exceptions import DecompressionError
    from cloudvolume.exceptions import (
        AlignmentError,
        DecodingError,
        EmptyRequestException,
        OutOfBoundsError,
        SubvoxelVolumeError,
    )

    # a box outside, or empty: the caller's bug (CloudVolume's ValueErrors about the request)
    if isinstance(err, OutOfBoundsError | AlignmentError | SubvoxelVolumeError
                  | EmptyRequestException):
        return False
    return isinstance(err, DecompressionError | DecodingError | IsADirectoryError | ValueError)


def write_block(vol: CloudVolume, lo: Sequence[int], array: np.ndarray) -> None:
    """`vol[lo:lo + shape] = array` for a block of whole chunks (clipped at the layer's end),
    gzipped at `GZIP_LEVEL`: the chunk files CloudVolume writes, byte for byte, encoded by
    CloudVolume's codecs, or for compressed_segmentation by `deepem3d.storage.cseg` (the same bytes,
    twice as fast). Anything else (sharded layers, unaligned blocks, a local cache) goes
    through CloudVolume."""
    from cloudvolume import chunks
    from cloudvolume.datasource.precomputed.common import content_type, should_compress
    from cloudvolume.lib import Bbox

    meta, mip = vol.meta, vol.mip
    data = array if array.ndim == 4 else array[..., np.newaxis]
    block = Bbox(lo, [int(a) + int(s) for a, s in zip(lo, data.shape[:3])])
    bounds = meta.bounds(mip)
    chunk = np.asarray(meta.chunk_size(mip))
    offset = np.asarray(meta.voxel_offset(mip))
    start = np.asarray(block.minpt) - offset
    aligned = not np.any(start % chunk) and all(
        (int(e) - o) % c == 0 or int(e) == int(b)
        for e, o, c, b in zip(block.maxpt, offset, chunk, bounds.maxpt)
    )
    compress = should_compress(meta.encoding(mip), vol.compress, vol.cache)
    if (meta.sharding(mip) is not None or not aligned or compress not in ("gzip", None)
            or vol.cache.enabled):
        vol[block.to_slices()] = data
        return
    from deepem3d.storage import cseg  # numba: only writers of segmentation chunks pay for it

    encoding, cseg_block = meta.encoding(mip), meta.compressed_segmentation_block_size(mip)
    ours = encoding == "compressed_segmentation" and np.prod(cseg_block) <= cseg.MAX_BLOCK_VOXELS
    files = CloudFiles(meta.cloudpath)
    for x in range(block.minpt[0], block.maxpt[0], chunk[0]):
        for y in range(block.minpt[1], block.maxpt[1], chunk[1]):
            for z in range(block.minpt[2], block.maxpt[2], chunk[2]):
                part = Bbox((x, y, z), np.minimum((x, y, z) + chunk, block.maxpt))
                cut = part - block.minpt  # part lies inside block
                if ours:
                    encoded = cseg.encode(data[cut.to_slices()], cseg_block)
                else:
                    encoded = chunks.encode(
                        np.asfortranarray(data[cut.to_slices()]), encoding, cseg_block,
                        compression_params=meta.compression_params(mip),
                    )
                name = "_".join(f"{a}-{b}" for a, b in zip(part.minpt, part.maxpt))
                files.put(meta.join(meta.key(mip), name), encoded,
                          content_type=content_type(encoding), compress=compress,
                          compression_level=GZIP_LEVEL if compress else None)


def layer_holds_data(path: str) -> bool:
    """True when the layer has an info file and at least one chunk file at any scale."""
    path = cloudpath(path)
    check_bucket(path)
    cf = CloudFiles(path)
    info = cf.get_json("info")
    if info is None:
        return False
    for scale in info.get("scales", []):
        prefix = scale["key"].rstrip("/") + "/"
        if next(iter(cf.list(prefix=prefix)), None) is not None:
            return True
    return False


def layer_geometry(path: str) -> dict | None:
    """What a stage compares before it resumes a layer or refuses it: the info's type, dtype,
    channels and first scale (resolution, voxel offset, size, chunk size, sharding); None
    where there is no info or it has no scale."""
    info = CloudFiles(cloudpath(path)).get_json("info")
    if not isinstance(info, dict) or not info.get("scales"):
        return None
    scale = info["scales"][0]
    return {
        "type": info.get("type"),
        "data_type": info.get("data_type"),
        "num_channels": info.get("num_channels"),
        "resolution": [float(r) for r in scale.get("resolution", [])],
        "voxel_offset": [int(v) for v in scale.get("voxel_offset", [])],
        "size": [int(v) for v in scale.get("size", [])],
        "chunk_size": [int(v) for v in (scale.get("chunk_sizes") or [[]])[0]],
        "sharding": scale.get("sharding"),
    }


def check_empty(path: str, overwrite: bool) -> None:
    """InputError for a layer that already holds data, unless `overwrite` (which lets the
    caller replace it)."""
    if not overwrite and layer_holds_data(path):
        raise InputError(f"{path} already holds data: pass --overwrite to replace it")


def delete_layer_data(path: str) -> None:
    """Remove what a layer holds (chunks of every scale, meshes, skeletons, task markers).

    Called only by an explicit overwrite, so stale chunks or completion markers of the old
    layer can never be mistaken for the new one's. The markers go first: a deletion stopped
    part-way (Ctrl-C on a large layer) left them vouching for chunks already deleted, and a
    re-run without --overwrite skipped every task over the holes.
    """
    path = cloudpath(path)
    cf = CloudFiles(path)
    info = cf.get_json("info") or {}
    prefixes = ["tasks/"] + [scale["key"].rstrip("/") + "/" for scale in info.get("scales", [])]
    prefixes += [f"{info.get(k) or k}/" for k in ("mesh", "skeletons")]
    delete_prefixes(path, prefixes)


def remove_levels(path: str, mip: int) -> list[str]:
    """Remove the layer's levels above `mip`: their chunks, then their scales in the info (a
    stop in between leaves levels the info still lists, which a run replacing them removes
    again, not chunks no info lists). Returns the removed levels' keys."""
    path = cloudpath(path)
    files = CloudFiles(path)
    info = files.get_json("info")
    keys = [scale["key"] for scale in info["scales"][mip + 1:]]
    delete_prefixes(path, [key.rstrip("/") + "/" for key in keys])
    put_info(path, {**info, "scales": info["scales"][:mip + 1]})
    return keys


def delete_prefixes(path: str, prefixes: Iterable[str]) -> None:
    """Delete every file under each prefix, and a local layer's folders a prefix ending in /
    names once they are empty (an old level the new info lacks is no folder left behind)."""
    path, prefixes = cloudpath(path), list(prefixes)
    files = CloudFiles(path)
    keys = [key for prefix in prefixes for key in files.list(prefix=prefix)]
    if keys:  # deleting nothing still starts a thread pool
        files.delete(keys)
    for prefix in prefixes:
        if prefix.endswith("/"):
            _remove_empty_folders(path, prefix)


def remove_layer(path: str) -> None:
    """Remove a layer whole: what it holds, then its info and provenance (and a local layer's
    folders, where that leaves them empty)."""
    delete_layer_data(path)
    path = cloudpath(path)
    CloudFiles(path).delete(["info", "provenance"])
    _remove_empty_folders(path)


def _remove_empty_folders(path: str, under: str = "") -> None:
    """A local layer's folders under `under` (all: "") that hold nothing, deepest first; a
    bucket has no folders to leave behind."""
    if path.startswith("file://"):
        folder = os.path.join(path[len("file://"):], under)
        for where, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):
            if not os.listdir(where):
                os.rmdir(where)


def create_layer(
    path: str,
    *,
    layer_type: str,
    dtype: str,
    resolution: Sequence[float],
    size: Sequence[int],
    voxel_offset: Sequence[int] = (0, 0, 0),
    chunk_size: Sequence[int] = (128, 128, 16),
    encoding: str | None = None,
    num_channels: int = 1,
    overwrite: bool = False,
    provenance: dict | None = None,
    sharding: dict | None = None,
) -> CloudVolume:
    """Write the info of a new layer and return it opened at mip 0; with `sharding` (a spec,
    deepem3d.storage.sharding), its scale is sharded.

    Refuses (InputError) to touch a layer that already holds data unless `overwrite`.
    The info names no `mesh` or `skeletons` directory: the stages that write those name them
    once they are written (Neuroglancer asks for what the info names, and refuses a layer
    whose skeleton source has no info).
    """
    path = cloudpath(path)
    check_bucket(path)
    if layer_type not in DEFAULT_ENCODING:
        raise InputError(f"layer type must be image or segmentation, not {layer_type!r}")
    allowed = IMAGE_DTYPES if layer_type == "image" else SEGMENTATION_DTYPES
    if dtype not in allowed:
        raise InputError(
            f"a {layer_type} layer cannot hold {dtype}: use one of {', '.join(allowed)}"
        )
    encoding = encoding or DEFAULT_ENCODING[layer_type]
    if encoding == "compressed_segmentation" and layer_type != "segmentation":
        raise InputError("compressed_segmentation encoding is for segmentation layers only")
    check_empty(path, overwrite)
    # the new info is checked whole before an old layer's data is deleted
    vol, problem = None, None
    try:
        info = CloudVolume.create_new_info(
            num_channels=num_channels,
            layer_type=layer_type,
            data_type=dtype,
            encoding=encoding,
            resolution=[_number(r) for r in resolution],
            voxel_offset=[int(v) for v in voxel_offset],
            volume_size=[int(s) for s in size],
            chunk_size=[int(c) for c in chunk_size],
        )
        if sharding is not None:
            info["scales"][0]["sharding"] = dict(sharding)
        problem = info_problem(info)
        vol = None if problem else CloudVolume(path, info=info, progress=False)
    except (ValueError, OverflowError, ZeroDivisionError) as err:
        problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if vol is None:
        raise InputError(f"{path}: cannot create a layer of resolution "
                         f"{format_triple(resolution)}, size {','.join(map(str, size))}, "
                         f"chunks {','.join(map(str, chunk_size))}: {problem}")
    if overwrite and layer_holds_data(path):
        delete_layer_data(path)
    try:
        vol.commit_info()
    except FileNotFoundError as err:  # a folder that cannot be made (a file in the way, no
        # permission: cli.main's words)
        raise InputError(f"cannot write the layer at {path}: {err}") from None
    if provenance is not None:
        record_provenance(vol, provenance, replace=overwrite)
    return vol


def record_provenance(vol: CloudVolume, method: dict, replace: bool = False) -> None:
    """Append what wrote the layer, and with which parameters, to its provenance file."""
    if replace:
        vol.provenance.processing = []
    vol.provenance.processing.append(
        {
            "method": method,
            "by": f"deepem3d {deepem3d.__version__}",
            "user": _user(),
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
    )
    if not vol.provenance.description:
        vol.provenance.description = "written by deepem3d"
    vol.commit_provenance()


#: what `check_layer_role` checks a layer for
LAYER_ROLES = ("map", "labels")


def layer_processing(path: str) -> list:
    """The `processing` list of the layer's provenance file, oldest first; [] where there is no
    provenance or it is not a JSON object (as good as none)."""
    try:
        provenance = CloudFiles(cloudpath(path)).get_json("provenance")
    except ValueError:  # not JSON
        return []
    processing = provenance.get("processing") if isinstance(provenance, dict) else None
    return [entry for entry in processing if isinstance(entry, dict)] \
        if isinstance(processing, list) else []


def layer_writer(processing: Sequence) -> tuple[str, str] | None:
    """(what the layer holds, "image", "map" or "labels"; the command that wrote it) by the
    last entry of one of deepem3d's own layer writers in a provenance's `processing` list, or
    None (written by other tools, or no provenance). Other entries, such as igneous's
    downsampling, are skipped: they do not change what a layer holds."""
    for entry in reversed(list(processing or [])):
        method = entry.get("method") if isinstance(entry, dict) else None
        if not isinstance(method, dict) or not str(entry.get("by", "")).startswith("deepem3d"):
            continue
        task = method.get("task")
        if task == "sample":  # deepem3d/sample.py: the image's "array" is "raw"
            return ("image" if method.get("array") == "raw" else "labels"), "`deepem3d sample`"
        if task == "ingest" and method.get("layer_type") in ("image", "segmentation"):
            role = "image" if method["layer_type"] == "image" else "labels"
            return role, "`deepem3d ingest`"
        if task == "InferenceTask":
            return "map", "`deepem3d infer`"
        if task == "deepem3d segment (smooth)":
            return "map", "`deepem3d segment --sigma`"
        if task == "deepem3d segment":
            return "labels", "`deepem3d segment`"
    return None


def check_layer_role(
    path: str, role: str, vol: CloudVolume | None = None, name: str = ""
) -> str | None:
    """Refuse (one-line InputError) a layer that is positively not a `role` layer; else None,
    or a one-line warning when nothing says what the layer holds.

    role "map" (what `deepem3d segment` reads): refused when its info type is segmentation,
    when deepem3d's provenance says it wrote the sample's EM image or labels, or when it has
    other than 1 (boundary) or 3 (affinity) channels; a layer with no provenance (a map made by
    other tools), or one `deepem3d ingest` wrote as an image (how such maps come in), gets a
    warning.
    role "labels" (`deepem3d evaluate`'s SEG and GT): refused when deepem3d's provenance says
    it wrote an image or a map, or when it is an image layer of floats; an image layer with
    no provenance gets a warning. `name` ("SEG", "GT") prefixes the layer in messages.
    """
    if role not in LAYER_ROLES:
        raise ValueError(f"role must be one of {LAYER_ROLES}, not {role!r}")
    if vol is None:
        vol = open_layer(path)
    where = f"{name} {cloudpath(path)}" if name else cloudpath(path)
    layer_type = str(vol.layer_type)
    processing = layer_processing(path)
    writer = layer_writer(processing)
    held, command = writer if writer else (None, "")
    if role == "map":
        if layer_type == "segmentation" or held == "labels":
            raise InputError(
                f"{where} is a segmentation layer, not a boundary or affinity map: pass the map "
                "`deepem3d infer IMAGE MAP` wrote"
            )
        if held == "image" and command == "`deepem3d ingest`":
            # ingest is also how a map made by another tool comes in: not positive evidence
            return (f"{where} was ingested as an image: segmenting it as a map (an EM image "
                    "segments into noise)")
        if held == "image":
            raise InputError(
                f"{where} is an EM image (written by {command}), not a boundary or affinity "
                "map: run `deepem3d infer IMAGE MAP` on it and segment MAP"
            )
        channels = int(vol.num_channels)
        if channels not in (1, 3):
            raise InputError(f"{where} has {channels} channels: a boundary map has 1, an "
                             "affinity map 3 (x, y, z)")
        if not processing:
            return (f"{where} has no provenance, so nothing says it is a map: segmenting it "
                    "as one (an EM image segments into noise)")
        return None
    if held in ("image", "map"):
        what = "an EM image" if held == "image" else "a boundary or affinity map"
        fix = ("re-ingest labels with --layer-type segmentation" if command ==
               "`deepem3d ingest`" else "pass a segmentation layer; segment a map first with "
               "`deepem3d segment MAP OUTPUT`")
        raise InputError(f"{where} is {what} (written by {command}), not labels: {fix}")
    dtype = np.dtype(vol.dtype)
    if layer_type == "image" and np.issubdtype(dtype, np.floating):
        raise InputError(
            f"{where} is an image layer of {dtype.name}, not labels: pass a segmentation layer "
            "(a boundary or affinity map must be segmented first)"
        )
    if layer_type == "image" and not processing:
        return (f"{where} is an image layer without provenance, so nothing says it holds "
                "labels: scoring its values as ids")
    return None


def _number(value: float) -> int | float:
    """4.0 -> 4 so scale keys read 4_4_50, as other tools write them."""
    return int(value) if float(value).is_integer() else float(value)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@contextlib.contextmanager
def info_naming(layer_path: str, names: dict[str, str]) -> Iterator[None]:
    """CloudVolume reads `layer_path`'s info with `names` added (where the stored info lacks
    them), for igneous's task creation and tasks; the stored info is left as it is."""
    from cloudvolume.datasource.precomputed.metadata import PrecomputedMetadata

    target = cloudpath(layer_path).rstrip("/")
    original = PrecomputedMetadata.fetch_info

    def fetch_info(self: PrecomputedMetadata) -> dict:
        info = original(self)
        if cloudpath(self.cloudpath).rstrip("/") == target:
            for key, directory in names.items():
                info.setdefault(key, directory)
        return info

    PrecomputedMetadata.fetch_info = fetch_info
    try:
        yield
    finally:
        PrecomputedMetadata.fetch_info = original
