// The generic causal-attention micro-kernel (see prefill_block.inc; compile flags set in CMakeLists.txt).
#define CBTM_ISA_NS isa_generic
#define CBTM_ISA_NAME "generic"
#define CBTM_VBYTES 16
#define CBTM_MR 6
#define CBTM_NV 2
#include "prefill_block.inc"
