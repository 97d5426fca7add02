// CPU mixture of experts' next-token distributions (OpenMP over rows).
#pragma once
#include <cstdint>

#include "common.h"

namespace cbtm::cpu {

// out[b, v] = log sum_j exp(logw[b, j] + x_jb[v] - lse(x_jb)) over the experts j with logw[b, j] > -inf,
// where x_jb is row idx[j, b] of tables[j] (row stride ld[j], V columns, float32 or bfloat16 bits);
// -inf everywhere for a row without experts. Rows of dropped experts are never read. logw: (B, k)
// compact float32 without NaN or +inf; idx: (k, B); out: (B, V) compact float32. Callers check the
// shapes and that idx[j, b] lies within tables[j].
void weighted_logsumexp_rows(const void* const* tables, const int64_t* ld, DType dtype, const int64_t* idx,
                             const float* logw, int64_t k, int64_t B, int64_t V, float* out);

}  // namespace cbtm::cpu
