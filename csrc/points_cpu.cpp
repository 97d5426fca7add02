#include "points_cpu.h"

#include <string>

namespace cbtm::cpu {
namespace {

template <class T, class Cvt>
void convert(const MatrixView& a, Points& out, Cvt cvt) {
  out.own.resize((size_t)out.n * out.d);
  const T* src = static_cast<const T*>(a.data);
#pragma omp parallel for if (out.n * out.d > kParallelWork)
  for (int64_t i = 0; i < out.n; ++i)
    for (int64_t t = 0; t < out.d; ++t) out.own[i * out.d + t] = cvt(src[i * a.ld + t * a.cs]);
  out.base = out.own.data();
  out.ld = out.d;
}

}  // namespace

Points load_points(const MatrixView& a, const char* name) {
  Points p;
  p.n = a.n;
  p.d = a.d;
  if (a.dtype == DType::f32 && a.unit_cols()) {
    p.base = static_cast<const float*>(a.data);
    p.ld = a.ld;
    return p;
  }
  switch (a.dtype) {
    case DType::f32: convert<float>(a, p, [](float v) { return v; }); break;
    case DType::f16: convert<uint16_t>(a, p, half_to_float); break;
    case DType::bf16: convert<uint16_t>(a, p, bf16_to_float); break;
    default: throw ValueError(std::string(name) + ": expected float32, float16 or bfloat16");
  }
  return p;
}

}  // namespace cbtm::cpu
