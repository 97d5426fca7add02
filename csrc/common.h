// Element types, conversions and small helpers shared by the CPU and CUDA kernels (no pybind11).
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace cbtm {

enum class DType { f32, f16, bf16, f64, i64, i32 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f64: return "float64";
    case DType::i64: return "int64";
    case DType::i32: return "int32";
  }
  return "?";
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// A borrowed 1-D or 2-D array: element (i, t) at data + (i * ld + t * cs) elements. 1-D arrays are
// (n, 1). Bindings build it from a DLPack tensor; kernels never see Python objects.
struct MatrixView {
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t n = 0, d = 0;    // rows, columns
  int64_t ld = 0, cs = 1;  // row and column strides, in elements
  bool unit_cols() const { return cs == 1 || d == 1; }
};

// Largest squared norm of a point or centre: (|x| + |c|)^2 <= 4 * kNormLimit stays below float32's
// maximum with room for rounding, so no squared distance can overflow (about 4.25e37).
constexpr float kNormLimit = 3.4028235e38f / 8;

struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

#define CBTM_CHECK(cond, msg)                                  \
  do {                                                         \
    if (!(cond)) throw ::cbtm::ValueError(std::string(msg));   \
  } while (0)

}  // namespace cbtm
