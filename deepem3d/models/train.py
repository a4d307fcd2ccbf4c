"""Training DeepEM3D: SGD with momentum, poly learning rate, class-balanced loss, augmentation.

The run is a function of its configuration: the batch of iteration i is drawn from
`np.random.default_rng([seed, i])`, so a run resumed from its last checkpoint continues
exactly as if it had never stopped (on the same device and thread count). That is also why
batches can be prepared by `workers` processes ahead of the step (a DataLoader over iteration
numbers, pinned for the GPU): worker w draws batch i from the same generator the training
process would, so the batches, and the run, do not depend on the number of workers.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import deepem3d
from deepem3d.axes import xyzc_from_czyx, zyx_from_xyz
from deepem3d.errors import InputError, warn
from deepem3d.models.checkpoint import (
    absolute_location,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from deepem3d.models.data import PatchSampler, absolute_source, load_pair, real_source
from deepem3d.models.losses import loss_for
from deepem3d.models.predict import predict_sections
from deepem3d.storage.paths import write_whole
from deepem3d.units import format_triple

LAST, BEST, HISTORY, CURVE = "last.pt", "best.pt", "history.json", "learning_curve.png"
OUTPUTS = (LAST, BEST, HISTORY, CURVE)  # what a run writes in its folder


@dataclass
class TrainConfig:
    image: str
    labels: str
    train_sections: tuple[int, int]
    val_sections: tuple[int, int] | None
    out_dir: str
    preset: str = "tiny"
    head: str = "boundary"
    in_sections: int = 5
    iterations: int = 2000
    batch_size: int = 4
    patch: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.8
    seed: int = 0
    val_every: int = 200
    resolution: tuple[float, float, float] = (4.0, 4.0, 50.0)
    threads: int | None = None
    init: str | None = None  # a checkpoint whose weights start the run (fine-tuning)
    workers: int = 0  # processes preparing batches ahead of the step (0: the step's own)

    def __post_init__(self) -> None:
        # recorded in the checkpoint: a relative path names nothing once it is read elsewhere
        self.image, self.labels = absolute_source(self.image), absolute_source(self.labels)
        self.init = absolute_location(self.init) if self.init else self.init

    def run_identity(self) -> dict:
        """What must match for a resume to continue the same run."""
        d = asdict(self)
        for k in ("out_dir", "iterations", "val_every", "threads", "workers"):
            d.pop(k)
        return json.loads(json.dumps(d))


#: run_identity's keys that are no option of `deepem3d train` (the rest are, `--` + dashes)
NOT_OPTIONS = {"momentum", "weight_decay", "power"}


def comparable_identity(identity: dict) -> dict:
    """A run's identity with each path spelled one way, links resolved, so that a resume
    compares places, not spellings (relative, file://, a link; a relative path recorded before
    paths were recorded absolute is read from the folder the resume runs in)."""
    d = dict(identity)
    for key in ("image", "labels"):
        if isinstance(d.get(key), str):
            d[key] = real_source(d[key])
    if isinstance(d.get("init"), str):
        init = absolute_location(d["init"])
        d["init"] = os.path.realpath(init) if os.path.isabs(init) else init
    return d


def identity_differences(recorded: dict, given: dict) -> list[str]:
    """Where two run identities differ, as `--lr 0.01, given 0.5` (the option, what the run
    recorded, what was given), in the order of the options."""
    a, b = comparable_identity(recorded), comparable_identity(given)

    def show(key: str, value: object) -> str:
        if value is None:
            return "none"
        if key.endswith("_sections") and isinstance(value, list | tuple) and len(value) == 2:
            return f"{value[0]}:{value[1]}"
        if key == "resolution" and isinstance(value, list | tuple) and len(value) == 3:
            return format_triple(value)
        return str(value)

    differences = []
    for key in [*given, *(k for k in recorded if k not in given)]:
        if a.get(key) != b.get(key):
            name = key if key in NOT_OPTIONS else "--patch-size" if key == "patch" else \
                "--" + key.replace("_", "-")
            differences.append(f"{name} {show(key, recorded.get(key))}, given "
                               f"{show(key, given.get(key))}")
    return differences


def _sections(option: str, sections: tuple[int, int]) -> str:
    return f"{option} {sections[0]}:{sections[1]}"


def poly_lr(base: float, iteration: int, total: int, power: float) -> float:
    return base * (1 - iteration / total) ** power


# How validation segments each head's map: the settings the shipped models use (chosen on
# ISBI 2012's validation sections), so the curve tracks what users will get.
VALIDATION_SEGMENTATION = {
    "boundary": {"method": "watershed", "threshold": 0.1, "sigma": 1.0, "dust_size": 0},
    "affinity": {"method": "mean", "threshold": 0.55, "sigma": 5.0, "dust_size": 0},
}


def segment_for_validation(probabilities: np.ndarray, head: str = "boundary") -> np.ndarray:
    """Segment a map in one piece with deepem3d's segmentation to score validation with:
    a boundary map (z,y,x) or affinities (3,z,y,x, channels x,y,z); returns z,y,x ids."""
    from deepem3d.models.sliding import quantize
    from deepem3d.segmentation.pipeline import segment

    maps = probabilities[None] if head == "boundary" else probabilities  # c,z,y,x
    values = xyzc_from_czyx(quantize(maps))
    settings = VALIDATION_SEGMENTATION[head]
    seg = segment(np.asfortranarray(values), settings["method"], settings["threshold"],
                  sigma=settings["sigma"], dust_size=settings["dust_size"])
    return np.ascontiguousarray(zyx_from_xyz(seg))


class IterationBatches(torch.utils.data.Dataset):
    """Batch i of a run, drawn from (seed, i) alone: what a DataLoader's workers prepare."""

    def __init__(self, sampler: PatchSampler, seed: int, batch_size: int, total: int):
        self.sampler, self.seed, self.batch_size, self.total = sampler, seed, batch_size, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, iteration])
        images, targets = self.sampler.batch(rng, self.batch_size)
        return torch.from_numpy(images), torch.from_numpy(targets)


def default_workers(device: str | None) -> int:
    """Batch-preparing processes for `--device`: on a GPU one per core but one (at most 8:
    the full preset's step on an H200 needs about 6 at 16 x 256^2, docs/gpu.md); on the CPU
    none, since the step's own threads use the cores."""
    if _device(device).type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _device(name: str | None) -> torch.device:
    """`deepem3d train --device`: auto (or None: CUDA when present), cpu or cuda."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}, but this machine has no CUDA device")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, device: str | None = None,
                 progress: bool = True):
        from deepem3d.models import build_model

        self.cfg = cfg
        self.progress = progress
        self.device = _device(device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.iterations < 1:
            raise InputError("--iterations must be at least 1")
        self.out = Path(cfg.out_dir)
        resuming = self._check_out(resume)
        image, ids = load_pair(cfg.image, cfg.labels, cfg.train_sections, "--train-sections")
        self.sampler = PatchSampler(image, ids, in_sections=cfg.in_sections, patch=cfg.patch,
                                    head=cfg.head, name=_sections("--train-sections",
                                                                  cfg.train_sections))
        self.val = None
        if cfg.val_sections:
            self.val = load_pair(cfg.image, cfg.labels, cfg.val_sections, "--val-sections")
            val_sampler = PatchSampler(*self.val, in_sections=cfg.in_sections, patch=cfg.patch,
                                       head=cfg.head, augment=False,
                                       name=_sections("--val-sections", cfg.val_sections))
            self.val_batch = val_sampler.batch(np.random.default_rng([cfg.seed, 2**31]), 8)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.preset, head=cfg.head, in_sections=cfg.in_sections)
        # a resumed run keeps the sha256 its start recorded (a shipped name may since hold others)
        self.init_sha256 = self._load_init(cfg.init) if cfg.init and not resuming else None
        self.model.to(self.device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        self.loss_fn = loss_for(cfg.head)
        self.iteration = 0
        self.history: list[dict] = []
        self.best = math.inf
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        if resuming:
            self._resume(self.out / LAST)

    def _check_out(self, resume: bool) -> bool:
        """Whether this run continues the one in OUT. One rule: a run writes over OUT's files
        only when it continues the run that wrote them (--resume), and never over its --init
        (fine-tuning from OUT/best.pt replaced the model it started from)."""
        init = self.cfg.init
        if init and os.path.isabs(init):  # a local file (absolute_location)
            for name in OUTPUTS:
                if os.path.realpath(init) == os.path.realpath(self.out / name):
                    raise InputError(f"--init {init} is a file this run writes in {self.out}: "
                                     "give a copy of it elsewhere, or choose another --out")
        held = [name for name in OUTPUTS if (self.out / name).exists()]
        if LAST in held:
            if not resume:
                raise InputError(f"{self.out} already holds a training run: pass --resume to "
                                 "continue it, or choose another --out")
            return True
        if held and not (resume and held == [BEST] and self._stopped_before_last()):
            raise InputError(f"{self.out} already holds {', '.join(held)} and no {LAST} to "
                             "resume from: choose another --out, or move them away")
        return False

    def _stopped_before_last(self) -> bool:
        """Whether OUT/best.pt alone is this run's own, stopped between its first best.pt and
        last.pt (`save` writes best.pt first): --resume then starts over and writes it again."""
        try:
            recorded = load_checkpoint(str(self.out / BEST))["meta"]["training"]["config"]
        except (InputError, KeyError, TypeError):
            return False
        return not identity_differences(recorded, self.cfg.run_identity())

    def _load_init(self, name_or_path: str) -> str:
        """Start from another checkpoint's weights (a fresh optimizer and schedule): the
        network it holds must be the one this run trains."""
        payload = load_checkpoint(name_or_path)
        theirs = {k: payload["meta"]["model"].get(k) for k in ("preset", "head", "in_sections")}
        ours = {k: self.model.config[k] for k in theirs}
        if theirs != ours:
            raise InputError(
                f"--init {name_or_path} holds a {theirs} network, not {ours}: "
                "give the same --preset, --head and --in-sections"
            )
        load_weights(self.model, payload)  # float16 weights copy in as float32
        return payload["sha256"]

    def _resume(self, path: Path) -> None:
        payload = load_checkpoint(str(path))
        meta = payload["meta"]
        training = meta.get("training")
        if not (isinstance(training, dict) and isinstance(training.get("config"), dict)
                and isinstance(training.get("history"), list)):
            raise InputError(f"{path} records no training run (its settings and history): a "
                             "run resumes from the last.pt it wrote")
        differences = identity_differences(training["config"], self.cfg.run_identity())
        if differences:
            raise InputError(f"{path} was trained with other settings ({'; '.join(differences)})"
                             ": resume with the same ones, or choose another --out")
        if "optimizer" not in payload:
            raise InputError(f"{path} holds no optimizer state (a best.pt or an exported "
                             "checkpoint): a run resumes from the last.pt it wrote")
        load_weights(self.model, payload)
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scaler is not None and "scaler" in payload:
            self.scaler.load_state_dict(payload["scaler"])
        self.iteration = payload["iteration"]
        if self.iteration > self.cfg.iterations:  # it would end at once, doing nothing
            raise InputError(f"the run in {self.out} is at iteration {self.iteration}, past "
                             f"--iterations {self.cfg.iterations}: give more to train on, or "
                             "choose another --out")
        self.history = training["history"]
        self.init_sha256 = training.get("init_sha256")
        self.best = min(
            (h["val_are"] for h in self.history if h.get("val_are") is not None),
            default=math.inf,
        )
        if self.best < math.inf and not (self.out / BEST).exists():
            # deleted or lost: it was only written on a better score, so it stayed absent
            at = min((h for h in self.history if h.get("val_are") is not None),
                     key=lambda h: h["val_are"])["iteration"]
            warn(f"{self.out / BEST} is gone (the best validation so far, adapted Rand error "
                 f"{self.best:.4f} at iteration {at}): the next validation writes it, the "
                 "best from here on")
            self.best = math.inf

    def meta(self) -> dict:
        return {
            "model": self.model.config,
            "normalization": {"mean": self.model.config["input_mean"],
                              "std": self.model.config["input_std"]},
            "context": list(self.model.context),
            "divisor": self.model.divisor,
            "resolution": list(self.cfg.resolution),
            "training": {
                "config": self.cfg.run_identity(),
                "iteration": self.iteration,
                "history": self.history,
                "by": f"deepem3d {deepem3d.__version__}",
                "host": socket.gethostname(),
                "device": str(self.device),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "init_sha256": self.init_sha256,
            },
        }

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, targets) for iterations self.iteration .. cfg.iterations - 1, in order:
        prepared by cfg.workers processes (pinned for a GPU), or here when it is 0."""
        cfg = self.cfg
        data = IterationBatches(self.sampler, cfg.seed, cfg.batch_size, cfg.iterations)
        loader = torch.utils.data.DataLoader(
            data, batch_size=None, sampler=range(self.iteration, cfg.iterations),
            num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if cfg.workers else None,
        )
        return iter(loader)

    def step(self, images: torch.Tensor | None = None, targets: torch.Tensor | None = None
             ) -> float:
        """One SGD step on the given batch (by default this iteration's, drawn here)."""
        cfg = self.cfg
        if images is None or targets is None:
            images, targets = IterationBatches(self.sampler, cfg.seed, cfg.batch_size,
                                               cfg.iterations)[self.iteration]
        x = self.model.normalize(images.to(self.device, non_blocking=True))
        t = targets.to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = poly_lr(cfg.lr, self.iteration, cfg.iterations, cfg.power)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.amp:
            with torch.autocast("cuda", dtype=torch.float16):
                logits = self.model(x)
            loss = self.loss_fn(logits.float(), t)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss = self.loss_fn(self.model(x), t)
            loss.backward()
            self.optimizer.step()
        self.iteration += 1
        return float(loss.detach())

    @torch.no_grad()
    def validate(self) -> dict:
        from deepem3d.segmentation.metrics import evaluate

        self.model.eval()
        images, targets = self.val_batch
        x = self.model.normalize(torch.from_numpy(images).to(self.device))
        loss = float(self.loss_fn(self.model(x), torch.from_numpy(targets).to(self.device)))
        image, ids = self.val
        probs = predict_sections(self.model, image, device=self.device)
        scores = evaluate(segment_for_validation(probs, self.cfg.head), ids.astype(np.uint64))
        return {"val_loss": loss, "val_are": scores["adapted_rand_error"],
                "val_voi": scores["voi"]}

    def run(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        # resumed: write the history last.pt holds first (a run stopped between its last.pt and
        # these left them stale or absent, and one stopped at its end would never rewrite them)
        if self.history:
            self.write_history()
        # a record's seconds count the run's training time, a resumed run's from its last record's
        start = time.time() - (self.history[-1].get("seconds", 0.0) if self.history else 0.0)
        losses: list[float] = []
        # closed however the loop ends, so that an error is a line of its own, not the bar's
        with tqdm(total=cfg.iterations, initial=self.iteration, desc="training",
                  disable=not self.progress, dynamic_ncols=True) as bar:
            for images, targets in self.batches():
                losses.append(self.step(images, targets))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if self.iteration % cfg.val_every == 0 or self.iteration == cfg.iterations:
                    record = {"iteration": self.iteration, "train_loss": float(np.mean(losses)),
                              "seconds": round(time.time() - start, 1)}
                    losses = []
                    if self.val is not None:
                        record.update(self.validate())
                        bar.write(
                            f"iteration {self.iteration}: train loss "
                            f"{record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
                            f"val adapted Rand error {record['val_are']:.4f}"
                        )
                    self.history.append(record)
                    self.save(record)
        return self.history[-1] if self.history else {}

    def save(self, record: dict) -> None:
        """best.pt first, then last.pt: a run stopped between them resumes from the last.pt
        before, and writes best.pt again (the other way, it would keep a stale best.pt)."""
        meta = self.meta()
        are = record.get("val_are")
        if are is None or are <= self.best:
            self.best = are if are is not None else self.best
            save_checkpoint(self.out / BEST, self.model, meta, iteration=self.iteration)
        save_checkpoint(self.out / LAST, self.model, meta, optimizer=self.optimizer,
                        iteration=self.iteration, scaler=self.scaler)
        self.write_history()

    def write_history(self) -> None:
        """history.json and the learning curve, each whole (`write_whole`)."""
        write_whole(self.out / HISTORY,
                    lambda path: path.write_text(json.dumps(self.history, indent=1)), shared=True)
        write_whole(self.out / CURVE, lambda path: plot_learning_curve(self.history, path),
                    shared=True)


def plot_learning_curve(history: list[dict], path: Path) -> None:
    """Training and validation loss, and validation adapted Rand error, by iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(its, [h["train_loss"] for h in history], label="training loss")
    if any("val_loss" in h for h in history):
        ax.plot(its, [h.get("val_loss") for h in history], label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("class-balanced loss")
    if any("val_are" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(its, [h.get("val_are") for h in history], "g--", label="val adapted Rand error")
        ax2.set_ylabel("adapted Rand error")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")  # PATH may be a partial file's name
    plt.close(fig)
