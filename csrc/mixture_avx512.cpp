// The avx512 mixture micro-kernels (see mixture_block.inc; compile flags set in CMakeLists.txt).
#define CBTM_ISA_NS isa_avx512
#define CBTM_VBYTES 64
#include "mixture_block.inc"
