// CUDA k-means M-step, the same semantics as centroid_cpu.h. Plain pointers only (no pybind11).
#pragma once
#include <cstdint>

#include "common.h"

namespace cbtm::cuda {

// x: device rows (unit column stride), labels: (N,) device; sums: (K, D), counts: (K,) device, +=.
void centroid_update(const MatrixView& x, const int64_t* labels, int64_t k, double* sums, int64_t* counts,
                     int64_t stream);

}  // namespace cbtm::cuda
