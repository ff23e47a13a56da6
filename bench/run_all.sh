#!/usr/bin/env bash
# The benchmark of the README's quick start, a few minutes on a 2-core CPU machine:
#   1. kernel benchmark (python -m bench) under the default allocator (glibc malloc),
#   2. the same under tcmalloc, a caching allocator (DESIGN.md §5: glibc hands big blocks back
#      to the OS on free, so every fresh B×D tensor pays page faults),
#   3. end-to-end training (python -m bench.e2e), digits VAE and a large-batch synthetic step,
#      under the default allocator.
# Extra arguments go to both kernel runs, e.g. bench/run_all.sh --full. On a shared machine,
# FASTVAE_BENCH_ATTEMPTS=3 FASTVAE_BENCH_WAIT_IDLE=5 bench/run_all.sh re-measures runs that other
# processes disturbed (see bench/README.md, "Noise").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

echo "== kernels, default allocator"
"${PYTHON:-python}" -m bench "$@"
if [ -e "$TCMALLOC" ]; then
    echo "== kernels, tcmalloc ($TCMALLOC)"
    LD_PRELOAD="$TCMALLOC" "${PYTHON:-python}" -m bench "$@"
else
    echo "== tcmalloc not found, skipping its run (Debian: apt-get install -y libtcmalloc-minimal4)"
fi
echo "== end-to-end training, default allocator"
"${PYTHON:-python}" -m bench.e2e
echo
echo "results (CSV and PNG): $PWD/bench/results/"
ls -1 bench/results/
