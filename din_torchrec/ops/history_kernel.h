// Membership of candidate items in their own sample's history, for DIEN's negative sampler
// (din_torchrec/data/negatives.py: NegativeSampler.sample, whose NumPy check is the reference and the fallback).
//
// Why: the sampler's rejection rounds ask, for every history position, whether the candidate drawn for it is one
// of the same sample's history items. In NumPy that is a sort of all N keys row * V + item and a searchsorted of
// the N candidates in them: ~0.7 ms of the ~2.7 ms it takes to read one DIEN batch of the comparison's data
// (N = 26k, histories <= 50), on the training thread. Here a short history (<= kScanLimit items) is scanned --
// a few vector compares per candidate -- and a longer one sorted once and binary-searched: no sort of all N.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace din_history {

constexpr int64_t kScanLimit = 64;

// Whether c is among p[0 .. n): eight ids per AVX-512 compare (a scalar loop where unavailable).
inline bool contains(const int64_t* p, int64_t n, int64_t c) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512i key = _mm512_set1_epi64(c);
  for (; i + 8 <= n; i += 8)
    if (_mm512_cmpeq_epi64_mask(_mm512_loadu_si512(p + i), key)) return true;
  if (i < n) {
    const __mmask8 tail = static_cast<__mmask8>((1u << (n - i)) - 1);
    return _mm512_mask_cmpeq_epi64_mask(tail, _mm512_maskz_loadu_epi64(tail, p + i), key) != 0;
  }
  return false;
#else
  for (; i < n; ++i)
    if (p[i] == c) return true;
  return false;
#endif
}

}  // namespace din_history

// offsets [B + 1] int64 (sample b's history is items[offsets[b] .. offsets[b + 1])), items [N] int64, rows [M]
// int64 (the sample of each query), candidates [M] int64 -> bool [M]: candidates[k] is among sample rows[k]'s
// history items.
inline at::Tensor in_own_history(at::Tensor offsets, at::Tensor items, at::Tensor rows, at::Tensor candidates) {
  using din_history::kScanLimit;
  for (const at::Tensor* t : {&offsets, &items, &rows, &candidates})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(),
                "in_own_history: contiguous 1-D int64 CPU tensors expected");
  TORCH_CHECK(rows.numel() == candidates.numel(), "in_own_history: rows and candidates must have one length");
  const int64_t b = offsets.numel() - 1, m = rows.numel();
  TORCH_CHECK(b >= 0, "in_own_history: offsets must hold B + 1 entries");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* it = items.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* cp = candidates.data_ptr<int64_t>();
  TORCH_CHECK(b == 0 || (off[0] == 0 && off[b] == items.numel()), "in_own_history: offsets must run 0 .. N");
  // Long histories sorted once (a copy of their items), on first use.
  std::vector<int64_t> sorted;
  std::vector<int64_t> sorted_at(b, -1);
  at::Tensor out = at::empty({m}, rows.options().dtype(at::kBool));
  bool* op = out.data_ptr<bool>();
  for (int64_t k = 0; k < m; ++k) {
    const int64_t r = rp[k];
    TORCH_CHECK(r >= 0 && r < b, "in_own_history: rows[", k, "] = ", r, " is outside [0, ", b, ")");
    const int64_t s = off[r], len = off[r + 1] - s, c = cp[k];
    if (len <= kScanLimit) {
      op[k] = din_history::contains(it + s, len, c);
    } else {
      if (sorted_at[r] < 0) {
        sorted_at[r] = static_cast<int64_t>(sorted.size());
        sorted.insert(sorted.end(), it + s, it + s + len);
        std::sort(sorted.begin() + sorted_at[r], sorted.end());
      }
      const int64_t* first = sorted.data() + sorted_at[r];
      op[k] = std::binary_search(first, first + len, c);
    }
  }
  return out;
}
