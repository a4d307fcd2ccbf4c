"""The DeepEM3D network, its presets, training and checkpoints."""

from deepem3d.models.network import DeepEM3DNet, build_model
from deepem3d.models.presets import PRESETS

__all__ = ["PRESETS", "DeepEM3DNet", "build_model"]
