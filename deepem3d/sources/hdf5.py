"""HDF5: `FILE.h5:/DATASET`, or FILE.h5 alone where it holds one dataset; a dataset's
`resolution` and `offset` attributes (nm, in the array's own axis order) as CREMI writes them."""

from __future__ import annotations

import os

from deepem3d.errors import InputError
from deepem3d.sources.base import HDF5_SUFFIXES, ArraySource, shape_text


def split_hdf5(src: str) -> tuple[str, str | None] | None:
    """'a/v.h5:/raw' -> ('a/v.h5', '/raw'); 'v.h5' -> ('v.h5', None); not HDF5 -> None."""
    lower = src.lower()
    hits = [(lower.find(s + ":"), s) for s in HDF5_SUFFIXES if s + ":" in lower]
    if hits:
        i, suffix = min(hits)
        dataset = src[i + len(suffix) + 1 :].strip()
        if dataset and not dataset.startswith("/"):
            dataset = "/" + dataset
        return src[: i + len(suffix)], (dataset or None)
    if lower.endswith(HDF5_SUFFIXES):
        return src, None
    return None


def open_hdf5(file: str, dataset: str | None, axes: str) -> ArraySource:
    import h5py

    path = os.path.abspath(os.path.expanduser(file))
    if not os.path.isfile(path):
        raise InputError(f"no such file: {file}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"cannot read {file} as HDF5: {err}") from None
    try:
        if dataset is None:
            found = _hdf5_datasets(h5, limit=1)
            if len(found) != 1:  # none, or a choice to make
                raise InputError(
                    f"name the dataset to read: {file}:/DATASET ({_hdf5_contents(h5)})"
                )
            dataset = found[0].name
        try:
            obj = h5[dataset]
        except KeyError:
            raise InputError(
                f"{file} has no dataset {dataset} ({_hdf5_contents(h5)})"
            ) from None
        if not isinstance(obj, h5py.Dataset):
            raise InputError(
                f"{file}:{dataset} is a group, not a dataset ({_hdf5_contents(obj)})"
            )
        source = ArraySource(f"{path}:{dataset}", obj, axes, kind="hdf5", handle=h5)
        source.record_resolution(obj.attrs.get("resolution"),
                                 f"the dataset's `resolution` attribute, read as {axes}")
        source.record_position(obj.attrs.get("offset"),
                               f"the dataset's `offset` attribute (nm), read as {axes}")
        return source
    except BaseException:
        h5.close()
        raise


def _hdf5_datasets(group, limit: int) -> list:
    """The group's datasets (h5py objects) in visiting order, at most `limit` + 1 of them."""
    import h5py

    found: list = []

    def visit(name: str, obj: object) -> bool | None:
        if isinstance(obj, h5py.Dataset):
            found.append(obj)
            if len(found) > limit:
                return True  # stop walking
        return None

    group.visititems(visit)
    return found


def _hdf5_contents(group, limit: int = 6) -> str:
    """'it holds /raw 7x33x50 uint8, /labels ...' — shortened to `limit` datasets."""
    found = [f"{obj.name} {shape_text(obj.shape)} {obj.dtype}"
             for obj in _hdf5_datasets(group, limit)]
    if not found:
        return "it holds no datasets"
    more = ", ..." if len(found) > limit else ""
    return "it holds " + ", ".join(found[:limit]) + more
