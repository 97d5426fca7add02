// Exact balanced assignment: N points, K clusters of capacity `cap`, minimum total squared
// distance. A host-side dual (price) solver over a distance oracle, shared by CPU and CUDA.
#pragma once
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace cbtm {

// Label and margin of one point: (argmin_j dist_j + prices_j, first index on ties; second best
// cost - best cost, +inf when K = 1). dist: (K,), prices: (K,).
inline std::pair<int32_t, float> best_and_margin(const float* dist, const double* prices, int64_t k) {
  double b1 = std::numeric_limits<double>::infinity(), b2 = b1;
  int32_t j1 = 0;
  for (int64_t j = 0; j < k; ++j) {
    const double v = (double)dist[j] + prices[j];
    if (v < b1) {
      b2 = b1;
      b1 = v;
      j1 = (int32_t)j;
    } else if (v < b2) {
      b2 = v;
    }
  }
  return {j1, (float)(b2 - b1)};
}

// Where distances come from (CPU kernels or CUDA kernels).
struct DistanceOracle {
  virtual ~DistanceOracle() = default;
  int64_t rows_computed = 0;  // implementations count the distance rows they compute
  // For every point: label <- argmin_k (d_ik + prices_k) (first index on ties), margin <- second
  // best cost - best cost (+inf when K = 1). prices: (K,); labels, margin: (N,) out.
  virtual void full_pass(const double* prices, int32_t* labels, float* margin) = 0;
  // out: (n, K) squared distances of the points idx[0..n).
  virtual void rows(const int64_t* idx, int64_t n, float* out) = 0;
};

struct SolveStats {
  int64_t rows = 0;      // distance rows computed (full passes and cached candidates)
  int rounds = 0;        // price-raising rounds on cached candidates
  int64_t augments = 0;  // shortest-path augmentations (ties / jams)
  int64_t cached = 0;    // largest candidate set held in memory
};

// prices: (K,) in / out (dual prices, min 0); labels: (N,) out. warm: the prices come from an
// earlier solve (skips the subset presolve that cold starts use).
SolveStats balanced_solve(DistanceOracle& oracle, int64_t n, int64_t k, int64_t cap,
                          std::vector<double>& prices, int32_t* labels, bool warm);

}  // namespace cbtm
