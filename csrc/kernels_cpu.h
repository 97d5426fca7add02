// CPU kernels (OpenMP): squared distances to a small set of centres, fused with what consumes them.
#pragma once
#include <cstdint>
#include <vector>

#include "array.h"
#include "balanced.h"

namespace cbtm::cpu {

// Points as compact-row float32 (converted from float16 / bfloat16 / strided input when needed).
struct Points {
  const float* base = nullptr;
  int64_t ld = 0, n = 0, d = 0;
  std::vector<float> own;
  const float* row(int64_t i) const { return base + i * ld; }
};
Points load_points(const Array& a);

// Centres packed for the micro-kernel: panels of 16 centres, (D, 16) each, zero padded.
struct Centers {
  int64_t k = 0, d = 0, kp = 0;
  std::vector<float> panels;  // (kp / 16, d, 16)
  std::vector<float> norm;    // (kp,), +inf for padding
};
Centers pack_centers(const Points& c);

// labels: (N,) nearest centre of argmin_k (d_ik + bias_k); sqdist: (N,) its squared distance.
void assign(const Points& x, const Centers& c, const float* bias, int64_t* labels, float* sqdist);
// out: (N, K)
void pairwise_sqdist(const Points& x, const Centers& c, float* out);
// sums: (K, D) += per-cluster sums; counts: (K,) += per-cluster counts.
void centroid_update(const Points& x, const int64_t* labels, int64_t k, double* sums, int64_t* counts);
// labels: (N,) exact balanced assignment; prices: (K,) in/out (warm: from an earlier solve).
SolveStats balanced_assign(const Points& x, const Centers& c, int64_t cap, std::vector<double>& prices,
                           bool warm, int64_t* labels);

}  // namespace cbtm::cpu
