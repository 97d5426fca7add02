// The mixture micro-kernels (a weighted log-sum-exp of log-softmaxes, one row at a time), compiled
// once per instruction set (mixture_block.inc) and chosen with the distance kernels' choice
// (distance_block.h: the best the CPU supports, or CBTM_CPU_ISA).
#pragma once
#include <cstdint>

namespace cbtm::cpu {

struct MixtureIsa {
  // log sum_v exp(x[v]) of a row of V logits (float32 or bfloat16 bits); -inf entries add nothing.
  float (*lse_f32)(const float* x, int64_t V);
  float (*lse_bf16)(const uint16_t* x, int64_t V);
  // out[v] = log sum_{j < k} exp(c[j] + x[j][v]) (k >= 1); -inf where every term is -inf.
  void (*mix_f32)(const float* const* x, const float* c, int k, int64_t V, float* out);
  void (*mix_bf16)(const uint16_t* const* x, const float* c, int k, int64_t V, float* out);
};

namespace isa_avx512 { extern const MixtureIsa kMixture; }
namespace isa_avx2 { extern const MixtureIsa kMixture; }
namespace isa_generic { extern const MixtureIsa kMixture; }

}  // namespace cbtm::cpu
