// The avx2 distance micro-kernel (see distance_block.inc; compile flags set in CMakeLists.txt).
#define CBTM_ISA_NS isa_avx2
#define CBTM_ISA_NAME "avx2"
#define CBTM_VBYTES 32
#define CBTM_MR 6
#include "distance_block.inc"
