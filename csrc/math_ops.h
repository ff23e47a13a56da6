// Scalar maths used by the shared element-wise formulas, callable from host and device code.
//
// The formulas in likelihoods.h, elementwise.h and philox.h are templates over a value type T and reach
// every function through MathOps<T>, so the CPU build can instantiate them with ATen's
// Vectorized<float>/<double> (cpu/vec_math_ops.h) and the CUDA build with plain float/double.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTVAE_HD __host__ __device__ __forceinline__
#else
#define FASTVAE_HD inline
#endif

// The CPU kernels are compiled once per instruction set (CPU_CAPABILITY: AVX2, AVX512) and
// the CUDA ones by nvcc. Each copy of the shared code lives in an inline namespace named after
// its instruction set, so the copies never merge at link time (an AVX-512 copy must never run
// on an AVX2-only machine).
#if defined(__CUDACC__)
#define FASTVAE_ISA device
#elif defined(CPU_CAPABILITY)
#define FASTVAE_ISA CPU_CAPABILITY
#else
#define FASTVAE_ISA generic
#endif
#define FASTVAE_NAMESPACE_BEGIN \
  namespace fastvae {           \
  inline namespace FASTVAE_ISA {
#define FASTVAE_NAMESPACE_END \
  }                           \
  }

FASTVAE_NAMESPACE_BEGIN

template <typename T>
struct MathOps;

template <>
struct MathOps<float> {
  using Scalar = float;
  static FASTVAE_HD float exp(float x) { return ::expf(x); }
  static FASTVAE_HD float log(float x) { return ::logf(x); }
  static FASTVAE_HD float log1p(float x) { return ::log1pf(x); }
  static FASTVAE_HD float sqrt(float x) { return ::sqrtf(x); }
  static FASTVAE_HD float cos(float x) { return ::cosf(x); }
  static FASTVAE_HD float sin(float x) { return ::sinf(x); }
  static FASTVAE_HD float abs(float x) { return ::fabsf(x); }
  static FASTVAE_HD float max(float a, float b) { return a > b ? a : b; }
  static FASTVAE_HD float sign(float x) { return float(x > 0.0f) - float(x < 0.0f); }
};

template <>
struct MathOps<double> {
  using Scalar = double;
  static FASTVAE_HD double exp(double x) { return ::exp(x); }
  static FASTVAE_HD double log(double x) { return ::log(x); }
  static FASTVAE_HD double log1p(double x) { return ::log1p(x); }
  static FASTVAE_HD double sqrt(double x) { return ::sqrt(x); }
  static FASTVAE_HD double cos(double x) { return ::cos(x); }
  static FASTVAE_HD double sin(double x) { return ::sin(x); }
  static FASTVAE_HD double abs(double x) { return ::fabs(x); }
  static FASTVAE_HD double max(double a, double b) { return a > b ? a : b; }
  static FASTVAE_HD double sign(double x) { return double(x > 0.0) - double(x < 0.0); }
};

// A constant of T's scalar type, broadcast when T is a vector.
template <typename T>
FASTVAE_HD T constant(double value) {
  return T(static_cast<typename MathOps<T>::Scalar>(value));
}

FASTVAE_NAMESPACE_END
