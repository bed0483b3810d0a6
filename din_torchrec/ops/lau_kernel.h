// The behaviour side of the local activation unit's first layer with one weight matrix per sample, float32, CPU:
//
//   z[n] = M_s b[n] + k[s],   M_s = A + P diag(c_s),   s = seg[n]
//
// b [N, D] behaviours, c [B, D] candidates, A = W_b + W_d and P = W_p [H, D] (the split first layer), k [B, H]
// the candidate side (W_c - W_d) c + bias. It equals [b, b * c_s] @ [A; P]^T + k[s] -- the matmul on [N, 2D]
// that DIN's attention otherwise runs -- with half the multiply-adds per row (D * H instead of 2 * D * H): the
// per-sample matrix M_s is built once per sample (D * H) and stays in L1 for the sample's rows. In float32 that
// first layer is the largest matmul of a DIN step and runs at the core's peak, so fewer multiply-adds is the
// only way to make it faster. Backward, per sample: db[n] = M_s^T dz[n], dM_s = sum_n dz[n] b[n]^T, then
// dA += dM_s, dP += dM_s diag(c_s), dc_s = diag(P^T dM_s), dk_s = sum_n dz[n].
//
// Rows must come sample after sample (seg non-decreasing: the jagged layout); the kernels return an undefined
// tensor otherwise and the caller runs the matmul path. Reference: din_torchrec.ops.jagged.first_layer_reference.
#pragma once

#include "kernel_math.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace din_lau {

// Run starts of equal seg values (plus the end), or an empty vector when seg decreases somewhere.
inline std::vector<int64_t> runs_of(const int64_t* seg, int64_t n) {
  std::vector<int64_t> starts;
  starts.reserve(1024);
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || seg[i] != seg[i - 1]) {
      if (i > 0 && seg[i] < seg[i - 1]) return {};
      starts.push_back(i);
    }
  }
  starts.push_back(n);
  return starts;
}

// mt[d][o] = at[d][o] + pt[d][o] * c[d]   (the per-sample matrix, transposed: [D][H])
inline void build_transposed(const float* __restrict__ at_, const float* __restrict__ pt, const float* __restrict__ c,
                             float* __restrict__ mt, int64_t d_, int64_t h) {
  for (int64_t d = 0; d < d_; ++d) {
    const float cd = c[d];
    const float* __restrict__ a = at_ + d * h;
    const float* __restrict__ p = pt + d * h;
    float* __restrict__ m = mt + d * h;
    for (int64_t o = 0; o < h; ++o) m[o] = a[o] + p[o] * cd;
  }
}

using din_ops::load16;
using din_ops::store16;
using din_ops::v16;

// z[o] = k[o] + sum_d mt[d][o] b[d]: tiles of 16 outputs, each accumulated in a register over d.
inline void row_forward(const float* __restrict__ mt, const float* __restrict__ b, const float* __restrict__ k,
                        float* __restrict__ z, int64_t d_, int64_t h) {
  int64_t o0 = 0;
  for (; o0 + 16 <= h; o0 += 16) {
    v16 acc = load16(k + o0);
    for (int64_t d = 0; d < d_; ++d) acc += load16(mt + d * h + o0) * b[d];
    store16(z + o0, acc);
  }
  for (int64_t o = o0; o < h; ++o) {
    float acc = k[o];
    for (int64_t d = 0; d < d_; ++d) acc += mt[d * h + o] * b[d];
    z[o] = acc;
  }
}

// db[d] = sum_o mt[d][o] g[o];  dmt[d][o] += g[o] b[d];  dk[o] += g[o]
inline void row_backward(const float* __restrict__ mt, const float* __restrict__ b, const float* __restrict__ g,
                         float* __restrict__ db, float* __restrict__ dmt, float* __restrict__ dk, int64_t d_,
                         int64_t h) {
  for (int64_t o = 0; o < h; ++o) dk[o] += g[o];
  for (int64_t d = 0; d < d_; ++d) {
    const float* __restrict__ m = mt + d * h;
    float* __restrict__ dm = dmt + d * h;
    const float bd = b[d];
    float acc = 0.0f;
    for (int64_t o = 0; o < h; ++o) {
      acc += m[o] * g[o];
      dm[o] += g[o] * bd;
    }
    db[d] = acc;
  }
}

inline void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == dim && t.is_contiguous() && t.scalar_type() == at::kFloat,
              "lau kernels: ", name, " must be a contiguous float32 ", dim, "-D CPU tensor");
}

// The operands both directions share: b [N, D], c [B, D], seg [N] int64, a_t / p_t [D, H].
inline void check_operands(const at::Tensor& b, const at::Tensor& c, const at::Tensor& seg, const at::Tensor& at_,
                           const at::Tensor& pt) {
  check(b, "b", 2);
  check(c, "c", 2);
  check(at_, "a_t", 2);
  check(pt, "p_t", 2);
  TORCH_CHECK(seg.scalar_type() == at::kLong && seg.is_contiguous() && seg.numel() == b.size(0),
              "lau kernels: seg must be int64 [N]");
  TORCH_CHECK(c.size(1) == b.size(1) && at_.size(0) == b.size(1) && pt.sizes() == at_.sizes(),
              "lau kernels: shapes b [N, D], c [B, D], a_t / p_t [D, H] disagree");
}

}  // namespace din_lau

// b [N, D], c [B, D], seg [N] int64 non-decreasing, at / pt [D, H] (A and P transposed), k [B, H] -> z [N, H];
// undefined if seg decreases.
inline at::Tensor lau_first_forward(at::Tensor b, at::Tensor c, at::Tensor seg, at::Tensor at_, at::Tensor pt,
                                    at::Tensor k) {
  using namespace din_lau;
  check_operands(b, c, seg, at_, pt);
  check(k, "k", 2);
  const int64_t n = b.size(0), d_ = b.size(1), h = at_.size(1);
  TORCH_CHECK(k.size(0) == c.size(0) && k.size(1) == h, "lau kernels: k must be [B, H]");
  const int64_t* sp = seg.data_ptr<int64_t>();
  const std::vector<int64_t> starts = runs_of(sp, n);
  if (starts.empty()) return at::Tensor();
  at::Tensor z = at::empty({n, h}, b.options());
  const float *bp = b.data_ptr<float>(), *cp = c.data_ptr<float>(), *ap = at_.data_ptr<float>(),
              *pp = pt.data_ptr<float>(), *kp = k.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  const int64_t num_runs = static_cast<int64_t>(starts.size()) - 1;
  at::parallel_for(0, num_runs, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> mt(d_ * h);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = sp[starts[r]];
      build_transposed(ap, pp, cp + s * d_, mt.data(), d_, h);
      for (int64_t i = starts[r]; i < starts[r + 1]; ++i) row_forward(mt.data(), bp + i * d_, kp + s * h, zp + i * h, d_, h);
    }
  });
  return z;
}

// grad z [N, H] -> {db [N, D], dc [B, D], da_t [D, H], dp_t [D, H], dk [B, H]}; empty if seg decreases.
inline std::vector<at::Tensor> lau_first_backward(at::Tensor g, at::Tensor b, at::Tensor c, at::Tensor seg,
                                                  at::Tensor at_, at::Tensor pt) {
  using namespace din_lau;
  check_operands(b, c, seg, at_, pt);
  check(g, "grad", 2);
  const int64_t n = b.size(0), d_ = b.size(1), h = at_.size(1), rows_b = c.size(0);
  TORCH_CHECK(g.size(0) == n && g.size(1) == h, "lau kernels: grad must be [N, H]");
  const int64_t* sp = seg.data_ptr<int64_t>();
  const std::vector<int64_t> starts = runs_of(sp, n);
  if (starts.empty()) return {};
  at::Tensor db = at::empty({n, d_}, b.options());
  at::Tensor dc = at::zeros({rows_b, d_}, b.options());
  at::Tensor dk = at::zeros({rows_b, h}, b.options());
  const float *gp = g.data_ptr<float>(), *bp = b.data_ptr<float>(), *cp = c.data_ptr<float>(),
              *ap = at_.data_ptr<float>(), *pp = pt.data_ptr<float>();
  float *dbp = db.data_ptr<float>(), *dcp = dc.data_ptr<float>(), *dkp = dk.data_ptr<float>();
  const int64_t num_runs = static_cast<int64_t>(starts.size()) - 1;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_runs / 64));
  // Per-part sums of dA^T and dP^T, added in part order (deterministic for a given thread count).
  std::vector<float> partial(parts * 2 * d_ * h, 0.0f);
  at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
    std::vector<float> mt(d_ * h), dmt(d_ * h);
    for (int64_t q = q0; q < q1; ++q) {
      float* __restrict__ da = partial.data() + q * 2 * d_ * h;
      float* __restrict__ dp = da + d_ * h;
      for (int64_t r = num_runs * q / parts; r < num_runs * (q + 1) / parts; ++r) {
        const int64_t s = sp[starts[r]];
        const float* __restrict__ cs = cp + s * d_;
        build_transposed(ap, pp, cs, mt.data(), d_, h);
        std::fill(dmt.begin(), dmt.end(), 0.0f);
        for (int64_t i = starts[r]; i < starts[r + 1]; ++i)
          row_backward(mt.data(), bp + i * d_, gp + i * h, dbp + i * d_, dmt.data(), dkp + s * h, d_, h);
        for (int64_t d = 0; d < d_; ++d) {
          const float* __restrict__ dm = dmt.data() + d * h;
          const float* __restrict__ p = pp + d * h;
          float* __restrict__ dad = da + d * h;
          float* __restrict__ dpd = dp + d * h;
          const float cd = cs[d];
          float acc = 0.0f;
          for (int64_t o = 0; o < h; ++o) {
            dad[o] += dm[o];
            dpd[o] += dm[o] * cd;
            acc += p[o] * dm[o];
          }
          dcp[s * d_ + d] = acc;
        }
      }
    }
  });
  at::Tensor da_t = at::zeros({d_, h}, b.options());
  at::Tensor dp_t = at::zeros({d_, h}, b.options());
  float *dap = da_t.data_ptr<float>(), *dpp = dp_t.data_ptr<float>();
  for (int64_t q = 0; q < parts; ++q) {
    const float* src = partial.data() + q * 2 * d_ * h;
    for (int64_t i = 0; i < d_ * h; ++i) {
      dap[i] += src[i];
      dpp[i] += src[d_ * h + i];
    }
  }
  return {db, dc, da_t, dp_t, dk};
}
