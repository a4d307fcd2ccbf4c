"""MRC (`.mrc`, `.rec`, `.st`, `.ali`, `.map`, `.mrcs`), memory-mapped: its voxel size from the
header, its first voxel's index from nxstart, nystart, nzstart, IMOD's unsigned bytes."""

from __future__ import annotations

import math
import warnings

import numpy as np

from deepem3d.errors import InputError
from deepem3d.sources.base import ArraySource

#: IMOD's stamp in an MRC header (bytes 152..155, then its flags): with it, mode 0 bytes are
#: unsigned unless flag bit 0 is set
IMOD_STAMP = 1146047817
IMOD_STAMP_OFFSET = 152 - 112  # within mrcfile's `extra2` field, which starts at byte 112


def _imod_unsigned_bytes(header) -> bool:
    """Whether IMOD wrote this mode-0 file's bytes unsigned (mrcfile reads them as int8)."""
    order = header.dtype["nx"].str[0]  # the header's byte order
    extra = bytes(header.extra2.tobytes())
    stamp, flags = np.frombuffer(extra, dtype=order + "i4", count=2,
                                 offset=IMOD_STAMP_OFFSET)
    return int(stamp) == IMOD_STAMP and not int(flags) & 1


def _mrc_placement(source: ArraySource, header) -> None:
    """nxstart, nystart, nzstart: the first voxel's index, a number of voxels whatever the
    program. The origin (in A) is not applied: programs differ in its sign (IMOD's first
    voxel lies at minus the origin, UCSF Chimera's at plus it); the note says it was seen."""
    start = tuple(int(header[k]) for k in ("nxstart", "nystart", "nzstart"))
    if any(start):
        source.start = start
    origin = tuple(float(header.origin[a]) for a in "xyz")
    if any(origin) and all(math.isfinite(v) for v in origin):
        at = ",".join(f"{v:g}" for v in origin)
        source.placement_note = (
            f"{source.name}: its MRC header's origin {at} A is not applied (programs differ "
            "in its sign); the layer starts at voxel "
            f"{','.join(map(str, start))} (nxstart, nystart, nzstart): give --voxel-offset "
            "X,Y,Z to place it elsewhere")


def open_mrc(path: str) -> ArraySource:
    import mrcfile

    try:  # permissive: older files lack the "MAP " ID; the shape, mode and axes are checked
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"cannot read {path} as MRC: {err}") from None
    try:
        if mrc.data is None:
            raise InputError(f"cannot read {path} as MRC: its header gives no data mode "
                             f"and shape mrcfile reads (mode {int(mrc.header.mode)})")
        header = mrc.header
        mapping = (int(header.mapc), int(header.mapr), int(header.maps))
        if mapping != (1, 2, 3):
            raise InputError(f"{path}: its columns, rows and sections are axes {mapping}; "
                             "deepem3d reads MRC files stored x,y,z (1,2,3)")
        data = mrc.data
        if int(header.mode) == 0 and _imod_unsigned_bytes(header):
            data = data.view(np.uint8)
        source = ArraySource(path, data, "zyx", kind="mrc", handle=mrc)
        # the cell's size in Angstrom over its sampling, z,y,x; 0 where the file leaves it unset
        cell = [float(header.cella[a]) for a in "zyx"]
        samples = [int(header[m]) for m in ("mz", "my", "mx")]
        angstrom = [c / n if n > 0 else 0.0 for c, n in zip(cell, samples)]
        if angstrom == [1.0, 1.0, 1.0]:  # what IMOD, EMAN2 and others write when unknown
            source.resolution_from = ("its MRC header gives 1 A on every axis, what programs "
                                      "write when the voxel size is unknown")
        else:
            source.record_resolution([a / 10 for a in angstrom], "the MRC header")
        _mrc_placement(source, header)
        return source
    except BaseException:
        mrc.close()
        raise
