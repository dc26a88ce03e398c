# zoobot-hpc: one environment for laptops, workstations and Slurm clusters (Docker and Apptainer).
#
#   docker build -t zoobot-hpc:latest .          # from the repository root (BuildKit, Docker >= 23)
#
# Build arguments
#   BASE_IMAGE       Debian or Ubuntu based image. Python >= 3.10 is taken from the base when it has a
#                    working `python3 -m venv`, otherwise installed with apt. The default runs on CPU and
#                    on NVIDIA GPUs: PyPI's x86_64 torch wheels bundle their CUDA and cuDNN libraries, so
#                    the host only has to expose its driver (`docker run --gpus all`, `apptainer --nv`).
#                    A vendor CUDA base works too, e.g. nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04.
#   TORCH_INDEX_URL  package index that torch and torchvision are installed from, instead of PyPI;
#                    https://download.pytorch.org/whl/cpu gives a much smaller CPU-only image for laptops.
#
# The torch/torchvision versions are the pins in constraints.txt; the package itself keeps ranges.
# See the README (section Containers) for `docker run` examples and the Apptainer image (apptainer.def).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=

LABEL org.opencontainers.image.title="zoobot-hpc" \
      org.opencontainers.image.description="Train and apply Galaxy Zoo morphology CNNs (PyTorch Lightning) on laptops and Slurm clusters" \
      org.opencontainers.image.licenses="GPL-3.0-or-later"

# PYTHONNOUSERSITE: packages in a bound $HOME/.local (Apptainer binds $HOME) must never shadow the image's.
ENV PYTHONNOUSERSITE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A virtual environment keeps the install independent of the base's Python (PEP 668 on Debian/Ubuntu).
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c 'import sys; assert sys.version_info >= (3, 10), "zoobot-hpc needs Python >= 3.10, the base image has " + sys.version' \
    && python3 -m venv /opt/venv \
    && groupadd --gid 10001 zoobot \
    && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash zoobot \
    && install -d -m 1777 /work

# torch first, in its own layer: by far the largest download, and independent of the package source.
RUN --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} -c /tmp/constraints.txt torch torchvision

# The package from the build context (a bind mount, so no copy of the source stays in a layer).
# `docker run --user UID:GID` with a uid the image does not know gets HOME=/: /.config and /.cache
# let such users' libraries (matplotlib, torch) keep their caches without warnings.
RUN --mount=type=bind,target=/tmp/src,rw \
    pip install -c /tmp/src/constraints.txt /tmp/src \
    && zoobot-hpc --version \
    && install -d -m 1777 /.config /.cache

# Non-root by default; any other uid works too (`docker run --user "$(id -u):$(id -g)"`, Apptainer).
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["zoobot-hpc"]
CMD ["--help"]
