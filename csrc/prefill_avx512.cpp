// The avx512 causal-attention micro-kernel (see prefill_block.inc; compile flags set in CMakeLists.txt).
#define CBTM_ISA_NS isa_avx512
#define CBTM_ISA_NAME "avx512"
#define CBTM_VBYTES 64
#define CBTM_MR 12
#define CBTM_NV 4
#include "prefill_block.inc"
