"""The compiled kernels (numba, `@njit(cache=True)`), and warming their cache.

Every kernel is compiled on its first call and, with `cache=True`, written to numba's cache:
next to its module, or under NUMBA_CACHE_DIR. A worker image installs the package read-only,
so it points NUMBA_CACHE_DIR at a folder of its own and warms it at build time by calling
every kernel once (`python -m deepem3d.run.kernels`); a worker then loads them from there
instead of compiling them in every new pod (about half a minute of CPU each time).

`warm()` runs the in-memory segmentation (whole and chunked, boundary and affinity maps, both
methods, both dust modes, with smoothing) and the compressed_segmentation encoder on small
synthetic volumes: between them they call every kernel. It returns the kernels it did not
reach; tests keep that empty, so a new kernel needs a call here.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import numpy as np

#: the packages whose modules hold kernels
KERNEL_PACKAGES = ("deepem3d.segmentation", "deepem3d.storage")


def kernels() -> dict[str, object]:
    """`module.name` -> every numba dispatcher defined in deepem3d's kernel packages."""
    from numba.core.dispatcher import Dispatcher

    found = {}
    for package in KERNEL_PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.iter_modules(root.__path__, prefix=f"{package}."):
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if isinstance(value, Dispatcher) and value.__module__ == info.name:
                    found[f"{info.name}.{name}"] = value
    return found


def warm() -> list[str]:
    """Call every kernel once (see the module docstring); the names of those not reached."""
    from deepem3d.segmentation.pipeline import segment, segment_chunked
    from deepem3d.segmentation.region_graph import merge_graphs, region_graph
    from deepem3d.segmentation.supervoxels import supervoxels
    from deepem3d.segmentation.synthetic import affinity_map, boundary_map, voronoi_cells
    from deepem3d.storage import cseg

    labels, _, _ = voronoi_cells((24, 20, 6), (8, 8, 3), seed=1)
    boundary = boundary_map(labels, seed=1)
    for values in (boundary, affinity_map(boundary)):
        for method, threshold in (("mean", [0.3, 0.6]), ("watershed", 0.2)):
            for dust_mode in ("merge", "zero"):
                kwargs = dict(dust_size=20, dust_mode=dust_mode, sigma=1.0)
                segment(values, method, threshold, **kwargs)
                segment_chunked(values, (10, 8, 3), method, threshold, **kwargs)
        graph = region_graph(supervoxels(values), values)
        merge_graphs([graph, graph])
    cseg.encode(labels.astype(np.uint64), (8, 8, 8))
    cseg.encode(labels.astype(np.uint32), (8, 8, 8))
    return uncached()


def uncached() -> list[str]:
    """The kernels with no entry in numba's cache (a kernel called only by another one is
    compiled, and cached, with it)."""
    return sorted(name for name, kernel in kernels().items()
                  if not os.path.exists(kernel._cache._cache_file._index_path))


def main() -> None:
    missed = warm()
    where = os.environ.get("NUMBA_CACHE_DIR") or "next to their modules"
    print(f"compiled {len(kernels()) - len(missed)} kernels into numba's cache ({where})")
    if missed:
        print(f"not reached: {', '.join(missed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
