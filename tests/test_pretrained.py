"""The shipped weights load by name and predict real boundaries on held-out EM."""

from __future__ import annotations

import numpy as np
import torch

from deepem3d.models.checkpoint import DEFAULT_MODEL, load_model
from deepem3d.models.predict import predict_sections
from deepem3d.models.targets import boundary_target
from deepem3d.sample import load_sample


def test_shipped_model_predicts_held_out_boundaries():
    torch.set_num_threads(1)
    model, meta = load_model(DEFAULT_MODEL)
    assert meta["model"]["preset"] == "small" and meta["resolution"] == [4.0, 4.0, 50.0]
    train = meta["training"]["config"]
    assert train["train_sections"][1] <= 20 and train["val_sections"][1] <= 20
    image, ids = load_sample()
    crop = (slice(20, 25), slice(128, 256), slice(128, 256))  # held-out sections
    boundary = predict_sections(model, image[crop], margin=32) > 0.5
    target = boundary_target(ids[crop].astype(np.int64)).astype(bool)
    precision = (boundary & target).sum() / boundary.sum()
    recall = (boundary & target).sum() / target.sum()
    assert precision > 0.8 and recall > 0.6, (precision, recall)
