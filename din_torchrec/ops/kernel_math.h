// Helpers shared by the native kernels (dice_kernel.h, jagged_kernel.h, lau_kernel.h, pair_loss_kernel.h,
// recurrence_kernel.h, tbe_forward_kernel.h); inline so that the kernels' loops vectorise through them.
#pragma once

#include <c10/util/BFloat16.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define DIN_OPS_AVX512BF16 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace din_ops {

// float32 value of a float or c10::BFloat16 element.
template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// e^x for x in [-87, 88] (clamped there): x log2(e) split into an integer n and f in [-1/2, 1/2], 2^f by the
// polynomial poly(f) (Horner), n added to the exponent bits. exp_fast and exp_bf16 differ in the polynomial.
template <typename Poly>
inline float exp2_split(float x, Poly poly) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const float n = std::nearbyint(t);
  float p = poly(t - n);
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) * (1 << 23);
  std::memcpy(&p, &bits, sizeof(p));
  return p;
}

// e^x to a few float32 ulps (relative error < 1e-6): 2^f by its degree-6 minimax polynomial.
// Why not std::exp: the kernels spend most of their element-wise time in sigmoids (DIEN: ~15M per training
// step), and libmvec's vectorised expf, which GCC calls for std::exp under -ffast-math, made a sigmoid cost
// 0.235 ns against 0.155 ns this way (measured, 64k floats in L1; sigmoid values within 7e-7 relative).
inline float exp_fast(float x) {
  return exp2_split(x, [](float f) {
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    return p * f + 1.0f;
  });
}

inline float sigmoid(float z) {
  // exp_fast clamps its argument: sigmoid is 0 / 1 to float precision well inside that range.
  return 1.0f / (1.0f + exp_fast(-z));
}

// e^x to 7.5e-5 relative, for values rounded to bf16 right after (half a bf16 step is 2^-9 = 2e-3, 26x more):
// 2^f by its degree-3 minimax polynomial (weighted least squares with Lawson's iterations on [-1/2, 1/2];
// float32 evaluation checked on 200k points). A bf16 result then differs from the exact one's rounding for ~2 %
// of values, by one step. Measured: DIEN's auxiliary kernel 13.85 -> 13.37 ms, its sigmoids being most of its
// element-wise time.
inline float exp_bf16(float x) {
  return exp2_split(x, [](float f) {
    float p = 5.517166681468173e-2f;
    p = p * f + 2.426111350945239e-1f;
    p = p * f + 6.932609870111998e-1f;
    return p * f + 9.999280727914251e-1f;
  });
}

// sigmoid to bf16 precision (exp_bf16): the relative errors of s and of 1 - s stay below 7.5e-5.
inline float sigmoid_bf16(float z) { return 1.0f / (1.0f + exp_bf16(-z)); }

// sigmoid of a value whose result is stored as T: sigmoid_bf16 when T is bf16, else sigmoid's full precision.
template <typename T>
inline float sigmoid_for(float z) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return sigmoid_bf16(z);
  else return sigmoid(z);
}

// 16 floats as one value (GCC / Clang vector extension: one AVX-512 register, two AVX2 ones): an accumulator
// that stays in a register across a loop. Accumulating in memory instead (acc[d] += ... per step) chains every
// step through a store and a reload: the attention's first layer took 2.6 ms on [25.6k, 32] -> 80 that way and
// 1.7 ms with these; a pooled lookup of 205k rows of 64 floats 2.8-4.6 ms against 1.6-1.8 ms.
typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

// dst[i] = T(src[i]) for n floats: a copy for float32; for bf16, round to nearest even -- with AVX512-BF16 one
// vcvtneps2bf16 per 16 values, where c10::BFloat16's conversion compiles to ~6 integer ops per vector (its
// rounding by hand); the instruction flushes denormal inputs to zero, which c10's keeps.
template <typename T>
inline void store_row(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    int64_t i = 0;
#ifdef DIN_OPS_AVX512BF16
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
    if (i < n) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1);
      _mm256_mask_storeu_epi16(dst + i, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + i)));
      i = n;
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

}  // namespace din_ops
