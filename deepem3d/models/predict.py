"""Whole-array prediction in memory: the reference predictor for validation and small volumes.

Chunked, seam-free inference over layers is the inference stage's job; this one predicts every
section of an in-memory z,y,x array, padding by reflection at the array's own bounds.
"""

from __future__ import annotations

import numpy as np
import torch

from deepem3d.models.augment import dihedral, undo_dihedral
from deepem3d.models.data import reflect_sections


def _pad_to(size: int, divisor: int, margin: int) -> tuple[int, int]:
    total = size + 2 * margin
    total += (-total) % divisor
    before = (total - size) // 2
    return before, total - size - before


@torch.no_grad()
def predict_sections(
    model: torch.nn.Module, image: np.ndarray, *, tta: int = 1, batch_size: int = 4,
    device: str | torch.device = "cpu", margin: int = 32,
) -> np.ndarray:
    """Boundary probability (z,y,x float32) or affinities (3,z,y,x) for every section.

    tta: 1 (identity) or up to 16 dihedral x z-reversal variants, each undone, averaged
    (boundary head only: flipped affinities need their offsets restored).
    """
    head = model.config["head"]
    if tta > 1 and head != "boundary":
        raise ValueError("test-time augmentation is implemented for the boundary head only")
    half = model.config["in_sections"] // 2
    depth, height, width = image.shape
    py, px = _pad_to(height, model.divisor, margin), _pad_to(width, model.divisor, margin)
    stack = reflect_sections(image, half)
    stack = np.pad(stack, ((0, 0), py, px), mode="reflect")
    channels = 1 if head == "boundary" else 3
    out = np.zeros((channels, depth, height, width), dtype=np.float32)
    was_training = model.training
    model.eval()
    windows = [stack[z : z + 2 * half + 1] for z in range(depth)]
    for k in range(tta):
        for start in range(0, depth, batch_size):
            batch = np.stack([dihedral(w, k) for w in windows[start : start + batch_size]])
            x = torch.from_numpy(np.ascontiguousarray(batch)[:, None]).to(device)
            probs = model.probabilities(model(model.normalize(x))).float().cpu().numpy()
            for i, p in enumerate(probs):
                p = undo_dihedral(p[:, None], k)[:, 0]  # (C, Y, X): in-plane undo only
                out[:, start + i] += p[:, py[0] : py[0] + height, px[0] : px[0] + width]
    model.train(was_training)
    out /= tta
    return out[0] if head == "boundary" else out
