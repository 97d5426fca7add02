// CPU kernels of the stacked experts' layers: see layers_cpu.h.
#include "layers_cpu.h"

#include <omp.h>

#include <cmath>
#include <vector>

namespace cbtm::cpu {
namespace {
constexpr int64_t kParallelWork = 1 << 16;  // elements below which one thread is faster
}

void grouped_rms_norm(const float* x, const float* weight, const int64_t* expert, int64_t n, int64_t d, float eps,
                      float* out) {
#pragma omp parallel for schedule(static) if (n * d > kParallelWork)
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * d;
    const float* w = weight + expert[i] * d;
    float* oi = out + i * d;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < d; ++j) s += xi[j] * xi[j];
    const float r = 1.f / std::sqrt(s / (float)d + eps);
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) oi[j] = w[j] * (xi[j] * r);
  }
}

void rotary(float* x, int64_t ld, const float* cos, const float* sin, int64_t n, int64_t h, int64_t d) {
  const int64_t half = d / 2;
#pragma omp parallel for schedule(static) if (n * h * d > kParallelWork)
  for (int64_t i = 0; i < n; ++i) {
    const float* c = cos + i * d;
    const float* s = sin + i * d;
    for (int64_t k = 0; k < h; ++k) {
      float* v = x + i * ld + k * d;
      for (int64_t j = 0; j < half; ++j) {
        const float a = v[j], b = v[j + half];
        const float lo = a * c[j], hi = b * c[j + half];
        const float rlo = -b * s[j], rhi = a * s[j + half];
        v[j] = lo + rlo;
        v[j + half] = hi + rhi;
      }
    }
  }
}

}  // namespace cbtm::cpu
