#!/usr/bin/env bash
# fastvae's commands:
#   ./run.sh test       installs, then the test suite: every CPU backend, Triton under its
#                       interpreter, and (where nvcc exists) a compile check of the CUDA kernels
#   ./run.sh bench      installs, then the kernel benchmark (glibc malloc, then tcmalloc where it
#                       is installed) with table, CSV and plots, then end-to-end training
#   ./run.sh gpu-check  on a CUDA machine, offline: build, the suite on CUDA, the GPU benchmark,
#                       a profiler table and the host overhead, each step time-limited so that
#                       the whole takes at most 8 minutes; logs under $OUT (default
#                       bench/results/gpu-check), a summary printed last
# An installed torch is never replaced. Where there is none, test and bench install the CPU
# build torch==2.13.0 (set FASTVAE_TORCH_INDEX to a CPU wheel index, e.g.
# https://download.pytorch.org/whl/cpu, on machines without a local CPU wheel).
# PYTHON picks the interpreter (default python3), e.g. PYTHON=.venv/bin/python ./run.sh test.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# Tools pip installs for this interpreter (ninja, cmake) must be found by the build even in a
# venv that is not activated.
PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"

install() {  # $1: the extras to install (test | bench)
    if ! "$PYTHON" -c "import torch" 2>/dev/null; then
        echo "run.sh: no torch found; installing the CPU build torch==2.13.0"
        "$PYTHON" -m pip install --quiet "torch==2.13.0" \
            ${FASTVAE_TORCH_INDEX:+--index-url "$FASTVAE_TORCH_INDEX"}
    fi
    # --no-build-isolation builds with what is installed, so the build tools come first.
    "$PYTHON" -m pip install --quiet ninja "setuptools>=64" wheel
    command -v cmake >/dev/null || "$PYTHON" -m pip install --quiet cmake
    "$PYTHON" -m pip install --quiet --no-build-isolation -e ".[$1]"
    "$PYTHON" -c "import fastvae._C"  # fail here, not in the tests, if the extension is missing
}

run_tests() {
    install test
    "$PYTHON" -c "import triton" 2>/dev/null || "$PYTHON" -m pip install --quiet "triton==3.9.0"
    # The CUDA compile check (nvcc, one core) runs beside the test runs, which spread over the
    # cores (pytest-xdist); its output is shown once it is done.
    local nvcc_log="" nvcc_pid=""
    if command -v nvcc >/dev/null; then
        nvcc_log=$(mktemp)
        PYTHON="$PYTHON" csrc/cuda/check_compile.sh >"$nvcc_log" 2>&1 &
        nvcc_pid=$!
    else
        echo "run.sh: nvcc not found; skipping the CUDA compile check"
    fi
    "$PYTHON" -m pytest tests -q -n auto
    TRITON_INTERPRET=1 FASTVAE_TEST_BACKENDS=triton "$PYTHON" -m pytest tests -q -n auto
    if [[ -n "$nvcc_pid" ]]; then
        local nvcc_status=0
        wait "$nvcc_pid" || nvcc_status=$?
        cat "$nvcc_log"
        rm -f "$nvcc_log"
        ((nvcc_status == 0)) || { echo "run.sh: the CUDA compile check failed" >&2; return 1; }
    fi
}

# --- gpu-check ---------------------------------------------------------------------------
GPU_CHECK_SECONDS=470  # leaves the summary well inside 8 minutes
SUMMARY=()

step() {  # step NAME SECONDS COMMAND...: run COMMAND, cut off after SECONDS (or at the
          # overall deadline), its output shown and kept in $LOGS/NAME.log; sets STATUS
    local name=$1 seconds=$2 started=$SECONDS verdict=ok
    shift 2
    local left=$((DEADLINE - SECONDS))
    ((seconds <= left)) || seconds=$left
    if ((seconds < 10)); then
        STATUS=124
        SUMMARY+=("$(printf '%-14s %-10s' "$name" "skipped: no time left")")
        return
    fi
    echo "== $name (at most ${seconds}s): $*"
    STATUS=0
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$LOGS/$name.log" || STATUS=$?
    case $STATUS in
        0) ;;
        124|137) verdict="timed out" ;;
        *) verdict="failed ($STATUS)" ;;
    esac
    SUMMARY+=("$(printf '%-14s %-10s %4ss  %s' "$name" "$verdict" "$((SECONDS - started))" \
                 "$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-100)")")
}

gpu_build() {
    step build 100 "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e .
    if ((STATUS != 0 && STATUS != 124 && STATUS != 137)); then  # a timeout would recur
        step build-inplace 100 "$PYTHON" setup.py build_ext --inplace
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
}

gpu_check() {
    DEADLINE=$((SECONDS + GPU_CHECK_SECONDS))
    LOGS=${OUT:-bench/results/gpu-check}
    mkdir -p "$LOGS"
    # One Triton compile cache for every xdist worker, the benchmarks and the next run.
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
    "$PYTHON" -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu-check: no CUDA')"
    gpu_build
    local workers=()
    if "$PYTHON" -c "import xdist" 2>/dev/null; then
        workers=(-n "$(($(nproc) < 12 ? $(nproc) : 12))")
    fi
    step suite 200 env FASTVAE_TEST_DEVICE=cuda "$PYTHON" -m pytest tests -q "${workers[@]}"
    step bench 150 "$PYTHON" -m bench --device cuda --no-plots --out-dir "$LOGS" \
        --impl fastvae-triton,fastvae-native,plain,compiled-plain
    step profile 30 "$PYTHON" -m bench.profile --device cuda
    step overhead 60 "$PYTHON" -m bench.overhead --device cuda --out-dir "$LOGS"
    gpu_summary | tee "$LOGS/summary.txt"
}

gpu_summary() {
    echo
    echo "== gpu-check summary, $((SECONDS)) s in all; logs in $LOGS"
    { "$PYTHON" -c "import torch, fastvae; print(torch.cuda.get_device_name(), '| torch',
        torch.__version__, '| fastvae backends on cuda:', *fastvae.available_backends('cuda'))" \
        2>&1 || true; } | tail -n 1  # a failed import is reported, not fatal
    printf '%s\n' "${SUMMARY[@]}"
}

case "${1:-}" in
    test)
        run_tests
        ;;
    bench)
        install bench
        PYTHON="$PYTHON" bench/run_all.sh "${@:2}"
        ;;
    gpu-check)
        gpu_check
        ;;
    *)
        echo "usage: ./run.sh test | bench [benchmark options] | gpu-check" >&2
        exit 2
        ;;
esac
