// CPU distance ops (OpenMP): squared distances to a small set of centres, computed per block of
// points by a register-tiled micro-kernel for the CPU's instruction set (distance_block.h), fused
// with what consumes them; no N x K matrix except where the op returns one.
#pragma once
#include <cstdint>
#include <vector>

#include "balanced_solver.h"
#include "distance_block.h"
#include "points_cpu.h"

namespace cbtm::cpu {

// Centres packed for the active instruction set.
struct Centers {
  std::vector<float> panels, norm;
  PackedCenters view;
  int64_t k() const { return view.k; }
};
// Raises ValueError naming `centers` when a centre's squared norm is not finite or above kNormLimit.
Centers pack_centers(const Points& c);

// labels: (N,) argmin_k (d_ik + bias_k), first index on ties; sqdist: (N,) its squared distance.
void assign(const Points& x, const Centers& c, const float* bias, int64_t* labels, float* sqdist);
// out: (N, K)
void pairwise_sqdist(const Points& x, const Centers& c, float* out);
// labels: (N,) exact balanced assignment; prices: (K,) in/out (warm: from an earlier solve).
SolveStats balanced_assign(const Points& x, const Centers& c, int64_t cap, std::vector<double>& prices,
                           bool warm, int64_t* labels);
// Name of the instruction set the kernels use ("avx512", "avx2", "generic").
const char* isa_name();

}  // namespace cbtm::cpu
