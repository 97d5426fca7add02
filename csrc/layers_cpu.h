// CPU kernels of the stacked experts' layers that PyTorch runs as several small ops (OpenMP, float32).
#pragma once
#include <cstdint>

namespace cbtm::cpu {

// out[n] = weight[expert[n]] * (x[n] / sqrt(mean(x[n]^2) + eps)): RMSNorm of every row with its own
// expert's weight. x, out: (N, D); weight: (K, D); expert: (N,) in [0, K) (checked by the caller).
void grouped_rms_norm(const float* x, const float* weight, const int64_t* expert, int64_t n, int64_t d, float eps,
                      float* out);

// Rotary positions in place: for each of the H heads of row n, x = x * cos[n] + rotate_half(x) * sin[n]
// (rotate_half(x) = (-x[D/2:], x[:D/2])). x: (N, H, D) with row stride ld; cos, sin: (N, D).
void rotary(float* x, int64_t ld, const float* cos, const float* sin, int64_t n, int64_t h, int64_t d);

}  // namespace cbtm::cpu
