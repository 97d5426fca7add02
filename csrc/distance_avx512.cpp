// The avx512 distance micro-kernel (see distance_block.inc; compile flags set in CMakeLists.txt).
#define CBTM_ISA_NS isa_avx512
#define CBTM_ISA_NAME "avx512"
#define CBTM_VBYTES 64
#define CBTM_MR 12
#include "distance_block.inc"
