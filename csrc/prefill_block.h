// The causal-attention micro-kernels of packed variable-length segments, compiled once per
// instruction set (prefill_block.inc) and chosen at run time with the distance kernels' choice
// (distance_block.h: the best the CPU supports, or CBTM_CPU_ISA).
#pragma once
#include <cstdint>

namespace cbtm::cpu {

// One segment of n rows and one KV head with `group` query heads: causal softmax attention in
// float32. Row t's query head h is q[t * ld + h * D + d], its key k[t * ld + d], its value
// v[t * ld + d]; row t's output head h goes to out[t * ldo + h * D + d]. work: work_floats(n, D) floats.
using SegmentFn = void (*)(const float* q, const float* k, const float* v, int64_t ld, int64_t n, int64_t group,
                           int64_t D, float scale, float* out, int64_t ldo, float* work);

struct PrefillIsa {
  const char* name;
  int64_t (*work_floats)(int64_t n, int64_t D);
  SegmentFn segment;
};

namespace isa_avx512 { extern const PrefillIsa kPrefill; }
namespace isa_avx2 { extern const PrefillIsa kPrefill; }
namespace isa_generic { extern const PrefillIsa kPrefill; }

}  // namespace cbtm::cpu
