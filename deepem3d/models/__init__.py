"""The DeepEM3D network, its presets, training and checkpoints (see issue 4)."""
