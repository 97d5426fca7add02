// CPU k-means M-step (OpenMP).
#pragma once
#include <cstdint>

#include "points_cpu.h"

namespace cbtm::cpu {

// labels: (N,) in [0, K); sums: (K, D) += per-cluster sums; counts: (K,) += per-cluster counts.
void centroid_update(const Points& x, const int64_t* labels, int64_t k, double* sums, int64_t* counts);

}  // namespace cbtm::cpu
