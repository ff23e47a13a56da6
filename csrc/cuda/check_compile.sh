#!/usr/bin/env bash
# Compile check for the CUDA kernels where no GPU (or CUDA build of torch) is present: compiles
# every .cu translation unit in this directory with nvcc -c for sm_80 and sm_90 against the
# installed torch's headers, and exits non-zero on any error.
#
#   csrc/cuda/check_compile.sh          (NVCC or CUDA_HOME pick the compiler; PYTHON the python)
#
# A CPU wheel of torch lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h; a stub
# of it is supplied here only when the installed torch does not have it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
nvcc="${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}"

torch_include="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
cxx11_abi="$("$python" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [[ ! -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  mkdir -p "$work/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$work/stub/c10/cuda/impl/cuda_cmake_macros.h"
fi

status=0
for source in "$here"/*.cu; do
  name="$(basename "$source" .cu)"
  echo "nvcc: $name.cu (sm_80, sm_90)"
  if ! "$nvcc" -c "$source" -o "$work/$name.o" \
      -std=c++20 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC \
      -D_GLIBCXX_USE_CXX11_ABI="$cxx11_abi" \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -I "$work/stub" -I "$torch_include" -I "$torch_include/torch/csrc/api/include"; then
    echo "FAILED: $name.cu" >&2
    status=1
  fi
done
exit "$status"
