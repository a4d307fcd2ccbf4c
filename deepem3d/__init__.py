"""deepem3d: DeepEM3D neuron segmentation as seam-free queue tasks over precomputed layers."""

__version__ = "0.1.0"
