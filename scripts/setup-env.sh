#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv: torch/torchvision pinned by
# constraints.txt, the package editable with its test tools. Re-running is cheap: pip only
# installs what changed. Usage: bash scripts/setup-env.sh [--no-test-extras]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras="[test]"
[ "${1:-}" = "--no-test-extras" ] && extras=""

if [ ! -x .venv/bin/python ]; then
  echo "setup-env: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.zoobot-hpc-installed
want="$(sha256sum pyproject.toml constraints.txt | sha256sum | cut -c1-16)$extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup-env: installing zoobot-hpc$extras (torch/torchvision pinned by constraints.txt)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".$extras"
  echo "$want" > "$stamp"
fi
echo "setup-env: ready ($(.venv/bin/python -c 'import torch, pytorch_lightning as pl; print(f"torch {torch.__version__}, lightning {pl.__version__}")'))"
