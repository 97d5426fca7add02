// CPU kernels (OpenMP): squared distances to a small set of centres, fused with what consumes them.
#pragma once
#include <cstdint>
#include <vector>

#include "balanced_solver.h"
#include "points_cpu.h"

namespace cbtm::cpu {

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
// labels: (N,) exact balanced assignment; prices: (K,) in/out (warm: from an earlier solve).
SolveStats balanced_assign(const Points& x, const Centers& c, int64_t cap, std::vector<double>& prices,
                           bool warm, int64_t* labels);

}  // namespace cbtm::cpu
