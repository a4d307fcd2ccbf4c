"""Where data lives: precomputed layers, their encodings, intermediate arrays."""
