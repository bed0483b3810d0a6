// Two jagged row operations of DIN's target attention, forward and backward, for the CPU. Rows are the N
// behaviours of a batch; seg[n] is the sample of row n (any order: sums over a sample accumulate).
//
//   product_features:    x[n] = [b[n], b[n] * c[seg[n]]]            b [N, D], c [B, D]  -> x [N, 2D]
//   weighted_segment_sum: p[s] = sum over rows n of sample s of w[n] b[n]                -> p [B, D]
//
// In ATen the first is a gather of c, a product and a concatenation (3 passes, a 4th to cast x to bf16 under
// autocast) and its backward a split, two products, a scatter-add and an accumulation; the second a product and
// a scatter-add forward, a gather, a product and a row sum backward. Here each is one pass over the rows each
// way. The sums over a sample (the gradient of c, the pooled rows) go into per-thread partial [B, D] buffers,
// added in thread order. References: din_torchrec.ops.jagged (product_features_reference,
// weighted_segment_sum_reference); tests compare values and gradients.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "kernel_math.h"

#include <vector>

namespace din_jagged {

using din_ops::to_float;

// Runs fn(row_begin, row_end, partial) over row ranges, one range per thread, each summing into its own zeroed
// [rows_b, d] float buffer; returns the buffers' sum as a [rows_b, d] float tensor.
template <typename F>
at::Tensor partial_sums(int64_t n, int64_t rows_b, int64_t d, const at::TensorOptions& opts, const F& fn) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 2048));
  std::vector<float> partial(parts * rows_b * d, 0.0f);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) fn(n * p / parts, n * (p + 1) / parts, partial.data() + p * rows_b * d);
  });
  at::Tensor out = at::zeros({rows_b, d}, opts.dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t p = 0; p < parts; ++p) {
    const float* src = partial.data() + p * rows_b * d;
    for (int64_t i = 0; i < rows_b * d; ++i) o[i] += src[i];
  }
  return out;
}

template <typename T>
inline void features_row(const float* __restrict__ b, const float* __restrict__ c, T* __restrict__ x, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    x[j] = static_cast<T>(b[j]);
    x[d + j] = static_cast<T>(b[j] * c[j]);
  }
}

template <typename T>
inline void features_grad_row(const T* __restrict__ g, const float* __restrict__ b, const float* __restrict__ c,
                              float* __restrict__ gb, float* __restrict__ gc, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    const float g2 = to_float(g[d + j]);
    gb[j] = to_float(g[j]) + g2 * c[j];
    gc[j] += g2 * b[j];
  }
}

inline void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == dim && t.is_contiguous(), "jagged kernels: ", name,
              " must be a contiguous ", dim, "-D CPU tensor");
}

template <typename T>
at::Tensor features_impl(const at::Tensor& b, const at::Tensor& c, const at::Tensor& seg) {
  const int64_t n = b.size(0), d = b.size(1);
  at::Tensor x = at::empty({n, 2 * d}, b.options().dtype(c10::CppTypeToScalarType<T>::value));
  const float* bp = b.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const int64_t* sp = seg.data_ptr<int64_t>();
  T* xp = x.data_ptr<T>();
  at::parallel_for(0, n, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) features_row<T>(bp + r * d, cp + sp[r] * d, xp + r * 2 * d, d);
  });
  return x;
}

template <typename T>
std::vector<at::Tensor> features_backward_impl(const at::Tensor& g, const at::Tensor& b, const at::Tensor& c,
                                               const at::Tensor& seg) {
  const int64_t n = b.size(0), d = b.size(1), rows_b = c.size(0);
  at::Tensor gb = at::empty({n, d}, b.options());
  const T* gp = g.data_ptr<T>();
  const float* bp = b.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const int64_t* sp = seg.data_ptr<int64_t>();
  float* gbp = gb.data_ptr<float>();
  at::Tensor gc = partial_sums(n, rows_b, d, b.options(), [&](int64_t r0, int64_t r1, float* part) {
    for (int64_t r = r0; r < r1; ++r)
      features_grad_row<T>(gp + r * 2 * d, bp + r * d, cp + sp[r] * d, gbp + r * d, part + sp[r] * d, d);
  });
  return {gb, gc};
}

template <typename W>
at::Tensor weighted_sum_impl(const at::Tensor& b, const at::Tensor& w, const at::Tensor& seg, int64_t rows_b) {
  const int64_t n = b.size(0), d = b.size(1);
  const float* bp = b.data_ptr<float>();
  const W* wp = w.data_ptr<W>();
  const int64_t* sp = seg.data_ptr<int64_t>();
  return partial_sums(n, rows_b, d, b.options(), [&](int64_t r0, int64_t r1, float* part) {
    for (int64_t r = r0; r < r1; ++r) {
      const float wr = to_float(wp[r]);
      const float* __restrict__ br = bp + r * d;
      float* __restrict__ pr = part + sp[r] * d;
      for (int64_t j = 0; j < d; ++j) pr[j] += wr * br[j];
    }
  });
}

template <typename W>
std::vector<at::Tensor> weighted_sum_backward_impl(const at::Tensor& gp, const at::Tensor& b, const at::Tensor& w,
                                                   const at::Tensor& seg) {
  const int64_t n = b.size(0), d = b.size(1);
  at::Tensor gb = at::empty({n, d}, b.options());
  at::Tensor gw = at::empty({n}, w.options());
  const float* gpp = gp.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const W* wp = w.data_ptr<W>();
  const int64_t* sp = seg.data_ptr<int64_t>();
  float* gbp = gb.data_ptr<float>();
  W* gwp = gw.data_ptr<W>();
  at::parallel_for(0, n, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float wr = to_float(wp[r]);
      const float* __restrict__ g = gpp + sp[r] * d;
      const float* __restrict__ br = bp + r * d;
      float* __restrict__ out = gbp + r * d;
      float dot = 0.0f;
      for (int64_t j = 0; j < d; ++j) {
        out[j] = wr * g[j];
        dot += br[j] * g[j];
      }
      gwp[r] = static_cast<W>(dot);
    }
  });
  return {gb, gw};
}

inline void check_common(const at::Tensor& b, const at::Tensor& seg) {
  check(b, "b", 2);
  check(seg, "seg", 1);
  TORCH_CHECK(b.scalar_type() == at::kFloat, "jagged kernels: b must be float32");
  TORCH_CHECK(seg.scalar_type() == at::kLong && seg.size(0) == b.size(0),
              "jagged kernels: seg must be int64 with one entry per row of b");
}

}  // namespace din_jagged

inline at::Tensor product_features(at::Tensor b, at::Tensor c, at::Tensor seg, bool bf16_out) {
  using namespace din_jagged;
  check_common(b, seg);
  check(c, "c", 2);
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.size(1) == b.size(1), "jagged kernels: c must be float32 [B, D]");
  return bf16_out ? features_impl<c10::BFloat16>(b, c, seg) : features_impl<float>(b, c, seg);
}

inline std::vector<at::Tensor> product_features_backward(at::Tensor g, at::Tensor b, at::Tensor c, at::Tensor seg) {
  using namespace din_jagged;
  check_common(b, seg);
  check(g, "grad", 2);
  TORCH_CHECK(g.size(0) == b.size(0) && g.size(1) == 2 * b.size(1), "jagged kernels: grad must be [N, 2D]");
  if (g.scalar_type() == at::kBFloat16) return features_backward_impl<c10::BFloat16>(g, b, c, seg);
  TORCH_CHECK(g.scalar_type() == at::kFloat, "jagged kernels: grad must be float32 or bfloat16");
  return features_backward_impl<float>(g, b, c, seg);
}

inline at::Tensor weighted_segment_sum(at::Tensor b, at::Tensor w, at::Tensor seg, int64_t num_segments) {
  using namespace din_jagged;
  check_common(b, seg);
  check(w, "w", 1);
  TORCH_CHECK(w.size(0) == b.size(0), "jagged kernels: w must have one entry per row of b");
  if (w.scalar_type() == at::kBFloat16) return weighted_sum_impl<c10::BFloat16>(b, w, seg, num_segments);
  TORCH_CHECK(w.scalar_type() == at::kFloat, "jagged kernels: w must be float32 or bfloat16");
  return weighted_sum_impl<float>(b, w, seg, num_segments);
}

inline std::vector<at::Tensor> weighted_segment_sum_backward(at::Tensor gp, at::Tensor b, at::Tensor w,
                                                             at::Tensor seg) {
  using namespace din_jagged;
  check_common(b, seg);
  check(gp, "grad", 2);
  TORCH_CHECK(gp.scalar_type() == at::kFloat && gp.size(1) == b.size(1), "jagged kernels: grad must be float32 [B, D]");
  if (w.scalar_type() == at::kBFloat16) return weighted_sum_backward_impl<c10::BFloat16>(gp, b, w, seg);
  return weighted_sum_backward_impl<float>(gp, b, w, seg);
}
