"""Options shared by several commands, spelled the same way everywhere (as igneous does)."""

from __future__ import annotations

import click

from deepem3d.errors import InputError


def parse_triple(text: str, name: str, kind: type = float) -> tuple:
    """'4,4,50' -> (4.0, 4.0, 50.0); anything else is an InputError naming the option."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 3:
            raise ValueError
        values = tuple(kind(p) for p in parts)
    except ValueError:
        example = "4,4,50" if kind is float else "128,128,16"
        raise InputError(
            f"malformed {name} {text!r}: expected three comma-separated "
            f"{'numbers' if kind is float else 'integers'} x,y,z such as {example}"
        ) from None
    if any(v <= 0 for v in values):
        raise InputError(f"{name} {text!r} must be positive on every axis")
    return values


def parse_bounds(text: str | None) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """'x0,y0,z0,x1,y1,z1' (voxels, end exclusive) -> ((x0,y0,z0), (x1,y1,z1))."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 6:
            raise ValueError
        values = [int(p) for p in parts]
    except ValueError:
        raise InputError(
            f"malformed --bounds {text!r}: expected six integers x0,y0,z0,x1,y1,z1 "
            "(voxels, end exclusive)"
        ) from None
    lo, hi = tuple(values[:3]), tuple(values[3:])
    if any(h <= low for low, h in zip(lo, hi)):
        raise InputError(f"--bounds {text!r} is empty: each end must exceed its start")
    return lo, hi


queue_option = click.option(
    "--queue",
    "queue",
    default=None,
    help="Queue to put the tasks on (fq://DIR or sqs://NAME). Without it, the tasks run "
    "here in --parallel local worker processes.",
)
parallel_option = click.option(
    "--parallel",
    type=click.IntRange(min=0),
    default=None,
    help="Spawn N local worker processes that drain the queue, and wait for the stage "
    "to finish (default: 1 without --queue, 0 with it).",
)
dry_run_option = click.option(
    "--dry-run",
    is_flag=True,
    help="Print how many tasks, their shape and the memory one task needs; create nothing.",
)
