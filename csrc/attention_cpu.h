// CPU attention kernels (OpenMP): decode over a pool of KV-cache slots, and causal attention of packed
// variable-length segments.
#pragma once
#include <cstdint>

#include "common.h"

namespace cbtm::cpu {

// One query per row attends to the first lengths[p] positions of its KV slot, read in place (no
// gather). q: (P, Hq, D); k, v: (S, Hk, L, D) in dtype (float32, float16 or bfloat16), compact;
// slots, lengths: (P,); out: float32 (P, Hq, D). Query head h reads KV head h / (Hq / Hk).
// Callers check slots[p] in [0, S) and lengths[p] in [1, L].
void decode_attention(const void* q, const void* k, const void* v, DType dtype, const int64_t* slots,
                      const int64_t* lengths, int64_t P, int64_t Hq, int64_t Hk, int64_t L, int64_t D,
                      float scale, float* out);

// Causal self-attention of P segments packed without padding (as flash-attn's varlen "qkvpacked"
// call): segment p is the next lengths[p] rows of qkv (lengths may be 0). Row t of qkv holds its Hq
// query heads, then Hk key heads, then Hk value heads, D floats each, with row stride ld; query head
// h reads key/value head h / (Hq / Hk). out: (N, Hq * D) compact, float32. Callers check the shapes
// and that scale > 0.
void varlen_attention(const float* qkv, int64_t ld, const int64_t* lengths, int64_t P, int64_t Hq, int64_t Hk,
                      int64_t D, float scale, float* out);

}  // namespace cbtm::cpu
