// What the native TBE kernels (tbe_backward_kernel.h, tbe_forward_kernel.h) read the same way from FBGEMM's
// table-batched layout.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace din_tbe {

// The rows of feature t: hash_size_cumsum[t + k] - hash_size_cumsum[t] for the first k >= 1 that makes it
// non-zero (features sharing a table carry its size once, FBGEMM's convention); `op` names the caller in the
// error.
inline int64_t feature_rows(const int64_t* cumsum, int64_t t, int64_t T, const char* op) {
  for (int64_t k = t + 1; k <= T; ++k) {
    const int64_t rows = cumsum[k] - cumsum[t];
    if (rows != 0) return rows;
  }
  TORCH_CHECK(false, op, ": feature ", t, " has no rows in hash_size_cumsum");
  return 0;
}

}  // namespace din_tbe
