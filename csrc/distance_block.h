// The distance micro-kernels, compiled once per instruction set (distance_block.inc) and chosen at
// run time: squared distances of a block of points to all centres, as a register-tiled product
// ||x||^2 - 2 x.c + ||c||^2 over centre panels that stay in L1.
#pragma once
#include <cstdint>

#include "mixture_block.h"
#include "prefill_block.h"

namespace cbtm::cpu {

// Centres packed for one instruction set: panels of `np` centres, (d, np) each, zero padded.
struct PackedCenters {
  int64_t k = 0, d = 0, kp = 0;  // kp: k rounded up to a multiple of np
  int np = 0;
  const float* panels = nullptr;  // (kp / np, d, np)
  const float* norm = nullptr;    // (kp,) squared norms, 0 for padding
};

// dist: (nb, kp) squared distances (clamped at 0) of points x[i] (i = idx[r] or i0 + r, r < nb) to
// the packed centres; xn: (nb,) the points' squared norms. nb >= 1.
using BlockFn = void (*)(const float* x, int64_t ldx, const int64_t* idx, int64_t i0, int64_t nb,
                         const PackedCenters& c, float* dist, float* xn);

struct Isa {
  const char* name;  // "avx512", "avx2", "generic"
  int np;            // centres per panel
  int mr;            // points per register tile
  BlockFn block;
  const PrefillIsa* prefill;  // the causal-attention micro-kernel of the same instruction set
  const MixtureIsa* mixture;  // the mixture micro-kernels of the same instruction set
};

namespace isa_avx512 { extern const Isa kIsa; }
namespace isa_avx2 { extern const Isa kIsa; }
namespace isa_generic { extern const Isa kIsa; }

// The instruction set of every CPU micro-kernel: the best the CPU supports, or a lower one named by the environment
// variable CBTM_CPU_ISA (avx2, generic) read once; an unsupported or unknown name is an error.
const Isa& active_isa();

}  // namespace cbtm::cpu
