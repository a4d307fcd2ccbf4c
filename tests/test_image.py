"""The worker image, proven as far as a machine without a container engine allows.

The Dockerfile's steps are docker/install.sh (as root) and then, as the runtime user,
`python -m deepem3d.run.kernels` (warm numba's cache). This test runs the same script into a
fresh virtual environment, makes its site-packages read-only (in the image root owns them),
warms the cache as an unprivileged user, then as that user with the image's environment runs
`deepem3d worker --help` and calls every kernel: they must load from the cache, and no cache
file may be written or rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

RUNTIME_UID = 65534  # nobody: a user with no home and no rights here


def usable_by_others(path: str) -> bool:
    """Whether an unprivileged user can run the interpreter at `path` (every folder above
    it searchable)."""
    real = Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in real.parents) and \
        bool(os.stat(real).st_mode & stat.S_IXOTH)


def interpreter() -> str | None:
    for candidate in (sys.executable, shutil.which("python3.11") or "", "/usr/bin/python3.11",
                      "/usr/bin/python3"):
        if candidate and os.path.exists(candidate) and usable_by_others(candidate):
            return candidate
    return None


def as_user(uid: int):
    def switch() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    return switch


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


CHECK = """
import json
from deepem3d.run.kernels import kernels, warm
missed = warm()
found = kernels()
print(json.dumps({"missed": missed,
                  "misses": sum(sum(k._cache_misses.values()) for k in found.values()),
                  "hits": sum(sum(k._cache_hits.values()) for k in found.values()),
                  "count": len(found)}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming an unprivileged user needs root "
                    "(CI runs as root)")
def test_image_install_starts_as_an_unprivileged_user_and_loads_kernels_from_its_cache():
    python = interpreter()
    assert python, "no Python interpreter an unprivileged user can run"
    root = Path(tempfile.mkdtemp(prefix="deepem3d-image-", dir="/tmp"))
    try:
        root.chmod(0o755)
        venv, cache, home = root / "venv", root / "numba-cache", root / "home"
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        home.mkdir()
        os.chown(home, RUNTIME_UID, RUNTIME_UID)
        image_env = {
            "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
            "PYTHONUNBUFFERED": "1", "NUMBA_CACHE_DIR": str(cache), "NUMBA_CPU_NAME": "generic",
            "RUNTIME_UID": str(RUNTIME_UID),
        }
        install = subprocess.run(
            ["sh", str(ROOT / "docker" / "install.sh")], cwd=root, capture_output=True,
            text=True, timeout=900, env={**os.environ, **image_env, "PYTHON": str(venv /
                                         "bin" / "python"), "NOTICES_DIR": str(root / "doc")})
        assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
        for folder in (venv / "lib").rglob("*"):  # root's in the image: read-only to the user
            folder.chmod(folder.stat().st_mode & ~0o222)
        # the licence notices, GPL-3.0 ones among them
        listed = (root / "doc" / "third-party" / "LICENSES.txt").read_text()
        for name in ("igneous", "kimimaro"):
            (line,) = [x for x in listed.splitlines() if x.lower().startswith(name)]
            assert "GPL" in line, line
        assert (root / "doc" / "NOTICE").exists() and (root / "doc" / "LICENSE").exists()

        def run_as_user(*command: str) -> subprocess.CompletedProcess:
            return subprocess.run(list(command), cwd=home, env=image_env, capture_output=True,
                                  text=True, timeout=600, preexec_fn=as_user(RUNTIME_UID))

        warmed = run_as_user(str(venv / "bin" / "python"), "-m", "deepem3d.run.kernels")
        assert warmed.returncode == 0, warmed.stderr[-3000:]
        assert "compiled" in warmed.stdout and str(cache) in warmed.stdout
        before = snapshot(cache)
        assert before and cache.stat().st_uid == RUNTIME_UID

        helped = run_as_user(str(venv / "bin" / "deepem3d"), "worker", "--help")
        assert helped.returncode == 0 and "--allow-prefix" in helped.stdout, helped.stderr
        checked = run_as_user(str(venv / "bin" / "python"), "-c", CHECK)
        assert checked.returncode == 0, checked.stderr[-3000:]
        result = json.loads(checked.stdout.strip().splitlines()[-1])
        assert result["missed"] == [] and result["count"] >= 40, result
        assert result["misses"] == 0 and result["hits"] > 0, result  # loaded, not compiled
        assert snapshot(cache) == before, "kernels were compiled again at run time"
    finally:
        for path in [root, *root.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def test_the_dockerfile_does_what_the_image_test_checks():
    """Each target installs with docker/install.sh, then warms the cache as the runtime user
    (the manifests' runAsUser), in a folder outside /tmp (a RAM disk in the pods)."""
    text = (ROOT / "Dockerfile").read_text()
    targets = text.split("\nFROM ")[1:]
    built = [t for t in targets if " AS cpu" in t.split("\n")[0] or " AS cuda" in t.split("\n")[0]]
    assert len(built) == 2
    (common,) = [t for t in targets if " AS common" in t.split("\n")[0]]
    workdir = None  # the folder the package's source is copied into
    for line in common.splitlines():
        if line.startswith("WORKDIR "):
            workdir = line.split()[1]
        if line.startswith("COPY deepem3d "):
            source = workdir
    for target in built:
        lines = [line.strip() for line in target.splitlines()]
        install = next(i for i, line in enumerate(lines) if "sh docker/install.sh" in line)
        user = lines.index("USER deepem3d")
        warm = lines.index("RUN python -m deepem3d.run.kernels")
        assert install < user < warm
        # warmed outside the source folder: `python -m` there imports that copy, whose kernels
        # numba caches under another path than the installed package's (compiled again in
        # every pod)
        at = ([line.split()[1] for line in lines[:warm] if line.startswith("WORKDIR ")]
              or [workdir])[-1]
        assert at != source, f"the cache is warmed in {source}, the source's folder"
    assert "--uid 10001 " in text and "RUNTIME_UID=10001" in text
    (cache,) = [w.split("=", 1)[1] for w in text.split() if w.startswith("NUMBA_CACHE_DIR=")]
    assert not cache.startswith("/tmp")
    assert "NUMBA_CPU_NAME=generic" in text.split()  # as the image test warms and loads
    deployment = (ROOT / "k8s" / "base" / "worker" / "deployment.yaml").read_text()
    assert "runAsUser: 10001" in deployment
