# Worker image for k8s/ (GKE, EKS). Build: docker build -t deepem3d .
# TORCH_SPEC selects the PyTorch build: the default CUDA wheel from PyPI for GPU pools; for a
# CPU-only image pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu.
FROM python:3.11-slim
ARG TORCH_SPEC="torch>=2.4,<2.14"
ARG TORCH_INDEX=""
# HOME: the runtime user `nobody` has none, and taskqueue creates ~/.cloudvolume at import
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache HOME=/tmp
WORKDIR /opt/deepem3d
RUN if [ -n "$TORCH_INDEX" ]; then pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"; \
    else pip install "$TORCH_SPEC"; fi
COPY pyproject.toml README.md LICENSE ./
COPY deepem3d ./deepem3d
RUN pip install .
USER nobody
ENTRYPOINT []
CMD ["deepem3d", "worker", "--help"]
