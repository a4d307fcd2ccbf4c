"""One picture of a run: a section of the image, the map, the segmentation and the ground truth,
and the largest segments' meshes in 3D (matplotlib, no screen needed)."""

from __future__ import annotations

import numpy as np

MAX_FACES = 20_000  # per mesh drawn: enough to see its shape, quick to draw


def _colours(labels: np.ndarray) -> np.ndarray:
    """A stable random colour per id (0 black): the same id has the same colour everywhere."""
    ids = labels.astype(np.uint64)
    mixed = (ids * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    rgb = np.stack([(mixed >> np.uint64(s)) & np.uint64(255) for s in (0, 8, 16)], axis=-1)
    rgb = rgb.astype(np.float32) / 255 * 0.8 + 0.2
    rgb[ids == 0] = 0
    return rgb


def draw_run(layers: dict[str, str], path: str, *, section: int | None = None,
             segments: int = 5) -> int:
    """Write a PNG of the run's layers to `path`; returns the section drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cloudvolume import CloudVolume
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    def read(name: str) -> np.ndarray:
        vol = CloudVolume(layers[name], progress=False, fill_missing=True)
        return np.asarray(vol[:, :, z:z + 1])[:, :, 0]  # x, y, channels

    seg_vol = CloudVolume(layers["segmentation"], progress=False, fill_missing=True)
    z = int(seg_vol.volume_size[2]) // 2 if section is None else int(section)
    panels = [("image", "image")]
    if "map" in layers:
        panels.append(("map", "map"))
    panels.append(("segmentation", "segmentation"))
    if "ground_truth" in layers:
        panels.append(("ground_truth", "ground truth"))
    fig = plt.figure(figsize=(4 * (len(panels) + 1), 4.4), dpi=80)
    for k, (name, title) in enumerate(panels):
        data = read(name)
        ax = fig.add_subplot(1, len(panels) + 1, k + 1)
        if name in ("segmentation", "ground_truth"):
            shown = _colours(data[..., 0])
        elif data.shape[-1] == 3:
            shown = data.astype(np.float32) / 255  # affinities x, y, z as red, green, blue
        else:
            shown = data[..., 0]
        ax.imshow(np.swapaxes(shown, 0, 1), cmap="gray", interpolation="nearest")
        ax.set_title(f"{title}, section {z}")
        ax.axis("off")
    ax = fig.add_subplot(1, len(panels) + 1, len(panels) + 1, projection="3d")
    drawn = _draw_meshes(ax, seg_vol, segments, Poly3DCollection)
    ax.set_title(f"meshes of the {drawn} largest segments" if drawn else "no meshes yet")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return z


def _draw_meshes(ax, seg_vol, count: int, poly) -> int:
    if not seg_vol.info.get("mesh"):
        ax.axis("off")
        return 0
    from deepem3d.viewer import largest_segments

    ids = largest_segments(seg_vol.cloudpath, count)
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for segment in ids:
        mesh = seg_vol.mesh.get(segment)
        mesh = mesh[segment] if isinstance(mesh, dict) else mesh
        faces = mesh.faces[:: max(1, len(mesh.faces) // MAX_FACES)]
        colour = _colours(np.array([segment]))[0]
        ax.add_collection3d(poly(mesh.vertices[faces], facecolors=colour, edgecolor="none",
                                 shade=True))
        lo, hi = np.minimum(lo, mesh.vertices.min(0)), np.maximum(hi, mesh.vertices.max(0))
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_zlim(lo[2], hi[2])
    ax.set_box_aspect(tuple(hi - lo))
    ax.view_init(elev=25, azim=-50)
    ax.set_axis_off()
    return len(ids)
