"""The DeepEM3D network, its presets, training and checkpoints.

`build_model`, `DeepEM3DNet` and `PRESETS` load torch on first use: the table of shipped
models (deepem3d.models.shipped) is read by commands that never run a network.
"""

from __future__ import annotations

__all__ = ["PRESETS", "DeepEM3DNet", "build_model"]


def __getattr__(name: str):
    if name in ("DeepEM3DNet", "build_model"):
        from deepem3d.models import network

        return getattr(network, name)
    if name == "PRESETS":
        from deepem3d.models.presets import PRESETS

        return PRESETS
    raise AttributeError(f"module 'deepem3d.models' has no attribute {name!r}")
