"""zarr, v2 and v3, and OME-Zarr: an array, the one array of a group, or an OME-Zarr image's
first (full-resolution) level or the level its path names, its size-1 time and channel axes
dropped, its scale and translation as the voxel size and position. A blosc chunk on this disk
is checked against its stream's header before it is read."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import numpy as np

from deepem3d.errors import InputError
from deepem3d.sources.base import (
    AXES,
    BLOSC_HEADER,
    ZARR_MARKERS,
    ArraySource,
    check_blosc_size,
    shape_text,
    whole,
)


def open_zarr(path: str, axes: str | None) -> ArraySource:
    try:
        import zarr
        import zarr.errors
    except Exception as err:  # noqa: BLE001 - an environment fault, named in one line
        # numcodecs 0.16 (zarr's codecs) fails to import beside zfpy 1.0.1.post0, which
        # pyproject.toml excludes; another environment may still hold it
        raise InputError(f"reading {path} needs zarr, which fails to import here ({err!r}); "
                         "if zfpy 1.0.1.post0 is installed, pip install zfpy==1.0.1") from None
    try:
        node = zarr.open(store=path, mode="r")
    except (zarr.errors.BaseZarrError, OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot read {path} as zarr: {err}") from None
    scale, position, fixed, file_axes, no_unit = None, None, (), None, False
    multiscale = _ome_multiscale(node) if isinstance(node, zarr.Group) else None
    if isinstance(node, zarr.Group) and multiscale is None:
        try:
            members = list(node.members(max_depth=None))
        except (zarr.errors.BaseZarrError, OSError, ValueError, KeyError) as err:
            raise InputError(f"cannot read {path} as zarr: {err}") from None
        images = [(name, g, m) for name, g in members if isinstance(g, zarr.Group)
                  and (m := _ome_multiscale(g)) is not None]
        if len(images) > 1:  # bioformats2raw writes a series per group: 0/, 1/, ...
            raise InputError(f"name the OME-Zarr image to read: {path}/IMAGE (its images: "
                             f"{', '.join(name for name, _, _ in images[:6])}"
                             f"{', ...' if len(images) > 6 else ''})")
        if images:
            name, node, multiscale = images[0]
            path = os.path.join(path, name)
        else:
            arrays = [(name, a) for name, a in members if isinstance(a, zarr.Array)]
            if len(arrays) != 1:
                listed = ", ".join(f"{name} {shape_text(a.shape)} {a.dtype}"
                                   for name, a in arrays[:6]) or "none"
                raise InputError(f"name the array to read: {path}/ARRAY (its arrays: "
                                 f"{listed}{', ...' if len(arrays) > 6 else ''})")
            name, node = arrays[0]
            path = os.path.join(path, name)
    said = "OME-Zarr metadata"
    if multiscale is not None:
        node, scale, position, fixed, file_axes, no_unit = _ome_level(path, node, multiscale)
    elif (listed := _ome_level_named(path)) is not None:  # a level by its path: img.zarr/1
        node, scale, position, fixed, file_axes, no_unit = _ome_level(*listed)
    else:  # zarr 3's dimension_names, or xarray's _ARRAY_DIMENSIONS in zarr 2
        said, file_axes = "zarr metadata", _named_axes(node)
    if file_axes is not None and axes not in (None, file_axes):
        raise InputError(f"{path}: its {said} says its axes are "
                         f"{','.join(file_axes)}: drop --axes {axes}")
    source = ArraySource(path, node, file_axes or axes or "zyx", kind="zarr", fixed=fixed,
                         check=_blosc_chunk_check(path, node, fixed, file_axes or axes or "zyx"))
    if scale is not None:
        source.record_resolution(scale, "the OME-Zarr metadata")
        source.record_position(position, "the OME-Zarr metadata")
    elif no_unit:
        source.resolution_from = "its OME-Zarr scale names no unit of length"
    return source


def _blosc_chunk_check(path: str, array, fixed: tuple[int, ...],
                       axes: str) -> Callable[[int, int], None] | None:
    """Where the array's chunk files on this disk are blosc streams (zarr 2's compressor, or
    zarr 3's last codec, unsharded): a check of each stored chunk that sections z0..z1 - 1
    read against its stream's header (`check_blosc_size`), or None."""
    meta = array.metadata
    codecs = [meta.compressor] if hasattr(meta, "compressor") else list(meta.codecs)
    last = type(codecs[-1]).__name__ if codecs and codecs[-1] is not None else ""
    if last not in ("Blosc", "BloscCodec") or not os.path.isdir(path):
        return None  # numcodecs' Blosc (zarr 2), zarr 3's BloscCodec; sharded ends otherwise
    chunks, shape = [int(c) for c in array.chunks], [int(n) for n in array.shape]
    z_axis = len(fixed) if axes == "zyx" else array.ndim - 1

    def check(z0: int, z1: int) -> None:
        ranges = [range(-(-n // c)) for n, c in zip(shape, chunks)]
        for axis, index in enumerate(fixed):
            ranges[axis] = range(index // chunks[axis], index // chunks[axis] + 1)
        ranges[z_axis] = range(z0 // chunks[z_axis], -(-z1 // chunks[z_axis]))
        for position in itertools.product(*ranges):
            file = os.path.join(path, *meta.encode_chunk_key(position).split("/"))
            try:
                with open(file, "rb") as f:
                    header, length = f.read(BLOSC_HEADER), os.fstat(f.fileno()).st_size
            except FileNotFoundError:
                continue  # not stored: the fill value
            try:
                check_blosc_size(header, length)
            except ValueError as err:
                raise InputError(f"cannot read the zarr chunk {file}: {err}") from None
    return check


def _named_axes(array) -> str | None:
    """"zyx" or "xyz" where a plain zarr array names its dimensions so (zarr 3's
    `dimension_names`, xarray's `_ARRAY_DIMENSIONS` attribute); else None."""
    names = getattr(getattr(array, "metadata", None), "dimension_names", None)
    if not names:
        names = dict(array.attrs).get("_ARRAY_DIMENSIONS")
    if isinstance(names, (list, tuple)) and len(names) == 3 and all(
            isinstance(n, str) for n in names):
        order = "".join(n.lower() for n in names)
        return order if order in AXES else None
    return None


#: nanometres per unit of OME-Zarr's spatial axes (UDUNITS names, as the spec has them)
OME_UNITS_NM = {"picometer": 1e-3, "angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3,
                "millimeter": 1e6, "centimeter": 1e7, "decimeter": 1e8, "meter": 1e9}


def _ome_multiscale(group) -> dict | None:
    """The first multiscale of an OME-Zarr group (version 0.4: in the attributes; 0.5: under
    their "ome" key), or None."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    found = attrs.get("multiscales") or (ome.get("multiscales") if isinstance(ome, dict)
                                         else None)
    return found[0] if isinstance(found, list) and found and isinstance(found[0], dict) else None


def _ome_level_named(path: str) -> tuple | None:
    """(image path, image group, multiscale, level index) when the array at `path` is a level
    an OME-Zarr image above it lists (`img.zarr/1`, `img.zarr/scale/1`); else None."""
    import zarr
    import zarr.errors

    parts = os.path.normpath(path).split(os.sep)
    for up in (1, 2):  # the image group is the array's parent, or its grandparent
        image, below = os.sep.join(parts[:-up]), "/".join(parts[-up:])
        if not image or not any(os.path.exists(os.path.join(image, m)) for m in ZARR_MARKERS):
            continue
        try:
            group = zarr.open_group(store=image, mode="r")
        except (zarr.errors.BaseZarrError, OSError, ValueError, KeyError, TypeError):
            continue
        multiscale = _ome_multiscale(group)
        datasets = multiscale.get("datasets") if multiscale else None
        paths = [d.get("path") if isinstance(d, dict) else None
                 for d in (datasets if isinstance(datasets, list) else [])]
        if below in paths:
            return image, group, multiscale, paths.index(below)
    return None


def _ome_level(path: str, group, multiscale: dict, index: int = 0) -> tuple:
    """(array, voxel size and first voxel's position in nm in the array's spatial order or
    None, indices of the leading size-1 axes, "zyx" or "xyz", whether a scale was dropped for
    want of a unit) of an OME-Zarr's level `index` (0: full resolution). Versions before 0.3
    name no axes: t,c,z,y,x."""
    import zarr

    try:
        level = multiscale["datasets"][index]
        array = group[level["path"]]
        axes = multiscale.get("axes") or list("tczyx")
        names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
        units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise InputError(f"{path}: malformed OME-Zarr multiscales metadata ({err!r})") from None
    if not isinstance(array, zarr.Array) or len(names) != array.ndim:
        raise InputError(f"{path}: its OME-Zarr metadata names {len(names)} axes "
                         f"({','.join(names)}) for its level {level['path']}")
    spatial = [i for i, n in enumerate(names) if n in ("x", "y", "z")]
    order = "".join(names[i] for i in spatial)
    lead = len(names) - 3
    if order not in AXES or spatial != list(range(lead, len(names))) or any(
            array.shape[i] != 1 for i in range(lead)):
        raise InputError(
            f"{path}: its axes are {','.join(names)} (shape {shape_text(array.shape)}): "
            "deepem3d reads one-channel 3D volumes whose last axes are z,y,x (or x,y,z); "
            "save one channel and time point as its own array first")
    scale, position, no_unit = None, None, False
    try:
        factors, start, scaled = _ome_transform(level, multiscale, len(names))
        per_nm = [OME_UNITS_NM.get(units[i]) for i in spatial]
        if all(per_nm):
            scale = [float(factors[i]) * u for i, u in zip(spatial, per_nm)]
            position = [float(start[i]) * u for i, u in zip(spatial, per_nm)]
        no_unit = scaled and scale is None
        if index > 0 and scale is not None:
            full, _, _ = _ome_transform(multiscale["datasets"][0], multiscale, len(names))
            centred = [p - (s - float(full[i]) * u) / 2
                       for p, s, i, u in zip(position, scale, spatial, per_nm)]
            if not whole(position, scale) and whole(centred, scale):
                position = centred  # the level's translation names its first voxel's centre
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        scale = position = None  # no usable scale: the user gives --resolution
    return array, scale, position, (0,) * lead, order, no_unit


def _ome_transform(level: dict, multiscale: dict, ndim: int) -> tuple:
    """(scale, translation, whether a scale was given) of an OME-Zarr level: its transforms,
    then the multiscale's, applied to index 0 and to a step."""
    factors, start, scaled = np.ones(ndim), np.zeros(ndim), False
    for transforms in (level.get("coordinateTransformations") or [],
                       multiscale.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale":
                step = np.asarray(t["scale"], dtype=np.float64)
                factors, start, scaled = factors * step, start * step, True
            elif t.get("type") == "translation":
                start = start + np.asarray(t["translation"], dtype=np.float64)
    return factors, start, scaled
