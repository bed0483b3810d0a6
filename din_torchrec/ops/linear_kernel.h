// A float32 linear layer, y = x W^T + b, forward and backward, with its products through oneDNN's BRGEMM
// micro-kernel (small_gemm.h) instead of at::mm / at::addmm: ATen sends float32 matmuls to MKL, which runs its
// AVX2 code on AMD CPUs (~100 GFLOP/s on one core of this project's Zen 5 machine against ~250 for BRGEMM on
// the same shapes). Rows are split in blocks of din_gemm::kGemmRowBlock shared among torch's threads.
//
// Determinism: each row of y and of dx is one micro-kernel call's, whatever the thread count; dW
// (din_gemm::gemm_at_b) is the same for a given thread count.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "small_gemm.h"

#include <optional>
#include <vector>

namespace din_linear {

inline void check_2d_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2, "native linear: ", name,
              " must be a 2-D float32 CPU tensor, got ", t.scalar_type(), " of ", t.dim(), " dims on ", t.device());
}

inline int64_t row_blocks(int64_t m) { return (m + din_gemm::kGemmRowBlock - 1) / din_gemm::kGemmRowBlock; }

}  // namespace din_linear

// x [M, I], weight [O, I], bias [O] or none -> y [M, O].
inline at::Tensor linear_forward(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias) {
  using namespace din_linear;
  check_2d_f32(x, "x");
  check_2d_f32(weight, "weight");
  TORCH_CHECK(x.size(1) == weight.size(1), "native linear: x has ", x.size(1), " columns, weight expects ",
              weight.size(1));
  x = x.contiguous();
  const int64_t m = x.size(0), in = x.size(1), o = weight.size(0);
  const at::Tensor wt = weight.t().contiguous();  // [I, O], the product's right-hand side
  at::Tensor b;
  if (bias) {
    check_2d_f32(bias->view({1, -1}), "bias");
    TORCH_CHECK(bias->numel() == o, "native linear: bias has ", bias->numel(), " values, expected ", o);
    b = bias->contiguous();
  }
  at::Tensor y = at::empty({m, o}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, row_blocks(m), 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * din_gemm::kGemmRowBlock, rows = std::min(din_gemm::kGemmRowBlock, m - r0);
      if (bp)
        for (int64_t i = 0; i < rows; ++i) std::memcpy(yp + (r0 + i) * o, bp, sizeof(float) * o);
      din_gemm::gemm_rows(rows, o, in, xp + r0 * in, in, wp, o, yp + r0 * o, o, bp != nullptr);
    }
  });
  return y;
}

// grad_y [M, O], x [M, I], weight [O, I] -> {dx [M, I] (undefined unless need_dx), dW [O, I] (unless need_dw)}.
// The bias's gradient is grad_y's column sums (left to the caller).
inline std::vector<at::Tensor> linear_backward(at::Tensor grad_y, at::Tensor x, at::Tensor weight, bool need_dx,
                                               bool need_dw) {
  using namespace din_linear;
  constexpr int64_t kb = din_gemm::kGemmRowBlock;
  check_2d_f32(grad_y, "grad_y");
  check_2d_f32(x, "x");
  check_2d_f32(weight, "weight");
  grad_y = grad_y.contiguous();
  x = x.contiguous();
  const at::Tensor w = weight.contiguous();
  const int64_t m = x.size(0), in = x.size(1), o = w.size(0);
  TORCH_CHECK(grad_y.size(0) == m && grad_y.size(1) == o, "native linear: grad_y must be [", m, ", ", o, "]");
  const float* gp = grad_y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t blocks = row_blocks(m);
  at::Tensor dx, dw;
  if (need_dx) {
    dx = at::empty({m, in}, x.options());
    float* dxp = dx.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * kb, rows = std::min(kb, m - r0);
        din_gemm::gemm_rows(rows, in, o, gp + r0 * o, o, wp, in, dxp + r0 * in, in, false);
      }
    });
  }
  if (need_dw) dw = din_gemm::gemm_at_b(m, o, in, gp, xp, x.options());
  return {dx, dw};
}
