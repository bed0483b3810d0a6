// A linear layer, y = x W^T + b, forward and backward, with its products through oneDNN's BRGEMM micro-kernel
// (small_gemm.h) instead of at::mm / at::addmm, in float32 or in bf16 (bf16 operands, float32 sums).
//
// float32: ATen sends float32 matmuls to MKL, which runs its AVX2 code on AMD CPUs (~100 GFLOP/s on one core of
// this project's Zen 5 machine against ~250 for BRGEMM on the same shapes). Rows are split in blocks of
// din_gemm::kGemmRowBlock shared among torch's threads.
//
// bf16 (autocast): ATen's bf16 matmul goes through oneDNN's matmul primitive, built per shape; the models pad
// jagged row counts to buckets of 1,024 to bound the shapes (modules/mlp.py: ROW_BUCKET), and the padding, its
// zero fill and the gradient's slice-back cost a DIEN bf16 step ~3 ms. Here every product has a fixed row
// block (the last one zero-padded in a block buffer): one micro-kernel per layer shape, whatever N, with
// nothing padded outside the kernel. The bias is added in float32 before the output's one rounding to bf16;
// dW and db are summed in float32 and returned in float32.
//
// Determinism: each row of y and of dx is one micro-kernel call's, whatever the thread count; dW and db
// (per-thread partial sums in contiguous runs of blocks, added in thread order) are the same for a given
// thread count.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "kernel_math.h"
#include "small_gemm.h"

#include <optional>
#include <vector>

namespace din_linear {

inline void check_2d_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2, "native linear: ", name,
              " must be a 2-D float32 CPU tensor, got ", t.scalar_type(), " of ", t.dim(), " dims on ", t.device());
}

inline int64_t row_blocks(int64_t m) { return (m + din_gemm::kGemmRowBlock - 1) / din_gemm::kGemmRowBlock; }

using Bf16 = c10::BFloat16;

using din_gemm::pack_vnni;

// A row block of a row-major bf16 [m, k] matrix as the micro-kernel's left-hand side of kGemmRowBlock rows
// and an even K: the rows in place when the block is whole and k even; otherwise copied into buf with zero
// rows / a zero column. Returns the pointer and sets lda.
inline const Bf16* lhs_block(const Bf16* src, int64_t m, int64_t k, int64_t r0, std::vector<Bf16>& buf,
                             int64_t& lda) {
  constexpr int64_t kb = din_gemm::kGemmRowBlock;
  const int64_t rows = std::min(kb, m - r0), kp = k + (k & 1);
  if (rows == kb && kp == k) {
    lda = k;
    return src + r0 * k;
  }
  buf.assign(kb * kp, Bf16(0.0f));
  for (int64_t i = 0; i < rows; ++i) std::memcpy(buf.data() + i * kp, src + (r0 + i) * k, sizeof(Bf16) * k);
  lda = kp;
  return buf.data();
}

// Row block r0 (of m rows) of the product's left-hand side x[index[r]] (x[r] without an index), x float32 or
// bf16 [*, k], as bf16 rows of stride ld (ld >= k; columns k .. ld and rows past the block's end zero): bf16 x
// without an index is lhs_block's (in place when it can be); otherwise the rows are gathered and rounded into
// buf -- the float32 -> bf16 cast and the row gather that would each have been a pass over all of x.
template <typename In>
inline const Bf16* x_block(const In* src, int64_t m, int64_t k, int64_t ld, int64_t r0, const int64_t* index,
                           std::vector<Bf16>& buf, int64_t& lda) {
  constexpr int64_t kb = din_gemm::kGemmRowBlock;
  if constexpr (std::is_same_v<In, Bf16>) {
    if (!index && ld == k + (k & 1)) return lhs_block(src, m, k, r0, buf, lda);
  }
  const int64_t rows = std::min(kb, m - r0);
  buf.resize(kb * ld);
  for (int64_t i = 0; i < rows; ++i) {
    const In* s = src + (index ? index[r0 + i] : r0 + i) * k;
    Bf16* d = buf.data() + i * ld;
    if constexpr (std::is_same_v<In, Bf16>) std::memcpy(d, s, sizeof(Bf16) * k);
    else din_ops::store_row(s, d, k);
    std::fill(d + k, d + ld, Bf16(0.0f));
  }
  std::fill(buf.data() + rows * ld, buf.data() + kb * ld, Bf16(0.0f));
  lda = ld;
  return buf.data();
}

// rows [M] int64: distinct rows of an [x_rows, *] x, or none: checked, as a contiguous int64 tensor; `name`
// prefixes the errors (the recurrence's projection checks its x_rows with it too).
inline at::Tensor checked_rows(const std::optional<at::Tensor>& rows, int64_t x_rows,
                               const char* name = "native linear: rows") {
  if (!rows) return at::Tensor();
  TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1 && rows->size(0) <= x_rows, name,
              " must be int64 [M <= ", x_rows, "], got ", rows->scalar_type(), " ", rows->sizes());
  at::Tensor idx = rows->contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<uint8_t> seen(x_rows, 0);
  for (int64_t r = 0; r < idx.size(0); ++r) {
    TORCH_CHECK(ip[r] >= 0 && ip[r] < x_rows, name, "[", r, "] = ", ip[r], " is outside [0, ", x_rows, ")");
    TORCH_CHECK(!seen[ip[r]], name, "[", r, "] = ", ip[r], " repeats an earlier row (rows must be distinct)");
    seen[ip[r]] = 1;
  }
  return idx;
}

inline std::vector<float> bias_values(const std::optional<at::Tensor>& bias, int64_t o) {
  std::vector<float> out(o, 0.0f);
  if (bias) {
    TORCH_CHECK(bias->numel() == o, "native linear: bias has ", bias->numel(), " values, expected ", o);
    const at::Tensor b = bias->to(at::kFloat).contiguous();
    std::memcpy(out.data(), b.data_ptr<float>(), sizeof(float) * o);
  }
  return out;
}

// A float32 tensor's values rounded to bf16, as float32 (a one-output layer's weight row).
inline std::vector<float> bf16_rounded(const at::Tensor& t) {
  const float* p = t.data_ptr<float>();
  std::vector<float> out(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) out[i] = static_cast<float>(static_cast<Bf16>(p[i]));
  return out;
}

// One output (O = 1, a scoring layer): a dot product per row. The micro-kernel with N = 1 wastes its vector
// width on the output dimension (measured: 26k x 40 -> 1, forward and backward, 1.2x slower than ATen's matmul
// on padded rows). Same arithmetic: bf16 operands, float32 products and sums, one rounding.
inline at::Tensor forward_bf16_single(const at::Tensor& x, const std::vector<float>& wv, float b,
                                      const at::Tensor& plus) {
  const int64_t m = x.size(0), in = x.size(1);
  at::Tensor y = at::empty({m, 1}, x.options());
  const Bf16* xp = x.data_ptr<Bf16>();
  Bf16* yp = y.data_ptr<Bf16>();
  const float* w = wv.data();
  at::parallel_for(0, m, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const Bf16* __restrict__ xr = xp + r * in;
      float acc = 0.0f;
      for (int64_t i = 0; i < in; ++i) acc += static_cast<float>(xr[i]) * w[i];
      acc += b;
      if (plus.defined())
        acc += plus.scalar_type() == at::kFloat ? plus.data_ptr<float>()[r]
                                                : static_cast<float>(plus.data_ptr<Bf16>()[r]);
      yp[r] = static_cast<Bf16>(acc);
    }
  });
  return y;
}

// add_index [M] int64, each in [0, rows), or none: checked, as a contiguous int64 tensor (undefined for none).
inline at::Tensor checked_index(const std::optional<at::Tensor>& index, int64_t m, int64_t rows) {
  if (!index) return at::Tensor();
  TORCH_CHECK(index->scalar_type() == at::kLong && index->dim() == 1 && index->size(0) == m,
              "native linear: add_index must be int64 [", m, "], got ", index->scalar_type(), " ", index->sizes());
  at::Tensor idx = index->contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t r = 0; r < m; ++r)
    TORCH_CHECK(ip[r] >= 0 && ip[r] < rows, "native linear: add_index[", r, "] = ", ip[r], " is outside [0, ",
                rows, ")");
  return idx;
}

// Row r of add (of element type T): add itself row-aligned with y, or add[index[r]] (index defined).
template <typename T>
inline const T* add_row(const at::Tensor& add, const int64_t* index, int64_t r, int64_t o) {
  return add.data_ptr<T>() + (index ? index[r] : r) * o;
}

// x [X, I] (bf16, or float32 rounded to bf16 block by block), weight [O, I] (any float type, rounded to bf16),
// bias [O] or none, add (float32 or bf16) or none, rows [M] or none -> bf16 y [M, O] = x[rows] W^T + b + add
// (x itself without rows: M = X), the sums in float32, rounded once. add is [M, O], or with add_index [M] any
// [S, O] whose row add_index[r] goes to row r (a per-sample term broadcast over each sample's rows, without
// materialising the [M, O] gather). One output (O = 1) takes bf16 x without rows.
template <typename In>
inline at::Tensor forward_bf16(const at::Tensor& x_in, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add,
                               const std::optional<at::Tensor>& add_index, const std::optional<at::Tensor>& rows_in) {
  constexpr int64_t kb = din_gemm::kGemmRowBlock;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor rix = checked_rows(rows_in, x.size(0));
  const int64_t m = rix.defined() ? rix.size(0) : x.size(0), in = x.size(1), o = weight.size(0);
  const int64_t kp = in + (in & 1);
  const at::Tensor wf = weight.to(at::kFloat).contiguous();
  const float* wp = wf.data_ptr<float>();
  const std::vector<float> bv = bias_values(bias, o);
  at::Tensor plus, idx;
  TORCH_CHECK(add || !add_index, "native linear: add_index without add");
  if (add) {
    const int64_t rows = add_index ? add->size(0) : m;
    TORCH_CHECK(add->dim() == 2 && add->size(0) == rows && add->size(1) == o &&
                    (add->scalar_type() == at::kFloat || add->scalar_type() == at::kBFloat16),
                "native linear: add must be float32 or bf16 [", rows, ", ", o, "], got ", add->scalar_type(), " ",
                add->sizes());
    plus = add->contiguous();
    idx = checked_index(add_index, m, rows);
  }
  const int64_t* ip = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
  const int64_t* xr = rix.defined() ? rix.data_ptr<int64_t>() : nullptr;
  if (o == 1) {
    TORCH_CHECK((std::is_same_v<In, Bf16>) && !xr, "native linear: one output takes bf16 x without rows");
    // One output: the added column gathered here (at most M values) keeps forward_bf16_single row-aligned.
    if (ip) plus = plus.index_select(0, idx);
    return forward_bf16_single(x, bf16_rounded(wf), bv[0], plus);
  }
  const std::vector<Bf16> wb = pack_vnni(in, o, [&](int64_t i, int64_t j) { return wp[j * in + i]; });
  at::Tensor y = at::empty({m, o}, x.options().dtype(at::kBFloat16));
  const In* xp = x.data_ptr<In>();
  Bf16* yp = y.data_ptr<Bf16>();
  at::parallel_for(0, row_blocks(m), 1, [&](int64_t k0, int64_t k1) {
    std::vector<Bf16> abuf;
    std::vector<float> c(kb * o);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * kb, rows = std::min(kb, m - r0);
      int64_t lda = 0;
      const Bf16* a = x_block<In>(xp, m, in, kp, r0, xr, abuf, lda);
      at::native::cpublas::brgemm(kb, o, kp, lda, o, o, false, a, wb.data(), c.data(), true);
      if (plus.defined() && plus.scalar_type() == at::kFloat) {
        for (int64_t i = 0; i < rows; ++i) {
          const float* __restrict__ ap = add_row<float>(plus, ip, r0 + i, o);
          float* __restrict__ ci = c.data() + i * o;
          for (int64_t j = 0; j < o; ++j) ci[j] += ap[j];
        }
      } else if (plus.defined()) {
        for (int64_t i = 0; i < rows; ++i) {
          const Bf16* __restrict__ ap = add_row<Bf16>(plus, ip, r0 + i, o);
          float* __restrict__ ci = c.data() + i * o;
          for (int64_t j = 0; j < o; ++j) ci[j] += static_cast<float>(ap[j]);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        float* __restrict__ ci = c.data() + i * o;
        for (int64_t j = 0; j < o; ++j) ci[j] += bv[j];
      }
      din_ops::store_row(c.data(), yp + r0 * o, rows * o);
    }
  });
  return y;
}

// forward_bf16_single's backward: dx = dy w (one rounding per element), dW = sum_r dy_r x_r and db = sum_r dy_r
// in float32 (per-thread partial sums in contiguous row runs, added in thread order).
inline std::vector<at::Tensor> backward_bf16_single(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                                                    bool need_dx, bool need_dw, bool need_db) {
  const int64_t m = x.size(0), in = x.size(1);
  const std::vector<float> wv = bf16_rounded(weight.to(at::kFloat).contiguous());
  const Bf16* gp = g.data_ptr<Bf16>();
  const Bf16* xp = x.data_ptr<Bf16>();
  at::Tensor dx, dw, db;
  if (need_dx) {
    dx = at::empty({m, in}, x.options());
    Bf16* dxp = dx.data_ptr<Bf16>();
    const float* w = wv.data();
    at::parallel_for(0, m, 1024, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float gr = static_cast<float>(gp[r]);
        Bf16* __restrict__ d = dxp + r * in;
        for (int64_t i = 0; i < in; ++i) d[i] = static_cast<Bf16>(gr * w[i]);
      }
    });
  }
  if (need_dw || need_db) {
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (m + 1023) / 1024));
    const at::TensorOptions f32 = x.options().dtype(at::kFloat);
    at::Tensor parts = at::zeros({threads, in + 1}, f32);  // dW's row, then db
    float* pp = parts.data_ptr<float>();
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* __restrict__ acc = pp + t * (in + 1);
        float sum = 0.0f;
        for (int64_t r = m * t / threads; r < m * (t + 1) / threads; ++r) {
          const float gr = static_cast<float>(gp[r]);
          const Bf16* __restrict__ xr = xp + r * in;
          sum += gr;
          for (int64_t i = 0; i < in; ++i) acc[i] += gr * static_cast<float>(xr[i]);
        }
        acc[in] = sum;
      }
    });
    const at::Tensor total = din_gemm::sum_parts(parts);
    if (need_dw) dw = total.narrow(0, 0, in).reshape({1, in}).contiguous();
    if (need_db) db = total.narrow(0, in, 1).contiguous();
  }
  return {dx, dw, db};
}

// bf16 grad_y [M, O], x [X, I] (bf16 or float32, as forward_bf16's), weight [O, I], rows [M] or none ->
// {dx [X, I] in x's type (rows of x not in rows: zero), dW float32 [O, I], db float32 [O], d(add) float32
// [add_rows, O]} (each undefined unless asked for; d(add), the gradient of forward_bf16's indexed add, is asked
// for by add_index: grad_y's rows summed by add_index, in float32). dx is rounded once, to x's type: float32
// x gets the float32 sums (autocast would round them to bf16 and cast back).
template <typename In>
inline std::vector<at::Tensor> backward_bf16(const at::Tensor& grad_in, const at::Tensor& x_in,
                                             const at::Tensor& weight, bool need_dx, bool need_dw, bool need_db,
                                             const std::optional<at::Tensor>& add_index, int64_t add_rows,
                                             const std::optional<at::Tensor>& rows_in) {
  constexpr int64_t kb = din_gemm::kGemmRowBlock;
  const at::Tensor g = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor rix = checked_rows(rows_in, x.size(0));
  const int64_t* xr = rix.defined() ? rix.data_ptr<int64_t>() : nullptr;
  const int64_t m = xr ? rix.size(0) : x.size(0), in = x.size(1), o = weight.size(0), op = o + (o & 1);
  TORCH_CHECK(g.size(0) == m && g.size(1) == o, "native linear: grad_y must be [", m, ", ", o, "]");
  const at::Tensor idx = checked_index(add_index, m, add_rows);
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  if (o == 1) {
    TORCH_CHECK((std::is_same_v<In, Bf16>) && !xr, "native linear: one output takes bf16 x without rows");
    std::vector<at::Tensor> out = backward_bf16_single(g, x, weight, need_dx, need_dw, need_db);
    // One output: at most M values to add, ATen's index_add (sequential on the CPU: deterministic).
    if (idx.defined()) out.push_back(at::zeros({add_rows, 1}, f32).index_add_(0, idx, g.to(at::kFloat)));
    else out.push_back(at::Tensor());
    return out;
  }
  const Bf16* gp = g.data_ptr<Bf16>();
  const In* xp = x.data_ptr<In>();
  const int64_t blocks = row_blocks(m);
  at::Tensor dx, dw, db;
  std::vector<Bf16> wb;
  In* dxp = nullptr;
  if (need_dx) {
    const at::Tensor wf = weight.to(at::kFloat).contiguous();
    const float* wp = wf.data_ptr<float>();
    wb = pack_vnni(o, in, [&](int64_t i, int64_t j) { return wp[i * in + j]; });
    // Rows of x that no output row read get no gradient: zeros (rows that are a permutation cover them all).
    dx = xr && m < x.size(0) ? at::zeros_like(x) : at::empty_like(x);
    dxp = dx.data_ptr<In>();
  }
  // One pass over the row blocks (contiguous runs per thread), each block's grad rows used for dx, db and dW
  // while in cache (three passes had read the cold [M, O] gradient three times). dx = grad W, one micro-kernel
  // call per block; dW = sum over blocks of (grad block)^T (x block): both operands as pairs of rows in 32-bit
  // words (VNNI) -- x's is the right-hand side itself; the grad's, transposed as words ([O, kb / 2]), is the grad
  // block transposed ([O, kb] bf16), each word holding one column's two consecutive rows; zero past the last
  // row. db = the grad's column sums. dW / db per thread, added in thread order.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  at::Tensor dw_parts = need_dw ? at::zeros({threads, o, in}, f32) : at::Tensor();
  at::Tensor db_parts = need_db ? at::zeros({threads, o}, f32) : at::Tensor();
  at::Tensor dadd_parts = idx.defined() ? at::zeros({threads, add_rows, o}, f32) : at::Tensor();
  float* dwp = need_dw ? dw_parts.data_ptr<float>() : nullptr;
  float* dbp = need_db ? db_parts.data_ptr<float>() : nullptr;
  float* dap = idx.defined() ? dadd_parts.data_ptr<float>() : nullptr;
  const int64_t* ip = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<Bf16> abuf, xbuf;
    din_gemm::AtBScratch atb(need_dw ? o : 0, need_dw ? in : 0);
    std::vector<float> c(need_dx ? kb * in : 0);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = blocks * t / threads; k < blocks * (t + 1) / threads; ++k) {
        const int64_t r0 = k * kb, rows = std::min(kb, m - r0);
        if (need_dx) {
          int64_t lda = 0;
          const Bf16* a = lhs_block(gp, m, o, r0, abuf, lda);
          at::native::cpublas::brgemm(kb, in, op, lda, in, in, false, a, wb.data(), c.data(), true);
          if (!xr) {
            din_ops::store_row(c.data(), dxp + r0 * in, rows * in);
          } else {
            for (int64_t i = 0; i < rows; ++i) din_ops::store_row(c.data() + i * in, dxp + xr[r0 + i] * in, in);
          }
        }
        if (need_db) {
          float* __restrict__ dbt = dbp + t * o;
          for (int64_t i = 0; i < rows; ++i) {
            const Bf16* __restrict__ gi = gp + (r0 + i) * o;
            for (int64_t j = 0; j < o; ++j) dbt[j] += static_cast<float>(gi[j]);
          }
        }
        if (dap) {
          float* dat = dap + t * add_rows * o;
          for (int64_t i = 0; i < rows; ++i) {
            const Bf16* __restrict__ gi = gp + (r0 + i) * o;
            float* __restrict__ di = dat + ip[r0 + i] * o;
            for (int64_t j = 0; j < o; ++j) di[j] += static_cast<float>(gi[j]);
          }
        }
        if (need_dw) {
          int64_t ld = 0;  // x's block as bf16 rows (in place for bf16 x read in order)
          din_gemm::add_at_b_bf16_block(rows, o, in, gp + r0 * o, x_block<In>(xp, m, in, in, r0, xr, xbuf, ld),
                                        dwp + t * o * in, atb);
        }
      }
    }
  });
  if (need_dw) dw = din_gemm::sum_parts(dw_parts);
  if (need_db) db = din_gemm::sum_parts(db_parts);
  return {dx, dw, db, idx.defined() ? din_gemm::sum_parts(dadd_parts) : at::Tensor()};
}

}  // namespace din_linear

// x [M, I], weight [O, I], bias [O] or none -> y [M, O].
// compute_bf16 (x bf16 or float32): forward_bf16 (x[rows] for rows [M]; add -- [M, O], or [S, O] by add_index
// [M] -- or none, added before the output's rounding); otherwise float32 x, no add, no rows.
inline at::Tensor linear_forward(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias,
                                 std::optional<at::Tensor> add, std::optional<at::Tensor> add_index,
                                 std::optional<at::Tensor> rows, bool compute_bf16) {
  using namespace din_linear;
  if (compute_bf16) {
    TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) &&
                    (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
                "native linear: bf16 or float32 x [M, I] and weight [O, I] expected");
    if (x.scalar_type() == at::kFloat) return forward_bf16<float>(x, weight, bias, add, add_index, rows);
    return forward_bf16<Bf16>(x, weight, bias, add, add_index, rows);
  }
  TORCH_CHECK(!add && !add_index && !rows, "native linear: add and rows are for bf16 compute only");
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

// grad_y [M, O], x [M, I], weight [O, I] -> {dx [M, I] (undefined unless need_dx), dW [O, I] (unless need_dw),
// db [O] (unless need_db), d(add) [add_rows, O] (bf16 only; unless add_index)}: float32; or for bf16 grad_y
// (forward_bf16's backward, x bf16 or float32, read at rows if given) dx in x's type and shape, dW, db and d(add)
// in float32.
inline std::vector<at::Tensor> linear_backward(at::Tensor grad_y, at::Tensor x, at::Tensor weight, bool need_dx,
                                               bool need_dw, bool need_db, std::optional<at::Tensor> add_index,
                                               int64_t add_rows, std::optional<at::Tensor> rows) {
  using namespace din_linear;
  constexpr int64_t kb = din_gemm::kGemmRowBlock;
  if (grad_y.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(grad_y.dim() == 2 && x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) &&
                    (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
                "native linear: bf16 grad_y [M, O], bf16 or float32 x [M, I] and weight [O, I] expected");
    if (x.scalar_type() == at::kFloat)
      return backward_bf16<float>(grad_y, x, weight, need_dx, need_dw, need_db, add_index, add_rows, rows);
    return backward_bf16<Bf16>(grad_y, x, weight, need_dx, need_dw, need_db, add_index, add_rows, rows);
  }
  TORCH_CHECK(!add_index && !rows, "native linear: add_index and rows are for bf16 compute only");
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
  return {dx, dw, need_db ? grad_y.sum(0) : at::Tensor(), at::Tensor()};
}
