#!/bin/sh
# Installs deepem3d as the worker images do (the Dockerfile runs this as root; so does
# tests/test_image.py, into a fresh virtual environment):
#   PYTHON        the interpreter to install into (default: python)
#   TORCH_INDEX   where PyTorch comes from: https://download.pytorch.org/whl/cpu for the CPU
#                 image, empty for PyPI's CUDA build (the GPU image)
#   RUNTIME_UID   the user the image runs as: it owns NUMBA_CACHE_DIR, which it warms
#   NOTICES_DIR   where the licence notices go (default /usr/share/doc/deepem3d)
# The image also sets NUMBA_CPU_NAME=generic: numba keys its cache by the CPU it compiled for,
# and the pods' CPUs are not the build machine's.
# Packages are pinned by docker/constraints.txt (the versions the test suite ran with).
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
: "${NUMBA_CACHE_DIR:?set NUMBA_CACHE_DIR: the kernels' cache, inside the image}"
: "${RUNTIME_UID:?set RUNTIME_UID: the user the image runs as}"
TORCH="torch==2.13.0"  # as in the README's set-up and .ci/run
if [ -n "${TORCH_INDEX:-}" ]; then
    # the build alone from there (its index need not hold the pinned versions of the rest)
    "$PYTHON" -m pip install --no-deps "$TORCH" --index-url "$TORCH_INDEX"
fi
"$PYTHON" -m pip install --constraint docker/constraints.txt "$TORCH"
"$PYTHON" -m pip install --constraint docker/constraints.txt .
# the kernels' cache: the runtime user's (numba ignores a cache folder it cannot write)
mkdir -p "$NUMBA_CACHE_DIR"
chown "$RUNTIME_UID" "$NUMBA_CACHE_DIR"
# licence notices: deepem3d's, and that it runs GPL-3.0 code (igneous, kimimaro)
NOTICES="${NOTICES_DIR:-/usr/share/doc/deepem3d}"
mkdir -p "$NOTICES"
cp LICENSE "$NOTICES/LICENSE"
cp docker/NOTICE "$NOTICES/NOTICE"
"$PYTHON" docker/notices.py "$NOTICES/third-party"
