"""The models that ship with deepem3d, their ensembles, and the segmentation settings each was
scored with. No torch here: a pipeline file is checked against this table before anything runs.

Settings travel with the model: `deepem3d infer` records the settings of its model (for the TTA
it ran) in the map's provenance, and `deepem3d segment` and the pipeline file use them when
none are given. Each was chosen on ISBI 2012 sections 15..19 (validation), never on the
held-out 20..29 (deepem3d/models/pretrained/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence

PRETRAINED = {
    "isbi2012-small": "isbi2012-small.pt",
    "isbi2012-small-affinity": "isbi2012-small-affinity.pt",
    "isbi2012-small-affinity-s3": "isbi2012-small-affinity-s3.pt",
    "isbi2012-small-affinity-s4": "isbi2012-small-affinity-s4.pt",
}
# A shipped ensemble's name stands for several shipped models whose maps are combined
# (deepem3d.models.sliding.combine). With 16-way TTA these three score better than any one of
# them; without TTA no better, at three times the cost, so the default stays one model.
ENSEMBLES = {
    "isbi2012-small-affinity-x3": (
        "isbi2012-small-affinity", "isbi2012-small-affinity-s3", "isbi2012-small-affinity-s4",
    ),
}
DEFAULT_MODEL = "isbi2012-small-affinity"


def _settings(method: str, threshold: float, sigma: float, dust_size: int) -> dict:
    return {"method": method, "threshold": threshold, "sigma": sigma, "dust_size": dust_size}


#: name -> {"tta": settings for maps predicted with TTA (16-way), "no_tta": without}
SEGMENTATION_SETTINGS = {
    "isbi2012-small-affinity": {
        "tta": _settings("mean", 0.55, 5, 0),
        "no_tta": _settings("mean", 0.55, 4, 200),
    },
    # chosen for the ensemble with 16-way TTA; without TTA those of its first member
    "isbi2012-small-affinity-x3": {
        "tta": _settings("mean", 0.6, 3, 200),
        "no_tta": _settings("mean", 0.55, 4, 200),
    },
    "isbi2012-small": {
        "tta": _settings("watershed", 0.1, 1, 0),
        "no_tta": _settings("watershed", 0.1, 1, 0),
    },
}


def expand_models(names: Sequence[str | None] | None) -> list[str]:
    """The checkpoints behind `--model` values: a shipped ensemble's name stands for its
    members, and no value for the default."""
    out: list[str] = []
    for name in names or [None]:
        name = name or DEFAULT_MODEL
        out.extend(ENSEMBLES.get(name, (name,)))
    return out


def recommended_settings(names: Sequence[str | None] | None, tta: int) -> dict | None:
    """The segmentation settings recorded for this model (or ensemble name) at this TTA; None
    for several names, or a model that records none (your own checkpoints)."""
    names = list(names or [None])
    if len(names) != 1:
        return None
    table = SEGMENTATION_SETTINGS.get(names[0] or DEFAULT_MODEL)
    if table is None:
        return None
    return dict(table["tta" if tta > 1 else "no_tta"])
