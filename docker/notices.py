"""Copy the licence files of every installed distribution to DIR/NAME-VERSION/, and write
DIR/LICENSES.txt: one line per distribution with its licence (the worker images ship these
notices, GPL-3.0 ones included: igneous, kimimaro)."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

LICENCE_NAMES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")


def licence_of(dist: metadata.Distribution) -> str:
    meta = dist.metadata
    expression = meta.get("License-Expression") or meta.get("License") or ""
    if expression and len(expression) < 80:
        return expression.strip()
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                   if c.startswith("License ::")]
    return ", ".join(classifiers) or "see the files copied here"


def main(target: str) -> None:
    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
        name, version = dist.metadata["Name"], dist.version
        folder = out / f"{name}-{version}"
        for file in dist.files or []:
            if Path(file.name).stem.upper().startswith(LICENCE_NAMES):
                source = Path(dist.locate_file(file))
                if source.is_file():
                    folder.mkdir(exist_ok=True)
                    (folder / file.name).write_bytes(source.read_bytes())
        lines.append(f"{name} {version}: {licence_of(dist)}")
    (out / "LICENSES.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
