#include "distance_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

namespace cbtm::cpu {
namespace {

constexpr int64_t kBlockFloats = 16384;  // distance block (rows x kp) kept in L1/L2: 64 KB

const Isa* select_isa(std::string& error) {
  const char* env = std::getenv("CBTM_CPU_ISA");
  const std::string want = env ? env : "";
  const Isa* best = &isa_generic::kIsa;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f")) best = &isa_avx512::kIsa;
  else if (avx2) best = &isa_avx2::kIsa;
  const Isa* all[] = {&isa_avx512::kIsa, &isa_avx2::kIsa, &isa_generic::kIsa};
#else
  const Isa* all[] = {&isa_generic::kIsa};
#endif
  if (want.empty()) return best;
  bool usable = false;
  for (const Isa* isa : all) {
    if (isa == best) usable = true;  // `all` is ordered best first: what follows best is supported
    if (want == isa->name) {
      if (usable) return isa;
      error = "CBTM_CPU_ISA=" + want + ": this CPU does not support it (best: " + best->name + ")";
      return nullptr;
    }
  }
  error = "CBTM_CPU_ISA=" + want + ": unknown instruction set (avx512, avx2 or generic)";
  return nullptr;
}

// Calls fn(i0, nb, dist) for blocks of points (rows idx[i0..i0+nb) or i0..i0+nb), in parallel with
// dynamic scheduling. dist: (nb, kp). Raises ValueError naming x when a point's
// squared norm is not finite or above kNormLimit.
template <class Fn>
void for_each_block(const Points& x, const Centers& c, const int64_t* idx, int64_t n, Fn&& fn) {
  const Isa& isa = active_isa();
  const PackedCenters& pc = c.view;
  const int64_t rb = std::max<int64_t>(isa.mr, kBlockFloats / pc.kp / isa.mr * isa.mr);  // rows per block
  const int64_t blocks = (n + rb - 1) / rb;
  int bad = 0;
#pragma omp parallel if (n * pc.k > kParallelWork) reduction(| : bad)
  {
    std::vector<float> dist((size_t)rb * pc.kp), xn(rb);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i0 = b * rb, nb = std::min(rb, n - i0);
      isa.block(x.base, x.ld, idx ? idx + i0 : nullptr, i0, nb, pc, dist.data(), xn.data());
      bool ok = true;
      for (int64_t r = 0; r < nb; ++r) ok &= xn[r] <= kNormLimit;  // false for NaN
      if (!ok) {
        bad = 1;
        continue;
      }
      fn(i0, nb, dist.data());
    }
  }
  if (bad)
    throw ValueError("x contains NaN or Inf, or a point whose squared norm exceeds 4.25e37 (squared "
                     "distances would overflow float32: scale the data down)");
}

class CpuOracle final : public DistanceOracle {
 public:
  CpuOracle(const Points& x, const Centers& c) : x_(x), c_(c) {}
  void full_pass(const double* prices, int32_t* labels, float* margin) override {
    const int64_t k = c_.k(), kp = c_.view.kp;
    rows_computed += x_.n;
    for_each_block(x_, c_, nullptr, x_.n, [&](int64_t i0, int64_t nb, const float* dist) {
      for (int64_t r = 0; r < nb; ++r)
        std::tie(labels[i0 + r], margin[i0 + r]) = best_and_margin(dist + r * kp, prices, k);
    });
  }
  void rows(const int64_t* idx, int64_t n, float* out) override {
    const int64_t k = c_.k(), kp = c_.view.kp;
    rows_computed += n;
    for_each_block(x_, c_, idx, n, [&](int64_t i0, int64_t nb, const float* dist) {
      for (int64_t r = 0; r < nb; ++r) std::memcpy(out + (i0 + r) * k, dist + r * kp, k * sizeof(float));
    });
  }

 private:
  const Points& x_;
  const Centers& c_;
};

}  // namespace

const Isa& active_isa() {
  static std::string error;
  static const Isa* isa = select_isa(error);
  if (!isa) throw ValueError(error);
  return *isa;
}

const char* isa_name() { return active_isa().name; }

Centers pack_centers(const Points& c) {
  const int np = active_isa().np;
  Centers out;
  PackedCenters& v = out.view;
  v.k = c.n;
  v.d = c.d;
  v.np = np;
  v.kp = (c.n + np - 1) / np * np;
  out.panels.assign((size_t)v.kp * c.d, 0.f);
  out.norm.assign(v.kp, 0.f);
  for (int64_t j = 0; j < c.n; ++j) {
    double s = 0.0;
    for (int64_t t = 0; t < c.d; ++t) {
      const float e = c.row(j)[t];
      out.panels[(j / np) * c.d * np + t * np + j % np] = e;
      s += (double)e * e;
    }
    if (!(s <= kNormLimit))
      throw ValueError("centers: row " + std::to_string(j) + " contains NaN or Inf, or its squared norm exceeds "
                       "4.25e37 (squared distances would overflow float32: scale the data down)");
    out.norm[j] = (float)s;
  }
  v.panels = out.panels.data();
  v.norm = out.norm.data();
  return out;
}

void assign(const Points& x, const Centers& c, const float* bias, int64_t* labels, float* sqdist) {
  const int64_t k = c.k(), kp = c.view.kp;
  for_each_block(x, c, nullptr, x.n, [&](int64_t i0, int64_t nb, const float* dist) {
    for (int64_t r = 0; r < nb; ++r) {
      const float* d = dist + r * kp;
      int64_t bj = 0;
      float bv = d[0] + (bias ? bias[0] : 0.f);
      for (int64_t j = 1; j < k; ++j) {
        const float v = d[j] + (bias ? bias[j] : 0.f);
        if (v < bv) {
          bv = v;
          bj = j;
        }
      }
      labels[i0 + r] = bj;
      sqdist[i0 + r] = d[bj];
    }
  });
}

void pairwise_sqdist(const Points& x, const Centers& c, float* out) {
  const int64_t k = c.k(), kp = c.view.kp;
  for_each_block(x, c, nullptr, x.n, [&](int64_t i0, int64_t nb, const float* dist) {
    for (int64_t r = 0; r < nb; ++r) std::memcpy(out + (i0 + r) * k, dist + r * kp, k * sizeof(float));
  });
}

SolveStats balanced_assign(const Points& x, const Centers& c, int64_t cap, std::vector<double>& prices,
                           bool warm, int64_t* labels) {
  CpuOracle oracle(x, c);
  std::vector<int32_t> lab(x.n);
  const SolveStats st = balanced_solve(oracle, x.n, c.k(), cap, prices, lab.data(), warm);
  std::copy(lab.begin(), lab.end(), labels);
  return st;
}

}  // namespace cbtm::cpu
