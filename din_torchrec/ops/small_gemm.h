// Row-major float32 matrix products for the kernels' many small matmuls, through oneDNN's BRGEMM micro-kernel
// (ATen's at::native::cpublas::brgemm) instead of at::mm.
//
// Why: ATen sends a float32 at::mm to MKL, and MKL runs its AVX2 code on AMD CPUs. On this project's machine
// (AMD EPYC, Zen 5, AVX-512) MKL's sgemm peaks at ~110 GFLOP/s on one core, while oneDNN's BRGEMM, which
// dispatches on the CPU's instruction sets rather than its vendor, runs the same products at ~250 GFLOP/s
// (measured: [520, 32] x [32, 96] 30.2 -> 12.3 us, [520, 96] x [96, 32] 32.0 -> 12.3 us, [26000, 32] x
// [32, 96] 1.65 -> 0.65 ms); on those shapes (K <= 96) its results were bit-identical to MKL's.
//
// The micro-kernel is JIT-generated per shape (~50 us) and cached per thread by ATen, and each kernel keeps a
// code buffer of a few hundred KB: with a kernel per row count, DIN training grew by ~400 MB over an epoch
// (1,268 vs 876 MiB). So rows go in blocks of kGemmRowBlock and a remainder in power-of-two pieces (64, 32, ...,
// 1): at most 8 kernels per (N, K, leading dimensions) whatever the row counts; gemm_at_b splits its summed
// dimension the same way. Where oneDNN's micro-kernels are unavailable (a build without them, a CPU
// without AVX2, or torch.backends.mkldnn disabled) ATen falls back to its BLAS gemm: same results, the old
// speed.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include "kernel_math.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace din_gemm {

constexpr int64_t kGemmRowBlock = 128;

// fn(start, size) over [0, total): pieces of kGemmRowBlock, then the remainder in power-of-two pieces (the
// bounded set of sizes above).
template <typename Fn>
inline void for_each_piece(int64_t total, Fn fn) {
  int64_t start = 0;
  for (int64_t piece = kGemmRowBlock; start < total; piece = std::max<int64_t>(1, piece / 2)) {
    for (; total - start >= piece; start += piece) fn(start, piece);
  }
}

// C[m, n] = (accumulate ? C : 0) + A[m, k] B[k, n]; all row-major with leading dimensions lda, ldb, ldc.
inline void gemm_rows(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(float) * n);
    return;
  }
  for_each_piece(m, [&](int64_t r, int64_t rows) {
    at::native::cpublas::brgemm(rows, n, k, lda, ldb, ldc, accumulate, a + r * lda, b, c + r * ldc, false);
  });
}

// out [o, n] += A^T B for row-aligned A [m, o] and B [m, n] (row-major, contiguous), on the calling thread: the
// sum over rows of their outer products, i.e. a weight gradient. Each block of kGemmRowBlock rows of A is
// transposed into buf ([o, kGemmRowBlock] floats; the micro-kernel takes its left-hand side row-major), and its
// rows, the summed dimension, go in pieces (for_each_piece) for a bounded set of kernels.
inline void transpose_u32(const uint32_t* __restrict__ src, int64_t lds, uint32_t* __restrict__ dst, int64_t ldd,
                          int64_t rows, int64_t cols);

inline void add_at_b(int64_t m, int64_t o, int64_t n, const float* a, const float* b, float* out, float* buf) {
  constexpr int64_t kb = kGemmRowBlock;
  for (int64_t r0 = 0; r0 < m; r0 += kb) {
    const int64_t rows = std::min(kb, m - r0);
    // float32 as 32-bit words: the AVX-512 tile transpose (an element-by-element loop here took a quarter of
    // the recurrence backward's own time).
    transpose_u32(reinterpret_cast<const uint32_t*>(a + r0 * o), o, reinterpret_cast<uint32_t*>(buf), kb, rows, o);
    for_each_piece(rows, [&](int64_t i, int64_t piece) {
      gemm_rows(o, n, piece, buf + i, kb, b + (r0 + i) * n, n, out, n, true);
    });
  }
}

// Rows [rows, cols] of 16-bit values (bf16) as [pairs, cols] 32-bit words: word (p, j) holds row 2p's element j
// in its low half and row 2p + 1's in its high half (little-endian: the VNNI layout of a bf16 right-hand side
// for the micro-kernel); rows past the last are zeros (pairs >= ceil(rows / 2)). Built as words, which
// vectorises.
inline void vnni_words(const uint16_t* src, int64_t rows, int64_t cols, int64_t pairs, uint32_t* __restrict__ out) {
  for (int64_t p = 0; p < pairs; ++p) {
    uint32_t* __restrict__ w = out + p * cols;
    const int64_t r = 2 * p;
    if (r + 1 < rows) {
      const uint16_t* __restrict__ a = src + r * cols;
      const uint16_t* __restrict__ b = a + cols;
      for (int64_t j = 0; j < cols; ++j) w[j] = uint32_t(a[j]) | (uint32_t(b[j]) << 16);
    } else if (r < rows) {
      const uint16_t* __restrict__ a = src + r * cols;
      for (int64_t j = 0; j < cols; ++j) w[j] = uint32_t(a[j]);
    } else {
      std::memset(w, 0, sizeof(uint32_t) * cols);
    }
  }
}

// bf16 products (bf16 operands, float32 sums) for the recurrences under bf16 autocast.
using Bf16 = c10::BFloat16;

// C[m, n] (+)= A[m, k] B[k, n]: A bf16 row-major (leading dimension lda, k even), B bf16 in the micro-kernel's
// VNNI layout ([k / 2, n, 2]: pairs of rows interleaved), C float32 (leading dimension ldc); row pieces as
// gemm_rows.
inline void gemm_rows_bf16(int64_t m, int64_t n, int64_t k, const Bf16* a, int64_t lda, const Bf16* b, float* c,
                           int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  for_each_piece(m, [&](int64_t r, int64_t rows) {
    at::native::cpublas::brgemm(rows, n, k, lda, n, ldc, accumulate, a + r * lda, b, c + r * ldc, true);
  });
}

// get(k, n) for k < K, n < N as a bf16 right-hand side in the micro-kernel's VNNI layout (pairs of rows
// interleaved), K rounded up to even with a zero row.
template <typename Get>
inline std::vector<Bf16> pack_vnni(int64_t k, int64_t n, Get get) {
  const int64_t kp = k + (k & 1);
  std::vector<Bf16> out(kp * n, Bf16(0.0f));
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < n; ++j) out[((i >> 1) * n + j) * 2 + (i & 1)] = static_cast<Bf16>(get(i, j));
  return out;
}

// Scratch of add_at_b_bf16 / add_at_b_bf16_block for widths o and n.
struct AtBScratch {
  std::vector<Bf16> rows_a, rows_b, at;
  std::vector<uint32_t> words, bv;
  AtBScratch(int64_t o, int64_t n)
      : rows_a(kGemmRowBlock * o), rows_b(kGemmRowBlock * n), at(o * kGemmRowBlock),
        words(kGemmRowBlock / 2 * o), bv(kGemmRowBlock / 2 * n) {}
};

// out [o, n] += A^T B for one block of rows <= kGemmRowBlock bf16 rows, A [rows, o] and B [rows, n] (row-major,
// contiguous), float32 sums: A's rows as VNNI words transposed (the bf16 A^T, [o, kb]), B's as VNNI words; rows
// past `rows` are zero pairs, so every call has the one shape [o, kb] x [kb, n]. A weight gradient's block (the
// linear kernel's dW, the recurrences' dU under bf16).
inline void add_at_b_bf16_block(int64_t rows, int64_t o, int64_t n, const Bf16* a, const Bf16* b, float* out,
                                AtBScratch& s) {
  constexpr int64_t kb = kGemmRowBlock;
  vnni_words(reinterpret_cast<const uint16_t*>(a), rows, o, kb / 2, s.words.data());
  transpose_u32(s.words.data(), o, reinterpret_cast<uint32_t*>(s.at.data()), kb / 2, kb / 2, o);
  vnni_words(reinterpret_cast<const uint16_t*>(b), rows, n, kb / 2, s.bv.data());
  at::native::cpublas::brgemm(o, n, kb, kb, n, n, true, s.at.data(), reinterpret_cast<const Bf16*>(s.bv.data()),
                              out, true);
}

// out [o, n] += A^T B as add_at_b, float32 A [m, o] and B [m, n] rounded to bf16 block by block (float32 sums).
inline void add_at_b_bf16(int64_t m, int64_t o, int64_t n, const float* a, const float* b, float* out,
                          AtBScratch& s) {
  constexpr int64_t kb = kGemmRowBlock;
  for (int64_t r0 = 0; r0 < m; r0 += kb) {
    const int64_t rows = std::min(kb, m - r0);
    din_ops::store_row(a + r0 * o, s.rows_a.data(), rows * o);
    din_ops::store_row(b + r0 * n, s.rows_b.data(), rows * n);
    add_at_b_bf16_block(rows, o, n, s.rows_a.data(), s.rows_b.data(), out, s);
  }
}

// parts [T, ...] summed over T in order (per-thread partial sums: the same result for a given thread count).
inline at::Tensor sum_parts(const at::Tensor& parts) {
  at::Tensor out = parts[0];
  for (int64_t t = 1; t < parts.size(0); ++t) out = out + parts[t];
  return out;
}

// A^T B as above, as a float32 [o, n] tensor, its rows split among the threads (contiguous runs of blocks),
// the threads' partial sums added in thread order: the same result for a given thread count.
inline at::Tensor gemm_at_b(int64_t m, int64_t o, int64_t n, const float* a, const float* b,
                            const at::TensorOptions& options) {
  constexpr int64_t kb = kGemmRowBlock;
  const int64_t blocks = (m + kb - 1) / kb;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  at::Tensor parts = at::zeros({threads, o, n}, options);
  float* pp = parts.data_ptr<float>();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(o * kb);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = std::min(m, blocks * t / threads * kb), r1 = std::min(m, blocks * (t + 1) / threads * kb);
      add_at_b(r1 - r0, o, n, a + r0 * o, b + r0 * n, pp + t * o * n, buf.data());
    }
  });
  return sum_parts(parts);
}

// dst[j * ldd + i] = src[i * lds + j] for a [rows, cols] matrix of 32-bit words. Why by hand: ATen's transposing
// copy (t().contiguous()) ran ~0.2 ns per element here, scalar; 16 x 16 tiles through AVX-512 registers (the
// unpack / shuffle network) move whole rows. Edges past the last full tile go element by element.
inline void transpose_u32(const uint32_t* __restrict__ src, int64_t lds, uint32_t* __restrict__ dst, int64_t ldd,
                          int64_t rows, int64_t cols) {
  int64_t r16 = 0, c16 = 0;
#ifdef __AVX512F__
  r16 = rows / 16 * 16;
  c16 = cols / 16 * 16;
  for (int64_t i0 = 0; i0 < r16; i0 += 16)
    for (int64_t j0 = 0; j0 < c16; j0 += 16) {
      __m512i r[16], t[16];
      for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_si512(src + (i0 + k) * lds + j0);
      for (int k = 0; k < 16; k += 2) {
        t[k] = _mm512_unpacklo_epi32(r[k], r[k + 1]);
        t[k + 1] = _mm512_unpackhi_epi32(r[k], r[k + 1]);
      }
      for (int k = 0; k < 16; k += 4) {
        r[k] = _mm512_unpacklo_epi64(t[k], t[k + 2]);
        r[k + 1] = _mm512_unpackhi_epi64(t[k], t[k + 2]);
        r[k + 2] = _mm512_unpacklo_epi64(t[k + 1], t[k + 3]);
        r[k + 3] = _mm512_unpackhi_epi64(t[k + 1], t[k + 3]);
      }
      for (int k = 0; k < 16; k += 8)
        for (int q = 0; q < 4; ++q) {
          t[k + q] = _mm512_shuffle_i32x4(r[k + q], r[k + q + 4], 0x88);
          t[k + q + 4] = _mm512_shuffle_i32x4(r[k + q], r[k + q + 4], 0xdd);
        }
      for (int q = 0; q < 8; ++q) {
        r[q] = _mm512_shuffle_i32x4(t[q], t[q + 8], 0x88);
        r[q + 8] = _mm512_shuffle_i32x4(t[q], t[q + 8], 0xdd);
      }
      for (int k = 0; k < 16; ++k) _mm512_storeu_si512(dst + (j0 + k) * ldd + i0, r[k]);
    }
#endif
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = (i < r16 ? c16 : 0); j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
}

}  // namespace din_gemm
