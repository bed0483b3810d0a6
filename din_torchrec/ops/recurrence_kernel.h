// DIEN's gated recurrences (GRU, AUGRU, UGRU, AGRU) over packed jagged sequences, forward and
// backpropagation through time, for the CPU.
//
// The same algorithm as din_torchrec.modules.recurrence.PackedRecurrence (its docstring has the cells and the
// packed layout): per step one matmul for U h and one fused loop over the b_t x H gate values; backward per
// step one fused loop and one matmul for the gradient reaching the previous state, the recurrent weight's
// gradient as one matmul after the loop. In Python each step is ~10 ATen calls on [b_t, H] tensors of a few
// KB (2-15 us each, dominated by dispatch); here each step is one small matmul (oneDNN's BRGEMM micro-kernel,
// small_gemm.h) plus a loop that stays in L1.
// The state, gates and every sum are float32. The projected input x may be float32 or bfloat16 (under bf16
// autocast the input projection's matmul writes bfloat16): it is read and widened inside the step's loop, and
// its gradient written back in bfloat16 there, instead of a float32 copy of all N x G values each way (DIEN's
// two [N, 96] casts and the evolution's bias add cost ~6 ms of a 80 ms bf16 training step). An optional input
// bias [G] is added in the same loop (and its gradient summed there).
// bf16_products (DIEN under bf16 autocast, as autocast's own GRU would run them): the three products per step
// -- U h, the gradient reaching the previous state and the recurrent weight's gradient -- take bf16 operands
// (the states and gate gradients rounded as they enter a product; U rounded once) with float32 sums, through
// the micro-kernel's bf16 path at twice the float32 rate; the states, gates and every other sum stay float32.
// The products were ~55 % of the recurrences' time in float32 (measured: 4.3 ms of GRU forward + backward on
// N = 26k, 2.4 ms of it products).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "kernel_math.h"
#include "linear_kernel.h"
#include "small_gemm.h"

#include <cmath>
#include <numeric>
#include <optional>
#include <vector>

namespace din_recurrence {

enum Mode : int64_t { kGru = 0, kAugru = 1, kUgru = 2, kAgru = 3 };

using din_ops::sigmoid;
using din_ops::to_float;

inline float tanh_(float v) {
  // 2 sigmoid(2v) - 1, as the Python path computes it (vectorises through the same exp).
  return 2.0f * sigmoid(2.0f * v) - 1.0f;
}

// One step forward for b rows. x: [b, G] input pre-activations (float or bfloat16), bx: [G] the input bias
// added to them, hh: [b, G] U h (+ b_hh) (hh_n its n columns), hp: [b, H] previous states (zeros at step 0),
// att: [b] (read by the attentional modes only). Writes sig [b, ns H], cand [b, H], hhn [b, H] (the n columns
// of hh, kept for the backward) and out [b, H]. No pointer is null and the inner loop has no branch: that is
// what lets GCC vectorise it (a `hp ? hp[j] : 0` in the loop had kept the backward's loop scalar).
template <int64_t M, typename T>
void step_forward(int64_t b, int64_t h, const T* __restrict__ x, const float* __restrict__ bx,
                  const float* __restrict__ hh,
                  const float* __restrict__ hp, const float* __restrict__ att, float* __restrict__ sig,
                  float* __restrict__ cand, float* __restrict__ hhn, float* __restrict__ out) {
  constexpr int64_t ns = M == kAgru ? 1 : 2;
  const int64_t g = (ns + 1) * h;
  for (int64_t i = 0; i < b; ++i) {
    const T* xi = x + i * g;
    const float* hi = hh + i * g;
    float* si = sig + i * ns * h;
    float* ni = cand + i * h;
    float* hn = hhn + i * h;
    float* oi = out + i * h;
    const float a = (M == kAugru || M == kAgru) ? att[i] : 0.0f;
    for (int64_t j = 0; j < h; ++j) {
      const float s0 = sigmoid(to_float(xi[j]) + bx[j] + hi[j]);
      float r, k;
      if constexpr (M == kAgru) {
        r = s0;
        k = 1.0f - a;
        si[j] = s0;
      } else {
        const float s1 = sigmoid(to_float(xi[h + j]) + bx[h + j] + hi[h + j]);
        si[j] = s0;
        si[h + j] = s1;
        if constexpr (M == kGru) {
          r = s0;
          k = s1;
        } else {
          r = s1;
          k = M == kAugru ? 1.0f - a * s0 : 1.0f - s0;
        }
      }
      const float hnv = hi[ns * h + j];
      const float n = tanh_(to_float(xi[ns * h + j]) + bx[ns * h + j] + r * hnv);
      ni[j] = n;
      hn[j] = hnv;
      oi[j] = n + k * (hp[i * h + j] - n);
    }
  }
}

// One step backward for b rows: from dh [b, H] (complete: output gradient plus what later steps sent back)
// the gradients of the gate pre-activations: dx [b, G] (in x's type), dhh [b, G] (of U h: equal to dx on the
// sigmoid columns, r dx on the n columns), datt [b] (attentional modes); adds dx's rows to dbx [G] (the input
// bias's gradient, in float32) and starts dprev [b, H], the previous states' gradient, as their own output
// gradient gprev plus dh k (the k h term; the U h term is added after). hp and gprev: zeros at step 0, and
// dprev then a scratch buffer: no null pointers, no branch in the inner loop (see step_forward).
template <int64_t M, typename T>
void step_backward(int64_t b, int64_t h, const float* __restrict__ dh, const float* __restrict__ sig,
                   const float* __restrict__ cand, const float* __restrict__ hhn, const float* __restrict__ hp,
                   const float* __restrict__ att, const float* __restrict__ gprev, T* __restrict__ dx,
                   float* __restrict__ dhh, float* __restrict__ dbx, float* __restrict__ datt,
                   float* __restrict__ dprev) {
  constexpr int64_t ns = M == kAgru ? 1 : 2;
  const int64_t g = (ns + 1) * h;
  for (int64_t i = 0; i < b; ++i) {
    const float* di = dh + i * h;
    const float* si = sig + i * ns * h;
    const float* ni = cand + i * h;
    const float* hn = hhn + i * h;
    T* dxi = dx + i * g;
    float* dhi = dhh + i * g;
    const float* hpi = hp + i * h;
    float* dpi = dprev + i * h;
    const float* gpi = gprev + i * h;
    const float a = (M == kAugru || M == kAgru) ? att[i] : 0.0f;
    float da = 0.0f;
    for (int64_t j = 0; j < h; ++j) {
      const float d = di[j];
      const float n = ni[j];
      const float s0 = si[j];
      const float s1 = M == kAgru ? 0.0f : si[h + j];
      float r, k;
      if constexpr (M == kGru) {
        r = s0;
        k = s1;
      } else if constexpr (M == kAgru) {
        r = s0;
        k = 1.0f - a;
      } else {
        r = s1;
        k = M == kAugru ? 1.0f - a * s0 : 1.0f - s0;
      }
      const float dk = d * (hpi[j] - n);
      const float dgn = d * (1.0f - k) * (1.0f - n * n);
      dxi[ns * h + j] = static_cast<T>(dgn);
      dhi[ns * h + j] = dgn * r;
      dbx[ns * h + j] += dgn;
      const float dr = dgn * hn[j];
      float d0, d1 = 0.0f;
      if constexpr (M == kGru) {
        d0 = dr;
        d1 = dk;
      } else if constexpr (M == kAugru) {
        d0 = -dk * a;
        d1 = dr;
        da -= dk * s0;
      } else if constexpr (M == kUgru) {
        d0 = -dk;
        d1 = dr;
      } else {
        d0 = dr;
        da -= dk;
      }
      const float g0 = d0 * s0 * (1.0f - s0);
      dxi[j] = static_cast<T>(g0);
      dhi[j] = g0;
      dbx[j] += g0;
      if constexpr (M != kAgru) {
        const float g1 = d1 * s1 * (1.0f - s1);
        dxi[h + j] = static_cast<T>(g1);
        dhi[h + j] = g1;
        dbx[h + j] += g1;
      }
      dpi[j] = gpi[j] + d * k;
    }
    if constexpr (M == kAugru || M == kAgru) datt[i] = da;
  }
}

// A step's rows split into at most this many-rows-or-more parts, one per thread: each part runs its own slice of
// the step's product (U h for its rows: single-threaded inside the parallel region) and of the gate loop. Left
// to itself, ATen ran the [b, H] x [H, G H] product on both threads (a fork and a join per product, for ~25 us
// of work) and the gate loop on one: DIEN's recurrences ran *slower* with two threads than with one (profiled,
// bf16 step: own time 8.0 -> 10.5 ms). Steps with fewer than 2 x kPartRows rows stay on the calling thread.
constexpr int64_t kPartRows = 128;

inline int64_t step_parts(int64_t b) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), b / kPartRows));
}

inline void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "packed recurrence: ",
              name, " must be a contiguous float32 CPU tensor");
}

// The input projection inside the forward (Python: NativeProjectedRecurrence): x = W_ih x_in[rows] is not a
// separate [N, G] matmul written out (bf16 under autocast) and read back by the steps, but one more product per
// step part, into a scratch that the step's loop reads while it is in cache. The backward is unchanged: it
// writes x's gradient, from which the linear kernel's backward gives x_in's and W_ih's (one large product for
// W_ih rather than one per step).
struct Projection {
  const float* x = nullptr;       // x_in [X, I] float32
  const int64_t* rows = nullptr;  // packed row r reads x_in[rows[r]]; null: x_in[r]
  int64_t in = 0;                 // I
  const float* w = nullptr;       // W_ih [G, I]
  const float* row(int64_t r) const { return x + (rows ? rows[r] : r) * in; }
};

template <int64_t M, typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const std::optional<at::Tensor>& att,
                                     const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_hh,
                                     const std::optional<at::Tensor>& input_bias, const std::vector<int64_t>& steps,
                                     bool bf16_products, const Projection* proj) {
  constexpr int64_t ns = M == kAgru ? 1 : 2;
  const int64_t h = weight_hh.size(1), g = (ns + 1) * h;
  const int64_t n_rows = proj ? std::accumulate(steps.begin(), steps.end(), int64_t{0}) : x.size(0);
  const at::TensorOptions f32 = weight_hh.options();
  at::Tensor out = at::empty({n_rows, h}, f32);
  at::Tensor sig = at::empty({n_rows, ns * h}, f32);
  at::Tensor cand = at::empty({n_rows, h}, f32);
  at::Tensor hh_n = at::empty({n_rows, h}, f32);
  const int64_t b0 = steps.empty() ? 0 : steps[0];
  at::Tensor hh = at::empty({b0, g}, f32);
  const at::Tensor bx = input_bias ? *input_bias : at::zeros({g}, f32);
  const T* xp = proj ? nullptr : x.data_ptr<T>();
  const at::Tensor zeros = at::zeros({b0 * h}, f32);  // the state before step 0
  // A [G, K] weight's transpose [K, G] as a product's right-hand side: VNNI bf16 under bf16 products, else
  // row-major float32 (only that one is filled). U^T, and with proj W_ih^T.
  struct Rhs {
    std::vector<din_gemm::Bf16> b;
    std::vector<float> f;
  };
  auto transposed = [&](const float* w, int64_t k) {
    Rhs r;
    if (bf16_products) {
      r.b = din_gemm::pack_vnni(k, g, [&](int64_t i, int64_t j) { return w[j * k + i]; });
    } else {
      r.f.resize(k * g);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < g; ++j) r.f[i * g + j] = w[j * k + i];
    }
    return r;
  };
  const Rhs u_t = transposed(weight_hh.data_ptr<float>(), h);
  const Rhs wih_t = proj ? transposed(proj->w, proj->in) : Rhs{};
  // bf16 products: per part a bf16 copy of its previous states.
  std::vector<std::vector<din_gemm::Bf16>> hbuf(bf16_products ? std::max<int64_t>(1, at::get_num_threads()) : 0,
                                                std::vector<din_gemm::Bf16>(bf16_products ? b0 * h : 0));
  // proj: per part its inputs' rows (in the products' type) and their projection (float32).
  const int64_t in = proj ? proj->in : 0;
  const int64_t slots = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::vector<din_gemm::Bf16>> xin_b(proj && bf16_products ? slots : 0, std::vector<din_gemm::Bf16>(b0 * in));
  std::vector<std::vector<float>> xin_f(proj && !bf16_products ? slots : 0, std::vector<float>(b0 * in));
  std::vector<std::vector<float>> xproj(proj ? slots : 0, std::vector<float>(b0 * g));
  const float* bhp = bias_hh ? bias_hh->data_ptr<float>() : nullptr;
  const float* attp = att ? att->data_ptr<float>() : nullptr;
  int64_t start = 0, prev_start = 0;
  for (size_t t = 0; t < steps.size(); ++t) {
    const int64_t b = steps[t], parts = step_parts(b);
    at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
      at::NoGradGuard no_grad;  // grad mode is thread-local: a worker thread's must not see weight_hh's grad
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t r0 = b * q / parts, rows = b * (q + 1) / parts - r0;
        float* hhp = hh.data_ptr<float>() + r0 * g;
        const float* hp = zeros.data_ptr<float>() + r0 * h;
        for (int64_t i = 0; i < rows; ++i) {
          if (bhp) std::memcpy(hhp + i * g, bhp, sizeof(float) * g);
          else std::memset(hhp + i * g, 0, sizeof(float) * g);
        }
        if (t > 0) {
          hp = out.data_ptr<float>() + (prev_start + r0) * h;
          if (bf16_products) {  // U h (+ b_hh) on bf16 operands, float32 sums
            din_gemm::Bf16* hb = hbuf[q].data();
            din_ops::store_row(hp, hb, rows * h);
            din_gemm::gemm_rows_bf16(rows, g, h, hb, h, u_t.b.data(), hhp, g, true);
          } else {
            din_gemm::gemm_rows(rows, g, h, hp, h, u_t.f.data(), g, hhp, g, true);  // U h (+ b_hh)
          }
        }
        const int64_t row = start + r0;
        if (proj) {  // this part's x = W_ih x_in[rows], then the float32 step
          float* xq = xproj[q].data();
          if (bf16_products) {
            din_gemm::Bf16* l = xin_b[q].data();
            for (int64_t i = 0; i < rows; ++i) din_ops::store_row(proj->row(row + i), l + i * in, in);
            din_gemm::gemm_rows_bf16(rows, g, in, l, in, wih_t.b.data(), xq, g, false);
          } else {
            float* l = xin_f[q].data();
            for (int64_t i = 0; i < rows; ++i) std::memcpy(l + i * in, proj->row(row + i), sizeof(float) * in);
            din_gemm::gemm_rows(rows, g, in, l, in, wih_t.f.data(), g, xq, g, false);
          }
          step_forward<M, float>(rows, h, xq, bx.data_ptr<float>(), hhp, hp, attp ? attp + row : nullptr,
                                 sig.data_ptr<float>() + row * ns * h, cand.data_ptr<float>() + row * h,
                                 hh_n.data_ptr<float>() + row * h, out.data_ptr<float>() + row * h);
          continue;
        }
        step_forward<M, T>(rows, h, xp + row * g, bx.data_ptr<float>(), hhp, hp,
                           attp ? attp + row : nullptr, sig.data_ptr<float>() + row * ns * h,
                           cand.data_ptr<float>() + row * h, hh_n.data_ptr<float>() + row * h,
                           out.data_ptr<float>() + row * h);
      }
    });
    prev_start = start;
    start += b;
  }
  return {out, sig, cand, hh_n};
}

template <int64_t M, typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_out, const std::optional<at::Tensor>& att,
                                      const at::Tensor& weight_hh, const at::Tensor& out, const at::Tensor& sig,
                                      const at::Tensor& cand, const at::Tensor& hh_n,
                                      const std::vector<int64_t>& steps, bool has_bias, bool has_input_bias,
                                      bool bf16_products, bool final_only) {
  constexpr int64_t ns = M == kAgru ? 1 : 2;
  const int64_t n_rows = out.size(0), h = out.size(1), g = (ns + 1) * h;
  // Each state's complete gradient: its output gradient plus what the next step sends back. Rows with a next
  // step get theirs written by that step (step_backward starts them from grad_out); the rest (each sequence's
  // last state, B rows in all) are copied from grad_out when their step comes -- instead of cloning all of
  // grad_out up front (a [N, H] copy).
  // final_only: grad_out is [B0, H], the gradient of each sequence's last state only, by rank (B0 = steps[0]);
  // every other state's output gradient is zero. Step t's ending sequences are its rows next .. b - 1, the
  // same ranks: their rows of grad_out are copied, and no state gets an output gradient of its own.
  const at::Tensor go = grad_out.contiguous();
  const float* gop = go.data_ptr<float>();
  at::Tensor dh_all = at::empty({n_rows, h}, out.options());
  at::Tensor dx = at::empty({n_rows, g}, out.options().dtype(c10::CppTypeToScalarType<T>::value));
  // The input bias's, the recurrent weight's and its bias's gradients summed per part (part q of every step into
  // slot q), then over the parts in order: deterministic for a given thread count. Each part's gate gradients
  // (dhh, of U h) live in its own scratch rows: used at once for the gradient reaching the previous state and
  // for dU += dhh^T h_prev while they are in cache, never stored for all N rows.
  const int64_t slots = std::max<int64_t>(1, at::get_num_threads());
  const int64_t b0 = steps.empty() ? 0 : steps[0];  // steps shrink: the first has the most rows
  at::Tensor dbx_parts = at::zeros({slots, g}, out.options());
  at::Tensor dw_parts = at::zeros({slots, g, h}, out.options());
  at::Tensor dbias_parts = at::zeros({slots, g}, out.options());
  at::Tensor dhh_scratch = at::empty({slots, b0 * g + g * din_gemm::kGemmRowBlock}, out.options());
  at::Tensor datt = att ? at::zeros({n_rows}, out.options()) : at::Tensor();
  const float* attp = att ? att->data_ptr<float>() : nullptr;
  std::vector<int64_t> starts(steps.size(), 0);
  for (size_t t = 1; t < steps.size(); ++t) starts[t] = starts[t - 1] + steps[t - 1];
  float* dhp = dh_all.data_ptr<float>();
  // Step 0 starts from zeros and sends nothing back: its hp is zeros and its dprev a scratch buffer.
  at::Tensor zeros = at::zeros({b0 * h}, out.options());
  at::Tensor scratch = at::empty({b0 * h}, out.options());
  const float* outp = out.data_ptr<float>();
  // bf16 products (the forward's were): U as a VNNI right-hand side; per slot a bf16 copy of the part's gate
  // gradients and add_at_b_bf16's scratch.
  const float* wp = weight_hh.data_ptr<float>();
  const std::vector<din_gemm::Bf16> w_vnni =
      bf16_products ? din_gemm::pack_vnni(g, h, [&](int64_t k, int64_t j) { return wp[k * h + j]; })
           : std::vector<din_gemm::Bf16>();
  std::vector<std::vector<din_gemm::Bf16>> dhh_b(bf16_products ? slots : 0,
                                                 std::vector<din_gemm::Bf16>(bf16_products ? b0 * g : 0));
  std::vector<din_gemm::AtBScratch> atb;
  if (bf16_products)
    for (int64_t q = 0; q < slots; ++q) atb.emplace_back(g, h);
  for (int64_t t = static_cast<int64_t>(steps.size()) - 1; t >= 0; --t) {
    const int64_t b = steps[t], start = starts[t], parts = std::min(step_parts(b), slots);
    const int64_t next = t + 1 < static_cast<int64_t>(steps.size()) ? steps[t + 1] : 0;  // rows with a next step
    std::memcpy(dhp + (start + next) * h, gop + ((final_only ? 0 : start) + next) * h,
                sizeof(float) * (b - next) * h);
    at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
      at::NoGradGuard no_grad;  // grad mode is thread-local: a worker thread's must not see weight_hh's grad
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t r0 = b * q / parts, rows = b * (q + 1) / parts - r0, row = start + r0;
        const float* hp = t > 0 ? outp + (starts[t - 1] + r0) * h : zeros.data_ptr<float>() + r0 * h;
        float* dprev = t > 0 ? dhp + (starts[t - 1] + r0) * h : scratch.data_ptr<float>() + r0 * h;
        const float* gprev =
            t > 0 && !final_only ? gop + (starts[t - 1] + r0) * h : zeros.data_ptr<float>() + r0 * h;
        float* dhh = dhh_scratch.data_ptr<float>() + q * dhh_scratch.size(1);
        step_backward<M, T>(rows, h, dhp + row * h, sig.data_ptr<float>() + row * ns * h,
                            cand.data_ptr<float>() + row * h, hh_n.data_ptr<float>() + row * h, hp,
                            attp ? attp + row : nullptr, gprev, dx.data_ptr<T>() + row * g, dhh,
                            dbx_parts.data_ptr<float>() + q * g, att ? datt.data_ptr<float>() + row : nullptr,
                            dprev);
        if (has_bias) {
          float* __restrict__ db = dbias_parts.data_ptr<float>() + q * g;
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < g; ++j) db[j] += dhh[i * g + j];
        }
        if (t > 0) {
          // Through U h to the previous state; and dU += dhh^T h_prev (a row of step t started from the row of
          // the same rank in step t - 1; step 0's rows started from zeros: no term).
          if (bf16_products) {
            din_gemm::Bf16* db = dhh_b[q].data();
            din_ops::store_row(dhh, db, rows * g);
            din_gemm::gemm_rows_bf16(rows, h, g, db, g, w_vnni.data(), dprev, h, true);
            din_gemm::add_at_b_bf16(rows, g, h, dhh, hp, dw_parts.data_ptr<float>() + q * g * h, atb[q]);
          } else {
            din_gemm::gemm_rows(rows, h, g, dhh, g, weight_hh.data_ptr<float>(), h, dprev, h, true);
            din_gemm::add_at_b(rows, g, h, dhh, hp, dw_parts.data_ptr<float>() + q * g * h, dhh + b0 * g);
          }
        }
      }
    });
  }
  // Parts summed in slot order (din_gemm::sum_parts).
  return {dx, datt, din_gemm::sum_parts(dw_parts), has_bias ? din_gemm::sum_parts(dbias_parts) : at::Tensor(),
          has_input_bias ? din_gemm::sum_parts(dbx_parts) : at::Tensor()};
}

}  // namespace din_recurrence

// The projection's inputs checked (weight_ih [G, I] float32; x_in [X, I] float32; x_rows [N] distinct int64 in
// [0, X) -- the linear kernel's checked_rows --, or none and X = N). x_rows must outlive the returned Projection.
inline din_recurrence::Projection checked_projection(const at::Tensor& x_in, const std::optional<at::Tensor>& x_rows,
                                                     const at::Tensor& weight_ih, int64_t gates, int64_t n_rows) {
  din_recurrence::check_f32(x_in, "x_in");
  din_recurrence::check_f32(weight_ih, "weight_ih");
  TORCH_CHECK(x_in.dim() == 2 && weight_ih.dim() == 2 && weight_ih.size(0) == gates &&
                  weight_ih.size(1) == x_in.size(1),
              "packed recurrence: weight_ih must be [", gates, ", I] for x_in [X, I], got ", weight_ih.sizes(),
              " and ", x_in.sizes());
  din_recurrence::Projection p{x_in.data_ptr<float>(), nullptr, x_in.size(1), weight_ih.data_ptr<float>()};
  if (x_rows) {
    TORCH_CHECK(x_rows->is_contiguous() && x_rows->dim() == 1 && x_rows->size(0) == n_rows,
                "packed recurrence: x_rows must be a contiguous [", n_rows, "], got ", x_rows->sizes());
    din_linear::checked_rows(x_rows, x_in.size(0), "packed recurrence: x_rows");
    p.rows = x_rows->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(x_in.size(0) == n_rows, "packed recurrence: x_in has ", x_in.size(0), " rows, the steps ", n_rows);
  }
  return p;
}

// x: [N, G] projected inputs (float32 or bfloat16) -- or, with weight_ih [G, I], x_in [X, I] float32 whose rows
// x_rows (default: all, X = N) are projected inside the steps (Projection).
inline std::vector<at::Tensor> recurrence_forward(at::Tensor x, std::optional<at::Tensor> att, at::Tensor weight_hh,
                                                  std::optional<at::Tensor> bias_hh,
                                                  std::optional<at::Tensor> input_bias, std::vector<int64_t> steps,
                                                  int64_t mode, bool bf16_products, std::optional<at::Tensor> x_rows,
                                                  std::optional<at::Tensor> weight_ih) {
  using namespace din_recurrence;
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "packed recurrence: x must be a contiguous float32 or bfloat16 CPU tensor");
  check_f32(weight_hh, "weight_hh");
  if (att) check_f32(*att, "att");
  if (bias_hh) check_f32(*bias_hh, "bias_hh");
  TORCH_CHECK(att.has_value() == (mode == kAugru || mode == kAgru),
              "packed recurrence: att is required by the augru / agru modes and not used by the others");
  TORCH_CHECK(!x_rows || weight_ih, "packed recurrence: x_rows needs weight_ih");
  const int64_t gates = ((mode == kAgru ? 1 : 2) + 1) * weight_hh.size(1);
  std::optional<Projection> proj;
  if (weight_ih)
    proj = checked_projection(x, x_rows, *weight_ih, gates, std::accumulate(steps.begin(), steps.end(), int64_t{0}));
  if (input_bias) {
    check_f32(*input_bias, "input_bias");
    TORCH_CHECK(input_bias->numel() == gates, "packed recurrence: input_bias must have ", gates, " values, got ",
                input_bias->numel());
  }
  const bool bf16 = x.scalar_type() == at::kBFloat16 && !proj;
  TORCH_CHECK(!bf16_products || weight_hh.size(1) % 2 == 0, "packed recurrence: bf16 products need an even hidden ",
              "size, got ", weight_hh.size(1));
  TORCH_CHECK(!bf16_products || !proj || proj->in % 2 == 0, "packed recurrence: bf16 products need an even input ",
              "size with weight_ih, got ", proj ? proj->in : 0);
  const Projection* pp = proj ? &*proj : nullptr;
#define DIN_RECURRENCE_FORWARD(M)                                                                                   \
  return bf16 ? forward_impl<M, c10::BFloat16>(x, att, weight_hh, bias_hh, input_bias, steps, bf16_products, pp) \
              : forward_impl<M, float>(x, att, weight_hh, bias_hh, input_bias, steps, bf16_products, pp)
  switch (mode) {
    case kGru: DIN_RECURRENCE_FORWARD(kGru);
    case kAugru: DIN_RECURRENCE_FORWARD(kAugru);
    case kUgru: DIN_RECURRENCE_FORWARD(kUgru);
    case kAgru: DIN_RECURRENCE_FORWARD(kAgru);
  }
#undef DIN_RECURRENCE_FORWARD
  TORCH_CHECK(false, "packed recurrence: unknown mode ", mode);
}

inline std::vector<at::Tensor> recurrence_backward(at::Tensor grad_out, std::optional<at::Tensor> att,
                                                   at::Tensor weight_hh, at::Tensor out, at::Tensor sig,
                                                   at::Tensor cand, at::Tensor hh_n, std::vector<int64_t> steps,
                                                   int64_t mode, bool has_bias, bool has_input_bias, bool bf16_dx,
                                                   bool bf16_products, bool final_only) {
  // dx comes back in x's type (bf16_dx: x was bfloat16); every other gradient in float32. final_only: grad_out
  // holds the gradient of each sequence's last state only, [steps[0], H] by rank (see backward_impl).
  using namespace din_recurrence;
  if (final_only) {
    TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == (steps.empty() ? 0 : steps[0]) &&
                    grad_out.size(1) == out.size(1),
                "packed recurrence: a final-state grad_out must be [", steps.empty() ? 0 : steps[0], ", ",
                out.size(1), "] (one row per sequence), got ", grad_out.sizes());
  } else {
    TORCH_CHECK(grad_out.sizes() == out.sizes(), "packed recurrence: grad_out must match the states");
  }
  check_f32(grad_out, "grad_out");
  TORCH_CHECK(att.has_value() == (mode == kAugru || mode == kAgru),
              "packed recurrence: att is required by the augru / agru modes and not used by the others");
  for (const at::Tensor* t : {&out, &sig, &cand, &hh_n, &weight_hh}) check_f32(*t, "saved tensor");
  TORCH_CHECK(!bf16_products || weight_hh.size(1) % 2 == 0, "packed recurrence: bf16 products need an even hidden ",
              "size, got ", weight_hh.size(1));
#define DIN_RECURRENCE_BACKWARD(M)                                                                          \
  return bf16_dx ? backward_impl<M, c10::BFloat16>(grad_out, att, weight_hh, out, sig, cand, hh_n, steps,     \
                                                   has_bias, has_input_bias, bf16_products, final_only)      \
                 : backward_impl<M, float>(grad_out, att, weight_hh, out, sig, cand, hh_n, steps, has_bias, \
                                           has_input_bias, bf16_products, final_only)
  switch (mode) {
    case kGru: DIN_RECURRENCE_BACKWARD(kGru);
    case kAugru: DIN_RECURRENCE_BACKWARD(kAugru);
    case kUgru: DIN_RECURRENCE_BACKWARD(kUgru);
    case kAgru: DIN_RECURRENCE_BACKWARD(kAgru);
  }
#undef DIN_RECURRENCE_BACKWARD
  TORCH_CHECK(false, "packed recurrence: unknown mode ", mode);
}
