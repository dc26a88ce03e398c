#!/usr/bin/env bash
# Fresh machine → test results: set up .venv with the test tools, bring up the real Slurm cluster
# the Slurm tests use (as root on Debian; elsewhere those tests skip with a reason), run pytest.
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k schema
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
if [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then
  bash tests/slurm/cluster-up.sh
else
  echo "test: not root on Debian: no Slurm cluster started, the Slurm tests will skip"
fi
exec .venv/bin/python -m pytest "$@"
