// Exact balanced assignment by raising cluster prices (the dual of the transportation problem).
//
// Problem: minimise sum_i d(i, label_i) with at most `cap` points per cluster. K*cap - N "dummy"
// points of cost 0 make every cluster hold exactly `cap`; the dual then has one free price p_j
// per cluster, and an assignment is optimal iff every point (and dummy) sits at
// argmin_j (d_ij + p_j) and every cluster is full. Prices only ever rise:
//  1. presolve (cold starts): exact solves on nested random subsets give prices close to the
//     optimum;
//  2. one full pass labels every point with its argmin and its margin to the second best;
//  3. only points with small margins can move while prices rise a little, so each cluster caches
//     the K distances of its members with the smallest margins; bound[j] is the smallest margin
//     left out, and a cluster whose price must rise past it fetches more rows (never a new pass);
//  4. rounds: every over-full cluster raises its price just enough to evict its excess (the
//     points with the smallest margins move to their next best cluster);
//  5. when a round stops making progress (points shuttling between tied clusters), shortest-path
//     augmentations over the K clusters (Dijkstra on reduced costs) finish the job exactly.
#include "balanced_solver.h"

#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <tuple>

namespace cbtm {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kTieTol = 1e-9;  // relative tolerance under which two costs count as tied
constexpr int64_t kParallelWork = 262144;
constexpr const char* kNonFiniteDistance =
    "balanced_assign: the distance kernels returned a NaN or infinite distance (inputs out of range)";

inline double tie_tol(double cost) { return kTieTol * (1.0 + std::fabs(cost)); }

// The price solver over a growing cache of candidate points.
class Solver {
 public:
  Solver(DistanceOracle& oracle, int64_t k, int64_t cap, std::vector<double>& p, std::vector<int64_t>& dummy,
         SolveStats& st)
      : oracle_(oracle), k_(k), cap_(cap), p_(p), p0_(p), dummy_(dummy), st_(st), pool_(k), bound_(k, kInf),
        cnt_(k) {}

  // Puts every point of a full pass in its cluster's pool, then caches the members with the
  // smallest margins: `share` per cluster plus four times the cluster's excess.
  void cache_from_pass(const int32_t* labels, const float* margin, int64_t n, int64_t share) {
    for (int64_t i = 0; i < n; ++i) pool_[labels[i]].push_back({margin[i], i});
    std::vector<int64_t> want(k_);
    for (int64_t j = 0; j < k_; ++j)
      want[j] = share + 4 * std::max<int64_t>(0, (int64_t)pool_[j].size() + dummy_[j] - cap_);
    extend(want);
  }

  void run() {
    int64_t best = std::numeric_limits<int64_t>::max();
    for (;;) {
      reassign();
      const int64_t excess = count();
      if (excess == 0) return;
      if (excess >= best) return augment();
      best = excess;
      ++st_.rounds;
      round();
    }
  }

  // labels[idx] <- cluster of every cached point.
  void store(int32_t* labels) const {
    for (size_t c = 0; c < idx_.size(); ++c) labels[idx_[c]] = lab_[c];
  }

 private:
  int64_t size() const { return (int64_t)lab_.size(); }
  const float* row(int64_t c) const { return rows_.data() + c * k_; }

  // Moves want[j] more members of cluster j (smallest margins first) from its pool into the cache.
  void extend(const std::vector<int64_t>& want) {
    std::vector<int64_t> ids;
    std::vector<int32_t> labs;
    for (int64_t j = 0; j < k_; ++j) {
      auto& pool = pool_[j];
      const int64_t r = std::min<int64_t>(want[j], (int64_t)pool.size());
      if (r <= 0) continue;
      if (r < (int64_t)pool.size()) {
        std::nth_element(pool.begin(), pool.begin() + r, pool.end());
        bound_[j] = pool[r].first;
      } else {
        bound_[j] = kInf;
      }
      for (int64_t t = 0; t < r; ++t) {
        ids.push_back(pool[t].second);
        labs.push_back((int32_t)j);
      }
      pool.erase(pool.begin(), pool.begin() + r);
    }
    const int64_t n0 = size(), m = (int64_t)ids.size();
    rows_.resize((size_t)(n0 + m) * k_);
    oracle_.rows(ids.data(), m, rows_.data() + n0 * k_);
    for (int64_t e = n0 * k_; e < (n0 + m) * k_; ++e)
      if (!std::isfinite(rows_[e])) throw ValueError(kNonFiniteDistance);
    idx_.insert(idx_.end(), ids.begin(), ids.end());
    lab_.insert(lab_.end(), labs.begin(), labs.end());
    st_.cached = std::max(st_.cached, size());
  }

  // Points a cluster fetches when it runs out of cached candidates.
  int64_t growth(int64_t members, int64_t need) const { return std::max<int64_t>({64, 2 * members, 4 * need}); }

  // Best cluster of cached point c other than `skip` (-1: none), and its cost.
  std::pair<int32_t, double> best_of(int64_t c, int64_t skip) const {
    const float* r = row(c);
    double bc = kInf;
    int32_t bj = -1;
    for (int64_t j = 0; j < k_; ++j) {
      if (j == skip) continue;
      const double v = (double)r[j] + p_[j];
      if (v < bc) {
        bc = v;
        bj = (int32_t)j;
      }
    }
    return {bj, bc};
  }

  std::pair<int32_t, double> cheapest_price(int64_t skip) const {
    double bc = kInf;
    int32_t bj = -1;
    for (int64_t j = 0; j < k_; ++j)
      if (j != skip && p_[j] < bc) {
        bc = p_[j];
        bj = (int32_t)j;
      }
    return {bj, bc};
  }

  // Every cached point and every dummy to its argmin, keeping current labels that are tied.
  void reassign() {
    const int64_t n = size();
#pragma omp parallel for schedule(static) if (n * k_ > kParallelWork)
    for (int64_t c = 0; c < n; ++c) {
      const auto [bj, bc] = best_of(c, -1);
      const int32_t cur = lab_[c];
      if ((double)row(c)[cur] + p_[cur] > bc + tie_tol(bc)) lab_[c] = bj;
    }
    const auto [mj, mp] = cheapest_price(-1);
    for (int64_t j = 0; j < k_; ++j)
      if (dummy_[j] > 0 && p_[j] > mp + tie_tol(mp)) {
        dummy_[mj] += dummy_[j];
        dummy_[j] = 0;
      }
  }

  int64_t count() {
    for (int64_t j = 0; j < k_; ++j) cnt_[j] = (int64_t)pool_[j].size() + dummy_[j];
    for (int32_t l : lab_) ++cnt_[l];
    int64_t excess = 0;
    for (int64_t j = 0; j < k_; ++j) excess += std::max<int64_t>(0, cnt_[j] - cap_);
    return excess;
  }

  // One round: every over-full cluster evicts its excess at once, from the prices at round start.
  // A cluster whose cached candidates do not suffice fetches more and waits for the next round.
  void round() {
    const int64_t n = size();
    std::vector<int64_t> start(k_ + 1, 0), order(n);
    for (int64_t c = 0; c < n; ++c) ++start[lab_[c] + 1];
    for (int64_t j = 0; j < k_; ++j) start[j + 1] += start[j];
    {
      std::vector<int64_t> pos(start.begin(), start.end() - 1);
      for (int64_t c = 0; c < n; ++c) order[pos[lab_[c]]++] = c;
    }
    std::vector<int64_t> over;
    for (int64_t j = 0; j < k_; ++j)
      if (cnt_[j] > cap_) over.push_back(j);
    std::vector<double> newp(p_);
    std::vector<int64_t> dummy_out(k_, 0), want(k_, 0);
    std::vector<int32_t> dummy_to(k_, -1);
    int lost = 0;
#pragma omp parallel for schedule(dynamic) if (n * k_ > kParallelWork) reduction(| : lost)
    for (size_t oi = 0; oi < over.size(); ++oi) {
      const int64_t j = over[oi];
      const int64_t need = cnt_[j] - cap_;
      const int64_t m = start[j + 1] - start[j];
      if (m + dummy_[j] < need) {
        want[j] = growth(m, need);
        continue;
      }
      // cand: (margin, cached point) for the members of j; the dummy entry has point -1.
      std::vector<std::pair<double, int64_t>> cand(m);
      for (int64_t t = 0; t < m; ++t) {
        const int64_t c = order[start[j] + t];
        cand[t] = {best_of(c, j).second - ((double)row(c)[j] + p_[j]), c};
      }
      const auto [dj, dcost] = cheapest_price(j);
      if (dummy_[j] > 0) cand.push_back({dcost - p_[j], -1});
      const int64_t keep = dummy_[j] > 0 ? (int64_t)cand.size() : need;
      if (keep < (int64_t)cand.size()) {
        std::nth_element(cand.begin(), cand.begin() + (keep - 1), cand.end());
        cand.resize(keep);
      }
      std::sort(cand.begin(), cand.end());
      // Evict the `need` smallest margins; the dummy entry counts dummy_[j] times.
      int64_t left = need, dummies = 0;
      double delta = 0.0;
      std::vector<int64_t> evict;
      for (const auto& [margin, c] : cand) {
        if (left == 0) break;
        delta = margin;
        if (c < 0) {
          dummies = std::min(left, dummy_[j]);
          left -= dummies;
        } else {
          evict.push_back(c);
          --left;
        }
      }
      delta = std::max(delta, 0.0);
      if (p_[j] + delta - p0_[j] > bound_[j]) {  // uncached members could be cheaper to evict
        want[j] = growth(m, need);
        continue;
      }
      for (int64_t c : evict) {
        lab_[c] = best_of(c, j).first;
        if (lab_[c] < 0) lost = 1;  // impossible with finite rows (K >= 2 here); never index with it
      }
      dummy_out[j] = dummies;
      dummy_to[j] = dj;
      newp[j] = p_[j] + delta;
    }
    if (lost) throw std::logic_error("balanced_assign: a point had no cluster to move to (internal error)");
    p_ = newp;
    for (int64_t j = 0; j < k_; ++j)
      if (dummy_out[j] > 0) {
        dummy_[j] -= dummy_out[j];
        dummy_[dummy_to[j]] += dummy_out[j];
      }
    if (std::any_of(want.begin(), want.end(), [](int64_t w) { return w > 0; })) extend(want);
  }

  // Successive shortest paths: move one unit of excess along the cheapest chain of moves from an
  // over-full to an under-full cluster, raising prices so every point stays at its argmin.
  // The reduced cost of moving a point of a to b is (r_b - r_a) + (p_b - p_a): the first term does
  // not depend on prices, so its minimum over the members of a is kept per (a, b) and only the
  // rows of clusters that lost a point are recomputed.
  void augment() {
    const int64_t kk = k_ * k_;
    std::vector<std::vector<int64_t>> mem(k_);
    std::vector<double> base(kk, kInf), w(kk), dist(k_);
    std::vector<int64_t> barg(kk, -3), arg(kk);  // moved point; -1 a dummy; -2 an uncached point; -3 none
    std::vector<int64_t> ties(kk, 0);  // members of a tied (within tolerance) at the minimum toward b
    auto add = [&](int64_t a, int64_t c) {
      const float* r = row(c);
      for (int64_t b = 0; b < k_; ++b) {
        if (b == a) continue;
        const double v = (double)r[b] - (double)r[a];
        double& m = base[a * k_ + b];
        if (m == kInf || v < m - tie_tol(m)) {
          m = v;
          barg[a * k_ + b] = c;
          ties[a * k_ + b] = 1;
        } else if (v <= m + tie_tol(m)) {
          ++ties[a * k_ + b];
        }
      }
    };
    auto rebuild = [&](int64_t a) {
      std::fill(base.begin() + a * k_, base.begin() + (a + 1) * k_, kInf);
      std::fill(barg.begin() + a * k_, barg.begin() + (a + 1) * k_, -3);
      std::fill(ties.begin() + a * k_, ties.begin() + (a + 1) * k_, 0);
      for (int64_t c : mem[a]) add(a, c);
    };
    auto fetch = [&](const std::vector<int64_t>& want) {  // extend the cache, register new points
      const int64_t n0 = size();
      extend(want);
      for (int64_t c = n0; c < size(); ++c) {
        mem[lab_[c]].push_back(c);
        add(lab_[c], c);
      }
    };
    for (int64_t c = 0; c < size(); ++c) mem[lab_[c]].push_back(c);
#pragma omp parallel for schedule(dynamic) if (size() * k_ > kParallelWork)
    for (int64_t a = 0; a < k_; ++a) rebuild(a);
    std::vector<int32_t> pred(k_);
    std::vector<char> done(k_), dirty(k_);
    std::vector<int64_t> want(k_);
    for (;;) {
      int64_t excess = 0;
      for (int64_t j = 0; j < k_; ++j) excess += std::max<int64_t>(0, cnt_[j] - cap_);
      if (excess == 0) return;
      for (int64_t a = 0; a < k_; ++a) {
        const double lb = pool_[a].empty() ? kInf : bound_[a] - (p_[a] - p0_[a]);
        for (int64_t b = 0; b < k_; ++b) {
          double e = base[a * k_ + b];
          int64_t g = barg[a * k_ + b];
          if (dummy_[a] > 0 && 0.0 < e) {
            e = 0.0;
            g = -1;
          }
          e += p_[b] - p_[a];
          if (lb < e) {
            e = lb;
            g = -2;
          }
          w[a * k_ + b] = std::max(e, 0.0);
          arg[a * k_ + b] = a == b ? -3 : g;
        }
      }
      // Dijkstra from every over-full cluster to the nearest under-full one.
      std::fill(done.begin(), done.end(), 0);
      std::fill(pred.begin(), pred.end(), -1);
      for (int64_t j = 0; j < k_; ++j) dist[j] = cnt_[j] > cap_ ? 0.0 : kInf;
      int64_t sink = -1;
      for (;;) {
        int64_t u = -1;
        for (int64_t j = 0; j < k_; ++j)
          if (!done[j] && dist[j] < kInf && (u < 0 || dist[j] < dist[u])) u = j;
        if (u < 0) throw std::logic_error("balanced_assign: no augmenting path (internal error)");
        done[u] = 1;
        if (cnt_[u] < cap_) {
          sink = u;
          break;
        }
        for (int64_t b = 0; b < k_; ++b)
          if (!done[b] && arg[u * k_ + b] != -3 && dist[u] + w[u * k_ + b] < dist[b]) {
            dist[b] = dist[u] + w[u * k_ + b];
            pred[b] = (int32_t)u;
          }
      }
      // The path must not rely on uncached points, nor raise a price past its cluster's bound.
      const double delta = dist[sink];
      std::fill(want.begin(), want.end(), 0);
      for (int64_t b = sink; pred[b] >= 0; b = pred[b])
        if (arg[pred[b] * k_ + b] == -2) want[pred[b]] = growth((int64_t)mem[pred[b]].size(), 1);
      for (int64_t j = 0; j < k_; ++j)
        if (done[j] && !pool_[j].empty() && p_[j] + (delta - dist[j]) - p0_[j] > bound_[j])
          want[j] = growth((int64_t)mem[j].size(), 1);
      if (std::any_of(want.begin(), want.end(), [](int64_t v) { return v > 0; })) {
        fetch(want);
        continue;
      }
      for (int64_t j = 0; j < k_; ++j)
        if (done[j]) p_[j] += delta - dist[j];
      // Units moved at once: as many as the source's excess, the sink's room and every edge
      // allow (an edge carries its points tied at the minimum reduced cost, or its dummies).
      int64_t flow = cap_ - cnt_[sink], src = sink;
      for (int64_t b = sink; pred[b] >= 0; b = pred[b]) {
        src = pred[b];
        flow = std::min(flow, arg[src * k_ + b] >= 0 ? ties[src * k_ + b] : dummy_[src]);
      }
      flow = std::min(flow, cnt_[src] - cap_);
      std::fill(dirty.begin(), dirty.end(), 0);
      for (int64_t b = sink; pred[b] >= 0; b = pred[b]) {
        const int64_t a = pred[b];
        const int64_t c = arg[a * k_ + b];
        if (c >= 0) {
          // the `flow` members of a tied at the minimum toward b (c first)
          std::vector<int64_t> movers{c};
          const double m = base[a * k_ + b];
          for (int64_t x : mem[a]) {
            if ((int64_t)movers.size() >= flow) break;
            if (x != c && (double)row(x)[b] - (double)row(x)[a] <= m + tie_tol(m)) movers.push_back(x);
          }
          auto& ma = mem[a];
          for (int64_t x : movers) {
            lab_[x] = (int32_t)b;
            ma.erase(std::find(ma.begin(), ma.end(), x));
            mem[b].push_back(x);
            add(b, x);
          }
          dirty[a] = 1;
        } else {
          dummy_[a] -= flow;
          dummy_[b] += flow;
        }
        cnt_[a] -= flow;
        cnt_[b] += flow;
      }
      for (int64_t a = 0; a < k_; ++a)
        if (dirty[a]) rebuild(a);
      ++st_.augments;
    }
  }

  DistanceOracle& oracle_;
  const int64_t k_, cap_;
  std::vector<double>& p_;
  const std::vector<double> p0_;  // prices when the margins of the pools were measured
  std::vector<int64_t>& dummy_;
  SolveStats& st_;
  std::vector<int64_t> idx_;  // (n,) global index of each cached point
  std::vector<float> rows_;   // (n, K) its squared distances
  std::vector<int32_t> lab_;  // (n,) its cluster
  std::vector<std::vector<std::pair<float, int64_t>>> pool_;  // per cluster: uncached (margin, index)
  std::vector<double> bound_;  // (K,) smallest margin in the pool
  std::vector<int64_t> cnt_;   // (K,) points + dummies per cluster
};

// Dummies (cost 0 everywhere) belong at the cheapest price: they fill the free room of the
// clusters tied at the minimum price first, any rest goes to the first of them.
std::vector<int64_t> place_dummies(int64_t count, int64_t cap, const std::vector<double>& p,
                                   const std::vector<int64_t>& points) {
  const int64_t k = (int64_t)p.size();
  const double pmin = *std::min_element(p.begin(), p.end());
  std::vector<int64_t> dummy(k, 0);
  int64_t first = -1;
  for (int64_t j = 0; j < k && count > 0; ++j) {
    if (p[j] > pmin + tie_tol(pmin)) continue;
    if (first < 0) first = j;
    const int64_t put = std::min(count, std::max<int64_t>(0, cap - points[j]));
    dummy[j] = put;
    count -= put;
  }
  if (count > 0) dummy[first] += count;
  return dummy;
}

// One full pass: labels and margins of every point; returns the excess over capacity.
int64_t full_pass(DistanceOracle& oracle, int64_t n, int64_t k, int64_t cap, const std::vector<double>& p,
                  int32_t* labels, std::vector<float>& margin, std::vector<int64_t>& dummy) {
  margin.resize(n);
  oracle.full_pass(p.data(), labels, margin.data());
  // Defensive: labels index clusters and margins order the candidate pools (a NaN there breaks
  // nth_element's ordering and writes out of bounds), so both are checked, not trusted.
  for (int64_t i = 0; i < n; ++i)
    if (labels[i] < 0 || labels[i] >= k || !(margin[i] >= 0.f)) throw ValueError(kNonFiniteDistance);
  std::vector<int64_t> counts(k, 0);
  for (int64_t i = 0; i < n; ++i) ++counts[labels[i]];
  dummy = place_dummies(k * cap - n, cap, p, counts);
  int64_t excess = 0;
  for (int64_t j = 0; j < k; ++j) excess += std::max<int64_t>(0, counts[j] + dummy[j] - cap);
  return excess;
}

// The solver on the candidates a full pass leaves.
void solve_after_pass(DistanceOracle& oracle, int64_t n, int64_t k, int64_t cap, std::vector<double>& p,
                      int32_t* labels, const std::vector<float>& margin, std::vector<int64_t>& dummy,
                      int64_t excess, SolveStats& st) {
  if (excess == 0) return;
  Solver solver(oracle, k, cap, p, dummy, st);
  solver.cache_from_pass(labels, margin.data(), n, std::max<int64_t>(4 * excess, 4096) / k);
  solver.run();
  solver.store(labels);
}

void solve_from_pass(DistanceOracle& oracle, int64_t n, int64_t k, int64_t cap, std::vector<double>& p,
                     int32_t* labels, SolveStats& st) {
  std::vector<float> margin;
  std::vector<int64_t> dummy;
  const int64_t excess = full_pass(oracle, n, k, cap, p, labels, margin, dummy);
  solve_after_pass(oracle, n, k, cap, p, labels, margin, dummy, excess, st);
}

// The oracle of a subset of the points (ids), its full pass computed from rows in blocks.
class SubsetOracle final : public DistanceOracle {
 public:
  SubsetOracle(DistanceOracle& base, std::vector<int64_t> ids, int64_t k) : base_(base), ids_(std::move(ids)), k_(k) {}
  void full_pass(const double* prices, int32_t* labels, float* margin) override {
    constexpr int64_t kBlock = 4096;
    const int64_t n = (int64_t)ids_.size();
    std::vector<float> rows((size_t)kBlock * k_);
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const int64_t nb = std::min(kBlock, n - i0);
      base_.rows(ids_.data() + i0, nb, rows.data());
      for (int64_t t = 0; t < nb; ++t)
        std::tie(labels[i0 + t], margin[i0 + t]) = best_and_margin(rows.data() + t * k_, prices, k_);
    }
  }
  void rows(const int64_t* idx, int64_t n, float* out) override {
    std::vector<int64_t> ids(n);
    for (int64_t t = 0; t < n; ++t) ids[t] = ids_[idx[t]];
    base_.rows(ids.data(), n, out);
  }

 private:
  DistanceOracle& base_;
  const std::vector<int64_t> ids_;
  const int64_t k_;
};

// Prices from exact solves on nested random subsets (4096+ points, doubling): the optimal prices
// of a sample approximate those of the whole set, so each level starts close to its optimum.
void presolve(DistanceOracle& oracle, int64_t n, int64_t k, int64_t cap, std::vector<double>& p, SolveStats& st) {
  std::vector<int64_t> levels;
  for (int64_t m = std::max<int64_t>(32 * k, 4096); 2 * m <= n; m *= 2) levels.push_back(m);
  if (levels.empty()) return;
  std::vector<int64_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937_64 rng(0x5eedULL);
  for (int64_t i = 0; i < levels.back(); ++i) std::swap(perm[i], perm[i + (int64_t)(rng() % (uint64_t)(n - i))]);
  for (const int64_t m : levels) {
    std::vector<int64_t> ids(perm.begin(), perm.begin() + m);
    std::sort(ids.begin(), ids.end());
    const int64_t cap_m = std::max((m + k - 1) / k, (int64_t)std::llround((double)cap * m / n));
    SubsetOracle sub(oracle, std::move(ids), k);
    std::vector<int32_t> lab(m);
    solve_from_pass(sub, m, k, cap_m, p, lab.data(), st);
  }
}

}  // namespace

SolveStats balanced_solve(DistanceOracle& oracle, int64_t n, int64_t k, int64_t cap, std::vector<double>& p,
                          int32_t* labels, bool warm) {
  if (k < 1 || n < 1) throw std::invalid_argument("balanced_assign: need at least one point and one cluster");
  if (cap < 1 || cap * k < n) throw std::invalid_argument("balanced_assign: capacity * K must be at least N");
  SolveStats st;
  if (!warm) presolve(oracle, n, k, cap, p, st);
  std::vector<float> margin;
  std::vector<int64_t> dummy;
  int64_t excess = full_pass(oracle, n, k, cap, p, labels, margin, dummy);
  if (warm && excess * 32 > n) {  // the warm prices are far off: refine them on subsets first
    presolve(oracle, n, k, cap, p, st);
    excess = full_pass(oracle, n, k, cap, p, labels, margin, dummy);
  }
  solve_after_pass(oracle, n, k, cap, p, labels, margin, dummy, excess, st);
  st.rows = oracle.rows_computed;
  const double pmin = *std::min_element(p.begin(), p.end());
  for (double& v : p) v -= pmin;
  return st;
}

}  // namespace cbtm
