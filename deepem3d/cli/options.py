"""Options shared by several commands, spelled the same way everywhere (as igneous does)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from deepem3d.axes import LARGEST_COORDINATE
from deepem3d.units import parse_bytes


class OptionValueError(click.BadParameter):
    """A malformed option value; the message names the option itself, so it is printed as is
    (main turns it into one `deepem3d: error: ...` line, exit status 2)."""

    def format_message(self) -> str:
        return self.message


def _option_name(param: click.Parameter | None) -> str:
    """The option as a user spells it: '--task-shape'."""
    if param is None:
        return "value"
    long = [opt for opt in getattr(param, "opts", ()) if opt.startswith("--")]
    return long[0] if long else (param.name or "value")


def _parts(value: object) -> tuple[str, list]:
    """('4,4,50', ['4', '4', '50']) from text, or from a tuple given as a default."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)), list(value)
    text = str(value)
    return text, [p.strip() for p in text.split(",")]


def _check_coordinates(name: str, text: str, values, ctx, param) -> None:
    if any(abs(v) > LARGEST_COORDINATE for v in values):
        raise OptionValueError(f"{name} {text!r}: voxel coordinates and sizes are at most "
                               f"{LARGEST_COORDINATE:,}", ctx=ctx, param=param)


class Triple(click.ParamType):
    """x,y,z as a tuple of three numbers: `Triple(int)` for voxel shapes, sizes and factors,
    `Triple(float)` for resolutions in nm. Positive on every axis unless `positive=False`."""

    def __init__(self, kind: type = float, *, positive: bool = True, example: str | None = None):
        if kind not in (int, float):
            raise TypeError(f"Triple kind must be int or float, not {kind!r}")
        self.kind = kind
        self.positive = positive
        self.example = example or ("4,4,50" if kind is float else "128,128,16")
        self.name = "x,y,z"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "X,Y,Z"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple:
        text, parts = _parts(value)
        name = _option_name(param)
        try:
            if len(parts) != 3 or any(isinstance(p, bool) for p in parts):
                raise ValueError
            if self.kind is int and any(isinstance(p, float) and not p.is_integer()
                                        for p in parts):
                raise ValueError  # a default of 2.5 where an integer is meant
            values = tuple(self.kind(p) for p in parts)
            if not all(math.isfinite(v) for v in values):
                raise ValueError
        except (TypeError, ValueError):
            raise OptionValueError(
                f"malformed {name} {text!r}: expected three comma-separated "
                f"{'numbers' if self.kind is float else 'integers'} x,y,z such as "
                f"{self.example}", ctx=ctx, param=param,
            ) from None
        if self.positive and any(v <= 0 for v in values):
            raise OptionValueError(
                f"{name} {text!r} must be positive on every axis (e.g. {self.example})",
                ctx=ctx, param=param,
            )
        if self.kind is int:
            _check_coordinates(name, text, values, ctx, param)
        return values

    def __repr__(self) -> str:
        return f"Triple({self.kind.__name__})"


class Bounds(click.ParamType):
    """x0,y0,z0,x1,y1,z1 (voxels, end exclusive) as ((x0, y0, z0), (x1, y1, z1))."""

    name = "x0,y0,z0,x1,y1,z1"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "X0,Y0,Z0,X1,Y1,Z1"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None
                ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        if (isinstance(value, tuple) and len(value) == 2
                and all(isinstance(v, tuple) and len(v) == 3 for v in value)):
            value = (*value[0], *value[1])  # already converted: check it again
        text, parts = _parts(value)
        name = _option_name(param)
        try:
            if len(parts) != 6 or any(isinstance(p, (bool, float)) for p in parts):
                raise ValueError
            values = [int(p) for p in parts]
        except (TypeError, ValueError):
            raise OptionValueError(
                f"malformed {name} {text!r}: expected six integers x0,y0,z0,x1,y1,z1 "
                "(voxels, end exclusive) such as 0,0,0,512,512,30", ctx=ctx, param=param,
            ) from None
        _check_coordinates(name, text, values, ctx, param)
        lo, hi = tuple(values[:3]), tuple(values[3:])
        if any(h <= low for low, h in zip(lo, hi)):
            raise OptionValueError(
                f"{name} {text!r} is empty: each end must exceed its start "
                "(x0,y0,z0,x1,y1,z1, end exclusive)", ctx=ctx, param=param,
            )
        return lo, hi


class Number(click.FloatRange):
    """A finite float in a range (click's FloatRange lets nan and inf through: every
    comparison with nan is false)."""

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            raise OptionValueError(f"{_option_name(param)} {value!r} must be a finite number",
                                   ctx=ctx, param=param)
        return number


class ByteSize(click.ParamType):
    """A number of bytes: 3500000000, 3.5e9, 3500MB, 3.5GB, 2GiB (KB, MB, GB, TB are powers of
    1000, KiB, MiB, GiB, TiB powers of 1024), as an int, at least `min` bytes."""

    name = "bytes"

    def __init__(self, min: int = 1):  # noqa: A002 (click.IntRange's spelling)
        self.min = min

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "BYTES"

    def convert(self, value: str | int | float, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        name = _option_name(param)
        try:
            size = parse_bytes(value)
        except ValueError:
            raise OptionValueError(
                f"malformed {name} {value!r}: expected bytes such as 3.5e9, 3500MB, "
                "3.5GB or 2GiB", ctx=ctx, param=param,
            ) from None
        if size < self.min:
            raise OptionValueError(
                f"{name} {value!r} must be at least {self.min} B (e.g. 3.5e9 or 3500MB)",
                ctx=ctx, param=param,
            )
        return int(size)


def argparse_type(param_type: click.ParamType, option: str) -> Callable[[str], Any]:
    """The same parsing for a script's argparse option (benchmarks/, scripts/), e.g.
    `parser.add_argument("--task-shape", type=argparse_type(Triple(int), "--task-shape"))`."""
    import argparse

    param = click.Option([option])

    def convert(text: str) -> Any:
        try:
            return param_type.convert(text, param, None)
        except click.BadParameter as err:
            raise argparse.ArgumentTypeError(err.format_message()) from None

    convert.__name__ = param_type.name  # argparse names the type in some messages
    return convert


def not_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Callback refusing an empty value (a path, a name, a range) given to an option whose
    absence means something else: `--mask ''` is a mistake, not `--mask` left out."""
    for item in value if isinstance(value, tuple) else (value,):
        if item is not None and not str(item).strip():
            raise OptionValueError(f"{_option_name(param)} {item!r}: an empty value; give one, "
                                   "or leave the option out", ctx=ctx, param=param)
    return value


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
