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
// sums) in one loop over the block that also writes the next product's operands in the layouts the
// micro-kernel takes (row-major for a left-hand side; for a right-hand side, row-major in float32 and pairs of
// rows interleaved -- "VNNI" -- in bf16). The pre-activations, logits and every sum stay float32; the
// activations, and the gradients fed into products, are rounded to the compute type (bf16 under autocast) as a
// bf16 matmul's operands are; under bf16 the hidden activations' sigmoids are computed to that precision only
// (kernel_math.h: sigmoid_for / exp_bf16), the loss's own sigmoid in full.
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

template <typename T>
constexpr bool kVnni = std::is_same_v<T, c10::BFloat16>;

// Index of element (k, n) of a [K, N] right-hand side in the micro-kernel's layout.
template <typename T>
inline int64_t b_index(int64_t k, int64_t n, int64_t cols) {
  if constexpr (kVnni<T>) return ((k >> 1) * cols + n) * 2 + (k & 1);
  else return k * cols + n;
}

// C[m, n] (+)= A[m, k] B[k, n]: A row-major (leading dimension lda), B in b_index's layout.
template <typename T>
inline void mm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, float* c, int64_t ldc,
               bool accumulate) {
  if constexpr (kVnni<T>) at::native::cpublas::brgemm(m, n, k, lda, n, ldc, accumulate, a, b, c, true);
  else din_gemm::gemm_rows(m, n, k, a, lda, b, n, c, ldc, accumulate);
}

// A [K, N] right-hand side from get(k, n), in b_index's layout.
template <typename T, typename Get>
std::vector<T> pack_b(int64_t k, int64_t n, Get get) {
  std::vector<T> out(k * n);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < n; ++j) out[b_index<T>(i, j, n)] = static_cast<T>(get(i, j));
  return out;
}

inline float softplus(float x) { return std::max(x, 0.0f) + std::log1p(std::exp(-std::abs(x))); }

// The element-wise loops below are kept apart so that each vectorises (GCC: the float math with exp through
// libmvec and its conversion in one loop, layout changes in others): one loop doing all of it with a strided
// store ran scalar, with a scalar expf per element (measured: the bf16 block loop 2x slower than the PyTorch
// one).

// Rows [rows, cols] (row-major, rows even) into the bf16 right-hand-side layout (b_index; din_gemm::vnni_words);
// float32's is the same layout as the rows, so only bf16 calls this.
inline void to_vnni(const c10::BFloat16* src, c10::BFloat16* dst, int64_t rows, int64_t cols) {
  din_gemm::vnni_words(reinterpret_cast<const uint16_t*>(src), rows, cols, rows / 2,
                       reinterpret_cast<uint32_t*>(dst));
}

// The right-hand-side form of row-major rows: the rows themselves for float32, a VNNI copy in buf for bf16.
template <typename T>
inline const T* as_b(const T* rows_ptr, std::vector<T>& buf, int64_t rows, int64_t cols) {
  if constexpr (kVnni<T>) {
    to_vnni(rows_ptr, buf.data(), rows, cols);
    return buf.data();
  } else {
    return rows_ptr;
  }
}

// Per-thread accumulators and block buffers.
template <typename T>
struct Work {
  double loss = 0.0;
  std::vector<std::vector<float>> gw, gb;  // layer 0's weight gradient as [L0, H + D]
  std::vector<float> gw0h, gw0e;           // layer 0's state / behaviour halves, [L0, H] and [L0, D]
  std::vector<T> hs, hs_b, x, x_b;         // the block's inputs: row-major and right-hand-side (bf16) layouts
  std::vector<float> s, z, logit, dl, da, dzf, out;
  std::vector<std::vector<T>> act;         // each hidden layer's activations, row-major
  std::vector<T> act_b;                    // one of them in the right-hand-side layout (bf16)
  std::vector<T> dz, dz_t, ds, ds_t;        // gradients fed into products: row-major and transposed
  std::vector<uint32_t> words;              // transpose_rows's scratch
};

// n rows of In (float32 or T) widened / rounded to T.
template <typename T, typename In>
inline void convert_rows(const In* __restrict__ src, int64_t count, T* __restrict__ dst) {
  if constexpr (std::is_same_v<In, float>) din_ops::store_row(src, dst, count);
  else std::memcpy(dst, src, sizeof(T) * count);
}

// rows x cols row-major -> dst [cols, ld] transposed (dst[c * ld + r]), from the rows in float32 (f) and in T
// (t, the same values rounded): float32 as 32-bit words; bf16 as pairs of rows packed into words (scratch,
// [rows / 2, cols]; rows even), whose transpose is the bf16 transpose (each word holds one column's two
// consecutive rows). Both through the AVX-512 tile transpose (din_gemm::transpose_u32): an element-by-element
// loop here was ~7 % of this kernel's own time.
template <typename T>
inline void transpose_rows(const float* f, const T* t, T* dst, int64_t rows, int64_t cols, int64_t ld,
                           uint32_t* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    (void)t;
    (void)scratch;
    din_gemm::transpose_u32(reinterpret_cast<const uint32_t*>(f), cols, reinterpret_cast<uint32_t*>(dst), ld, rows,
                            cols);
  } else {
    (void)f;
    to_vnni(t, reinterpret_cast<T*>(scratch), rows, cols);
    din_gemm::transpose_u32(scratch, cols, reinterpret_cast<uint32_t*>(dst), ld / 2, rows / 2, cols);
  }
}

// T: the compute type; In: the inputs' type (T, or float32 read and rounded block by block).
template <typename T, typename In>
std::vector<at::Tensor> fused_impl(const at::Tensor& states, const at::Tensor& behaviours,
                                   const at::Tensor& negatives, const at::Tensor& mask,
                                   const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                                   double scale, bool grads) {
  const int64_t n = states.size(0), h = states.size(1), d = behaviours.size(1), k = weights.size();
  std::vector<int64_t> width(k);  // output width of each layer; width[k - 1] == 1
  for (int64_t j = 0; j < k; ++j) width[j] = weights[j].size(0);
  const int64_t l0 = width[0], last_in = width[k - 2];
  int64_t wmax = 0;
  for (int64_t j = 0; j < k - 1; ++j) wmax = std::max(wmax, width[j]);
  wmax = std::max({wmax, h, d});

  // Weights as float for reading, packed once as right-hand sides.
  std::vector<at::Tensor> wf, bf;
  for (int64_t j = 0; j < k; ++j) {
    wf.push_back(weights[j].to(at::kFloat).contiguous());
    bf.push_back(biases[j].to(at::kFloat).contiguous());
  }
  const float* w0 = wf[0].data_ptr<float>();
  const int64_t in0 = h + d;
  const std::vector<T> b_h = pack_b<T>(h, l0, [&](int64_t i, int64_t j) { return w0[j * in0 + i]; });
  const std::vector<T> b_e = pack_b<T>(d, l0, [&](int64_t i, int64_t j) { return w0[j * in0 + h + i]; });
  const std::vector<T> bb_h = pack_b<T>(l0, h, [&](int64_t i, int64_t j) { return w0[i * in0 + j]; });
  const std::vector<T> bb_e = pack_b<T>(l0, d, [&](int64_t i, int64_t j) { return w0[i * in0 + h + j]; });
  std::vector<std::vector<T>> bf_mid(k), bb_mid(k);  // layers 1 .. k - 2: forward (W^T) and backward (W)
  for (int64_t j = 1; j < k - 1; ++j) {
    const float* w = wf[j].data_ptr<float>();
    const int64_t in = width[j - 1], o = width[j];
    bf_mid[j] = pack_b<T>(in, o, [&](int64_t a, int64_t b) { return w[b * in + a]; });
    bb_mid[j] = pack_b<T>(o, in, [&](int64_t a, int64_t b) { return w[a * in + b]; });
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
  constexpr int64_t r2 = 2 * kBlock;  // scored rows of a full block; leading dimension of transposed buffers

  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      Work<T>& w = works[t];
      w.hs.assign(kBlock * h, T(0));
      w.hs_b.assign(kBlock * h, T(0));
      w.x.assign(r2 * d, T(0));
      w.x_b.assign(r2 * d, T(0));
      w.s.resize(kBlock * l0);
      w.z.resize(r2 * wmax);
      w.logit.resize(r2);
      w.dl.resize(r2);
      w.da.resize(r2 * wmax);
      w.dzf.resize(r2 * l0);
      w.out.resize(r2 * wmax);
      w.act.assign(k - 1, {});
      for (int64_t j = 0; j < k - 1; ++j) w.act[j].resize(r2 * width[j]);
      w.act_b.resize(r2 * wmax);
      w.dz.resize(r2 * wmax);
      w.dz_t.resize(wmax * r2);
      w.ds.resize(kBlock * l0);
      w.ds_t.resize(l0 * kBlock);
      w.words.resize(kBlock * wmax);
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
        // Every block has kBlock rows, a short last one padded with zero rows (mask 0: they add nothing to any
        // gradient): one set of micro-kernel shapes (each JIT kernel keeps a code buffer of a few hundred KB;
        // a kernel per last-block size had grown DIEN training by ~600 MB).
        const int64_t half = kBlock;
        const int64_t rows = 2 * half;  // scored rows: positives [0, half), negatives [half, 2 half)
        // Target row r pairs with state r - 1 (row 0, were it a target, with a zero state).
        for (int64_t i = 0; i < m; ++i) {
          const int64_t r = rows_of[i];
          if (r > 0) convert_rows(sp + (r - 1) * h, h, w.hs.data() + i * h);
          else std::fill(w.hs.data() + i * h, w.hs.data() + (i + 1) * h, T(0));
          convert_rows(bp + r * d, d, w.x.data() + i * d);
          convert_rows(np + r * d, d, w.x.data() + (half + i) * d);
        }
        if (m < half) {
          std::fill(w.hs.data() + m * h, w.hs.data() + half * h, T(0));
          std::fill(w.x.data() + m * d, w.x.data() + half * d, T(0));
          std::fill(w.x.data() + (half + m) * d, w.x.data() + rows * d, T(0));
        }
        // Layer 0: the state side once for both halves, the behaviour side for all rows.
        mm<T>(half, l0, h, w.hs.data(), h, b_h.data(), w.s.data(), l0, false);
        mm<T>(rows, l0, d, w.x.data(), d, b_e.data(), w.z.data(), l0, false);
        {
          const float* b0 = bf[0].data_ptr<float>();
          for (int64_t r = 0; r < rows; ++r) {
            const float* __restrict__ sr = w.s.data() + (r % half) * l0;
            float* __restrict__ zr = w.z.data() + r * l0;
            for (int64_t c = 0; c < l0; ++c) zr[c] = din_ops::sigmoid_for<T>(zr[c] + sr[c] + b0[c]);
          }
          din_ops::store_row(w.z.data(), w.act[0].data(), rows * l0);
        }
        for (int64_t j = 1; j < k - 1; ++j) {
          const int64_t in = width[j - 1], o = width[j];
          mm<T>(rows, o, in, w.act[j - 1].data(), in, bf_mid[j].data(), w.z.data(), o, false);
          const float* __restrict__ bj = bf[j].data_ptr<float>();
          for (int64_t r = 0; r < rows; ++r) {
            float* __restrict__ zr = w.z.data() + r * o;
            for (int64_t c = 0; c < o; ++c) zr[c] = din_ops::sigmoid_for<T>(zr[c] + bj[c]);
          }
          din_ops::store_row(w.z.data(), w.act[j].data(), rows * o);
        }
        // Output layer (one unit): a dot product per row; the loss over the block's real pairs.
        const T* a_last = w.act[k - 2].data();
        for (int64_t r = 0; r < rows; ++r) {
          float acc = b_last;
          for (int64_t c = 0; c < last_in; ++c) acc += din_ops::to_float(a_last[r * last_in + c]) * w_last[c];
          w.logit[r] = acc;
        }
        for (int64_t i = 0; i < m; ++i) {
          const float mk = mp[rows_of[i]];
          w.loss += mk * (softplus(-w.logit[i]) + softplus(w.logit[half + i]));
        }
        if (!grads) continue;

        // Backward. d loss / d logit for a gradient of 1 of the mean: (p - 1) / pairs on positives, p / pairs on
        // negatives, 0 on unpaired rows.
        for (int64_t i = 0; i < half; ++i) {
          const float mk = i < m ? mp[rows_of[i]] * static_cast<float>(scale) : 0.0f;
          w.dl[i] = (sigmoid(w.logit[i]) - 1.0f) * mk;
          w.dl[half + i] = sigmoid(w.logit[half + i]) * mk;
        }
        // Output layer: its weight and bias gradients; the gradient of the last hidden pre-activation (float32
        // in da, then rounded into dz and its transpose).
        {
          float* __restrict__ gw = w.gw[k - 1].data();
          float* __restrict__ gb = w.gb[k - 2].data();  // the last hidden layer's bias
          const int64_t o = last_in;
          // Layer 0's pre-activation gradient is kept in float32 (dzf) for its state half: written there
          // directly when this is layer 0 (k == 2), as the hidden loop below does for its last layer.
          float* dst = k == 2 ? w.dzf.data() : w.da.data();
          float gbl = 0.0f;
          for (int64_t r = 0; r < rows; ++r) {
            const float g = w.dl[r];
            const T* __restrict__ ar = a_last + r * o;
            float* __restrict__ dr = dst + r * o;
            gbl += g;
            for (int64_t c = 0; c < o; ++c) {
              const float a = din_ops::to_float(ar[c]);
              gw[c] += g * a;
              const float v = g * w_last[c] * a * (1.0f - a);
              gb[c] += v;
              dr[c] = v;
            }
          }
          w.gb[k - 1][0] += gbl;
          din_ops::store_row(dst, w.dz.data(), rows * o);
          transpose_rows<T>(dst, w.dz.data(), w.dz_t.data(), rows, o, r2, w.words.data());
        }
        // Hidden layers k - 2 .. 1: weight gradient, then the gradient of the layer below's pre-activation.
        for (int64_t j = k - 2; j >= 1; --j) {
          const int64_t in = width[j - 1], o = width[j];
          const T* a_b = as_b<T>(w.act[j - 1].data(), w.act_b, rows, in);
          mm<T>(o, in, rows, w.dz_t.data(), r2, a_b, w.gw[j].data(), in, true);
          float* dst = j == 1 ? w.dzf.data() : w.da.data();  // layer 0's gradient stays in dzf (see above)
          mm<T>(rows, in, o, w.dz.data(), o, bb_mid[j].data(), dst, in, false);
          float* __restrict__ gb = w.gb[j - 1].data();
          for (int64_t r = 0; r < rows; ++r) {
            const T* __restrict__ ar = w.act[j - 1].data() + r * in;
            float* __restrict__ dr = dst + r * in;
            for (int64_t c = 0; c < in; ++c) {
              const float av = din_ops::to_float(ar[c]);
              const float v = dr[c] * av * (1.0f - av);
              gb[c] += v;
              dr[c] = v;
            }
          }
          din_ops::store_row(dst, w.dz.data(), rows * in);
          transpose_rows<T>(dst, w.dz.data(), w.dz_t.data(), rows, in, r2, w.words.data());
        }
        // Layer 0 (dz holds its pre-activation's gradient, [rows, L0]): the behaviour half of the weight
        // gradient over all rows; the state half from the two halves' sum ds (both scored rows share the state).
        mm<T>(l0, d, rows, w.dz_t.data(), r2, as_b<T>(w.x.data(), w.x_b, rows, d), w.gw0e.data(), d, true);
        for (int64_t i = 0; i < half; ++i) {
          const float* __restrict__ p = w.dzf.data() + i * l0;
          const float* __restrict__ q = w.dzf.data() + (half + i) * l0;
          float* __restrict__ o = w.da.data() + i * l0;
          for (int64_t c = 0; c < l0; ++c) o[c] = p[c] + q[c];
        }
        din_ops::store_row(w.da.data(), w.ds.data(), half * l0);
        transpose_rows<T>(w.da.data(), w.ds.data(), w.ds_t.data(), half, l0, kBlock, w.words.data());
        mm<T>(l0, h, half, w.ds_t.data(), kBlock, as_b<T>(w.hs.data(), w.hs_b, half, h), w.gw0h.data(), h, true);
        mm<T>(half, h, l0, w.ds.data(), l0, bb_h.data(), w.out.data(), h, false);
        for (int64_t i = 0; i < m; ++i)
          if (rows_of[i] > 0) std::memcpy(gsp + (rows_of[i] - 1) * h, w.out.data() + i * h, sizeof(float) * h);
        mm<T>(rows, d, l0, w.dz.data(), l0, bb_e.data(), w.out.data(), d, false);
        for (int64_t i = 0; i < m; ++i) {
          std::memcpy(gxp + rows_of[i] * d, w.out.data() + i * d, sizeof(float) * d);
          std::memcpy(gxp + (n + rows_of[i]) * d, w.out.data() + (half + i) * d, sizeof(float) * d);
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
