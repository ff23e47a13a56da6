// A vector-then-scalar loop: the same generic body runs on Vectorized<acc_t> over full vectors
// and on acc_t over the tail, so both paths use the one shared formula.
#pragma once

#include "../math_ops.h"

#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

FASTVAE_NAMESPACE_BEGIN

template <typename T, typename S>
T load_as(const S* pointer) {
  if constexpr (std::is_same_v<T, S>) {
    return *pointer;
  } else {
    return T::loadu(pointer);
  }
}

template <typename T, typename S>
void store_as(const T& value, S* pointer) {
  if constexpr (std::is_same_v<T, S>) {
    *pointer = value;
  } else {
    value.store(pointer);
  }
}

// Large outputs that are written once and not read back soon are stored around the cache:
// a non-temporal store skips reading the destination line first, saving a third of the
// traffic of writing it. The caller issues stream_fence() before the data is used elsewhere.
inline bool can_stream(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % sizeof(at::vec::Vectorized<float>) == 0;
}

template <typename T, typename S>
void store_maybe_streaming(const T& value, S* pointer, bool streaming) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::vec::Vectorized<float>>) {
    if (streaming) return _mm512_stream_ps(pointer, value);
  } else if constexpr (std::is_same_v<T, at::vec::Vectorized<double>>) {
    if (streaming) return _mm512_stream_pd(pointer, value);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, at::vec::Vectorized<float>>) {
    if (streaming) return _mm256_stream_ps(pointer, value);
  } else if constexpr (std::is_same_v<T, at::vec::Vectorized<double>>) {
    if (streaming) return _mm256_stream_pd(pointer, value);
  }
#endif
  store_as(value, pointer);
}

inline void stream_fence() { _mm_sfence(); }

template <typename acc_t>
acc_t sum_lanes(const at::vec::Vectorized<acc_t>& value) {
  alignas(64) acc_t lanes[at::vec::Vectorized<acc_t>::size()];
  value.store(lanes);
  acc_t total = 0;
  for (acc_t lane : lanes) total += lane;
  return total;
}

// Names the value type of a vectorized_for body: `using T = typename decltype(width)::type`.
template <typename T>
struct Width {
  using type = T;
};

// Runs body(i, Width<T>{}) for every i in [0, n): T = Vectorized<acc_t> a vector at a time,
// then T = acc_t over the tail.
template <typename acc_t, typename Body>
void vectorized_for(int64_t n, Body&& body) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) body(i, Width<Vec>{});
  for (; i < n; ++i) body(i, Width<acc_t>{});
}

// Σ body(i, Width<T>{}) over [0, n), a vector at a time and then the tail as vectorized_for;
// the vector lanes are added last.
template <typename acc_t, typename Body>
acc_t vectorized_sum(int64_t n, Body&& body) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec vector_total(acc_t(0));
  acc_t scalar_total = 0;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) vector_total = vector_total + body(i, Width<Vec>{});
  for (; i < n; ++i) scalar_total += body(i, Width<acc_t>{});
  return sum_lanes(vector_total) + scalar_total;
}

FASTVAE_NAMESPACE_END
