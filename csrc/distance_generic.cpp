// The generic distance micro-kernel (see distance_block.inc; compile flags set in CMakeLists.txt).
#define CBTM_ISA_NS isa_generic
#define CBTM_ISA_NAME "generic"
#define CBTM_VBYTES 16
#define CBTM_MR 6
#include "distance_block.inc"
