// Forward lookups of FBGEMM's table-batched embeddings (TBE) on the CPU, for both TorchRec collections:
//   * pooled (EmbeddingBagCollection): out[b, D_offsets[t] : D_offsets[t + 1]] = sum (or mean) over the
//     bag (t, b) of the table's rows, each times its per-lookup weight when there are any;
//   * unpooled, "nobag" (EmbeddingCollection, the behaviour sequences): out[i, :] = row of lookup i.
// Same inputs and outputs as FBGEMM 1.8's `split_embedding_codegen_forward_cpu` and
// `split_embedding_nobag_codegen_forward_cpu`; ops/tbe.py registers these as those operators' CPU kernels.
//
// Why: FBGEMM's unpooled kernel copies each row element by element without prefetching -- on a 1 GB table it
// took 11 ms for 205k lookups of 64 floats where index_select took 5.8 ms (55 vs 28 ns a lookup), and its
// pooled kernel (fbgemm's JIT SpMDM, prefetching 16 lookups ahead) 2.2 ms where a loop prefetching 32 ahead took
// 1.9 ms. Table rows far larger than the caches are random DRAM reads: what matters is how many are in flight,
// so both loops here request the row of the lookup kPrefetchAhead positions ahead while summing / copying the
// current one. Rows are summed in float in lookup order (FBGEMM's order), then scaled and converted once.
//
// Semantics kept from FBGEMM:
//   * offsets hold T * B + 1 entries, feature-major: bag (t, b) is indices[offsets[t * B + b] :
//     offsets[t * B + b + 1]], looked up in table t, which starts at weights_offsets[t] (in elements);
//   * a feature's row count is hash_size_cumsum[t + k] - hash_size_cumsum[t] for the first k >= 1 that makes
//     it non-zero (features sharing a table carry its size once); an index outside it is an error -- raised
//     here naming the feature, index and position (the output, a new tensor, is dropped);
//   * mean pooling divides by the bag's length when the bag is non-empty -- with per-lookup weights only for
//     float32 outputs, as FBGEMM's two code paths do; an empty bag gives zeros;
//   * output dtype: float32 / float16 / bfloat16 by `output_dtype` (SparseType 0 / 1 / 5), else the weights'.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernel_math.h"
#include "tbe_common.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace din_tbe {

// How many lookups ahead the row reads are requested. Pooled sums of 205k uniform lookups in bags of 50 on
// tables of 1-2 GB, one thread, ms for 4 / 8 / 16 / 32 / 64 / 128 ahead: dim 16: 1.78 1.66 1.48 1.29 1.26 1.29;
// dim 32: 1.92 1.77 1.57 1.38 1.37 1.42; dim 64: 2.86 2.44 1.96 1.77 1.80 1.83; dim 128: 6.97 5.54 4.65 4.65
// 4.87 5.00.
constexpr int64_t kPrefetchAhead = 32;
// At least this many lookups per parallel chunk (below it one thread is faster than waking others).
constexpr int64_t kMinLookupsPerChunk = 8192;

inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

struct FeatureTables {
  std::vector<int64_t> rows, begin;  // per feature: row count, first element of its table
};

inline FeatureTables feature_tables(const at::Tensor& weights_offsets, const at::Tensor& hash_size_cumsum, int64_t T,
                                    const char* op) {
  TORCH_CHECK(weights_offsets.scalar_type() == at::kLong && weights_offsets.numel() >= T,
              op, ": weights_offsets must be int64 with one entry per feature");
  TORCH_CHECK(hash_size_cumsum.scalar_type() == at::kLong && hash_size_cumsum.numel() >= T + 1,
              op, ": hash_size_cumsum must be int64 with T + 1 entries");
  auto wo = weights_offsets.contiguous(), hc = hash_size_cumsum.contiguous();
  FeatureTables f;
  f.rows.resize(T);
  f.begin.resize(T);
  for (int64_t t = 0; t < T; ++t) {
    f.rows[t] = feature_rows(hc.data_ptr<int64_t>(), t, T, op);
    f.begin[t] = wo.data_ptr<int64_t>()[t];
  }
  return f;
}

inline void check_index(int64_t idx, int64_t rows, int64_t t, int64_t pos, const char* op) {
  TORCH_CHECK(idx >= 0 && idx < rows, op, ": feature ", t, " looked up index ", idx, " (position ", pos,
              "), outside its table of ", rows, " rows");
}

// An index is checked where it is used (a separate pass over them cost ~10 % of the unpooled copy): the loops
// return the position of the first bad one, or -1.
inline bool outside(int64_t x, int64_t rows) { return static_cast<uint64_t>(x) >= static_cast<uint64_t>(rows); }

// Bags per parallel chunk: enough for kMinLookupsPerChunk lookups at the batch's mean bag length.
template <typename index_t>
int64_t bag_grain(const index_t* off, int64_t T, int64_t B) {
  const int64_t lookups = static_cast<int64_t>(off[T * B]) - static_cast<int64_t>(off[0]);
  const int64_t avg = std::max<int64_t>(1, lookups / std::max<int64_t>(1, T * B));
  return std::max<int64_t>(1, kMinLookupsPerChunk / avg);
}

template <typename index_t>
void check_offsets(const index_t* off, int64_t T, int64_t B, int64_t num_indices, const char* op) {
  TORCH_CHECK(off[0] >= 0 && off[T * B] >= off[0] && static_cast<int64_t>(off[T * B]) <= num_indices, op,
              ": offsets run past the indices");
}

// 16 stored weights as 16 floats: float16 rows through F16C's conversion (c10::Half's portable conversion,
// element by element, made float16 tables 6x slower than FBGEMM's kernel).
inline din_ops::v16 load16w(const float* p) { return din_ops::load16(p); }

inline din_ops::v16 load16w(const at::Half* p) {
  din_ops::v16 out;
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&out, &v, sizeof(out));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
#else
  for (int k = 0; k < 16; ++k) out[k] = static_cast<float>(p[k]);
#endif
  return out;
}

// Sum over lookups [i0, i1) of the rows (times per-lookup weights pw[i] when Weighted) into acc[0 : D],
// requesting the row of lookup i + kPrefetchAhead while it sums lookup i (while that is before `last`).
// The fixed-width form keeps D = 16 * NV floats in registers; the other one serves any D.
template <int NV, bool Weighted, typename weight_t, typename index_t>
int64_t bag_sum_fixed(const weight_t* __restrict__ table, int64_t rows, int64_t, const index_t* __restrict__ idx,
                      int64_t i0, int64_t i1, int64_t last, const float* __restrict__ pw, float* __restrict__ acc) {
  constexpr int64_t D = 16 * NV;
  constexpr int64_t row_bytes = D * static_cast<int64_t>(sizeof(weight_t));
  din_ops::v16 a[NV] = {};
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t x = static_cast<int64_t>(idx[i]);
    if (outside(x, rows)) return i;
    if (i + kPrefetchAhead < last) prefetch_bytes(table + static_cast<int64_t>(idx[i + kPrefetchAhead]) * D, row_bytes);
    const weight_t* r = table + x * D;
    if constexpr (Weighted) {
      const float s = pw[i];
      for (int v = 0; v < NV; ++v) a[v] += load16w(r + 16 * v) * s;
    } else {
      for (int v = 0; v < NV; ++v) a[v] += load16w(r + 16 * v);
    }
  }
  for (int v = 0; v < NV; ++v) din_ops::store16(acc + 16 * v, a[v]);
  return -1;
}

template <typename weight_t, bool Weighted, typename index_t>
int64_t bag_sum_any(const weight_t* __restrict__ table, int64_t rows, int64_t D, const index_t* __restrict__ idx,
                    int64_t i0, int64_t i1, int64_t last, const float* __restrict__ pw, float* __restrict__ acc) {
  std::fill(acc, acc + D, 0.0f);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(weight_t));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t x = static_cast<int64_t>(idx[i]);
    if (outside(x, rows)) return i;
    if (i + kPrefetchAhead < last) prefetch_bytes(table + static_cast<int64_t>(idx[i + kPrefetchAhead]) * D, row_bytes);
    const weight_t* r = table + x * D;
    const float s = Weighted ? pw[i] : 1.0f;
    for (int64_t d = 0; d < D; ++d) acc[d] += s * static_cast<float>(r[d]);
  }
  return -1;
}

template <typename weight_t, typename index_t>
using BagSum = int64_t (*)(const weight_t*, int64_t, int64_t, const index_t*, int64_t, int64_t, int64_t, const float*,
                           float*);

template <typename weight_t, bool Weighted, typename index_t>
BagSum<weight_t, index_t> bag_sum_for(int64_t D) {
  switch (D) {
    case 16: return bag_sum_fixed<1, Weighted, weight_t, index_t>;
    case 32: return bag_sum_fixed<2, Weighted, weight_t, index_t>;
    case 48: return bag_sum_fixed<3, Weighted, weight_t, index_t>;
    case 64: return bag_sum_fixed<4, Weighted, weight_t, index_t>;
    case 96: return bag_sum_fixed<6, Weighted, weight_t, index_t>;
    case 128: return bag_sum_fixed<8, Weighted, weight_t, index_t>;
    case 192: return bag_sum_fixed<12, Weighted, weight_t, index_t>;
    case 256: return bag_sum_fixed<16, Weighted, weight_t, index_t>;
    default: return bag_sum_any<weight_t, Weighted, index_t>;
  }
}

template <typename weight_t, typename out_t, typename index_t>
void pooled_forward_impl(const at::Tensor& weights, const FeatureTables& f, const int32_t* D_off, int64_t total_D,
                         const index_t* idx, const index_t* off, int64_t T, int64_t B, bool mean,
                         const float* per_lookup, at::Tensor& out) {
  const weight_t* W = weights.data_ptr<weight_t>();
  out_t* Y = out.data_ptr<out_t>();
  const int64_t grain = bag_grain(off, T, B);
  const char* op = "TBE pooled forward";
  // Mean pooling of a weighted bag: FBGEMM divides the weighted sum by the bag's length when the output is
  // float32 (its fbgemm SpMDM path) and not otherwise (its loop path); kept as it is.
  constexpr bool kMeanOfWeighted = std::is_same_v<out_t, float>;
  at::parallel_for(0, T * B, grain, [&](int64_t g0, int64_t g1) {
    int64_t D_max = 0;
    for (int64_t t = g0 / B; t <= (g1 - 1) / B; ++t) D_max = std::max<int64_t>(D_max, D_off[t + 1] - D_off[t]);
    std::vector<float> acc(D_max);
    for (int64_t g = g0; g < g1;) {
      const int64_t t = g / B, g_end = std::min(g1, (t + 1) * B);
      const int64_t D = D_off[t + 1] - D_off[t];
      const weight_t* table = W + f.begin[t];
      const int64_t last = off[g_end];  // prefetch within this feature's part of the chunk
      const BagSum<weight_t, index_t> sum =
          per_lookup != nullptr ? bag_sum_for<weight_t, true, index_t>(D) : bag_sum_for<weight_t, false, index_t>(D);
      for (; g < g_end; ++g) {
        const int64_t b = g - t * B, i0 = off[g], i1 = off[g + 1];
        const int64_t bad = sum(table, f.rows[t], D, idx, i0, i1, last, per_lookup, acc.data());
        if (bad >= 0) check_index(static_cast<int64_t>(idx[bad]), f.rows[t], t, bad, op);
        const float scale = (mean && (per_lookup == nullptr || kMeanOfWeighted) && i1 > i0)
                                ? 1.0f / static_cast<float>(i1 - i0)
                                : 1.0f;
        out_t* y = Y + b * total_D + D_off[t];
        for (int64_t d = 0; d < D; ++d) y[d] = static_cast<out_t>(scale * acc[d]);
      }
    }
  });
}

// Outputs at least this large are written with streaming (non-temporal) stores, past the caches: a copy
// through the cache first reads every output line it will overwrite. On the 1 GB table, 205k rows of 64
// floats (52 MB out): 3.9 ms streamed, 5.3 ms through the cache (index_select: 6.5; FBGEMM's kernel: 11-13);
// small outputs are read back at once by the model and stay cached.
constexpr int64_t kStreamOutputBytes = int64_t{16} << 20;

template <typename weight_t, typename out_t>
inline void copy_row(const weight_t* r, out_t* y, int64_t D, bool stream) {
  if constexpr (std::is_same_v<weight_t, float> && std::is_same_v<out_t, float>) {
#ifdef __AVX512F__
    if (stream) {  // D % 16 == 0 and y 64-byte aligned: checked by the caller
      for (int64_t d = 0; d < D; d += 16) _mm512_stream_ps(y + d, _mm512_loadu_ps(r + d));
      return;
    }
#endif
    std::memcpy(y, r, D * sizeof(float));
  } else if constexpr (std::is_same_v<weight_t, out_t>) {
    std::memcpy(y, r, D * sizeof(out_t));
  } else if constexpr (std::is_same_v<weight_t, at::Half> && std::is_same_v<out_t, float>) {
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) din_ops::store16(y + d, load16w(r + d));
    for (; d < D; ++d) y[d] = static_cast<float>(r[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) y[d] = static_cast<out_t>(static_cast<float>(r[d]));
  }
}

// Rows of lookups [i0, i1) into Y[i0 : i1], the row of lookup i + kPrefetchAhead requested while lookup i is
// copied; the position of the first index outside the table, or -1.
template <typename weight_t, typename out_t, typename index_t>
int64_t copy_rows(const weight_t* __restrict__ table, int64_t rows, const index_t* __restrict__ idx, int64_t i0,
                  int64_t i1, int64_t D, out_t* __restrict__ Y, bool stream) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(weight_t));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t x = static_cast<int64_t>(idx[i]);
    if (outside(x, rows)) return i;
    if (i + kPrefetchAhead < i1) prefetch_bytes(table + static_cast<int64_t>(idx[i + kPrefetchAhead]) * D, row_bytes);
    copy_row(table + x * D, Y + i * D, D, stream);
  }
  return -1;
}

template <typename weight_t, typename out_t, typename index_t>
void nobag_forward_impl(const at::Tensor& weights, const FeatureTables& f, int64_t D, const index_t* idx,
                        const index_t* off, int64_t T, int64_t B, at::Tensor& out) {
  const weight_t* W = weights.data_ptr<weight_t>();
  out_t* Y = out.data_ptr<out_t>();
  const int64_t grain = bag_grain(off, T, B);
  bool stream = false;
#ifdef __AVX512F__
  stream = std::is_same_v<weight_t, float> && std::is_same_v<out_t, float> && D % 16 == 0 &&
           reinterpret_cast<uintptr_t>(Y) % 64 == 0 &&
           out.numel() * static_cast<int64_t>(sizeof(out_t)) >= kStreamOutputBytes;
#endif
  const char* op = "TBE nobag forward";
  at::parallel_for(0, T * B, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1;) {
      const int64_t t = g / B, g_end = std::min(g1, (t + 1) * B);
      const int64_t bad = copy_rows(W + f.begin[t], f.rows[t], idx, off[g], off[g_end], D, Y, stream);
      if (bad >= 0) check_index(static_cast<int64_t>(idx[bad]), f.rows[t], t, bad, op);
      g = g_end;
    }
#ifdef __AVX512F__
    if (stream) _mm_sfence();  // streaming stores are weakly ordered: visible before the kernel returns
#endif
  });
}

inline at::ScalarType output_type(int64_t output_dtype, at::ScalarType weights) {
  switch (output_dtype) {
    case 0: return at::kFloat;
    case 1: return at::kHalf;
    case 5: return at::kBFloat16;
    default: return weights;
  }
}

inline void check_weight_and_output(at::ScalarType wt, at::ScalarType ot, const char* op) {
  TORCH_CHECK(wt == at::kFloat || wt == at::kHalf, op, ": float32 or float16 weights (got ", wt,
              "); set DIN_TORCHREC_NATIVE_KERNELS=0 for FBGEMM's kernel");
  TORCH_CHECK(ot == at::kFloat || ot == at::kHalf || ot == at::kBFloat16, op,
              ": float32, float16 or bfloat16 output (got ", ot, ")");
}

}  // namespace din_tbe

// Runs CALL with W (weights) and O (output) bound to the supported dtype pair (checked first).
#define DIN_TBE_DISPATCH_WEIGHT_AND_OUTPUT(WT, OT, OP, CALL)        \
  do {                                                               \
    din_tbe::check_weight_and_output(WT, OT, OP);                    \
    if ((WT) == at::kFloat) {                                        \
      using W = float;                                               \
      if ((OT) == at::kFloat) { using O = float; CALL; }             \
      else if ((OT) == at::kHalf) { using O = at::Half; CALL; }      \
      else { using O = at::BFloat16; CALL; }                         \
    } else {                                                         \
      using W = at::Half;                                            \
      if ((OT) == at::kFloat) { using O = float; CALL; }             \
      else if ((OT) == at::kHalf) { using O = at::Half; CALL; }      \
      else { using O = at::BFloat16; CALL; }                         \
    }                                                                \
  } while (0)

// fbgemm::split_embedding_codegen_forward_cpu (its schema's arguments; indice_weights empty for none).
inline at::Tensor tbe_pooled_forward(at::Tensor weights, at::Tensor weights_offsets, at::Tensor D_offsets,
                                     int64_t total_D, at::Tensor hash_size_cumsum, at::Tensor indices,
                                     at::Tensor offsets, int64_t pooling_mode, at::Tensor indice_weights,
                                     int64_t output_dtype) {
  const char* op = "TBE pooled forward";
  const int64_t T = D_offsets.numel() - 1;
  TORCH_CHECK(T > 0, op, ": no features");
  TORCH_CHECK((offsets.numel() - 1) % T == 0, op, ": offsets must hold T * B + 1 entries");
  TORCH_CHECK(pooling_mode == 0 || pooling_mode == 1, op, ": pooling mode SUM (0) or MEAN (1), got ", pooling_mode);
  TORCH_CHECK(weights.dim() == 1 && weights.is_contiguous(), op, ": weights must be a contiguous 1-D tensor");
  TORCH_CHECK(indices.scalar_type() == offsets.scalar_type(), op, ": indices and offsets must have one dtype");
  const int64_t B = (offsets.numel() - 1) / T;
  auto f = din_tbe::feature_tables(weights_offsets, hash_size_cumsum, T, op);
  auto Do = D_offsets.to(at::kInt).contiguous();
  auto ix = indices.contiguous(), of = offsets.contiguous();
  at::Tensor pw;
  if (indice_weights.defined() && indice_weights.numel() > 0) {
    TORCH_CHECK(indice_weights.numel() >= indices.numel(), op, ": one per-lookup weight per index");
    pw = indice_weights.to(at::kFloat).contiguous();
  }
  auto out = at::empty({B, total_D}, weights.options().dtype(din_tbe::output_type(output_dtype, weights.scalar_type())));
  AT_DISPATCH_INDEX_TYPES(ix.scalar_type(), "tbe_pooled_forward", [&] {
    const index_t* idx = ix.data_ptr<index_t>();
    const index_t* off = of.data_ptr<index_t>();
    din_tbe::check_offsets(off, T, B, ix.numel(), op);
    const float* per_lookup = pw.defined() ? pw.data_ptr<float>() : nullptr;
    DIN_TBE_DISPATCH_WEIGHT_AND_OUTPUT(weights.scalar_type(), out.scalar_type(), op,
                                       (din_tbe::pooled_forward_impl<W, O, index_t>(
                                           weights, f, Do.data_ptr<int32_t>(), total_D, idx, off, T, B,
                                           pooling_mode == 1, per_lookup, out)));
  });
  return out;
}

// fbgemm::split_embedding_nobag_codegen_forward_cpu.
inline at::Tensor tbe_nobag_forward(at::Tensor weights, at::Tensor weights_offsets, int64_t D,
                                    at::Tensor hash_size_cumsum, at::Tensor indices, at::Tensor offsets,
                                    int64_t output_dtype) {
  const char* op = "TBE nobag forward";
  const int64_t T = weights_offsets.numel();
  TORCH_CHECK(T > 0 && D > 0, op, ": no features or D <= 0");
  TORCH_CHECK((offsets.numel() - 1) % T == 0, op, ": offsets must hold T * B + 1 entries");
  TORCH_CHECK(weights.dim() == 1 && weights.is_contiguous(), op, ": weights must be a contiguous 1-D tensor");
  TORCH_CHECK(indices.scalar_type() == offsets.scalar_type(), op, ": indices and offsets must have one dtype");
  const int64_t B = (offsets.numel() - 1) / T;
  auto f = din_tbe::feature_tables(weights_offsets, hash_size_cumsum, T, op);
  auto ix = indices.contiguous(), of = offsets.contiguous();
  auto out = at::empty({ix.numel(), D},
                       weights.options().dtype(din_tbe::output_type(output_dtype, weights.scalar_type())));
  AT_DISPATCH_INDEX_TYPES(ix.scalar_type(), "tbe_nobag_forward", [&] {
    const index_t* idx = ix.data_ptr<index_t>();
    const index_t* off = of.data_ptr<index_t>();
    din_tbe::check_offsets(off, T, B, ix.numel(), op);
    DIN_TBE_DISPATCH_WEIGHT_AND_OUTPUT(weights.scalar_type(), out.scalar_type(), op,
                                       (din_tbe::nobag_forward_impl<W, O, index_t>(weights, f, D, idx, off, T, B, out)));
  });
  return out;
}
