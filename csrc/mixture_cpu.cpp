// CPU mixture of experts' next-token distributions: see mixture_cpu.h.
#include "mixture_cpu.h"

#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "distance_block.h"

namespace cbtm::cpu {
namespace {

constexpr int64_t kParallelWork = 1 << 16;  // logits read below which one thread is faster

template <class T>
void run(const T* const* tables, const int64_t* ld, const int64_t* idx, const float* logw, int64_t k, int64_t B,
         int64_t V, float* out, float (*lse)(const T*, int64_t),
         void (*mix)(const T* const*, const float*, int, int64_t, float*)) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel if (B * V * k > kParallelWork)
  {
    std::vector<const T*> rows(k);
    std::vector<float> c(k);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      int n = 0;
      for (int64_t j = 0; j < k; ++j) {
        const float w = logw[b * k + j];
        if (w == neg_inf) continue;  // a dropped expert: its row is never read
        rows[n] = tables[j] + idx[j * B + b] * ld[j];
        c[n] = w - lse(rows[n], V);
        ++n;
      }
      float* o = out + b * V;
      if (n == 0) {
        std::fill(o, o + V, neg_inf);
      } else {
        mix(rows.data(), c.data(), n, V, o);
      }
    }
  }
}

}  // namespace

void weighted_logsumexp_rows(const void* const* tables, const int64_t* ld, DType dtype, const int64_t* idx,
                             const float* logw, int64_t k, int64_t B, int64_t V, float* out) {
  const MixtureIsa& isa = *active_isa().mixture;
  if (dtype == DType::f32) {
    run(reinterpret_cast<const float* const*>(tables), ld, idx, logw, k, B, V, out, isa.lse_f32, isa.mix_f32);
  } else if (dtype == DType::bf16) {
    run(reinterpret_cast<const uint16_t* const*>(tables), ld, idx, logw, k, B, V, out, isa.lse_bf16, isa.mix_bf16);
  } else {
    throw ValueError("weighted_logsumexp_rows: the tables must be float32 or bfloat16");
  }
}

}  // namespace cbtm::cpu
