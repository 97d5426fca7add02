// The avx2 mixture micro-kernels (see mixture_block.inc; compile flags set in CMakeLists.txt).
#define CBTM_ISA_NS isa_avx2
#define CBTM_VBYTES 32
#include "mixture_block.inc"
