"""The embedded ISBI 2012 sample: 30 ssTEM sections of Drosophila L1 ventral nerve cord.

Shipped inside the package (lzma-compressed .npy, z,y,x) so the demo and the tests run on a
fresh machine with no download. Provenance and terms: deepem3d/data/isbi2012/README.md.
"""

from __future__ import annotations

import io
import lzma
from collections.abc import Sequence
from importlib import resources

import numpy as np
from tqdm import tqdm

from deepem3d.axes import xyz_from_zyx
from deepem3d.storage.layers import check_empty, cloudpath, create_layer

RESOLUTION = (4, 4, 50)  # nm, x,y,z
CHUNK_SIZE = (128, 128, 10)  # 30 sections = 3 chunks; the held-out z = 20..29 is one chunk row
LAYERS = ("image", "ground_truth")


def _load(name: str) -> np.ndarray:
    ref = resources.files("deepem3d") / "data" / "isbi2012" / f"{name}.npy.xz"
    with ref.open("rb") as packed, lzma.open(packed) as raw:
        return np.load(io.BytesIO(raw.read()), allow_pickle=False)


def load_sample() -> tuple[np.ndarray, np.ndarray]:
    """(image uint8, neuron ids uint16), both z,y,x (30, 512, 512); id 0 is membrane."""
    return _load("image"), _load("neuron_ids")


def write_sample(
    dest: str, *, chunk_size: Sequence[int] = CHUNK_SIZE, overwrite: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """Write the sample as precomputed layers DEST/image and DEST/ground_truth.

    Returns the layer paths by name. Refuses layers that already hold data unless overwrite.
    """
    dest = cloudpath(dest).rstrip("/")
    for name in LAYERS:
        check_empty(f"{dest}/{name}", overwrite)
    image, ids = load_sample()
    arrays = {"image": (image, "image", "uint8"), "ground_truth": (ids, "segmentation", "uint64")}
    paths = {}
    for name in tqdm(LAYERS, desc="Writing sample layers", disable=not progress):
        array, layer_type, dtype = arrays[name]
        path = f"{dest}/{name}"
        vol = create_layer(
            path,
            layer_type=layer_type,
            dtype=dtype,
            resolution=RESOLUTION,
            size=array.shape[::-1],
            chunk_size=chunk_size,
            overwrite=overwrite,
            provenance={
                "task": "sample",
                "source": "ISBI 2012 training volume (deepem3d/data/isbi2012)",
                "array": "raw" if name == "image" else "labels/neuron_ids",
            },
        )
        vol[:, :, :] = xyz_from_zyx(array.astype(dtype, copy=False))
        paths[name] = path
    return paths
