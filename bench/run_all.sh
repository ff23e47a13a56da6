#!/usr/bin/env bash
# The benchmark of the README's quick start, a few minutes on a 2-core CPU machine:
#   1. kernel benchmark (python -m bench) under the default allocator (glibc malloc),
#   2. the same under tcmalloc, a caching allocator (glibc hands big blocks back to the OS on
#      free, so every fresh B×D tensor pays page faults), where it is installed: nothing is
#      installed here (Debian/Ubuntu package libtcmalloc-minimal4),
#   3. end-to-end training (python -m bench.e2e), digits VAE and a large-batch synthetic step,
#      under the default allocator.
# Extra arguments go to both kernel runs, e.g. bench/run_all.sh --full. On a shared machine,
# FASTVAE_BENCH_ATTEMPTS=3 FASTVAE_BENCH_WAIT_IDLE=5 bench/run_all.sh re-measures runs that other
# processes disturbed (see bench/README.md, "Noise").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TCMALLOC=$( (ldconfig -p 2>/dev/null || true) | awk '/libtcmalloc_minimal\.so\.4 /{print $NF; exit}')

echo "== kernels, default allocator"
"${PYTHON:-python}" -m bench "$@"
if [ -n "$TCMALLOC" ]; then
    echo "== kernels, tcmalloc ($TCMALLOC)"
    LD_PRELOAD="$TCMALLOC" "${PYTHON:-python}" -m bench "$@"
else
    echo "== tcmalloc not found: skipping its run (to include it, install the package"
    echo "   libtcmalloc-minimal4, e.g. sudo apt-get install libtcmalloc-minimal4)"
fi
echo "== end-to-end training, default allocator"
"${PYTHON:-python}" -m bench.e2e
echo
echo "results (CSV and PNG): $PWD/bench/results/"
ls -1 bench/results/
