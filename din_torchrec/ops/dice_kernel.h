// Dice (DIN paper, eq. 8) in training mode, forward and backward, fused for the CPU.
//
//   z = (x - mean) * invstd,  p = sigmoid(z),  gate = alpha + (1 - alpha) p,  out = x * gate
//
// with mean / biased variance over the N rows of x [N, H] (per column). ATen runs this as ~9 passes over
// [N, H] forward and ~18 backward (batch norm, sigmoid, addcmul, muls, sums, batch-norm backward): each pass
// costs about the same whether the activations fit in cache or not, so the time is in the number of passes.
// Here the forward is 2 passes (column statistics, then the output and the sigmoid p, kept in float32; for bf16
// x computed to bf16 precision: kernel_math.h exp_bf16, relative errors of p and 1 - p below 7.5e-5) and
// the backward 2 (column sums, then grad_x), recomputing z and the gate from x and p. Recomputing p too
// (exp and a division per element, twice) made the backward 1.5-2.4x slower than reading it back. Per-column parameters are the inner,
// contiguous dimension, so the inner loops vectorise (rows grouped so that their width is a multiple of 16
// floats, see Layout). Row blocks run in parallel (at::parallel_for); each block keeps its own column partial
// sums, added in block order (deterministic: the blocks do not depend on the thread count).
// Reference: din_torchrec.modules.activations.Dice.forward_reference (tests compare values and gradients).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "kernel_math.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace din_dice {

constexpr int64_t kBlockRows = 256;

using din_ops::sigmoid;
using din_ops::to_float;

// The inner loops, one row each, as functions with restrict-qualified parameters: GCC then vectorises them
// without run-time alias checks (restrict on pointers captured by a lambda is not honoured).
template <typename T>
inline void moments_row(const T* __restrict__ row, const float* __restrict__ shift, float* __restrict__ s1,
                        float* __restrict__ s2, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    const float v = to_float(row[j]) - shift[j];
    s1[j] += v;
    s2[j] += v * v;
  }
}

template <typename T>
inline void forward_row(const T* __restrict__ row, const float* __restrict__ m, const float* __restrict__ is,
                        const float* __restrict__ a, T* __restrict__ out, float* __restrict__ prob, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    const float xv = to_float(row[j]);
    const float p = din_ops::sigmoid_for<T>((xv - m[j]) * is[j]);  // bf16 x: to bf16 precision (exp_bf16)
    out[j] = static_cast<T>(xv * (a[j] + (1.0f - a[j]) * p));
    prob[j] = p;
  }
}

template <typename T>
inline void backward_sums_row(const T* __restrict__ row, const T* __restrict__ grow, const float* __restrict__ prob,
                              const float* __restrict__ m, const float* __restrict__ is, const float* __restrict__ a,
                              float* __restrict__ sa, float* __restrict__ sg, float* __restrict__ sgz, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    const float xv = to_float(row[j]);
    const float z = (xv - m[j]) * is[j];
    const float p = prob[j];
    const float q = to_float(grow[j]) * xv * (1.0f - p);
    const float gz = q * p * (1.0f - a[j]);
    sa[j] += q;
    sg[j] += gz;
    sgz[j] += gz * z;
  }
}

template <typename T>
inline void grad_x_row(const T* __restrict__ row, const T* __restrict__ grow, const float* __restrict__ prob,
                       const float* __restrict__ m, const float* __restrict__ is, const float* __restrict__ a,
                       const float* __restrict__ mean_g, const float* __restrict__ mean_gz, T* __restrict__ gx,
                       int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    const float xv = to_float(row[j]);
    const float z = (xv - m[j]) * is[j];
    const float p = prob[j];
    const float g = to_float(grow[j]);
    const float q = g * xv * (1.0f - p);
    const float gz = q * p * (1.0f - a[j]);
    const float gate = a[j] + (1.0f - a[j]) * p;
    gx[j] = static_cast<T>(g * gate + is[j] * (gz - mean_g[j] - z * mean_gz[j]));
  }
}

// Rows are processed in groups of r = 16 / gcd(H, 16) consecutive rows, one contiguous "super-row" of
// W = r H values whose width is a multiple of 16 floats (one AVX-512 register), with the per-column parameters
// tiled r times: the inner loops then run without a remainder. For H = 40 (DIN's second attention layer)
// the per-row remainder had made [N, 40] slower than [N, 80]. Rows left over (N mod r) run one by one.
struct Layout {
  int64_t n, h, r, w, groups;
  Layout(int64_t n_, int64_t h_) : n(n_), h(h_) {
    r = 16 / std::gcd<int64_t>(h, 16);
    w = r * h;
    groups = n / r;
  }
  std::vector<float> tile(const float* v) const {
    std::vector<float> t(w);
    for (int64_t k = 0; k < w; ++k) t[k] = v[k % h];
    return t;
  }
  // Sums the r tiles of a W-wide accumulator into column sums (adds into out[0, h)).
  void fold(const float* acc, double* out) const {
    for (int64_t k = 0; k < w; ++k) out[k % h] += acc[k];
  }
};

// Column sums of (x - shift) and (x - shift)^2 with shift = the first row: the shifted-data variance
// (var = E[d^2] - E[d]^2 for d = x - shift) does not cancel catastrophically when |mean| >> std, as the
// unshifted formula does in float. Float within a block of 256 super-rows, double across blocks.
template <typename T>
void column_moments(const T* x, const Layout& L, std::vector<float>& shift, std::vector<double>& s1,
                    std::vector<double>& s2) {
  const int64_t h = L.h, w = L.w;
  shift.resize(h);
  for (int64_t j = 0; j < h; ++j) shift[j] = to_float(x[j]);
  const std::vector<float> sh_t = L.tile(shift.data());
  const int64_t nblocks = (L.groups + kBlockRows - 1) / kBlockRows;
  std::vector<float> part1((nblocks + 1) * w, 0.0f), part2((nblocks + 1) * w, 0.0f);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* a1 = part1.data() + b * w;
      float* a2 = part2.data() + b * w;
      const int64_t g1 = std::min(L.groups, (b + 1) * kBlockRows);
      for (int64_t g = b * kBlockRows; g < g1; ++g) moments_row(x + g * w, sh_t.data(), a1, a2, w);
    }
  });
  for (int64_t r = L.groups * L.r; r < L.n; ++r)  // leftover rows, into the last (extra) partial
    moments_row(x + r * h, shift.data(), part1.data() + nblocks * w, part2.data() + nblocks * w, h);
  s1.assign(h, 0.0);
  s2.assign(h, 0.0);
  for (int64_t b = 0; b <= nblocks; ++b) {
    L.fold(part1.data() + b * w, s1.data());
    L.fold(part2.data() + b * w, s2.data());
  }
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& alpha, double eps) {
  const int64_t n = x.size(0), h = x.size(1);
  const Layout L(n, h);
  const T* xp = x.data_ptr<T>();
  std::vector<float> shift;
  std::vector<double> s1, s2;
  column_moments(xp, L, shift, s1, s2);
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({h}, opts), var = at::empty({h}, opts), invstd = at::empty({h}, opts);
  float* m = mean.data_ptr<float>();
  float* v = var.data_ptr<float>();
  float* is = invstd.data_ptr<float>();
  for (int64_t j = 0; j < h; ++j) {
    const double d = s1[j] / n;  // mean - shift
    const double var_j = std::max(s2[j] / n - d * d, 0.0);
    m[j] = static_cast<float>(shift[j] + d);
    v[j] = static_cast<float>(var_j);
    is[j] = static_cast<float>(1.0 / std::sqrt(var_j + eps));
  }
  const float* a = alpha.data_ptr<float>();
  const std::vector<float> m_t = L.tile(m), is_t = L.tile(is), a_t = L.tile(a);
  // The sigmoid is kept in float32 for the backward (in bf16, 1 - p near p = 1 would lose all precision).
  at::Tensor out = at::empty_like(x), prob = at::empty_like(x, x.options().dtype(at::kFloat));
  T* op = out.data_ptr<T>();
  float* pp = prob.data_ptr<float>();
  const int64_t w = L.w;
  at::parallel_for(0, L.groups, kBlockRows, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      forward_row(xp + g * w, m_t.data(), is_t.data(), a_t.data(), op + g * w, pp + g * w, w);
  });
  for (int64_t r = L.groups * L.r; r < n; ++r) forward_row(xp + r * h, m, is, a, op + r * h, pp + r * h, h);
  return {out, mean, var, invstd, prob};
}

template <typename T>
std::vector<at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& prob, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& alpha) {
  const int64_t n = x.size(0), h = x.size(1);
  const Layout L(n, h);
  const int64_t w = L.w;
  const T* xp = x.data_ptr<T>();
  const T* gp = grad.data_ptr<T>();
  const float* pp = prob.data_ptr<float>();
  const float* m = mean.data_ptr<float>();
  const float* is = invstd.data_ptr<float>();
  const float* a = alpha.data_ptr<float>();
  const std::vector<float> m_t = L.tile(m), is_t = L.tile(is), a_t = L.tile(a);
  // Pass 1: column sums of t (1 - p) (alpha's gradient), of gz and of gz * z (batch-norm backward), with
  // t = grad * x and gz = t (1 - p) p (1 - alpha), the gradient reaching z.
  const int64_t nblocks = (L.groups + kBlockRows - 1) / kBlockRows;
  std::vector<float> pa((nblocks + 1) * w, 0.0f), pg((nblocks + 1) * w, 0.0f), pgz((nblocks + 1) * w, 0.0f);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g1 = std::min(L.groups, (b + 1) * kBlockRows);
      for (int64_t g = b * kBlockRows; g < g1; ++g)
        backward_sums_row(xp + g * w, gp + g * w, pp + g * w, m_t.data(), is_t.data(), a_t.data(), pa.data() + b * w,
                          pg.data() + b * w, pgz.data() + b * w, w);
    }
  });
  for (int64_t r = L.groups * L.r; r < n; ++r)
    backward_sums_row(xp + r * h, gp + r * h, pp + r * h, m, is, a, pa.data() + nblocks * w, pg.data() + nblocks * w,
                      pgz.data() + nblocks * w, h);
  std::vector<double> ga(h, 0.0), mg(h, 0.0), mgz(h, 0.0);
  for (int64_t b = 0; b <= nblocks; ++b) {
    L.fold(pa.data() + b * w, ga.data());
    L.fold(pg.data() + b * w, mg.data());
    L.fold(pgz.data() + b * w, mgz.data());
  }
  std::vector<float> mean_g(h), mean_gz(h);
  for (int64_t j = 0; j < h; ++j) {
    mean_g[j] = static_cast<float>(mg[j] / n);
    mean_gz[j] = static_cast<float>(mgz[j] / n);
  }
  const std::vector<float> mean_g_t = L.tile(mean_g.data()), mean_gz_t = L.tile(mean_gz.data());
  at::Tensor grad_alpha = at::empty({h}, x.options().dtype(at::kFloat));
  float* gap = grad_alpha.data_ptr<float>();
  for (int64_t j = 0; j < h; ++j) gap[j] = static_cast<float>(ga[j]);
  // Pass 2: grad_x = grad * gate + invstd (gz - mean(gz) - z mean(gz z)).
  at::Tensor grad_x = at::empty_like(x);
  T* gx = grad_x.data_ptr<T>();
  at::parallel_for(0, L.groups, kBlockRows, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      grad_x_row(xp + g * w, gp + g * w, pp + g * w, m_t.data(), is_t.data(), a_t.data(), mean_g_t.data(), mean_gz_t.data(),
                 gx + g * w, w);
  });
  for (int64_t r = L.groups * L.r; r < n; ++r)
    grad_x_row(xp + r * h, gp + r * h, pp + r * h, m, is, a, mean_g.data(), mean_gz.data(), gx + r * h, h);
  return {grad_x, grad_alpha};
}

inline void check(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "dice_cpu: ", name,
              " must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "dice_cpu: ", name,
              " must be float32 or bfloat16, got ", x.scalar_type());
}

}  // namespace din_dice

inline std::vector<at::Tensor> dice_forward(at::Tensor x, at::Tensor alpha, double eps) {
  din_dice::check(x, "x");
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && alpha.is_contiguous() && alpha.numel() == x.size(1),
              "dice_cpu: alpha must be a contiguous float32 [H]");
  TORCH_CHECK(x.size(0) > 0, "dice_cpu: x has no rows");
  if (x.scalar_type() == at::kFloat) return din_dice::forward_impl<float>(x, alpha, eps);
  return din_dice::forward_impl<c10::BFloat16>(x, alpha, eps);
}

inline std::vector<at::Tensor> dice_backward(at::Tensor grad, at::Tensor x, at::Tensor prob, at::Tensor mean,
                                             at::Tensor invstd, at::Tensor alpha) {
  din_dice::check(x, "x");
  din_dice::check(grad, "grad");
  din_dice::check(prob, "prob");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && prob.sizes() == x.sizes() &&
                  prob.scalar_type() == at::kFloat,
              "dice_cpu: grad must match x in shape and dtype, prob be its float32 sigmoid");
  if (x.scalar_type() == at::kFloat) return din_dice::backward_impl<float>(grad, x, prob, mean, invstd, alpha);
  return din_dice::backward_impl<c10::BFloat16>(grad, x, prob, mean, invstd, alpha);
}
