// The mini-batch-aware regularizer's sum over every regularized key of a batch, sum_k sum_i c_ki ||v_ki||^2, and
// its gradients 2 g c_ki v_ki, each in one call (din_torchrec/training/regularization.py: mba_penalty; its
// autograd formula is the reference and the fallback).
//
// Why: the penalty covers 7 keys per DIEN batch (the history's 26k rows twice, five [B, D] keys). Through ATen
// each key was a product pass into a temporary, a dot product, and a backward of two products, each a dispatch
// from Python: 1.1 ms of a 47 ms DIEN step here. One pass reads each key's rows here (the row's squared norm in
// registers), and the backward writes each gradient once.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace din_regularization {

// Rows per chunk of a key: each chunk's sum is kept apart and the chunks are added in order, so the result does
// not depend on the thread count.
constexpr int64_t kChunkRows = 2048;

inline void check_key(const at::Tensor& v, const at::Tensor& c, size_t k) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.dim() == 2 && v.stride(1) == 1,
              "weighted squared norms: values[", k, "] must be a float32 CPU [n, D] tensor with unit column "
              "stride, got ", v.scalar_type(), " ", v.sizes(), " strides ", v.strides());
  TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kFloat && c.dim() == 1 && c.is_contiguous() &&
                  c.size(0) == v.size(0),
              "weighted squared norms: coefficients[", k, "] must be a contiguous float32 [", v.size(0), "], got ",
              c.scalar_type(), " ", c.sizes());
}

}  // namespace din_regularization

// sum_k sum_i c[k][i] * ||values[k][i, :]||^2 as a float32 scalar (float64 sums).
inline at::Tensor weighted_squared_norms(const std::vector<at::Tensor>& values,
                                         const std::vector<at::Tensor>& coefficients) {
  using namespace din_regularization;
  TORCH_CHECK(values.size() == coefficients.size(), "weighted squared norms: ", values.size(), " value tensors, ",
              coefficients.size(), " coefficient tensors");
  double total = 0.0;
  for (size_t k = 0; k < values.size(); ++k) {
    const at::Tensor& v = values[k];
    const at::Tensor& c = coefficients[k];
    check_key(v, c, k);
    const int64_t n = v.size(0), d = v.size(1), stride = v.stride(0);
    const int64_t chunks = (n + kChunkRows - 1) / kChunkRows;
    std::vector<double> parts(static_cast<size_t>(chunks), 0.0);
    const float* vp = v.data_ptr<float>();
    const float* cp = c.data_ptr<float>();
    at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        double acc = 0.0;
        for (int64_t i = q * kChunkRows, end = std::min(n, (q + 1) * kChunkRows); i < end; ++i) {
          const float* row = vp + i * stride;
          float s = 0.0f;
          for (int64_t j = 0; j < d; ++j) s += row[j] * row[j];
          acc += static_cast<double>(cp[i]) * s;
        }
        parts[static_cast<size_t>(q)] = acc;
      }
    });
    for (double p : parts) total += p;
  }
  return at::scalar_tensor(static_cast<float>(total), at::TensorOptions().dtype(at::kFloat));
}

// Gradients of g * weighted_squared_norms: [n_k, D_k] float32 each, 2 g c[k][i] values[k][i, :].
inline std::vector<at::Tensor> weighted_squared_norms_backward(const std::vector<at::Tensor>& values,
                                                               const std::vector<at::Tensor>& coefficients,
                                                               double g) {
  using namespace din_regularization;
  TORCH_CHECK(values.size() == coefficients.size(), "weighted squared norms: ", values.size(), " value tensors, ",
              coefficients.size(), " coefficient tensors");
  std::vector<at::Tensor> grads;
  grads.reserve(values.size());
  for (size_t k = 0; k < values.size(); ++k) {
    const at::Tensor& v = values[k];
    const at::Tensor& c = coefficients[k];
    check_key(v, c, k);
    const int64_t n = v.size(0), d = v.size(1), stride = v.stride(0);
    at::Tensor out = at::empty({n, d}, v.options());
    const float* vp = v.data_ptr<float>();
    const float* cp = c.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float two_g = static_cast<float>(2.0 * g);
    at::parallel_for(0, n, kChunkRows, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float s = two_g * cp[i];
        const float* row = vp + i * stride;
        float* o = op + i * d;
        for (int64_t j = 0; j < d; ++j) o[j] = s * row[j];
      }
    });
    grads.push_back(out);
  }
  return grads;
}
