// Backward + row-wise Adagrad update of FBGEMM's unpooled ("nobag") table-batched embeddings on the CPU:
// the kernel behind TorchRec's fused EmbeddingCollection (the sequence features) when its optimizer is
// row-wise Adagrad. Same inputs, same arithmetic, same result as FBGEMM 1.8's
// `split_embedding_nobag_backward_codegen_rowwise_adagrad_cpu` (tests compare the two on random batches);
// it replaces that kernel's CPU registration (ops/tbe_backward.py) because of how FBGEMM gathers the
// gradients of each row: a std::unordered_map from index to an unordered_map from table to a heap-allocated
// std::vector per distinct row -- 110-180 ns per lookup here, 12 ms of a 100 ms DIEN step on six sequence
// features, all of it on one thread. Here the distinct rows get dense slots through an open-addressing hash
// table (or, for a row space of at most 4 rows per lookup, a direct array: DenseRowSlots) and their gradients
// are summed into one float buffer; with several threads, each thread gathers one
// hash partition of the rows (same per-row order, so the same result for any thread count); then the rows
// are updated in parallel.
//
// Semantics kept from FBGEMM (embedding_backward_split_cpu_template.cpp, rowwise_adagrad's
// split_weight_update_cpu):
//   * lookups are taken feature by feature (t), then in order; a row's gradient is the float sum, in that
//     order, of the gradient rows of every lookup of it -- across features that share the table too (the
//     row is the pair table start, index);
//   * the row's momentum slot is momentum1_offsets[f] + idx with f the last feature that looked it up;
//   * per row: s = sum_d (g_d [+ wd * w_d when weight_decay_mode == 1])^2, m += s / D,
//     multiplier = lr / (sqrt(m) + eps), correction = 1 - multiplier * wd (mode 1), 1 - lr * wd (mode 2),
//     else 1; w_d = correction * w_d - g_d * multiplier. (max_norm and stochastic rounding are ignored on the
//     CPU, as in FBGEMM.)
//   * a feature's row count is hash_size_cumsum[t + k] - hash_size_cumsum[t] for the first k >= 1 that
//     makes it non-zero (features sharing a table carry its size once); an index outside it is an error.
#pragma once

#include "tbe_common.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace din_tbe {

// Open addressing with linear probing over a power-of-two table kept at most half full (it doubles when
// needed): key -> dense slot, slots numbered in order of first appearance.
class RowSlots {
 public:
  explicit RowSlots(int64_t expected_keys) {
    int64_t cap = 16;
    while (cap < 2 * expected_keys) cap <<= 1;
    reset(cap);
  }
  // Returns the slot of key (>= 0) and whether it was new (then its slot is `size()` before the call).
  int64_t find_or_insert(int64_t key, bool* fresh) {
    if (2 * (size_ + 1) > mask_ + 1) grow();
    int64_t pos = home(key);
    while (true) {
      const int64_t k = keys_[pos];
      if (k == key) {
        *fresh = false;
        return slots_[pos];
      }
      if (k == -1) {
        keys_[pos] = key;
        slots_[pos] = size_;
        *fresh = true;
        return size_++;
      }
      pos = (pos + 1) & mask_;
    }
  }

 private:
  int64_t home(int64_t key) const {
    return static_cast<int64_t>((static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull) >> 20) & mask_;
  }
  void reset(int64_t cap) {
    mask_ = cap - 1;
    keys_.assign(cap, -1);
    slots_.resize(cap);
  }
  void grow() {
    std::vector<int64_t> keys = std::move(keys_), slots = std::move(slots_);
    reset(2 * (mask_ + 1));
    for (size_t i = 0; i < keys.size(); ++i) {
      if (keys[i] == -1) continue;
      int64_t pos = home(keys[i]);
      while (keys_[pos] != -1) pos = (pos + 1) & mask_;
      keys_[pos] = keys[i];
      slots_[pos] = slots[i];
    }
  }
  int64_t mask_ = 0, size_ = 0;
  std::vector<int64_t> keys_;
  std::vector<int64_t> slots_;
};

// The same map (key -> slot in order of first appearance) as a direct array over the row space, keys being
// row starts (multiples of D) below `space` elements: for tables small enough that an int32 per row costs less
// than hashing -- DIEN's item and category tables here (20k and 100 rows for 106k lookups: the hash table's
// probes missed L2 where this array, 80 KB, does not).
class DenseRowSlots {
 public:
  DenseRowSlots(int64_t space, int64_t d) : d_(d), slot_(space / d, -1) {}
  int64_t find_or_insert(int64_t key, bool* fresh) {
    int32_t& s = slot_[key / d_];
    *fresh = s < 0;
    if (*fresh) s = static_cast<int32_t>(size_++);
    return s;
  }

 private:
  int64_t d_, size_ = 0;
  std::vector<int32_t> slot_;
};

// The distinct rows of one partition of the row space and their summed gradients.
template <typename Slots>
struct RowGradients {
  Slots slots;
  std::vector<int64_t> begin;    // element offset of the row in host_weights
  std::vector<int64_t> feature;  // last feature that looked it up
  std::vector<int64_t> index;    // index within its table
  std::vector<float> grad;       // [rows, D]
  explicit RowGradients(Slots s) : slots(std::move(s)) {}
};

// Which of `parts` partitions a row belongs to (a hash independent of RowSlots' slot bits).
inline int64_t partition_of(int64_t key, int64_t parts) {
  const uint64_t h = (static_cast<uint64_t>(key) * 0xD6E8FEB86659FD93ull) >> 32;
  return static_cast<int64_t>((h * static_cast<uint64_t>(parts)) >> 32);
}

// Partitions (one per thread) only above this many lookups: below it one pass is faster than spawning.
constexpr int64_t kMinLookupsPerPartition = 16384;

// Gather: one slot per distinct row, the gradient rows summed in FBGEMM's order. With several threads the
// rows are split into hash partitions, each gathered by one thread scanning all lookups in order and keeping
// its own rows: a row's sum runs over its lookups in the same order whatever the thread count, so the result
// does not depend on it. An out-of-range id stops every partition before any row is updated. Then every
// distinct row is updated (independent rows: parallel, deterministic).
template <typename index_t, typename scalar_t, typename grad_t, typename Slots, typename MakeSlots>
void gather_and_update(const grad_t* g, scalar_t* w, float* mom, const int64_t* w_off, const int64_t* m_off,
                       const int64_t* cumsum, const index_t* idx_p, const index_t* off_p, int64_t T, int64_t B,
                       int64_t D, int64_t lookups, MakeSlots make_slots, float learning_rate, double eps,
                       double weight_decay, int64_t weight_decay_mode) {
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), lookups / kMinLookupsPerPartition));
  std::vector<RowGradients<Slots>> gathered;
  gathered.reserve(parts);
  for (int64_t p = 0; p < parts; ++p) gathered.emplace_back(make_slots(parts));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      RowGradients<Slots>& part = gathered[p];
      for (int64_t t = 0; t < T; ++t) {
        const int64_t rows = feature_rows(cumsum, t, T, "nobag rowwise adagrad backward");
        const int64_t table_begin = w_off[t];
        const int64_t i0 = off_p[t * B], i1 = off_p[(t + 1) * B];
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t idx = static_cast<int64_t>(idx_p[i]);
          TORCH_CHECK(idx >= 0 && idx < rows, "nobag rowwise adagrad backward: feature ", t, " looked up index ",
                      idx, " (position ", i, "), outside its table of ", rows, " rows");
          const int64_t begin = table_begin + idx * D;
          if (parts > 1 && partition_of(begin, parts) != p) continue;
          bool fresh = false;
          const int64_t s = part.slots.find_or_insert(begin, &fresh);
          if (fresh) {
            part.begin.push_back(begin);
            part.feature.push_back(t);
            part.index.push_back(idx);
            part.grad.insert(part.grad.end(), D, 0.0f);
          } else {
            part.feature[s] = t;
          }
          float* acc = part.grad.data() + s * D;
          const grad_t* gr = g + i * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(gr[d]);
        }
      }
    }
  });

  for (const RowGradients<Slots>& part : gathered) {
    const int64_t n_rows = static_cast<int64_t>(part.begin.size());
    at::parallel_for(0, n_rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* gb = part.grad.data() + r * D;
        scalar_t* wr = w + part.begin[r];
        float sum_sq = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
          float gd = gb[d];
          if (weight_decay_mode == 1) gd += weight_decay * static_cast<float>(wr[d]);
          sum_sq += gd * gd;
        }
        const float avg_sq = sum_sq / D;
        float& m = mom[m_off[part.feature[r]] + part.index[r]];
        const float new_sum = m + avg_sq;
        m = new_sum;
        const float multiplier = learning_rate / (std::sqrt(new_sum) + eps);
        float correction = 1.0f;
        if (weight_decay_mode == 1) {
          correction = 1.0 - multiplier * weight_decay;
        } else if (weight_decay_mode == 2) {
          correction = 1.0 - learning_rate * weight_decay;
        }
        for (int64_t d = 0; d < D; ++d)
          wr[d] = static_cast<scalar_t>(correction * static_cast<float>(wr[d]) - gb[d] * multiplier);
      }
    });
  }
}

// The direct array (DenseRowSlots) is used when the row space holds at most this many rows per lookup (and
// every table starts on a row boundary); else the hash table.
constexpr int64_t kDenseRowsPerLookup = 4;

template <typename index_t, typename scalar_t, typename grad_t>
void nobag_rowwise_adagrad_impl(const at::Tensor& grad_output, at::Tensor& host_weights,
                                const at::Tensor& weights_offsets, int64_t D, const at::Tensor& hash_size_cumsum,
                                const at::Tensor& indices, const at::Tensor& offsets, at::Tensor& momentum1_host,
                                const at::Tensor& momentum1_offsets, float learning_rate, double eps,
                                double weight_decay, int64_t weight_decay_mode) {
  const int64_t T = weights_offsets.size(0);
  const int64_t B = (offsets.size(0) - 1) / T;
  const grad_t* g = grad_output.data_ptr<grad_t>();
  scalar_t* w = host_weights.data_ptr<scalar_t>();
  float* mom = momentum1_host.data_ptr<float>();
  const int64_t* w_off = weights_offsets.data_ptr<int64_t>();
  const int64_t* m_off = momentum1_offsets.data_ptr<int64_t>();
  const int64_t* cumsum = hash_size_cumsum.data_ptr<int64_t>();
  const index_t* idx_p = indices.data_ptr<index_t>();
  const index_t* off_p = offsets.data_ptr<index_t>();
  const int64_t lookups = static_cast<int64_t>(off_p[T * B]) - static_cast<int64_t>(off_p[0]);
  TORCH_CHECK(off_p[0] >= 0 && lookups >= 0 && static_cast<int64_t>(off_p[T * B]) <= indices.numel() &&
                  static_cast<int64_t>(off_p[T * B]) * D <= grad_output.numel(),
              "nobag rowwise adagrad backward: offsets run past the indices or the gradient rows");
  const int64_t space = host_weights.numel();
  bool dense = space / D <= kDenseRowsPerLookup * std::max<int64_t>(lookups, 1);
  for (int64_t t = 0; t < T && dense; ++t) dense = w_off[t] % D == 0;
  if (dense) {
    gather_and_update<index_t, scalar_t, grad_t, DenseRowSlots>(
        g, w, mom, w_off, m_off, cumsum, idx_p, off_p, T, B, D, lookups,
        [&](int64_t) { return DenseRowSlots(space, D); }, learning_rate, eps, weight_decay, weight_decay_mode);
  } else {
    gather_and_update<index_t, scalar_t, grad_t, RowSlots>(
        g, w, mom, w_off, m_off, cumsum, idx_p, off_p, T, B, D, lookups,
        [&](int64_t parts) { return RowSlots(std::max<int64_t>(lookups / parts / 2, 16)); }, learning_rate, eps,
        weight_decay, weight_decay_mode);
  }
}

}  // namespace din_tbe

// The operator's arguments that the CPU computation uses, in its schema's order; ops/tbe.py drops the
// rest (placements, total_hash_size_bits, stochastic_rounding, max_norm: unused on the CPU, as in FBGEMM) and
// passes the learning rate as a number.
inline void nobag_rowwise_adagrad_backward(at::Tensor grad_output, at::Tensor host_weights, at::Tensor weights_offsets,
                                           int64_t D, at::Tensor hash_size_cumsum, at::Tensor indices,
                                           at::Tensor offsets, at::Tensor momentum1_host, at::Tensor momentum1_offsets,
                                           double learning_rate, double eps, double weight_decay,
                                           int64_t weight_decay_mode) {
  const int64_t T = weights_offsets.size(0);
  TORCH_CHECK(T > 0 && D > 0, "nobag rowwise adagrad backward: no features or D <= 0");
  TORCH_CHECK(host_weights.dim() == 1 && host_weights.is_contiguous(),
              "nobag rowwise adagrad backward: host_weights must be a contiguous 1-D tensor");
  TORCH_CHECK(momentum1_host.scalar_type() == at::kFloat && momentum1_host.is_contiguous(),
              "nobag rowwise adagrad backward: momentum1_host must be contiguous float32");
  TORCH_CHECK(weights_offsets.scalar_type() == at::kLong && momentum1_offsets.scalar_type() == at::kLong &&
                  hash_size_cumsum.scalar_type() == at::kLong && hash_size_cumsum.numel() >= T + 1,
              "nobag rowwise adagrad backward: offsets tables must be int64");
  TORCH_CHECK(indices.scalar_type() == offsets.scalar_type(), "indices and offsets must have one dtype");
  TORCH_CHECK((offsets.size(0) - 1) % T == 0, "offsets must hold T * B + 1 entries");
  auto go = grad_output.contiguous();
  auto wo = weights_offsets.contiguous(), mo = momentum1_offsets.contiguous(), hc = hash_size_cumsum.contiguous();
  auto ix = indices.contiguous(), of = offsets.contiguous();
  const float lr = static_cast<float>(learning_rate);
  AT_DISPATCH_INDEX_TYPES(ix.scalar_type(), "nobag_rowwise_adagrad_backward", [&] {
    const auto gt = go.scalar_type(), wt = host_weights.scalar_type();
    TORCH_CHECK((gt == at::kFloat || gt == at::kHalf) && (wt == at::kFloat || wt == at::kHalf),
                "nobag rowwise adagrad backward: float32 or float16 gradients and weights");
    if (gt == at::kFloat && wt == at::kFloat)
      din_tbe::nobag_rowwise_adagrad_impl<index_t, float, float>(go, host_weights, wo, D, hc, ix, of, momentum1_host, mo,
                                                                 lr, eps, weight_decay, weight_decay_mode);
    else if (gt == at::kFloat)
      din_tbe::nobag_rowwise_adagrad_impl<index_t, at::Half, float>(go, host_weights, wo, D, hc, ix, of, momentum1_host,
                                                                    mo, lr, eps, weight_decay, weight_decay_mode);
    else if (wt == at::kFloat)
      din_tbe::nobag_rowwise_adagrad_impl<index_t, float, at::Half>(go, host_weights, wo, D, hc, ix, of, momentum1_host,
                                                                    mo, lr, eps, weight_decay, weight_decay_mode);
    else
      din_tbe::nobag_rowwise_adagrad_impl<index_t, at::Half, at::Half>(go, host_weights, wo, D, hc, ix, of,
                                                                       momentum1_host, mo, lr, eps, weight_decay,
                                                                       weight_decay_mode);
  });
}
