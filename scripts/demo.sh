#!/usr/bin/env bash
# Fresh machine → trained demo model: set up .venv, then train briefly on the bundled demo galaxies (CPU).
# Usage: bash scripts/demo.sh [SAVE_DIR]   (default outputs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh --no-test-extras
exec .venv/bin/zoobot-hpc demo --save-dir "${1:-outputs/demo}"
