#!/usr/bin/env bash
# fastvae's two quick-start commands, each of which installs what it needs first:
#   ./run.sh bench   the main job: kernel benchmark (glibc malloc, then tcmalloc) with table,
#                    CSV and plots, then end-to-end training (the digits VAE, a large batch)
#   ./run.sh test    the test suite: every CPU backend, Triton under its interpreter, and
#                    (where nvcc exists) a compile check of the CUDA kernels
# An installed torch is never replaced. Where there is none, the CPU build torch==2.13.0 is
# installed (set FASTVAE_TORCH_INDEX to a CPU wheel index, e.g.
# https://download.pytorch.org/whl/cpu, on machines without a local CPU wheel).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

install() {  # $1: the extra to install (test | bench)
    if ! "$PYTHON" -c "import torch" 2>/dev/null; then
        echo "run.sh: no torch found; installing the CPU build torch==2.13.0"
        "$PYTHON" -m pip install --quiet "torch==2.13.0" \
            ${FASTVAE_TORCH_INDEX:+--index-url "$FASTVAE_TORCH_INDEX"}
    fi
    "$PYTHON" -m pip install --quiet ninja "setuptools>=64"
    "$PYTHON" -m pip install --quiet --no-build-isolation -e ".[$1]"
}

case "${1:-}" in
    test)
        install test
        "$PYTHON" -c "import triton" 2>/dev/null || "$PYTHON" -m pip install --quiet "triton==3.9.0"
        "$PYTHON" -m pytest tests -q
        TRITON_INTERPRET=1 FASTVAE_TEST_BACKENDS=triton "$PYTHON" -m pytest tests -q
        if command -v nvcc >/dev/null; then
            csrc/cuda/check_compile.sh
        else
            echo "run.sh: nvcc not found; skipping the CUDA compile check"
        fi
        ;;
    bench)
        install bench
        if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4 && [ "$(id -u)" = 0 ] \
                && command -v apt-get >/dev/null; then  # the caching allocator of the 2nd run
            apt-get install -y -qq libtcmalloc-minimal4 >/dev/null || true
        fi
        PYTHON="$PYTHON" bench/run_all.sh "${@:2}"
        ;;
    *)
        echo "usage: ./run.sh test | bench [benchmark options]" >&2
        exit 2
        ;;
esac
