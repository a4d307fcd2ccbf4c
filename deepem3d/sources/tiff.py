"""TIFF: a multi-page file, one page per z, or a folder of single-page files, one per z, in
natural name order. Pages are read in ranges (or memory-mapped where tifffile can)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import numpy as np

from deepem3d.axes import xyz_from_zyx
from deepem3d.errors import InputError
from deepem3d.sources.base import SUPPORTED, TIFF_SUFFIXES, VolumeSource, check_3d, shape_text


@contextlib.contextmanager
def quiet_tifffile() -> Iterator[None]:
    """tifffile's own log lines on a damaged file ("invalid page offset"), silenced while a
    TIFF is read: they would precede the one-line error that names the damage."""
    import logging

    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


class TiffStackSource(VolumeSource):
    """A multi-page TIFF file: page i is z = i. Reads page ranges (or a read-only memmap)."""

    kind = "tiff"

    def __init__(self, path: str):
        import tifffile

        with quiet_tifffile():
            try:
                self._tif = tifffile.TiffFile(path)
            except (tifffile.TiffFileError, OSError, ValueError) as err:
                raise InputError(f"cannot read {path} as TIFF: {err}") from None
            try:
                self._open(path)
            except BaseException:
                self.close()
                raise

    def _open(self, path: str) -> None:
        tif = self._tif
        series = tif.series
        if not series:
            raise InputError(f"{path} holds no images")
        if len(series) > 1:
            # tifffile splits pages of another shape or data type into series of their own
            kinds = ", ".join(f"{'x'.join(map(str, s.shape))} {s.dtype}" for s in series[:4])
            raise InputError(
                f"{path} holds {len(series)} image series of different shapes or data types "
                f"({kinds}{', ...' if len(series) > 4 else ''}): deepem3d reads a stack of "
                "equal-size 2D grayscale pages of one data type"
            )
        s = series[0]
        axes, shape = s.axes, tuple(s.shape)
        if len(shape) == 2:
            raise InputError(
                f"{path} holds a single 2D image ({shape[1]}x{shape[0]}): deepem3d takes a 3D "
                "stack, a multi-page TIFF or a directory of TIFF files"
            )
        if any(ax in "CS" and n > 1 for ax, n in zip(axes, shape)):
            # tifffile.imwrite stores 3 or 4 sections of y, x as one RGB(A) page unless told
            # photometric="minisblack"
            rgb = (" (a stack of 3 or 4 sections saved with tifffile.imwrite is stored so "
                   "unless photometric='minisblack': save it with that)"
                   if axes == "SYX" and shape[0] in (3, 4) else "")
            raise InputError(
                f"{path} has channels or samples per pixel (axes {axes}, shape {shape}): "
                "deepem3d reads one grayscale channel; save one channel as its own stack "
                f"first{rgb}"
            )
        check_3d(shape, path)
        depth, height, width = shape
        self._memmap = None
        if s.dataoffset is not None and s.keyframe.is_memmappable:
            # uncompressed and contiguous (also ImageJ stacks over 4 GB, which have one IFD)
            try:
                self._memmap = tif.filehandle.memmap_array(
                    tif.byteorder + s.dtype.char, shape, s.dataoffset
                )
            except ValueError:  # numpy's "mmap length is greater than file size"
                raise InputError(f"{path} is truncated: its {depth} pages of {width}x{height} "
                                 "run past the end of the file") from None
        elif len(s) != depth or tuple(s.keyframe.shape) != (height, width):
            raise InputError(
                f"{path}: pages of shape {tuple(s.keyframe.shape)} do not stack into "
                f"{shape}: deepem3d reads a stack of 2D grayscale pages"
            )
        self._series = s
        super().__init__(path, shape, s.dtype, "zyx")

    def _read(self, z0: int, z1: int) -> np.ndarray:
        if self._memmap is not None:
            return xyz_from_zyx(np.asarray(self._memmap[z0:z1]))
        import tifffile

        try:
            with quiet_tifffile():
                pages = self._tif.asarray(key=slice(z0, z1), series=0)
        except (tifffile.TiffFileError, OSError, ValueError) as err:
            raise InputError(f"cannot read pages {z0}..{z1 - 1} of {self.name} as TIFF: "
                             f"{err}") from None
        return xyz_from_zyx(pages.reshape(z1 - z0, *self.stored_shape[1:]))

    def close(self) -> None:
        self._memmap = None
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None


class TiffDirectorySource(VolumeSource):
    """A directory of single-page TIFF files, one per z, sorted by name (natural order)."""

    kind = "tiff-directory"

    def __init__(self, path: str):
        import tifffile

        self._tifffile = tifffile
        files = sorted(
            (
                entry.path
                for entry in os.scandir(path)
                if entry.is_file()
                and not entry.name.startswith(".")  # hidden files, macOS ._ resource forks
                and entry.name.lower().endswith(TIFF_SUFFIXES)
            ),
            key=lambda p: natural_key(os.path.basename(p)),
        )
        if not files:
            raise InputError(f"{path} holds no .tif/.tiff files: deepem3d reads {SUPPORTED}")
        shape = dtype = None
        for file in files:  # headers only: every file must be one 2D page of the same kind
            page_shape, page_dtype = self._header(file)
            if shape is None:
                shape, dtype = page_shape, page_dtype
            elif (page_shape, page_dtype) != (shape, dtype):
                raise InputError(
                    f"{file} is {shape_text(page_shape)} {page_dtype.name} but "
                    f"{files[0]} is {shape_text(shape)} {dtype.name}: every file of a "
                    "TIFF directory must have the same size and dtype"
                )
        self._files = files
        super().__init__(path, (len(files), *shape), dtype, "zyx")

    def _header(self, file: str) -> tuple[tuple[int, ...], np.dtype]:
        tifffile = self._tifffile
        try:
            with quiet_tifffile(), tifffile.TiffFile(file) as tif:
                npages = len(tif.pages)
                page = tif.pages.first
                shape, dtype = tuple(page.shape), np.dtype(page.dtype)
        except (tifffile.TiffFileError, OSError, ValueError) as err:
            raise InputError(f"cannot read {file} as TIFF: {err}") from None
        if npages != 1 or len(shape) != 2:
            raise InputError(
                f"{file} holds {npages} page(s) of shape {shape}: a TIFF directory must hold "
                "one 2D grayscale image per file"
            )
        return shape, dtype

    def _read(self, z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0, *self.stored_shape[1:]), dtype=self.dtype)
        for i, file in enumerate(self._files[z0:z1]):
            try:
                with quiet_tifffile(), self._tifffile.TiffFile(file) as tif:
                    out[i] = tif.pages.first.asarray()
            except (self._tifffile.TiffFileError, OSError, ValueError) as err:
                raise InputError(f"cannot read {file} as TIFF: {err}") from None
        return xyz_from_zyx(out)


def natural_key(name: str) -> tuple:
    """Sort key that puts 'z2.tif' before 'z10.tif'."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name
