// The generic mixture micro-kernels (see mixture_block.inc; compile flags set in CMakeLists.txt).
#define CBTM_ISA_NS isa_generic
#define CBTM_VBYTES 16
#include "mixture_block.inc"
