#!/usr/bin/env bash
# Create the peer's own virtual environment (the current Zoobot stack from PyPI) for the benchmarks.
# Idempotent: an existing, complete venv is reused. Nothing downloads weights or data at run time.
#   bash benchmarks/setup_peer.sh          # -> benchmarks/.peer-venv
#   PEER_VENV=/somewhere bash benchmarks/setup_peer.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${PEER_VENV:-$here/.peer-venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

ZOOBOT_VERSION="${ZOOBOT_VERSION:-2.9.0}"  # latest on PyPI on 2026-11-28 that installs on Python 3.11
GALAXY_DATASETS_VERSION=0.0.25
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import zoobot, galaxy_datasets, torch" 2>/dev/null; then
    echo "peer venv $venv already set up"
else
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # torch first, pinned, so that nothing below pulls another build
    "$venv/bin/pip" install --quiet "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    # zoobot and galaxy-datasets without their declared dependencies, then those dependencies minus
    # torchaudio (no release matches torch 2.14.1 and nothing benchmarked imports it), wandb and
    # litmodels (logging/model-hub clients, not imported by the code paths benchmarked)
    "$venv/bin/pip" install --quiet --no-deps "zoobot==$ZOOBOT_VERSION" "galaxy-datasets==$GALAXY_DATASETS_VERSION"
    "$venv/bin/pip" install --quiet "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
        numpy pandas pyarrow requests scikit-learn omegaconf "datasets>=3.6" "pytorch-lightning>=2.0" \
        "lightning>=2.2.5" h5py tqdm pillow scipy astropy matplotlib "timm>=1.0.15" torchmetrics \
        webdataset huggingface_hub setuptools
fi
echo "peer venv: $venv"
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
for name in ("zoobot", "galaxy-datasets", "torch", "torchvision", "timm", "pytorch-lightning", "lightning", "pillow", "pandas"):
    try:
        print(f"  {name}=={version(name)}")
    except Exception:
        print(f"  {name}: not installed")
PY
