// The noise stream on the CPU, a block of Philox calls at a time.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../philox.h"
#include "vec_math_ops.h"

FASTVAE_NAMESPACE_BEGIN

// Philox calls per block; a multiple of every vector width.
constexpr int64_t kNoiseBlock = 1024;

// The four normals of each Philox call at offsets [first, first + count), count <= kNoiseBlock:
// normals[j][q - first] is output j of the call at offset q.
inline void philox_normal_block(uint64_t seed, int64_t first, int64_t count,
                                float (*normals)[kNoiseBlock]) {
  using VecF = at::vec::Vectorized<float>;
  constexpr int64_t lanes = 2 * VecF::size();  // enough independent chains to hide latency
  for (int64_t base = 0; base < count; base += lanes) {
    uint32_t words[4][lanes];
    // Independent lanes of scalar Philox: the compiler turns this loop into vector code.
    for (int64_t lane = 0; lane < lanes; ++lane) {
      philox4x32_10(seed, static_cast<uint64_t>(first + base + lane), words[0][lane],
                    words[1][lane], words[2][lane], words[3][lane]);
    }
    float uniforms[4][lanes];
    for (int j = 0; j < 4; ++j) {
      for (int64_t lane = 0; lane < lanes; ++lane) uniforms[j][lane] = philox_uniform(words[j][lane]);
    }
    for (int64_t v = 0; v < lanes; v += VecF::size()) {
      VecF n0, n1, n2, n3;
      box_muller(VecF::loadu(uniforms[0] + v), VecF::loadu(uniforms[1] + v), n0, n1);
      box_muller(VecF::loadu(uniforms[2] + v), VecF::loadu(uniforms[3] + v), n2, n3);
      n0.store(normals[0] + base + v);
      n1.store(normals[1] + base + v);
      n2.store(normals[2] + base + v);
      n3.store(normals[3] + base + v);
    }
  }
}

// Calls `visit(i, eps, n)` for the stream elements [i, i + n) produced by the Philox calls
// [first, first + count), in pieces that do not cross a multiple of `row` (so a piece maps to
// one contiguous run of a [*, row] tensor). `numel` is the stream length.
template <typename Visit>
void for_each_noise_piece(uint64_t seed, int64_t numel, int64_t row, int64_t first,
                          int64_t count, Visit&& visit) {
  alignas(64) float normals[4][kNoiseBlock];
  philox_normal_block(seed, first, count, normals);
  const int64_t quarter = philox_quarter(numel);
  for (int j = 0; j < 4; ++j) {
    const int64_t begin = j * quarter + first;
    const int64_t end = std::min(begin + count, numel);
    for (int64_t i = begin; i < end;) {
      const int64_t n = std::min(end - i, row - i % row);
      visit(i, normals[j] + (i - begin), n);
      i += n;
    }
  }
}

FASTVAE_NAMESPACE_END
