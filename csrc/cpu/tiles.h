// Dtype handling for the CPU kernels: each input is read a tile at a time into the
// accumulation type (no copy when it already has that type) and each gradient tile is computed
// in the accumulation type and rounded to its tensor's dtype on the way out. This keeps the
// kernels templated on the accumulation type only, whatever mix of dtypes arrives.
#pragma once

#include "../math_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <type_traits>

FASTVAE_NAMESPACE_BEGIN

// Elements per tile: small enough for every tile buffer of a row to stay in L1.
constexpr int64_t kTile = 512;

template <typename acc_t>
constexpr c10::ScalarType scalar_type_of() {
  return std::is_same_v<acc_t, double> ? c10::ScalarType::Double : c10::ScalarType::Float;
}

template <typename half_t>
void widen_16bit(const half_t* src, int64_t n, float* dst) {
  using Vec16 = at::vec::Vectorized<half_t>;
  using VecF = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + Vec16::size() <= n; i += Vec16::size()) {
    auto [low, high] = at::vec::convert_to_float<half_t>(Vec16::loadu(src + i));
    low.store(dst + i);
    high.store(dst + i + VecF::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename half_t>
void narrow_16bit(const float* src, int64_t n, half_t* dst) {
  using Vec16 = at::vec::Vectorized<half_t>;
  using VecF = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + Vec16::size() <= n; i += Vec16::size()) {
    at::vec::convert_from_float<half_t>(VecF::loadu(src + i), VecF::loadu(src + i + VecF::size()))
        .store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<half_t>(src[i]);
}

// `n` elements of `src` (dtype `type`) as acc_t: `src` itself or `buffer` filled with them.
template <typename acc_t>
const acc_t* load_tile(const void* src, c10::ScalarType type, int64_t n, acc_t* buffer) {
  if (type == scalar_type_of<acc_t>()) return static_cast<const acc_t*>(src);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (type == c10::ScalarType::BFloat16) {
      widen_16bit(static_cast<const c10::BFloat16*>(src), n, buffer);
      return buffer;
    }
    if (type == c10::ScalarType::Half) {
      widen_16bit(static_cast<const c10::Half*>(src), n, buffer);
      return buffer;
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "fastvae_load_tile", [&] {
    const auto* typed = static_cast<const scalar_t*>(src);
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<acc_t>(typed[i]);
  });
  return buffer;
}

// Where to compute `n` gradient values bound for `dst`: `dst` itself when it has type acc_t,
// else `buffer`, to be rounded into `dst` by store_tile.
template <typename acc_t>
acc_t* tile_target(void* dst, c10::ScalarType type, acc_t* buffer) {
  return type == scalar_type_of<acc_t>() ? static_cast<acc_t*>(dst) : buffer;
}

template <typename acc_t>
void store_tile(const acc_t* values, int64_t n, void* dst, c10::ScalarType type) {
  if (type == scalar_type_of<acc_t>()) {
    if (values != dst) std::copy(values, values + n, static_cast<acc_t*>(dst));
    return;
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    if (type == c10::ScalarType::BFloat16) {
      return narrow_16bit(values, n, static_cast<c10::BFloat16*>(dst));
    }
    if (type == c10::ScalarType::Half) {
      return narrow_16bit(values, n, static_cast<c10::Half*>(dst));
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "fastvae_store_tile", [&] {
    auto* typed = static_cast<scalar_t*>(dst);
    for (int64_t i = 0; i < n; ++i) typed[i] = c10::convert<scalar_t>(values[i]);
  });
}

// Element size in bytes, for pointer arithmetic on untyped data.
inline int64_t element_size(c10::ScalarType type) { return c10::elementSize(type); }

template <typename T>
const void* advance(const void* base, c10::ScalarType type, T elements) {
  return static_cast<const char*>(base) + static_cast<int64_t>(elements) * element_size(type);
}
template <typename T>
void* advance(void* base, c10::ScalarType type, T elements) {
  return static_cast<char*>(base) + static_cast<int64_t>(elements) * element_size(type);
}

FASTVAE_NAMESPACE_END
