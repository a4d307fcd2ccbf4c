"""Training: the loss goes down on real EM, checkpoints round-trip, resume continues the run,
and bad input is refused with one line."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile
import torch

from deepem3d.errors import InputError
from deepem3d.models import build_model
from deepem3d.models.checkpoint import (
    export_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from deepem3d.models.data import PatchSampler, load_pair
from deepem3d.models.losses import balanced_cross_entropy
from deepem3d.models.train import TrainConfig, Trainer
from deepem3d.sample import load_sample
from tests.conftest import ROOT, assert_one_line_error, cli_here, run_cli


@pytest.fixture(scope="module")
def sample_h5(tmp_path_factory):
    """The embedded sample's first 8 sections, cropped, as an HDF5 file (z,y,x)."""
    path = tmp_path_factory.mktemp("data") / "sample.h5"
    image, ids = load_sample()
    with h5py.File(path, "w") as f:
        f["raw"] = image[:10, :96, :96]
        f["ids"] = ids[:10, :96, :96]
    return path


def config(h5, out, **kw) -> TrainConfig:
    base = dict(
        image=f"{h5}:/raw", labels=f"{h5}:/ids", train_sections=(0, 6), val_sections=None,
        out_dir=str(out), preset="tiny", iterations=6, batch_size=2, patch=64, val_every=3,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss_on_fib_sem(shared_data, tmp_path):
    h5 = shared_data / "gala_fib_small" / "gala_fib_small.h5"
    image, ids = load_pair(f"{h5}:/train/raw", f"{h5}:/train/neuron_ids", (0, 20), "sections")
    fixed = PatchSampler(image, ids, in_sections=5, patch=64, augment=False)
    x, t = fixed.batch(np.random.default_rng(123), 4)
    cfg = TrainConfig(
        image=f"{h5}:/train/raw", labels=f"{h5}:/train/neuron_ids", train_sections=(0, 20),
        val_sections=None, out_dir=str(tmp_path), preset="tiny", iterations=30, batch_size=4,
        patch=64, val_every=30, resolution=(10, 10, 10), threads=1,
    )
    trainer = Trainer(cfg, progress=False)

    def fixed_loss() -> float:
        # batch statistics, as in training: running BN averages lag after a few steps
        trainer.model.train()
        with torch.no_grad():
            logits = trainer.model(trainer.model.normalize(torch.from_numpy(x)))
        return float(balanced_cross_entropy(logits, torch.from_numpy(t)))

    before = fixed_loss()
    trainer.run()
    after = fixed_loss()
    assert after < 0.97 * before, (before, after)
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    assert (tmp_path / "best.pt").exists()


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", in_sections=5).eval()
    x = model.normalize(torch.randint(0, 256, (1, 1, 5, 64, 64)).float())
    meta = {"model": model.config, "resolution": [4, 4, 50]}
    save_checkpoint(tmp_path / "m.pt", model, meta)
    loaded, loaded_meta = load_model(str(tmp_path / "m.pt"))
    assert loaded_meta["resolution"] == [4, 4, 50]
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_resume_continues_the_same_run(sample_h5, tmp_path):
    straight = Trainer(config(sample_h5, tmp_path / "a"), progress=False)
    straight.run()
    first = Trainer(config(sample_h5, tmp_path / "b", iterations=6), progress=False)
    first.cfg.iterations = 6
    # stop after 3 iterations: run with the same total, interrupted at the first checkpoint
    while first.iteration < 3:
        first.step()
    first.save({"iteration": 3, "train_loss": 0.0})
    resumed = Trainer(config(sample_h5, tmp_path / "b"), resume=True, progress=False)
    assert resumed.iteration == 3
    resumed.run()
    a = straight.model.state_dict()
    b = resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_workers_prepare_the_same_batches(sample_h5, tmp_path):
    """Batches drawn by 2 worker processes are the in-process ones, so a run started without
    workers and resumed with them ends with the same weights."""
    here = Trainer(config(sample_h5, tmp_path / "a"), progress=False)
    there = Trainer(config(sample_h5, tmp_path / "w", workers=2), progress=False)
    for (a_img, a_tgt), (b_img, b_tgt) in zip(here.batches(), there.batches(), strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_tgt, b_tgt)
    here.run()
    first = Trainer(config(sample_h5, tmp_path / "b"), progress=False)
    while first.iteration < 3:
        first.step()
    first.save({"iteration": 3, "train_loss": 0.0})
    resumed = Trainer(config(sample_h5, tmp_path / "b", workers=2), resume=True,
                      progress=False)
    resumed.run()
    a, b = here.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_after_best_pt_was_lost_writes_it_again(sample_h5, tmp_path, capsys):
    """best.pt is written on a better validation score only: deleted, a resumed run went on
    without it (and said it wrote it) unless a later score beat the lost one."""
    out = tmp_path / "run"
    Trainer(config(sample_h5, out, val_sections=(7, 10), iterations=3), progress=False).run()
    (out / "best.pt").unlink()
    resumed = Trainer(config(sample_h5, out, val_sections=(7, 10), iterations=6), resume=True,
                      progress=False)
    assert "best.pt is gone (the best validation so far" in capsys.readouterr().err
    resumed.run()
    best = load_checkpoint(str(out / "best.pt"))
    assert best["meta"]["training"]["iteration"] == 6


def test_validation_scores_the_held_apart_sections(sample_h5, tmp_path):
    trainer = Trainer(config(sample_h5, tmp_path, val_sections=(7, 10)), progress=False)
    final = trainer.run()
    assert 0 <= final["val_are"] <= 1 and final["val_loss"] > 0
    history = load_checkpoint(str(tmp_path / "last.pt"))["meta"]["training"]["history"]
    assert [h["iteration"] for h in history] == [3, 6]


def test_refuses_to_clobber_or_resume_with_other_settings(sample_h5, tmp_path):
    Trainer(config(sample_h5, tmp_path), progress=False).run()
    with pytest.raises(InputError, match="--resume"):
        Trainer(config(sample_h5, tmp_path), progress=False)
    with pytest.raises(InputError, match=r"other settings \(--lr 0.01, given 0.5; --seed 0, "
                       r"given 1\): resume with the same ones"):
        Trainer(config(sample_h5, tmp_path, lr=0.5, seed=1), resume=True, progress=False)
    with pytest.raises(InputError, match="is at iteration 6, past --iterations 4"):
        Trainer(config(sample_h5, tmp_path, iterations=4), resume=True, progress=False)


def test_refuses_to_write_over_files_of_another_run_or_its_init(sample_h5, tmp_path):
    """Not only last.pt: a kept best.pt or history.json is refused (with --resume too, there
    being no run to continue), and always an --init that is one of the files the run writes;
    nothing is written. best.pt alone of this very run (stopped before its first last.pt)
    is what --resume starts over."""
    Trainer(config(sample_h5, tmp_path, iterations=3), progress=False).run()
    (tmp_path / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for resume in (False, True):
        with pytest.raises(InputError, match="holds best.pt, history.json, learning_curve.png "
                           "and no last.pt to resume from: choose another --out"):
            Trainer(config(sample_h5, tmp_path, iterations=3), resume=resume, progress=False)
    common = ["train", "--image", f"{sample_h5}:/raw", "--labels", f"{sample_h5}:/ids",
              "--train-sections", "0:6", "--resolution", "4,4,50", "--patch-size", "32",
              "--out", tmp_path, "--init", tmp_path / "best.pt"]
    assert_one_line_error(cli_here(*common), f"--init {tmp_path / 'best.pt'} is a file this "
                          "run writes")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / "history.json").unlink()
    (tmp_path / "learning_curve.png").unlink()
    with pytest.raises(InputError, match="no last.pt"):  # another run's best.pt
        Trainer(config(sample_h5, tmp_path, iterations=3, seed=1), resume=True, progress=False)
    assert Trainer(config(sample_h5, tmp_path, iterations=3), resume=True,
                   progress=False).iteration == 0
    Trainer(config(sample_h5, tmp_path / "run", iterations=3), progress=False).run()
    with pytest.raises(InputError, match="is a file this run writes"):
        Trainer(config(sample_h5, tmp_path / "run", iterations=3,
                       init=str(tmp_path / "run" / "last.pt")), resume=True, progress=False)


def test_sources_are_recorded_absolute_and_relative_records_resume(sample_h5, tmp_path,
                                                                   monkeypatch):
    """Checkpoints recorded `--image sample.h5:/raw` as given, which names nothing from
    another folder: they record absolute paths, and a run that recorded relative ones still
    resumes from the folder it ran in."""
    import json

    monkeypatch.chdir(sample_h5.parent)
    Trainer(config(sample_h5.name, tmp_path, iterations=3), progress=False).run()
    recorded = load_checkpoint(str(tmp_path / "last.pt"))["meta"]["training"]["config"]
    assert (recorded["image"], recorded["labels"]) == (f"{sample_h5}:/raw", f"{sample_h5}:/ids")
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    meta = json.loads(payload["meta"])
    meta["training"]["config"].update(image="sample.h5:/raw", labels="sample.h5:/ids")
    payload["meta"] = json.dumps(meta, sort_keys=True)
    torch.save(payload, tmp_path / "last.pt")
    resumed = Trainer(config(sample_h5.name, tmp_path, iterations=4), resume=True,
                      progress=False)
    assert resumed.iteration == 3


def test_a_resume_compares_places_not_spellings(sample_h5, tmp_path, monkeypatch):
    """A run resumes however its paths are spelled now: --out file://DIR (its last.pt was
    looked for under the spelling), a layer plain or file://, an --init given relative (it
    was recorded so) and then absolute from another folder."""
    common = ["--image", f"{sample_h5}:/raw", "--labels", f"{sample_h5}:/ids",
              "--train-sections", "0:6", "--resolution", "4,4,50", "--patch-size", "32",
              "--batch-size", "2", "--threads", "1", "--val-every", "1"]
    out = f"file://{tmp_path / 'a'}"
    assert cli_here("train", *common, "--out", out, "--iterations", "1", "--head",
                    "affinity").returncode == 0
    resumed = cli_here("train", *common, "--out", out, "--iterations", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr  # the network is the one last.pt holds
    assert load_checkpoint(str(tmp_path / "a" / "last.pt"))["iteration"] == 2

    for name in ("raw", "ids"):
        assert cli_here("ingest", f"{sample_h5}:/{name}", tmp_path / "layers" / name,
                        "--resolution", "4,4,50", "--no-progress").returncode == 0
    monkeypatch.chdir(tmp_path)
    on_layers = dict(image="layers/raw", labels="layers/ids", val_every=1)
    Trainer(config(sample_h5, tmp_path / "l", iterations=1, **on_layers), progress=False).run()
    on_layers.update(image=f"file://{tmp_path}/layers/raw",
                     labels=f"precomputed://file://{tmp_path}/layers/ids/")
    assert Trainer(config(sample_h5, tmp_path / "l", iterations=2, **on_layers), resume=True,
                   progress=False).iteration == 1

    tuned = dict(head="affinity", val_every=1)
    Trainer(config(sample_h5, tmp_path / "t", iterations=1, init="a/last.pt", **tuned),
            progress=False).run()
    monkeypatch.chdir(tmp_path / "layers")
    resumed = Trainer(config(sample_h5, tmp_path / "t", iterations=2, **tuned,
                             init=f"file://{tmp_path}/a/last.pt"), resume=True, progress=False)
    assert resumed.iteration == 1 and resumed.cfg.init == str(tmp_path / "a" / "last.pt")


def test_init_starts_from_another_checkpoints_weights(sample_h5, tmp_path):
    Trainer(config(sample_h5, tmp_path / "a"), progress=False).run()
    source = str(tmp_path / "a" / "last.pt")
    tuned = Trainer(config(sample_h5, tmp_path / "b", init=source, seed=1), progress=False)
    start = load_checkpoint(source)["state_dict"]
    assert all(torch.equal(tuned.model.state_dict()[k], start[k]) for k in start)
    scratch = Trainer(config(sample_h5, tmp_path / "c", seed=1), progress=False)
    assert not all(torch.equal(scratch.model.state_dict()[k], start[k]) for k in start)
    tuned.run()
    meta = load_checkpoint(str(tmp_path / "b" / "last.pt"))["meta"]["training"]
    assert meta["init_sha256"] == load_checkpoint(source)["sha256"]
    assert meta["config"]["init"] == source
    first = meta["init_sha256"]
    Trainer(config(sample_h5, tmp_path / "a", iterations=9), resume=True, progress=False).run()
    assert load_checkpoint(source)["sha256"] != first  # the init file now holds other weights
    resumed = Trainer(config(sample_h5, tmp_path / "b", init=source, seed=1, iterations=9),
                      resume=True, progress=False)
    resumed.run()  # continues from its own last.pt, and keeps the provenance of its start
    meta = load_checkpoint(str(tmp_path / "b" / "last.pt"))["meta"]["training"]
    assert meta["init_sha256"] == first and meta["iteration"] == 9
    with pytest.raises(InputError, match="--init .* network"):
        Trainer(config(sample_h5, tmp_path / "d", init=source, head="affinity"), progress=False)


def test_fine_tuning_takes_the_network_of_its_init(sample_h5, tmp_path):
    """`train --init isbi2012-small-affinity` without --preset small --head affinity was
    refused: the checkpoint records its network, and flags not given now come from it."""
    run_cli("train", "--image", f"{sample_h5}:/raw", "--labels", f"{sample_h5}:/ids",
            "--train-sections", "0:6", "--out", tmp_path / "o", "--resolution", "4,4,50",
            "--iterations", "1", "--patch-size", "32", "--batch-size", "2", "--threads", "1",
            "--init", "isbi2012-small-affinity", check=True)
    model = load_checkpoint(str(tmp_path / "o" / "last.pt"))["meta"]["model"]
    assert (model["preset"], model["head"], model["in_sections"]) == ("small", "affinity", 5)


def test_a_fine_tuned_run_resumes_after_its_init_file_is_gone(sample_h5, tmp_path):
    """The network of a resumed run is the one its own last.pt holds: its --init file is not
    read again (it may be gone, or hold other weights since)."""
    common = ["--image", f"{sample_h5}:/raw", "--labels", f"{sample_h5}:/ids",
              "--train-sections", "0:6", "--resolution", "4,4,50", "--patch-size", "32",
              "--batch-size", "2", "--threads", "1", "--val-every", "1"]
    run_cli("train", *common, "--out", tmp_path / "a", "--iterations", "1", "--preset", "tiny",
            "--head", "affinity", check=True)
    init = tmp_path / "init.pt"
    init.write_bytes((tmp_path / "a" / "last.pt").read_bytes())
    tune = [*common, "--out", tmp_path / "b", "--init", init]
    run_cli("train", *tune, "--iterations", "1", check=True)
    init.unlink()
    run_cli("train", *tune, "--iterations", "2", "--resume", check=True)
    meta = load_checkpoint(str(tmp_path / "b" / "last.pt"))["meta"]
    assert meta["training"]["iteration"] == 2 and meta["model"]["head"] == "affinity"


def test_train_bad_input(sample_h5, tmp_path):
    h5 = sample_h5
    with h5py.File(tmp_path / "short.h5", "w") as f:
        f["ids"] = np.ones((8, 64, 96), dtype=np.uint16)
    with h5py.File(h5) as f, h5py.File(tmp_path / "wide.h5", "w") as g:
        g["raw"] = f["raw"][...].astype(np.uint16) * 200
    assert_one_line_error(  # the way to uint8 named, as infer's refusal does
        cli_here("train", "--image", f"{tmp_path / 'wide.h5'}:/raw", "--labels", f"{h5}:/ids",
                 "--out", tmp_path / "o", "--resolution", "4,4,50", "--train-sections", "0:6"),
        "is uint16", "--to-uint8")
    args = ["train", "--image", f"{h5}:/raw", "--out", tmp_path / "o", "--resolution", "4,4,50",
            "--iterations", "2", "--patch-size", "32"]
    assert_one_line_error(
        run_cli(*args, "--labels", f"{tmp_path / 'short.h5'}:/ids", "--train-sections", "0:6"),
        "differ in shape",
    )
    assert_one_line_error(
        cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:60"), "outside",
        "counted from its first",  # not a layer's z offset, as --bounds elsewhere
    )
    assert_one_line_error(
        cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0-6"), "malformed"
    )
    assert_one_line_error(
        cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:6",
                "--val-sections", "5:8"), "overlap"
    )
    assert_one_line_error(  # the model reads 5 sections, its affinity target 1 more each side
        cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:3", "--head",
                 "affinity"), "--train-sections 0:3 holds 3 sections, too short for the "
        "5-section model and its affinity head's z neighbour: give at least 4")
    assert_one_line_error(
        cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:6", "--val-sections",
                 "6:8"), "--val-sections 6:8 holds 2 sections, too short for the 5-section "
        "model: give at least 3")
    assert_one_line_error(
        cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:6", "--preset", "huge"),
        "preset",
    )
    assert_one_line_error(
        cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:6", "--init",
                tmp_path / "missing.pt"), "no checkpoint at",
    )
    assert_one_line_error(  # the shipped default is the small preset, not tiny
        cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:6", "--init",
                "isbi2012-small-affinity", "--preset", "tiny"),
        "--init isbi2012-small-affinity holds",
    )
    assert_one_line_error(
        cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:6", "--patch-size",
                "16", "--batch-size", "1"), "one value per channel",
    )
    shipped = torch.load(ROOT / "deepem3d/models/pretrained/isbi2012-small.pt", weights_only=True)
    meta = json.loads(shipped["meta"])
    meta["model"]["in_sections"] = "five"  # a hand-edited checkpoint
    torch.save({**shipped, "meta": json.dumps(meta)}, tmp_path / "edited.pt")
    assert_one_line_error(
        cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:6", "--init",
                 tmp_path / "edited.pt"), "edited.pt records the network's in_sections as "
        "'five', which no deepem3d network has (one of 1, 3, 5): give --in-sections",
    )
    layer = tmp_path / "image"  # checkpoints written into an input layer's folder
    run_cli("ingest", f"{h5}:/raw", layer, "--resolution", "4,4,50", check=True)
    assert_one_line_error(
        cli_here("train", "--image", layer, "--labels", f"{h5}:/ids", "--train-sections", "0:6",
                "--out", layer / "run"), "--out", "overlaps the image layer")
    assert_one_line_error(  # the model would refuse the layer it was trained on
        cli_here("train", "--image", layer, "--labels", f"{h5}:/ids", "--train-sections", "0:6",
                 "--out", tmp_path / "o", "--resolution", "8,8,40"),
        "--resolution 8,8,40 nm contradicts the image layer", "which is 4,4,50 nm")
    assert_one_line_error(
        cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:6", "--lr", "nan"),
        "--lr 'nan' must be a finite number",
    )
    with h5py.File(h5, "r") as f:
        shape = f["ids"].shape
    with h5py.File(tmp_path / "signed.h5", "w") as f:
        f["ids"] = np.full(shape, -3, dtype=np.int32)
    assert_one_line_error(
        cli_here(*args, "--labels", f"{tmp_path / 'signed.h5'}:/ids", "--train-sections", "0:6"),
        "hold negative ids (min -3)",
    )
    assert_one_line_error(
        cli_here(*args, "--labels", f"{h5}:/raw", "--train-sections", "0:6"),
        "--labels is the image",
    )
    with h5py.File(tmp_path / "zero.h5", "w") as f:  # segments in 0..5, none in 6..9
        f["ids"] = np.where(np.arange(shape[0])[:, None, None] < 6, 7, 0) * np.ones(
            shape, np.uint16)
        f["other"] = f["ids"][:]
        f["other"].attrs["resolution"] = (40.0, 8.0, 8.0)
        f["raw"] = np.zeros(shape, np.uint8)
        f["raw"].attrs["resolution"] = (50.0, 4.0, 4.0)
    zero = tmp_path / "zero.h5"
    assert_one_line_error(
        cli_here(*args, "--labels", f"{zero}:/ids", "--train-sections", "0:6",
                 "--val-sections", "6:10"), "are all 0 (background) in --val-sections 6:10")
    assert_one_line_error(
        cli_here(*args[:2], f"{zero}:/raw", *args[3:], "--labels", f"{zero}:/other",
                 "--train-sections", "0:6"), "differ in voxel size: 4,4,50 vs 8,8,40 nm")
    assert_one_line_error(cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:6",
                                   "--out", "gs://bucket/run"), "written to a local folder")
    assert_one_line_error(cli_here(*args, "--labels", f"{h5}:/ids", "--train-sections", "0:6",
                                   "--seed", "-1"), "--seed")
    assert not (tmp_path / "o").exists()
    slices = tmp_path / "slices"  # checkpoints written into the input's TIFF folder
    slices.mkdir()
    for z in range(shape[0]):
        tifffile.imwrite(slices / f"z{z}.tif", np.zeros(shape[1:], np.uint8))
    assert_one_line_error(
        cli_here(*args[:2], slices, *args[3:4], slices / "run", *args[5:],
                 "--labels", f"{h5}:/ids", "--train-sections", "0:6"), "overlaps the image")
    assert sorted(p.name for p in slices.iterdir()) == [f"z{z}.tif" for z in sorted(
        range(shape[0]), key=str)]


def test_the_readme_synopsis_names_every_train_option():
    """The README's `deepem3d train` line left out --val-every."""
    from deepem3d.cli.train import train

    readme = (ROOT / "README.md").read_text()
    synopsis = readme[readme.index("deepem3d train --image SRC"):]
    synopsis = synopsis[:synopsis.index("train (or fine-tune)")]
    options = {o for p in train.params for o in p.opts if o.startswith("--")}
    assert [o for o in sorted(options) if o not in synopsis] == []


def test_corrupted_and_incompatible_checkpoints(tmp_path):
    model = build_model("tiny")
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, {"model": model.config})
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(InputError, match="not a readable deepem3d checkpoint"):
        load_checkpoint(str(corrupted))
    payload = torch.load(good, weights_only=True)
    payload["version"] = 99
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    with pytest.raises(InputError, match="format 99"):
        load_checkpoint(str(old))
    with pytest.raises(InputError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    text = tmp_path / "info"
    text.write_text('{"type": "image"}')
    with pytest.raises(InputError, match="not a file torch.save wrote"):
        load_checkpoint(str(text))
    pickled = tmp_path / "module.pt"
    torch.save(model, pickled)  # the whole module: classes weights_only refuses to load
    with pytest.raises(InputError, match="holds objects besides tensors") as err:
        load_checkpoint(str(pickled))
    assert "weights_only" not in str(err.value)
    for name, change in (("no-model", lambda p: p.update(meta="{}")),
                         ("not-json", lambda p: p.update(meta="{model")),
                         ("no-weights", lambda p: p.pop("state_dict"))):
        payload = torch.load(good, weights_only=True)
        change(payload)
        torch.save(payload, tmp_path / f"{name}.pt")
        with pytest.raises(InputError, match="records no network settings or weights"):
            load_checkpoint(str(tmp_path / f"{name}.pt"))
    payload = torch.load(good, weights_only=True)
    payload["state_dict"].pop(next(iter(payload["state_dict"])))
    torch.save(payload, tmp_path / "missing-key.pt")
    with pytest.raises(InputError, match="weights do not fit"):
        load_model(str(tmp_path / "missing-key.pt"))


def test_a_damaged_checkpoint_is_refused_not_loaded(tmp_path):
    """torch checks no checksum: a checkpoint with changed bytes in a tensor's record loaded
    other weights without a word, and a truncated one was refused in torch's internal words,
    cut mid-sentence. Both are one line that says the file is damaged."""
    model = build_model("tiny")
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, {"model": model.config})
    data = good.read_bytes()
    load_model(str(good))
    largest = max(model.state_dict().values(), key=torch.Tensor.numel).numpy().tobytes()
    where = data.index(largest[:256]) + len(largest) // 2  # inside the record, not its header
    changed = tmp_path / "changed.pt"
    changed.write_bytes(data[:where] + bytes(64) + data[where + 64:])
    with pytest.raises(InputError, match=r"changed.pt is not a readable deepem3d checkpoint "
                       r"\(damaged: its record .* fails its checksum\)$"):
        load_model(str(changed))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match=r"\(truncated or damaged: not a whole zip archive "
                       r"\(an interrupted copy\?\)\)$"):
        load_checkpoint(str(truncated))


def test_a_checkpoint_without_an_iteration_exports(tmp_path):
    model = build_model("tiny")
    save_checkpoint(tmp_path / "last.pt", model, {"model": model.config})
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    del payload["iteration"]  # as a checkpoint saved by other code may be
    torch.save(payload, tmp_path / "other.pt")
    export_checkpoint(str(tmp_path / "other.pt"), tmp_path / "model.pt")
    exported = load_checkpoint(str(tmp_path / "model.pt"))
    assert "iteration" not in exported and exported["meta"]["model"] == model.config


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail] unexpected pos 704 vs 598")])
def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch, failure):
    """A full disk (Python's OSError, or torch's writer's RuntimeError) while saving or
    exporting: the old file stays whole, no temp file stays beside it, and the error is one
    line (export_checkpoint wrote in place: a truncated model.pt)."""
    model = build_model("tiny")
    save_checkpoint(tmp_path / "last.pt", model, {"model": model.config})
    export_checkpoint(str(tmp_path / "last.pt"), tmp_path / "model.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(payload, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 truncated")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(InputError, match=r"cannot write .*model\.pt: .* free in "):
        export_checkpoint(str(tmp_path / "last.pt"), tmp_path / "model.pt")
    with pytest.raises(InputError, match=r"cannot write .*last\.pt: "):
        save_checkpoint(tmp_path / "last.pt", model, {"model": model.config})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_full_disk_after_the_checkpoints_is_one_line_error(sample_h5, tmp_path,
                                                             monkeypatch):
    """history.json and the learning curve are written after the checkpoints: a full disk
    there is the same one-line error, not a traceback."""
    import deepem3d.models.train as train_module

    def full_disk(history, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(train_module, "plot_learning_curve", full_disk)
    with pytest.raises(InputError, match=r"cannot write .*\.png: No space left on device "
                                         r"\(.* free in "):
        Trainer(config(sample_h5, tmp_path, iterations=1), progress=False).run()


def test_training_on_a_full_disk_is_one_line_error(sample_h5, tmp_path):
    """`deepem3d train` whose first checkpoint does not fit (a file size limit stands in for
    a full disk): one line, exit 2, and no partial best.pt left."""
    import resource
    import signal

    def small_files() -> None:  # writes past 64 KiB fail (EFBIG) rather than kill the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    result = subprocess.run(
        [sys.executable, "-m", "deepem3d", "train", "--image", f"{sample_h5}:/raw",
         "--labels", f"{sample_h5}:/ids", "--train-sections", "0:6", "--resolution", "4,4,50",
         "--iterations", "1", "--patch-size", "32", "--batch-size", "2", "--threads", "1",
         "--out", tmp_path / "o"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, preexec_fn=small_files)
    bars = [line for line in result.stderr.splitlines() if line.startswith("training:")]
    result.stderr = "\n".join(line for line in result.stderr.splitlines() if line not in bars)
    assert_one_line_error(result, f"cannot write {tmp_path / 'o' / 'best.pt'}: ")
    assert list((tmp_path / "o").iterdir()) == []


@pytest.mark.parametrize("batches", ["0", "-3"])
def test_averaging_refuses_no_batches_for_batchnorm(sample_h5, tmp_path, batches):
    """scripts/average_checkpoints.py --batches 0 wrote BatchNorm statistics reset to mean 0,
    variance 1 (none estimated): refused before anything is read or written."""
    model = build_model("tiny")
    save_checkpoint(tmp_path / "a.pt", model, {"model": model.config, "training": {
        "config": {"patch": 32, "batch_size": 2}}})
    result = subprocess.run(
        [sys.executable, ROOT / "scripts" / "average_checkpoints.py", tmp_path / "avg.pt",
         tmp_path / "a.pt", "--image", f"{sample_h5}:/raw", "--labels", f"{sample_h5}:/ids",
         "--train-sections", "0:6", "--batches", batches],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and f"--batches: {batches}: at least 1" in result.stderr
    assert not (tmp_path / "avg.pt").exists()


def test_history_and_curve_are_whole_and_a_resume_restores_them(sample_h5, tmp_path,
                                                                 monkeypatch):
    """history.json and learning_curve.png are written beside and renamed: a write that fails
    midway leaves the previous files whole. A run stopped after its last last.pt, before
    these, left them cut or absent, and --resume (with nothing left to train) restored
    nothing: it now writes those of its last.pt."""
    import deepem3d.models.train as train_module

    Trainer(config(sample_h5, tmp_path, iterations=2, val_every=1), progress=False).run()
    whole = (tmp_path / "history.json").read_text()
    (tmp_path / "history.json").write_text(whole[:20])  # cut mid-write
    whole = json.loads(whole)
    (tmp_path / "learning_curve.png").unlink()
    Trainer(config(sample_h5, tmp_path, iterations=2, val_every=1), resume=True,
            progress=False).run()
    assert json.loads((tmp_path / "history.json").read_text()) == whole
    assert (tmp_path / "learning_curve.png").read_bytes().startswith(b"\x89PNG")

    def cut(history, path):
        path.write_bytes(b"\x89PNG cut")
        raise KeyboardInterrupt  # stopped mid-write

    curve = (tmp_path / "learning_curve.png").read_bytes()
    monkeypatch.setattr(train_module, "plot_learning_curve", cut)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(sample_h5, tmp_path, iterations=3, val_every=1), resume=True,
                progress=False).run()
    assert (tmp_path / "learning_curve.png").read_bytes() == curve
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "history.json", "last.pt", "learning_curve.png"]


def test_checkpoints_without_a_network_key_or_a_run_are_one_line(sample_h5, tmp_path):
    """An --init whose network settings lack a key (here the head), and a last.pt that
    records no training run (a model saved by hand): one line, not a KeyError."""
    model = build_model("tiny")
    save_checkpoint(tmp_path / "nohead.pt", model, {"model": {"preset": "tiny"}})
    common = ("--image", f"{sample_h5}:/raw", "--labels", f"{sample_h5}:/ids",
              "--train-sections", "0:6", "--resolution", "4,4,50", "--iterations", "1",
              "--patch-size", "32", "--batch-size", "2", "--threads", "1")
    assert_one_line_error(cli_here("train", *common, "--init", tmp_path / "nohead.pt",
                                   "--out", tmp_path / "a"), "nohead.pt holds a")
    save_checkpoint(tmp_path / "b" / "last.pt", model, {"model": model.config})
    assert_one_line_error(cli_here("train", *common, "--resume", "--out", tmp_path / "b"),
                          "records no training run")


def test_a_resumed_runs_seconds_go_on_from_its_last_record(sample_h5, tmp_path):
    """history.json's seconds are the run's training time: a resumed run's records count on
    from its last.pt's last one (they restarted at 0, so the time axis went back)."""
    Trainer(config(sample_h5, tmp_path, iterations=1), progress=False).run()
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    meta = json.loads(payload["meta"])
    meta["training"]["history"][-1]["seconds"] = 1000.0  # an hour-long first part
    payload["meta"] = json.dumps(meta, sort_keys=True)
    torch.save(payload, tmp_path / "last.pt")
    Trainer(config(sample_h5, tmp_path, iterations=2, val_every=1), resume=True,
            progress=False).run()
    seconds = [h["seconds"] for h in json.loads((tmp_path / "history.json").read_text())]
    assert seconds[0] == 1000.0 and 1000.0 <= seconds[1] < 1100, seconds
