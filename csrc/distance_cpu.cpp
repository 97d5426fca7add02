#include "distance_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace cbtm::cpu {
namespace {

constexpr int PB = 8;   // points per micro-tile
constexpr int KB = 16;  // centres per panel

// out: (PB, KB) dot products of PB point rows with one centre panel. Eight explicit vector
// accumulators (GCC vector extension) so they stay in registers.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
static_assert(PB == 8 && KB == 16, "dot_panel is written for 8 x 16 tiles");
#if defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void dot_panel(const float* const* x, int64_t d, const float* panel, float* out) {
  v16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3], *x4 = x[4], *x5 = x[5], *x6 = x[6], *x7 = x[7];
  for (int64_t t = 0; t < d; ++t) {
    const v16 c = *reinterpret_cast<const v16*>(panel + t * KB);
    a0 += x0[t] * c;
    a1 += x1[t] * c;
    a2 += x2[t] * c;
    a3 += x3[t] * c;
    a4 += x4[t] * c;
    a5 += x5[t] * c;
    a6 += x6[t] * c;
    a7 += x7[t] * c;
  }
  v16* o = reinterpret_cast<v16*>(out);
  o[0] = a0, o[1] = a1, o[2] = a2, o[3] = a3, o[4] = a4, o[5] = a5, o[6] = a6, o[7] = a7;
}

// dist: (PB, kp) squared distances of up to PB points (rows idx[0..nb) or i0..i0+nb) to all centres.
// Returns false when a point's squared norm is not finite (NaN, Inf or overflow).
bool dist_tile(const Points& x, const Centers& c, const int64_t* idx, int64_t i0, int nb, float* dist) {
  const float* rows[PB];
  float xn[PB];
  for (int p = 0; p < PB; ++p) {
    const int64_t i = idx ? idx[std::min(p, nb - 1)] : i0 + std::min(p, nb - 1);
    rows[p] = x.row(i);
    float s = 0.f;
    for (int64_t t = 0; t < x.d; ++t) s += rows[p][t] * rows[p][t];
    xn[p] = s;
  }
  bool finite = true;
  for (int p = 0; p < nb; ++p) finite &= std::isfinite(xn[p]);
  float dots[PB * KB];
  for (int64_t b = 0; b < c.kp / KB; ++b) {
    dot_panel(rows, x.d, c.panels.data() + b * x.d * KB, dots);
    for (int p = 0; p < PB; ++p)
      for (int j = 0; j < KB; ++j) dist[p * c.kp + b * KB + j] = xn[p] + c.norm[b * KB + j] - 2.f * dots[p * KB + j];
  }
  return finite;
}

// Calls fn(i, dist_row) for every point, dist_row: (kp,), in parallel over tiles.
template <class Fn>
void for_each_row(const Points& x, const Centers& c, const int64_t* idx, int64_t n, Fn&& fn) {
  const int64_t tiles = (n + PB - 1) / PB;
  int bad = 0;
#pragma omp parallel if (n * c.k > kParallelWork) reduction(| : bad)
  {
    std::vector<float> dist(PB * c.kp);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t i0 = t * PB;
      const int nb = (int)std::min<int64_t>(PB, n - i0);
      if (!dist_tile(x, c, idx ? idx + i0 : nullptr, i0, nb, dist.data())) {
        bad = 1;
        continue;
      }
      for (int p = 0; p < nb; ++p) fn(i0 + p, dist.data() + p * c.kp);
    }
  }
  if (bad) throw ValueError("x contains NaN or Inf (or values whose square overflows float32)");
}

class CpuOracle final : public DistanceOracle {
 public:
  CpuOracle(const Points& x, const Centers& c) : x_(x), c_(c) {}
  void full_pass(const double* prices, int32_t* labels, float* margin) override {
    const int64_t k = c_.k;
    rows_computed += x_.n;
    for_each_row(x_, c_, nullptr, x_.n, [&](int64_t i, const float* dist) {
      std::tie(labels[i], margin[i]) = best_and_margin(dist, prices, k);
    });
  }
  void rows(const int64_t* idx, int64_t n, float* out) override {
    const int64_t k = c_.k;
    rows_computed += n;
    for_each_row(x_, c_, idx, n, [&](int64_t i, const float* dist) { std::copy(dist, dist + k, out + i * k); });
  }

 private:
  const Points& x_;
  const Centers& c_;
};

}  // namespace

Centers pack_centers(const Points& c) {
  Centers out;
  out.k = c.n;
  out.d = c.d;
  out.kp = (c.n + KB - 1) / KB * KB;
  out.panels.assign((size_t)out.kp * c.d, 0.f);
  out.norm.assign(out.kp, std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < c.n; ++j) {
    float s = 0.f;
    for (int64_t t = 0; t < c.d; ++t) {
      const float v = c.row(j)[t];
      out.panels[(j / KB) * c.d * KB + t * KB + j % KB] = v;
      s += v * v;
    }
    out.norm[j] = s;
  }
  return out;
}

void assign(const Points& x, const Centers& c, const float* bias, int64_t* labels, float* sqdist) {
  const int64_t k = c.k;
  for_each_row(x, c, nullptr, x.n, [&](int64_t i, const float* dist) {
    int64_t bj = 0;
    float bv = dist[0] + (bias ? bias[0] : 0.f);
    for (int64_t j = 1; j < k; ++j) {
      const float v = dist[j] + (bias ? bias[j] : 0.f);
      if (v < bv) {
        bv = v;
        bj = j;
      }
    }
    labels[i] = bj;
    sqdist[i] = std::max(dist[bj], 0.f);
  });
}

void pairwise_sqdist(const Points& x, const Centers& c, float* out) {
  const int64_t k = c.k;
  for_each_row(x, c, nullptr, x.n, [&](int64_t i, const float* dist) {
    for (int64_t j = 0; j < k; ++j) out[i * k + j] = std::max(dist[j], 0.f);
  });
}

SolveStats balanced_assign(const Points& x, const Centers& c, int64_t cap, std::vector<double>& prices,
                           bool warm, int64_t* labels) {
  CpuOracle oracle(x, c);
  std::vector<int32_t> lab(x.n);
  const SolveStats st = balanced_solve(oracle, x.n, c.k, cap, prices, lab.data(), warm);
  std::copy(lab.begin(), lab.end(), labels);
  return st;
}

}  // namespace cbtm::cpu
