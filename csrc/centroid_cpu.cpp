#include "centroid_cpu.h"

#include <string>
#include <vector>

namespace cbtm::cpu {

void centroid_update(const Points& x, const int64_t* labels, int64_t k, double* sums, int64_t* counts) {
  const int64_t d = x.d;
  for (int64_t i = 0; i < x.n; ++i)
    if (labels[i] < 0 || labels[i] >= k)
      throw ValueError("centroid_update: label " + std::to_string(labels[i]) + " at index " + std::to_string(i) +
                       " is outside [0, " + std::to_string(k) + ")");
#pragma omp parallel if (x.n * d > kParallelWork)
  {
    std::vector<double> ls((size_t)k * d, 0.0);
    std::vector<int64_t> lc(k, 0);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < x.n; ++i) {
      const float* r = x.row(i);
      double* s = ls.data() + labels[i] * d;
      for (int64_t t = 0; t < d; ++t) s[t] += r[t];
      ++lc[labels[i]];
    }
#pragma omp critical
    {
      for (int64_t e = 0; e < k * d; ++e) sums[e] += ls[e];
      for (int64_t j = 0; j < k; ++j) counts[j] += lc[j];
    }
  }
}

}  // namespace cbtm::cpu
