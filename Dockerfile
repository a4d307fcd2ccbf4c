# Worker images for k8s/ (GKE, EKS), two targets of one file:
#   docker build --target cpu  -t deepem3d-cpu  .   segmentation, meshes, downsampling pools
#   docker build --target cuda -t deepem3d-cuda .   the GPU inference pool (PyPI's CUDA torch)
# Both: a pinned base and packages (docker/constraints.txt), installed by docker/install.sh
# (tests/test_image.py runs the same script); a non-root user, deepem3d (uid 10001); numba's
# kernel cache in /opt/deepem3d/numba-cache, owned by that user and warmed at build time by
# calling every kernel once, so that no pod compiles them (not under /tmp: the pods mount a
# RAM disk there, which would hide it); licence notices in /usr/share/doc/deepem3d/.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS common
# NUMBA_CPU_NAME: numba keys its cache by the CPU it compiled for; generic code loads on any
# x86-64 node, whatever the build machine was. GLIBC_TUNABLES: malloc backs large allocations
# with transparent huge pages (where the node allows them: madvise or always), so a forward's
# activations fault in 2 MiB at a time (CPU inference 1.2x faster, the same peak memory)
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/opt/deepem3d/numba-cache NUMBA_CPU_NAME=generic RUNTIME_UID=10001 \
    HOME=/home/deepem3d GLIBC_TUNABLES=glibc.malloc.hugetlb=1
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/deepem3d deepem3d
WORKDIR /opt/deepem3d/src
COPY pyproject.toml README.md LICENSE ./
COPY docker ./docker
COPY deepem3d ./deepem3d

FROM common AS cpu
RUN TORCH_INDEX=https://download.pytorch.org/whl/cpu sh docker/install.sh
USER deepem3d
# warmed from HOME, not from the source folder: `python -m` there would import that copy, and
# numba keys its cache by the module's path, so the installed package would compile again
WORKDIR /home/deepem3d
RUN python -m deepem3d.run.kernels
CMD ["deepem3d", "worker", "--help"]

FROM common AS cuda
RUN sh docker/install.sh
USER deepem3d
WORKDIR /home/deepem3d
RUN python -m deepem3d.run.kernels
CMD ["deepem3d", "worker", "--help"]
