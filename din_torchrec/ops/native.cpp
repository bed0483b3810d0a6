// The project's native CPU kernels as one extension module (one build): see dice_kernel.h, history_kernel.h,
// jagged_kernel.h, lau_kernel.h, linear_kernel.h, pair_loss_kernel.h, recurrence_kernel.h,
// regularization_kernel.h, tbe_backward_kernel.h and tbe_forward_kernel.h;
// loaded by din_torchrec/ops/native.py.
#include "dice_kernel.h"
#include "history_kernel.h"
#include "jagged_kernel.h"
#include "lau_kernel.h"
#include "linear_kernel.h"
#include "pair_loss_kernel.h"
#include "recurrence_kernel.h"
#include "regularization_kernel.h"
#include "tbe_backward_kernel.h"
#include "tbe_forward_kernel.h"

#include <atomic>

// How many threads an at::parallel_for over n items runs on (a test that the kernels really use torch's intra-op
// threads: compiled without -fopenmp they silently ran on one).
inline int64_t parallel_threads(int64_t n) {
  std::atomic<int64_t> seen{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { seen.fetch_or(int64_t{1} << (at::get_thread_num() % 63)); });
  return __builtin_popcountll(static_cast<unsigned long long>(seen.load()));
}

// Every kernel releases the GIL while it runs (none touches a Python object): a batch-reading thread
// (data.prefetch_batches) then runs its Python during the kernels instead of waiting for the whole step --
// pybind11 holds the GIL through a bound function unless told otherwise, while ATen's own ops release it.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto kNoGil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("parallel_threads", &parallel_threads, "threads an at::parallel_for over n items runs on",
        kNoGil);
  m.def("dice_forward", &dice_forward, "Dice forward (training mode): out, mean, var, invstd, sigmoid",
        kNoGil);
  m.def("dice_backward", &dice_backward, "Dice backward: grad_x, grad_alpha",
        kNoGil);
  m.def("product_features", &product_features, "jagged [b, b * c[seg]]",
        kNoGil);
  m.def("product_features_backward", &product_features_backward, "grad_b, grad_c",
        kNoGil);
  m.def("lau_first_forward", &lau_first_forward, "first attention layer with per-sample weights M_s b + k_s",
        kNoGil);
  m.def("lau_first_backward", &lau_first_backward, "its backward: db, dc, da_t, dp_t, dk",
        kNoGil);
  m.def("weighted_segment_sum", &weighted_segment_sum, "sum over each sample's rows of w b",
        kNoGil);
  m.def("weighted_segment_sum_backward", &weighted_segment_sum_backward, "grad_b, grad_w",
        kNoGil);
  m.def("linear_forward", &linear_forward,
        "x[rows] W^T + b (+ add[add_index]) through oneDNN BRGEMM in float32 or bf16 (row blocks among threads)",
        kNoGil);
  m.def("linear_backward", &linear_backward, "its backward: dx, dW, db, d(add) (indexed add only)",
        kNoGil);
  m.def("pair_loss_fused", &pair_loss_fused,
        "DIEN's auxiliary pair loss, forward and backward in blocks of rows: loss, g_states, g_x, g_w..., g_b...",
        kNoGil);
  m.def("recurrence_forward", &recurrence_forward, "packed gated recurrence (optionally with its input projection inside): out, sig, cand, hh_n",
        kNoGil);
  m.def("recurrence_backward", &recurrence_backward, "packed gated recurrence backward: dx (or d x_in), datt, dweight, dbias, dinput_bias, dweight_ih",
        kNoGil);
  m.def("weighted_squared_norms", &weighted_squared_norms,
        "the regularizer's sum over keys of c_i ||v_i||^2 (float32 scalar, float64 sums)", kNoGil);
  m.def("weighted_squared_norms_backward", &weighted_squared_norms_backward, "its gradients 2 g c_i v_i",
        kNoGil);
  m.def("in_own_history", &in_own_history, "whether each candidate item is in its own sample's history",
        kNoGil);
  m.def("nobag_rowwise_adagrad_backward", &nobag_rowwise_adagrad_backward,
        "FBGEMM's CPU nobag TBE backward with row-wise Adagrad, in place on the weights and momentum",
        kNoGil);
  m.def("tbe_pooled_forward", &tbe_pooled_forward, "FBGEMM's CPU pooled TBE forward (sum / mean, per-lookup weights)",
        kNoGil);
  m.def("tbe_nobag_forward", &tbe_nobag_forward, "FBGEMM's CPU unpooled TBE forward: one row per lookup",
        kNoGil);
}
