// DIEN's auxiliary pair loss (sigmoid MLP scorer): the chunk loop of din_torchrec/ops/pair_loss.py
// (_SigmoidMLPPairLoss.forward) in C++, the same ATen calls in the same order, with the chunks shared among
// torch's intra-op threads.
//
// Why: each chunk is ~45 ATen calls on [4096, <=100] tensors. From Python each call paid its dispatch (~600
// calls per DIEN step), and with two threads every small matmul was forked over both and joined again (the
// step's matmuls ran 1.2x faster with two threads than with one). Here a chunk runs start to end on one
// thread (ATen calls inside a parallel region run single-threaded) and the threads take whole chunks.
//
// Determinism: chunks go to threads in contiguous runs (at::parallel_for's static split); each thread sums its
// chunks' loss and weight / bias gradients in its own float32 buffers, and those are added in thread order. With
// one thread that is exactly the Python loop's order and arithmetic (a test compares them bit for bit); with
// more, the result is the same for a given thread count. Rows of g_hs / g_x belong to one chunk each.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace din_pair_loss {

struct Partial {
  at::Tensor loss;
  std::vector<at::Tensor> g_w, g_b;
};

}  // namespace din_pair_loss

// hs [rows, H] (state j - 1 in row j, zero rows after n), behaviours / negatives [n, D], mask [rows] (acc dtype:
// 1 for a pair's target row), weights / biases of the scorer's layers in the compute dtype. Returns
// {loss, g_hs [rows, H], g_x [2, rows, D], g_w..., g_b...}: the loss summed over the pairs' softplus terms (not
// yet divided by the pair count) and the gradients of the mean (scale = 1 / pairs) -- or {loss} alone when
// grads is false.
inline std::vector<at::Tensor> pair_loss_chunks(at::Tensor hs, at::Tensor behaviours, at::Tensor negatives,
                                                at::Tensor mask, std::vector<at::Tensor> weights,
                                                std::vector<at::Tensor> biases, int64_t n, int64_t c, double scale,
                                                bool grads) {
  using din_pair_loss::Partial;
  TORCH_CHECK(hs.device().is_cpu() && hs.dim() == 2 && hs.is_contiguous(), "pair loss: hs must be [rows, H]");
  TORCH_CHECK(weights.size() == biases.size() && weights.size() >= 2, "pair loss: need >= 2 layers");
  TORCH_CHECK(c > 0 && hs.size(0) % c == 0 && hs.size(0) >= n, "pair loss: rows must be chunks of c rows");
  const int64_t rows = hs.size(0), h = hs.size(1), d = behaviours.size(1), k = weights.size();
  const int64_t num_chunks = rows / c;
  const auto dtype = hs.scalar_type();
  const auto acc = mask.scalar_type();
  const at::TensorOptions opt = hs.options(), acc_opt = mask.options();
  const at::Tensor w_h = weights[0].narrow(1, 0, h), w_e = weights[0].narrow(1, h, d);
  const at::Tensor w_h_t = w_h.t(), w_e_t = w_e.t();
  at::Tensor g_hs, g_x;
  if (grads) {
    g_hs = at::empty({rows, h}, opt);
    g_x = at::empty({2, rows, d}, opt);
  }
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_chunks));
  std::vector<Partial> parts(threads);
  for (Partial& p : parts) {
    p.loss = at::zeros({}, acc_opt);
    if (grads) {
      for (int64_t j = 0; j < k; ++j) {
        p.g_w.push_back(at::zeros(weights[j].sizes(), acc_opt));
        p.g_b.push_back(at::zeros(biases[j].sizes(), acc_opt));
      }
    }
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads must not record the weights' graph
    for (int64_t t = t0; t < t1; ++t) {
      Partial& part = parts[t];
      at::Tensor x = at::zeros({2 * c, d}, opt);
      at::Tensor z = at::empty({2 * c, weights[0].size(0)}, opt);
      at::Tensor dz = at::zeros({2 * c, 1}, opt);
      for (int64_t i = num_chunks * t / threads; i < num_chunks * (t + 1) / threads; ++i) {
        const int64_t r0 = i * c, r1 = std::min((i + 1) * c, n), m = std::max<int64_t>(r1 - r0, 0);
        if (m > 0) {
          x.narrow(0, 0, m).copy_(behaviours.narrow(0, r0, m));
          x.narrow(0, c, m).copy_(negatives.narrow(0, r0, m));
        }
        if (m < c) {
          x.narrow(0, m, c - m).zero_();
          x.narrow(0, c + m, c - m).zero_();
        }
        const at::Tensor hc = hs.narrow(0, r0, c);
        const at::Tensor s = at::addmm(biases[0], hc, w_h_t);
        z.narrow(0, 0, c).copy_(s);
        z.narrow(0, c, c).copy_(s);
        std::vector<at::Tensor> acts{x, z.addmm_(x, w_e_t).sigmoid_()};
        for (int64_t j = 1; j < k - 1; ++j) acts.push_back(at::addmm(biases[j], acts.back(), weights[j].t()).sigmoid_());
        const at::Tensor logits = at::addmm(biases[k - 1], acts.back(), weights[k - 1].t()).squeeze(1).to(acc);
        const at::Tensor mc = mask.narrow(0, r0, c);
        part.loss.add_((at::softplus(-logits.narrow(0, 0, c)) * mc).sum() + (at::softplus(logits.narrow(0, c, c)) * mc).sum());
        if (!grads) continue;
        const at::Tensor p = at::sigmoid(logits);
        dz.select(1, 0).narrow(0, 0, c).copy_((p.narrow(0, 0, c) - 1) * mc * scale);
        dz.select(1, 0).narrow(0, c, c).copy_(p.narrow(0, c, c) * mc * scale);
        at::Tensor grad = dz;
        for (int64_t j = k - 1; j > 0; --j) {
          part.g_w[j].add_(grad.t().mm(acts[j]));
          part.g_b[j].add_(grad.sum(at::IntArrayRef{0}, false, acc));
          grad = at::sigmoid_backward(grad.mm(weights[j]), acts[j]);
        }
        const at::Tensor ds = grad.narrow(0, 0, c) + grad.narrow(0, c, c);
        part.g_w[0].narrow(1, 0, h).add_(ds.t().mm(hc));
        part.g_w[0].narrow(1, h, d).add_(grad.t().mm(x));
        part.g_b[0].add_(ds.sum(at::IntArrayRef{0}, false, acc));
        at::Tensor g_hs_c = g_hs.narrow(0, r0, c);
        at::mm_out(g_hs_c, ds, w_h);
        const at::Tensor dx = grad.mm(w_e);
        g_x.select(0, 0).narrow(0, r0, c).copy_(dx.narrow(0, 0, c));
        g_x.select(0, 1).narrow(0, r0, c).copy_(dx.narrow(0, c, c));
      }
    }
  });
  at::Tensor loss = parts[0].loss;
  for (int64_t t = 1; t < threads; ++t) loss = loss + parts[t].loss;
  if (!grads) return {loss};
  std::vector<at::Tensor> out{loss, g_hs, g_x};
  for (int64_t j = 0; j < k; ++j) {
    at::Tensor w = parts[0].g_w[j];
    for (int64_t t = 1; t < threads; ++t) w = w + parts[t].g_w[j];
    out.push_back(w);
  }
  for (int64_t j = 0; j < k; ++j) {
    at::Tensor b = parts[0].g_b[j];
    for (int64_t t = 1; t < threads; ++t) b = b + parts[t].g_b[j];
    out.push_back(b);
  }
  return out;
}
