"""DeepEM3D's class-balanced losses: each class weighted by smallest count / its count, per
batch, so thin boundaries weigh as much as the interiors they separate."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2-class softmax cross-entropy; logits (N, 2, y, x), target (N, y, x) in {0, 1}."""
    counts = torch.bincount(target.flatten(), minlength=2).to(logits.dtype)
    present = counts > 0
    weights = torch.where(present, counts[present].min() / counts.clamp(min=1), 0.0)
    return F.cross_entropy(logits.float(), target, weight=weights.float())


def balanced_binary_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-channel balanced BCE for affinities; logits and target (N, 3, y, x)."""
    losses = []
    for c in range(target.shape[1]):
        t = target[:, c]
        positives = t.sum()
        negatives = t.numel() - positives
        smallest = torch.minimum(positives, negatives).clamp(min=1)
        weight = torch.where(
            t > 0.5, smallest / positives.clamp(min=1), smallest / negatives.clamp(min=1)
        )
        losses.append(
            F.binary_cross_entropy_with_logits(logits[:, c].float(), t, weight=weight)
        )
    return torch.stack(losses).mean()


def loss_for(head: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return balanced_cross_entropy if head == "boundary" else balanced_binary_cross_entropy
