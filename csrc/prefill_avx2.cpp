// The avx2 causal-attention micro-kernel (see prefill_block.inc; compile flags set in CMakeLists.txt).
#define CBTM_ISA_NS isa_avx2
#define CBTM_ISA_NAME "avx2"
#define CBTM_VBYTES 32
#define CBTM_MR 6
#define CBTM_NV 2
#include "prefill_block.inc"
