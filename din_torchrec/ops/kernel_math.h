// Scalar helpers shared by the native kernels (dice_kernel.h, jagged_kernel.h, recurrence_kernel.h); inline
// so that the kernels' loops vectorise through them (exp via libmvec under -ffast-math).
#pragma once

#include <algorithm>
#include <cmath>

namespace din_ops {

// float32 value of a float or c10::BFloat16 element.
template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

inline float sigmoid(float z) {
  // Clamped so that exp never overflows (sigmoid is 0 / 1 to float precision well inside this range).
  z = std::min(std::max(z, -88.0f), 88.0f);
  return 1.0f / (1.0f + std::exp(-z));
}

}  // namespace din_ops
