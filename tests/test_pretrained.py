"""The shipped weights load by name and predict real boundaries on held-out EM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepem3d.errors import InputError
from deepem3d.models.checkpoint import (
    DEFAULT_MODEL,
    ENSEMBLES,
    PRETRAINED,
    expand_models,
    load_model,
)
from deepem3d.models.predict import predict_sections
from deepem3d.models.targets import affinity_target, boundary_target
from deepem3d.sample import load_sample

CROP = (slice(20, 25), slice(128, 256), slice(128, 256))  # held-out sections


def test_the_default_is_a_shipped_model():
    assert DEFAULT_MODEL in PRETRAINED and expand_models(None) == [DEFAULT_MODEL]


@pytest.mark.parametrize("name", sorted(ENSEMBLES))
def test_shipped_ensembles_name_shipped_models_of_one_head(name):
    members = expand_models([name])
    assert len(members) > 1 and all(m in PRETRAINED for m in members)
    assert len({load_model(m)[1]["model"]["head"] for m in members}) == 1
    # an ensemble's name expands in place; other names and paths pass through
    assert expand_models(["isbi2012-small", name, "/x.pt"]) == ["isbi2012-small", *members,
                                                              "/x.pt"]
    with pytest.raises(InputError, match="is an ensemble of"):
        load_model(name)  # one network cannot hold it


def test_a_checkpoint_under_home_loads_by_its_tilde_path(tmp_path, monkeypatch):
    """`~/x.pt` (a pipeline's model: YAML expands no `~`) passed the checks that expand it,
    then was not found by the loader, nor recorded whole as a fine-tuning run's --init."""
    import shutil

    from deepem3d.models.checkpoint import absolute_location, load_checkpoint, resolve_model

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copyfile(resolve_model(DEFAULT_MODEL), tmp_path / "mine.pt")
    assert load_checkpoint("~/mine.pt")["sha256"] == load_checkpoint(DEFAULT_MODEL)["sha256"]
    assert absolute_location("~/mine.pt") == str(tmp_path / "mine.pt")


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_shipped_model_predicts_held_out_boundaries(name):
    torch.set_num_threads(1)
    model, meta = load_model(name)
    assert meta["model"]["preset"] == "small" and meta["resolution"] == [4.0, 4.0, 50.0]
    train = meta["training"]["config"]
    assert train["train_sections"][1] <= 20 and train["val_sections"][1] <= 20
    image, ids = load_sample()
    ids = ids[CROP].astype(np.int64)
    predicted = predict_sections(model, image[CROP], margin=32)
    if model.head == "boundary":
        cut, target = predicted > 0.5, boundary_target(ids).astype(bool)
    else:  # the edges cut: affinity < 0.5 against the ground truth's
        cut, target = predicted < 0.5, affinity_target(ids) < 0.5
        # an edge at the crop's low faces has no neighbour in the crop: not scored
        cut, target = cut[:, 1:, 1:, 1:], target[:, 1:, 1:, 1:]
    precision = (cut & target).sum() / cut.sum()
    recall = (cut & target).sum() / target.sum()
    assert precision > 0.75 and recall > 0.6, (name, precision, recall)
