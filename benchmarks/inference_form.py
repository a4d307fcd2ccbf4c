"""The CPU inference form against the module as trained: nanoseconds per output pixel of one
forward, side by side in one process; the same form with every side output by bands of rows,
and with every one by a matrix product and col2im per dilation (what the form does below
`_SideByBands.BANDS_FROM` output pixels: these two columns are where that constant comes
from); and the share of the form's time its four
side outputs take (the decoder; `deepem3d/models/inference_form.py` says what the form
changes). The form is also timed as the CPU tasks run it, reusing the pages it frees
(`deepem3d.memory.reusing_freed_memory`), against its plain run: the ratio is what the
allocator setting gives one forward.

    python benchmarks/inference_form.py [--preset tiny] [--head affinity] [--threads 1]
                                        [--shapes 4x512 1x2528] [--repeats 3]

A shape BxS is a batch of B stacks of S x S pixels (5 sections for a 5-section model). Best of
`--repeats` forwards after one warm-up, random weights and input (time does not depend on them).
"""

from __future__ import annotations

import argparse
import time

import torch

from deepem3d.memory import reusing_freed_memory
from deepem3d.models import build_model
from deepem3d.models import inference_form as form_module
from deepem3d.models.inference_form import inference_form

SIDES = ("side_2x", "side_4x", "side_8x", "side_16x")


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def side_seconds(form: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds the form's side outputs take in one forward (timed by hooks)."""
    spent = []

    def enter(module, args):
        spent.append(-time.perf_counter())

    def leave(module, args, output):
        spent[-1] += time.perf_counter()

    hooks = [h for name in SIDES for h in (getattr(form, name).register_forward_pre_hook(enter),
                                           getattr(form, name).register_forward_hook(leave))]
    try:
        form(x)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--head", default="affinity", choices=("affinity", "boundary"))
    parser.add_argument("--sections", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", nargs="+", default=["4x512", "1x2528"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.preset, args.head, args.sections).eval()
    form = inference_form(model)
    print(f"{args.preset} preset, {args.head} head, {args.threads} thread(s), torch "
          f"{torch.__version__}")
    print("| batch x size | module as trained (ns/px) | inference form (ns/px) | ratio "
          "| form, freed memory reused (ns/px) | ratio | sides by bands (ns/px) "
          "| sides by col2im (ns/px) | form's side outputs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    bands_from = form_module._SideByBands.BANDS_FROM
    with torch.no_grad():
        for shape in args.shapes:
            batch, size = (int(v) for v in shape.split("x"))
            x = torch.randn(batch, 1, args.sections, size, size)
            pixels = batch * size * size
            trained = best_seconds(lambda: model(x), args.repeats)  # noqa: B023
            fast = best_seconds(lambda: form(x), args.repeats)  # noqa: B023
            with reusing_freed_memory():  # as the CPU tasks run it
                reused = best_seconds(lambda: form(x), args.repeats)  # noqa: B023
            sides = side_seconds(form, x)
            paths = []
            for threshold in (0, 2**62):  # every side by bands, then every one by col2im
                form_module._SideByBands.BANDS_FROM = threshold
                try:
                    paths.append(best_seconds(lambda: form(x), args.repeats))  # noqa: B023
                finally:
                    form_module._SideByBands.BANDS_FROM = bands_from
            print(f"| {shape} | {trained / pixels * 1e9:.0f} | {fast / pixels * 1e9:.0f} | "
                  f"{trained / fast:.2f}x | {reused / pixels * 1e9:.0f} | "
                  f"{fast / reused:.2f}x | {paths[0] / pixels * 1e9:.0f} | "
                  f"{paths[1] / pixels * 1e9:.0f} | {sides / fast:.0%} |", flush=True)


if __name__ == "__main__":
    main()
