// Points on the CPU as compact-row float32, the input every CPU kernel reads.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

namespace cbtm::cpu {

constexpr int64_t kParallelWork = 1 << 16;  // below this much work (elements, pairs), one thread

// (n, d) float32 rows `ld` apart: a view of the input when it already is float32 with unit column
// stride, otherwise a converted copy (float16 / bfloat16 / strided input).
struct Points {
  const float* base = nullptr;
  int64_t ld = 0, n = 0, d = 0;
  std::vector<float> own;
  const float* row(int64_t i) const { return base + i * ld; }
};
// name: the argument named in errors.
Points load_points(const MatrixView& a, const char* name);

}  // namespace cbtm::cpu
