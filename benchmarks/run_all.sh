#!/usr/bin/env bash
# Run every benchmark of issue 7, each against the peer in the same run; prints figures and, on the
# last line of each, the ratios. Set up the peer first (idempotent): bash benchmarks/setup_peer.sh
#   bash benchmarks/run_all.sh 2>/dev/null | tee benchmarks/results.txt
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
bash setup_peer.sh >/dev/null
py="${OURS_PYTHON:-$here/../.venv/bin/python}"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); $(lscpu | grep 'Model name' | sed 's/  */ /g'); $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
for bench in bench_loss.py bench_loader.py bench_predict.py bench_train_step.py bench_memory.py; do
    echo "== $bench"
    "$py" -u "$bench" 2> >(grep -v -i warn >&2)
done
