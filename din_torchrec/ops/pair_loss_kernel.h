// DIEN's auxiliary pair loss with its sigmoid MLP scorer, forward and backward in one pass over blocks of rows,
// for the CPU (din_torchrec/ops/pair_loss.py: _SigmoidMLPPairLoss; its PyTorch chunk loop _chunk_loop is the
// GPU's path and the reference).
//
// Why: the PyTorch loop (and its first C++ version, the same ATen calls from C++) spent half its time outside
// the matmuls -- bf16 casts, sigmoid passes, copies of each [4096, 100] chunk's activations, column sums --
// and its matmuls went through oneDNN's matmul primitive, which reorders its operands on every call. Here each
// block of kBlock target rows (2 kBlock scored rows: positives and negatives) runs through the whole net and
// straight back while it sits in L1 / L2: the products through oneDNN's BRGEMM micro-kernel (bf16 x bf16 -> f32
// on AVX512-BF16, or f32), every element-wise step (bias, sigmoid, the loss, the sigmoid's derivative, column
// sums) in loops over the block that also write the next product's operands in the layouts the micro-kernel
// takes (row-major for a left-hand side; for a right-hand side, row-major in float32 and pairs of rows
// interleaved -- "VNNI" -- in bf16). The block is held feature-major ([features, rows]; see below). The
// pre-activations, logits and every sum stay float32; the activations, and the gradients fed into products, are
// rounded to the compute type (bf16 under autocast) as a bf16 matmul's operands are; under bf16 the hidden
// activations' sigmoids are computed to that precision only (kernel_math.h: sigmoid_for / exp_bf16), the loss's
// own sigmoid in full.
//
// Only target rows (mask != 0) are scored, in blocks of kBlock of them (their states, behaviours and negatives
// read by row); the other rows' gradients are zero.
//
// Determinism: blocks go to threads in contiguous runs; each thread sums its blocks' loss and weight / bias
// gradients in its own float32 buffers, added in thread order at the end: the same result for a given thread
// count. Rows of g_states / g_x belong to one block each.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include "kernel_math.h"
#include "small_gemm.h"

#include <cmath>
#include <type_traits>
#include <vector>

namespace din_pair_loss {

using din_ops::sigmoid;

constexpr int64_t kBlock = 64;  // target rows per block (the op alone: 32, 64 and 128 rows within 2 %)
constexpr int64_t kRows = 2 * kBlock;  // scored rows per block: positives [0, kBlock), negatives [kBlock, kRows)

template <typename T>
constexpr bool kVnni = std::is_same_v<T, c10::BFloat16>;

// 32-bit words per value pair: a bf16 right-hand side packs two of its K rows into each word (VNNI), float32
// keeps one value per word.
template <typename T>
constexpr int64_t kPack = kVnni<T> ? 2 : 1;

// C[m, n] (+)= A[m, k] B[k, n]: A row-major (leading dimension lda); B [k, n] in the micro-kernel's layout for T
// (bf16: [k / 2, n] words, each holding rows 2p and 2p + 1 of one column; float32: row-major), leading
// dimension n; C float32 (leading dimension ldc).
template <typename T>
inline void mm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, float* c, int64_t ldc,
               bool accumulate) {
  if constexpr (kVnni<T>) at::native::cpublas::brgemm(m, n, k, lda, n, ldc, accumulate, a, b, c, true);
  else din_gemm::gemm_rows(m, n, k, a, lda, b, n, c, ldc, accumulate);
}

// A [rows, cols] matrix from get(i, j), row-major in T (a product's left-hand side).
template <typename T, typename Get>
std::vector<T> pack_rows(int64_t rows, int64_t cols, Get get) {
  std::vector<T> out(rows * cols);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = static_cast<T>(get(i, j));
  return out;
}

inline float softplus(float x) { return std::max(x, 0.0f) + std::log1p(std::exp(-std::abs(x))); }

// The block runs "feature-major": every matrix of activations or gradients is [features, rows], a feature per
// row and the block's 128 (or 64) scored rows along it, and each product is W [out, in] x M [in, rows] (or its
// transpose's). Why: the micro-kernel vectorises a product along its n (output columns) dimension, 16 floats at
// a time; with the rows there every n is 64 or 128 -- whole vectors -- where the row-major block's n were the
// layer widths (100, 50: a masked remainder in every row of every tile). Measured on the block's nine products
// (bf16, one thread): 17.6 us row-major against 15.5 us feature-major. The element-wise loops run along the rows
// as well (whole vectors, a layer's bias one scalar per feature).

// Rows [rows, cols] of 32-bit words from src (leading dimension lds) transposed into dst [cols, rows]
// (leading dimension ldd); for bf16 a word is a pair of adjacent values in a row.
inline void transpose_words(const void* src, int64_t lds, void* dst, int64_t ldd, int64_t rows, int64_t cols) {
  din_gemm::transpose_u32(static_cast<const uint32_t*>(src), lds, static_cast<uint32_t*>(dst), ldd, rows, cols);
}

// Float32 rows src [rows, n] (n a multiple of 16, leading dimension n) rounded to T into plain [rows, n]
// (row-major; a left-hand side) and, for bf16, pairs [rows / 2, n] words holding rows 2p and 2p + 1 of each
// column (the same matrix as a right-hand side; rows even). For float32 the right-hand side is plain itself.
template <typename T>
inline void emit_rows(const float* __restrict__ src, int64_t rows, int64_t n, T* __restrict__ plain,
                      uint32_t* __restrict__ pairs) {
  if constexpr (!kVnni<T>) {
    (void)pairs;
    std::memcpy(plain, src, sizeof(float) * rows * n);
  } else {
#ifdef DIN_OPS_AVX512BF16
    // One vcvtne2ps2bf16 rounds 16 values of both rows; a vpermw interleaves them into 16 words.
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23,
                                                7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t p = 0; p < rows / 2; ++p) {
      const float* a = src + 2 * p * n;
      const float* b = a + n;
      T* pa = plain + 2 * p * n;
      T* pb = pa + n;
      uint32_t* w = pairs + p * n;
      for (int64_t j = 0; j < n; j += 16) {
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(b + j), _mm512_loadu_ps(a + j));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pa + j), _mm512_castsi512_si256(both));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + j), _mm512_extracti64x4_epi64(both, 1));
        _mm512_storeu_si512(w + j, _mm512_permutexvar_epi16(interleave, both));
      }
    }
#else
    din_ops::store_row(src, plain, rows * n);
    din_gemm::vnni_words(reinterpret_cast<const uint16_t*>(plain), rows, n, rows / 2, pairs);
#endif
  }
}

// The right-hand side of a matrix kept as plain rows of T: the pairs for bf16, the rows themselves for float32.
template <typename T>
inline const T* rhs_of(const T* plain, const std::vector<uint32_t>& pairs) {
  if constexpr (kVnni<T>) return reinterpret_cast<const T*>(pairs.data());
  else return plain;
}

// Per-thread accumulators and block buffers (feature-major: [features, rows]).
template <typename T>
struct Work {
  double loss = 0.0;
  std::vector<std::vector<float>> gw, gb;  // layer 0's weight gradient as [L0, H + D]
  std::vector<float> gw0h, gw0e;           // layer 0's state / behaviour halves, [L0, H] and [L0, D]
  std::vector<T> hs, x;                    // the block's inputs, row-major: states [kBlock, H], rows [kRows, D]
  std::vector<uint32_t> hs_t, x_t;         // their transposes [H, kBlock] / [D, kRows] as right-hand sides
  std::vector<uint32_t> hs_r, x_r;         // themselves as right-hand sides over rows (bf16: row pairs)
  std::vector<float> s, z, logit, dl, da, dzf, out, out_t;
  std::vector<std::vector<T>> act;         // each hidden layer's activations [width, kRows]
  std::vector<std::vector<uint32_t>> act_p;  // ... as right-hand sides (bf16 pairs)
  std::vector<uint32_t> act_r;             // a layer's activations transposed: [kRows, width] right-hand side
  std::vector<T> dz;                        // a pre-activation gradient [width, kRows] (left-hand side)
  std::vector<uint32_t> dz_p;               // ... as a right-hand side
  std::vector<T> ds;                        // layer 0's state-side gradient [L0, kBlock]
  std::vector<uint32_t> ds_p;
};

// Rows of In (float32 or T) widened / rounded to T.
template <typename T, typename In>
inline void convert_rows(const In* __restrict__ src, int64_t count, T* __restrict__ dst) {
  if constexpr (std::is_same_v<In, float>) din_ops::store_row(src, dst, count);
  else std::memcpy(dst, src, sizeof(T) * count);
}

// Row-major rows [rows, cols] of T as a right-hand side over rows (the summed dimension of a weight gradient):
// bf16 pairs of rows as words (into buf), float32 the rows themselves.
template <typename T>
inline const T* rows_rhs(const T* src, int64_t rows, int64_t cols, std::vector<uint32_t>& buf) {
  if constexpr (!kVnni<T>) return src;
  din_gemm::vnni_words(reinterpret_cast<const uint16_t*>(src), rows, cols, rows / 2, buf.data());
  return reinterpret_cast<const T*>(buf.data());
}

// T: the compute type; In: the inputs' type (T, or float32 read and rounded block by block).
template <typename T, typename In>
std::vector<at::Tensor> fused_impl(const at::Tensor& states, const at::Tensor& behaviours,
                                   const at::Tensor& negatives, const at::Tensor& mask,
                                   const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                                   double scale, bool grads) {
  constexpr int64_t pk = kPack<T>;
  constexpr int64_t hb = kBlock, rb = kRows;
  const int64_t n = states.size(0), h = states.size(1), d = behaviours.size(1), k = weights.size();
  std::vector<int64_t> width(k);  // output width of each layer; width[k - 1] == 1
  for (int64_t j = 0; j < k; ++j) width[j] = weights[j].size(0);
  const int64_t l0 = width[0], last_in = width[k - 2];
  int64_t wmax = 0;
  for (int64_t j = 0; j < k - 1; ++j) wmax = std::max(wmax, width[j]);
  wmax = std::max({wmax, h, d});

  // Weights as float for reading, packed once as left-hand sides: W for the forward, W^T for the backward.
  std::vector<at::Tensor> wf, bf;
  for (int64_t j = 0; j < k; ++j) {
    wf.push_back(weights[j].to(at::kFloat).contiguous());
    bf.push_back(biases[j].to(at::kFloat).contiguous());
  }
  const float* w0 = wf[0].data_ptr<float>();
  const int64_t in0 = h + d;
  const std::vector<T> w_h = pack_rows<T>(l0, h, [&](int64_t i, int64_t j) { return w0[i * in0 + j]; });
  const std::vector<T> w_e = pack_rows<T>(l0, d, [&](int64_t i, int64_t j) { return w0[i * in0 + h + j]; });
  const std::vector<T> w_ht = pack_rows<T>(h, l0, [&](int64_t i, int64_t j) { return w0[j * in0 + i]; });
  const std::vector<T> w_et = pack_rows<T>(d, l0, [&](int64_t i, int64_t j) { return w0[j * in0 + h + i]; });
  std::vector<std::vector<T>> w_mid(k), w_midt(k);  // layers 1 .. k - 2: W [o, in] and W^T [in, o]
  for (int64_t j = 1; j < k - 1; ++j) {
    const float* w = wf[j].data_ptr<float>();
    const int64_t in = width[j - 1], o = width[j];
    w_mid[j] = pack_rows<T>(o, in, [&](int64_t a, int64_t b) { return w[a * in + b]; });
    w_midt[j] = pack_rows<T>(in, o, [&](int64_t a, int64_t b) { return w[b * in + a]; });
  }
  const float* w_last = wf[k - 1].data_ptr<float>();
  const float b_last = bf[k - 1].data_ptr<float>()[0];

  const In* sp = states.data_ptr<In>();
  const In* bp = behaviours.data_ptr<In>();
  const In* np = negatives.data_ptr<In>();
  const float* mp = mask.data_ptr<float>();
  // Only the pairs' target rows (mask != 0) are scored: rows that are no pair's target (each sample's first
  // behaviour: one in ~25 of DIEN's rows) add nothing to the loss, so they are left out of the blocks rather
  // than computed and masked.
  //
  // Gradients in float32, the states' already aligned with them (target row j's goes to state j - 1). Rows no
  // target writes -- non-target rows of g_x, the states before them and the last state -- are zeroed in the
  // same pass over the mask that lists the targets.
  at::Tensor g_states, g_x;
  const at::TensorOptions f32 = mask.options();
  if (grads) {
    g_states = at::empty({n, h}, f32);
    g_x = at::empty({2, n, d}, f32);
  }
  float* gsp = grads ? g_states.data_ptr<float>() : nullptr;
  float* gxp = grads ? g_x.data_ptr<float>() : nullptr;
  if (grads && n > 0) std::fill(gsp + (n - 1) * h, gsp + n * h, 0.0f);
  std::vector<int64_t> tgt;
  tgt.reserve(n);
  for (int64_t r = 0; r < n; ++r) {
    if (mp[r] != 0.0f) {
      tgt.push_back(r);
    } else if (grads) {
      std::fill(gxp + r * d, gxp + (r + 1) * d, 0.0f);
      std::fill(gxp + (n + r) * d, gxp + (n + r + 1) * d, 0.0f);
      if (r > 0) std::fill(gsp + (r - 1) * h, gsp + r * h, 0.0f);
    }
  }
  const int64_t nt = static_cast<int64_t>(tgt.size());

  const int64_t blocks = (nt + kBlock - 1) / kBlock;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  std::vector<Work<T>> works(threads);

  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      Work<T>& w = works[t];
      w.hs.assign(hb * h, T(0));
      w.x.assign(rb * d, T(0));
      w.hs_t.resize(h * hb);
      w.x_t.resize(d * rb);
      w.hs_r.resize(kVnni<T> ? hb / 2 * h : 0);
      w.x_r.resize(kVnni<T> ? rb / 2 * d : 0);
      w.s.resize(l0 * hb);
      w.z.resize(wmax * rb);
      w.logit.resize(rb);
      w.dl.resize(rb);
      w.da.resize(wmax * rb);
      w.dzf.resize(l0 * rb);
      w.out.resize(wmax * rb);
      w.out_t.resize(rb * wmax);
      w.act.assign(k - 1, {});
      w.act_p.assign(k - 1, {});
      for (int64_t j = 0; j < k - 1; ++j) {
        w.act[j].resize(width[j] * rb);
        if (kVnni<T>) w.act_p[j].resize(width[j] / 2 * rb);
      }
      w.act_r.resize(rb * wmax);
      w.dz.resize(wmax * rb);
      w.dz_p.resize(kVnni<T> ? wmax / 2 * rb : 0);
      w.ds.resize(l0 * hb);
      w.ds_p.resize(kVnni<T> ? l0 / 2 * hb : 0);
      if (grads) {
        w.gw.assign(k, {});
        w.gb.assign(k, {});
        for (int64_t j = 1; j < k; ++j) {
          w.gw[j].assign(width[j] * width[j - 1], 0.0f);
          w.gb[j].assign(width[j], 0.0f);
        }
        w.gb[0].assign(l0, 0.0f);
        w.gw0h.assign(l0 * h, 0.0f);
        w.gw0e.assign(l0 * d, 0.0f);
      }
      for (int64_t blk = blocks * t / threads; blk < blocks * (t + 1) / threads; ++blk) {
        const int64_t t0b = blk * kBlock, m = std::min(kBlock, nt - t0b);
        const int64_t* rows_of = tgt.data() + t0b;  // the block's target rows
        // Every block has kBlock targets, a short last one padded with zero rows (mask 0: they add nothing to
        // any gradient): one set of micro-kernel shapes (each JIT kernel keeps a code buffer of a few hundred
        // KB; a kernel per last-block size had grown DIEN training by ~600 MB).
        // Target row r pairs with state r - 1 (row 0, were it a target, with a zero state).
        for (int64_t i = 0; i < m; ++i) {
          const int64_t r = rows_of[i];
          if (r > 0) convert_rows(sp + (r - 1) * h, h, w.hs.data() + i * h);
          else std::fill(w.hs.data() + i * h, w.hs.data() + (i + 1) * h, T(0));
          convert_rows(bp + r * d, d, w.x.data() + i * d);
          convert_rows(np + r * d, d, w.x.data() + (hb + i) * d);
        }
        if (m < hb) {
          std::fill(w.hs.data() + m * h, w.hs.data() + hb * h, T(0));
          std::fill(w.x.data() + m * d, w.x.data() + hb * d, T(0));
          std::fill(w.x.data() + (hb + m) * d, w.x.data() + rb * d, T(0));
        }
        // The inputs transposed ([H, kBlock], [D, kRows]: words of value pairs for bf16 -- which is the pairs
        // layout of the transposes).
        transpose_words(w.hs.data(), h / pk, w.hs_t.data(), hb, hb, h / pk);
        transpose_words(w.x.data(), d / pk, w.x_t.data(), rb, rb, d / pk);
        const T* hs_t = reinterpret_cast<const T*>(w.hs_t.data());
        const T* x_t = reinterpret_cast<const T*>(w.x_t.data());
        // Layer 0: the state side once for both halves ([L0, kBlock]), the behaviour side for all rows.
        mm<T>(l0, hb, h, w_h.data(), h, hs_t, w.s.data(), hb, false);
        mm<T>(l0, rb, d, w_e.data(), d, x_t, w.z.data(), rb, false);
        {
          const float* b0 = bf[0].data_ptr<float>();
          for (int64_t c = 0; c < l0; ++c) {
            float* __restrict__ zc = w.z.data() + c * rb;
            const float* __restrict__ sc = w.s.data() + c * hb;
            const float bc = b0[c];
            for (int64_t r = 0; r < hb; ++r) zc[r] = din_ops::sigmoid_for<T>(zc[r] + sc[r] + bc);
            for (int64_t r = 0; r < hb; ++r) zc[hb + r] = din_ops::sigmoid_for<T>(zc[hb + r] + sc[r] + bc);
          }
          emit_rows<T>(w.z.data(), l0, rb, w.act[0].data(), w.act_p[0].data());
        }
        for (int64_t j = 1; j < k - 1; ++j) {
          const int64_t in = width[j - 1], o = width[j];
          mm<T>(o, rb, in, w_mid[j].data(), in, rhs_of<T>(w.act[j - 1].data(), w.act_p[j - 1]), w.z.data(), rb,
                false);
          const float* bj = bf[j].data_ptr<float>();
          for (int64_t c = 0; c < o; ++c) {
            float* __restrict__ zc = w.z.data() + c * rb;
            const float bc = bj[c];
            for (int64_t r = 0; r < rb; ++r) zc[r] = din_ops::sigmoid_for<T>(zc[r] + bc);
          }
          emit_rows<T>(w.z.data(), o, rb, w.act[j].data(), w.act_p[j].data());
        }
        // Output layer (one unit): a weighted sum over the last hidden layer's features, along the rows.
        const T* a_last = w.act[k - 2].data();
        {
          float* __restrict__ lg = w.logit.data();
          for (int64_t r = 0; r < rb; ++r) lg[r] = b_last;
          for (int64_t c = 0; c < last_in; ++c) {
            const T* __restrict__ ac = a_last + c * rb;
            const float wc = w_last[c];
            for (int64_t r = 0; r < rb; ++r) lg[r] += din_ops::to_float(ac[r]) * wc;
          }
        }
        for (int64_t i = 0; i < m; ++i) {
          const float mk = mp[rows_of[i]];
          w.loss += mk * (softplus(-w.logit[i]) + softplus(w.logit[hb + i]));
        }
        if (!grads) continue;

        // Backward. d loss / d logit for a gradient of 1 of the mean: (p - 1) / pairs on positives, p / pairs on
        // negatives, 0 on unpaired rows.
        for (int64_t i = 0; i < hb; ++i) {
          const float mk = i < m ? mp[rows_of[i]] * static_cast<float>(scale) : 0.0f;
          w.dl[i] = (sigmoid(w.logit[i]) - 1.0f) * mk;
          w.dl[hb + i] = sigmoid(w.logit[hb + i]) * mk;
        }
        {
          float gbl = 0.0f;
          for (int64_t r = 0; r < rb; ++r) gbl += w.dl[r];
          w.gb[k - 1][0] += gbl;
        }
        // Output layer: its weight gradient and the gradient of the last hidden pre-activation, [o, kRows]
        // (float32 in da, or dzf when that is layer 0's: kept in float32 for its state half).
        {
          float* __restrict__ gw = w.gw[k - 1].data();
          float* __restrict__ gb = w.gb[k - 2].data();
          const int64_t o = last_in;
          float* dst = k == 2 ? w.dzf.data() : w.da.data();
          const float* __restrict__ dl = w.dl.data();
          for (int64_t c = 0; c < o; ++c) {
            const T* __restrict__ ac = a_last + c * rb;
            float* __restrict__ dc = dst + c * rb;
            const float wc = w_last[c];
            float sw = 0.0f, sb = 0.0f;
            for (int64_t r = 0; r < rb; ++r) {
              const float a = din_ops::to_float(ac[r]);
              sw += dl[r] * a;
              const float v = dl[r] * wc * a * (1.0f - a);
              sb += v;
              dc[r] = v;
            }
            gw[c] += sw;
            gb[c] += sb;
          }
          emit_rows<T>(dst, o, rb, w.dz.data(), w.dz_p.data());
        }
        // Hidden layers k - 2 .. 1: weight gradient dZ_j^T A_{j-1} (the activations transposed to [kRows, in]
        // as a right-hand side over rows), then the layer below's pre-activation gradient W_j^T dZ_j.
        for (int64_t j = k - 2; j >= 1; --j) {
          const int64_t in = width[j - 1], o = width[j];
          // A_{j-1} [kRows, in]: bf16 row pairs are the words of act's rows, transposed.
          transpose_words(w.act[j - 1].data(), rb / pk, w.act_r.data(), in, in, rb / pk);
          mm<T>(o, in, rb, w.dz.data(), rb, reinterpret_cast<const T*>(w.act_r.data()), w.gw[j].data(), in, true);
          float* dst = j == 1 ? w.dzf.data() : w.da.data();  // layer 0's gradient stays in dzf (see above)
          mm<T>(in, rb, o, w_midt[j].data(), o, rhs_of<T>(w.dz.data(), w.dz_p), dst, rb, false);
          float* __restrict__ gb = w.gb[j - 1].data();
          for (int64_t c = 0; c < in; ++c) {
            const T* __restrict__ ac = w.act[j - 1].data() + c * rb;
            float* __restrict__ dc = dst + c * rb;
            float sb = 0.0f;
            for (int64_t r = 0; r < rb; ++r) {
              const float av = din_ops::to_float(ac[r]);
              const float v = dc[r] * av * (1.0f - av);
              sb += v;
              dc[r] = v;
            }
            gb[c] += sb;
          }
          emit_rows<T>(dst, in, rb, w.dz.data(), w.dz_p.data());
        }
        // Layer 0 (dz / dz_p hold its pre-activation's gradient, [L0, kRows]; dzf the same in float32): the
        // behaviour half of the weight gradient over all rows; the state half from the two halves' sum ds (both
        // scored rows share the state).
        mm<T>(l0, d, rb, w.dz.data(), rb, rows_rhs<T>(w.x.data(), rb, d, w.x_r), w.gw0e.data(), d, true);
        for (int64_t c = 0; c < l0; ++c) {
          const float* __restrict__ p = w.dzf.data() + c * rb;
          float* __restrict__ o = w.da.data() + c * hb;
          for (int64_t r = 0; r < hb; ++r) o[r] = p[r] + p[hb + r];
        }
        emit_rows<T>(w.da.data(), l0, hb, w.ds.data(), w.ds_p.data());
        mm<T>(l0, h, hb, w.ds.data(), hb, rows_rhs<T>(w.hs.data(), hb, h, w.hs_r), w.gw0h.data(), h, true);
        // The states' gradient W_h^T ds [H, kBlock] and the rows' W_e^T dz [D, kRows], transposed back to rows.
        mm<T>(h, hb, l0, w_ht.data(), l0, rhs_of<T>(w.ds.data(), w.ds_p), w.out.data(), hb, false);
        transpose_words(w.out.data(), hb, w.out_t.data(), h, h, hb);
        for (int64_t i = 0; i < m; ++i)
          if (rows_of[i] > 0) std::memcpy(gsp + (rows_of[i] - 1) * h, w.out_t.data() + i * h, sizeof(float) * h);
        mm<T>(d, rb, l0, w_et.data(), l0, rhs_of<T>(w.dz.data(), w.dz_p), w.out.data(), rb, false);
        transpose_words(w.out.data(), rb, w.out_t.data(), d, d, rb);
        for (int64_t i = 0; i < m; ++i) {
          std::memcpy(gxp + rows_of[i] * d, w.out_t.data() + i * d, sizeof(float) * d);
          std::memcpy(gxp + (n + rows_of[i]) * d, w.out_t.data() + (hb + i) * d, sizeof(float) * d);
        }
      }
    }
  });

  double loss = 0.0;
  for (const Work<T>& w : works) loss += w.loss;
  std::vector<at::Tensor> out{at::full({}, loss, f32)};
  if (!grads) return out;
  out.push_back(g_states);
  out.push_back(g_x);
  for (int64_t j = 0; j < k; ++j) {
    at::Tensor sum;
    for (const Work<T>& w : works) {
      at::Tensor part;
      if (j == 0) {
        part = at::cat({at::from_blob(const_cast<float*>(w.gw0h.data()), {l0, h}, f32),
                        at::from_blob(const_cast<float*>(w.gw0e.data()), {l0, d}, f32)}, 1);
      } else {
        part = at::from_blob(const_cast<float*>(w.gw[j].data()), {width[j], width[j - 1]}, f32).clone();
      }
      sum = sum.defined() ? sum + part : part;
    }
    out.push_back(sum);
  }
  for (int64_t j = 0; j < k; ++j) {
    at::Tensor sum;
    for (const Work<T>& w : works) {
      at::Tensor part = at::from_blob(const_cast<float*>(w.gb[j].data()), {width[j]}, f32).clone();
      sum = sum.defined() ? sum + part : part;
    }
    out.push_back(sum);
  }
  return out;
}

}  // namespace din_pair_loss

// states [n, H] (target row j pairs with state j - 1; row 0 is no pair's target), behaviours / negatives [n, D],
// all three float32 or all of the compute type (bf16 when compute_bf16, else float32; float32 inputs are rounded
// block by block); mask [n] float32 (1 for a pair's target row); the scorer's weights [L_j, in_j] and biases (any
// float type; read as float32). Returns {loss, g_states [n, H], g_x [2, n, D], g_w... , g_b...}: the loss summed
// over the pairs' softplus terms (not yet divided by the pair count), the input gradients (float32, g_states
// aligned with states) and the weight / bias gradients (float32) of the mean (scale = 1 / pairs) -- or {loss}
// alone when grads is false. bf16 needs even H, D and hidden widths (the micro-kernel's right-hand sides pair
// rows).
inline std::vector<at::Tensor> pair_loss_fused(at::Tensor states, at::Tensor behaviours, at::Tensor negatives,
                                               at::Tensor mask, std::vector<at::Tensor> weights,
                                               std::vector<at::Tensor> biases, double scale, bool grads,
                                               bool compute_bf16) {
  TORCH_CHECK(states.device().is_cpu() && states.dim() == 2 && states.is_contiguous(),
              "pair loss: states must be contiguous [n, H]");
  const auto dt = states.scalar_type();
  const auto ct = compute_bf16 ? at::kBFloat16 : at::kFloat;
  TORCH_CHECK(dt == at::kFloat || dt == ct, "pair loss: inputs must be float32 or of the compute type ", ct,
              ", got ", dt);
  TORCH_CHECK(behaviours.scalar_type() == dt && negatives.scalar_type() == dt && behaviours.is_contiguous() &&
                  negatives.is_contiguous() && behaviours.sizes() == negatives.sizes() &&
                  behaviours.dim() == 2 && behaviours.size(0) == states.size(0),
              "pair loss: behaviours and negatives must be contiguous [n, D] of states' type");
  TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.numel() == states.size(0) && mask.is_contiguous(),
              "pair loss: mask must be float32 [n]");
  TORCH_CHECK(weights.size() == biases.size() && weights.size() >= 2, "pair loss: need >= 2 layers");
  const int64_t k = weights.size();
  TORCH_CHECK(weights[0].size(1) == states.size(1) + behaviours.size(1),
              "pair loss: first layer takes H + D inputs");
  TORCH_CHECK(weights[k - 1].size(0) == 1, "pair loss: the last layer must have one output");
  for (int64_t j = 1; j < k; ++j)
    TORCH_CHECK(weights[j].size(1) == weights[j - 1].size(0), "pair loss: layer ", j, " takes ",
                weights[j].size(1), " inputs, the layer below gives ", weights[j - 1].size(0));
  using din_pair_loss::fused_impl;
  using Bf16 = c10::BFloat16;
  if (compute_bf16) {
    bool even = states.size(1) % 2 == 0 && behaviours.size(1) % 2 == 0;
    for (int64_t j = 0; j < k - 1; ++j) even = even && weights[j].size(0) % 2 == 0;
    TORCH_CHECK(even, "pair loss: bf16 needs even state, behaviour and hidden widths");
    if (dt == at::kFloat)
      return fused_impl<Bf16, float>(states, behaviours, negatives, mask, weights, biases, scale, grads);
    return fused_impl<Bf16, Bf16>(states, behaviours, negatives, mask, weights, biases, scale, grads);
  }
  return fused_impl<float, float>(states, behaviours, negatives, mask, weights, biases, scale, grads);
}
