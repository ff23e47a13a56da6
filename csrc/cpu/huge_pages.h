// Fresh multi-megabyte outputs cost more in page faults than in writing them when the
// allocator hands out new memory from the OS (glibc does for large blocks): ~1.8 µs per 4 KB
// page. Asking for transparent huge pages on such a buffer before its first write cuts the
// faults 512-fold. Advisory only: contents and validity are unchanged, and it is a no-op where
// THP is disabled or the memory is already mapped (a caching allocator).
#pragma once

#include "../math_ops.h"

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

FASTVAE_NAMESPACE_BEGIN

inline void advise_huge_pages(const at::Tensor& tensor) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  constexpr size_t kMinimumBytes = size_t(8) << 20;
  const size_t bytes = tensor.nbytes();
  if (bytes < kMinimumBytes) return;
  const auto start = reinterpret_cast<uintptr_t>(tensor.const_data_ptr());
  const uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (start + bytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

FASTVAE_NAMESPACE_END
