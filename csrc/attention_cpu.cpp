// CPU attention kernels: see attention_cpu.h.
#include "attention_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "distance_block.h"

namespace cbtm::cpu {
namespace {

constexpr int64_t kParallelWork = 1 << 15;  // multiply-adds below which one thread is faster

inline float load(float x) { return x; }
struct Half { uint16_t bits; };
struct BFloat { uint16_t bits; };
inline float load(Half x) { return half_to_float(x.bits); }
inline float load(BFloat x) { return bf16_to_float(x.bits); }

// Row p, query head h: softmax(scale * q . k_t) over t < n, times v_t; float32 throughout.
template <class T>
void one_head(const T* q, const T* k, const T* v, int64_t n, int64_t D, float scale, float* qf, float* score,
              float* out) {
  for (int64_t d = 0; d < D; ++d) qf[d] = load(q[d]);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    const T* kt = k + t * D;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += qf[d] * load(kt[d]);
    score[t] = s * scale;
    top = std::max(top, score[t]);
  }
  float total = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    score[t] = std::exp(score[t] - top);
    total += score[t];
  }
  std::fill(out, out + D, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const T* vt = v + t * D;
    const float w = score[t];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += w * load(vt[d]);
  }
  const float inv = 1.f / total;
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

template <class T>
void run(const T* q, const T* k, const T* v, const int64_t* slots, const int64_t* lengths, int64_t P, int64_t Hq,
         int64_t Hk, int64_t L, int64_t D, float scale, float* out) {
  const int64_t group = Hq / Hk;
  int64_t work = 0;
  for (int64_t p = 0; p < P; ++p) work += lengths[p];
  work *= 2 * Hq * D;
#pragma omp parallel if (work > kParallelWork)
  {
    std::vector<float> qf(D), score(L);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < P * Hq; ++i) {
      const int64_t p = i / Hq, h = i % Hq;
      const int64_t base = (slots[p] * Hk + h / group) * L * D;
      one_head(q + i * D, k + base, v + base, lengths[p], D, scale, qf.data(), score.data(), out + i * D);
    }
  }
}

}  // namespace

void varlen_attention(const float* qkv, int64_t ld, const int64_t* lengths, int64_t P, int64_t Hq, int64_t Hk,
                      int64_t D, float scale, float* out) {
  const PrefillIsa& isa = *active_isa().prefill;
  const int64_t group = Hq / Hk, ldo = Hq * D;
  std::vector<int64_t> start(P + 1, 0), order(P);
  int64_t longest = 0, work = 0;
  for (int64_t p = 0; p < P; ++p) {
    start[p + 1] = start[p] + lengths[p];
    longest = std::max(longest, lengths[p]);
    work += lengths[p] * lengths[p] * Hq * D;
  }
  std::iota(order.begin(), order.end(), 0);  // longest segments first: the dynamic schedule balances the rest
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  const int64_t tasks = P * Hk;
#pragma omp parallel if (work > kParallelWork)
  {
    std::vector<float> buf(longest ? isa.work_floats(longest, D) : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t p = order[t / Hk], g = t % Hk, n = lengths[p];
      if (n == 0) continue;
      const float* rows = qkv + start[p] * ld;
      isa.segment(rows + g * group * D, rows + (Hq + g) * D, rows + (Hq + Hk + g) * D, ld, n, group, D, scale,
                  out + start[p] * ldo + g * group * D, ldo, buf.data());
    }
  }
}

void decode_attention(const void* q, const void* k, const void* v, DType dtype, const int64_t* slots,
                      const int64_t* lengths, int64_t P, int64_t Hq, int64_t Hk, int64_t L, int64_t D,
                      float scale, float* out) {
  switch (dtype) {
    case DType::f32:
      run(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v), slots, lengths,
          P, Hq, Hk, L, D, scale, out);
      break;
    case DType::f16:
      run(static_cast<const Half*>(q), static_cast<const Half*>(k), static_cast<const Half*>(v), slots, lengths, P,
          Hq, Hk, L, D, scale, out);
      break;
    case DType::bf16:
      run(static_cast<const BFloat*>(q), static_cast<const BFloat*>(k), static_cast<const BFloat*>(v), slots,
          lengths, P, Hq, Hk, L, D, scale, out);
      break;
    default:
      throw ValueError("decode_attention: q, k and v must be float32, float16 or bfloat16");
  }
}

}  // namespace cbtm::cpu
