// CUDA kernels: the same semantics as the CPU kernels (kernels_cpu.h). Plain pointers only, so
// nvcc never sees pybind11; arrays are validated by bind_cuda.cpp.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "balanced.h"
#include "common.h"

namespace cbtm::cuda {

// A device matrix: rows of `d` elements `ld` apart (unit column stride), of dtype f32/f16/bf16.
struct DeviceRows {
  const void* data;
  DType dtype;
  int64_t n, d, ld;
};

int device_count();          // 0 when no usable device
std::string device_status();  // why no device is usable, or the device names

void assign(const DeviceRows& x, const DeviceRows& c, const float* bias, int64_t* labels, float* sqdist,
            int64_t stream);
void pairwise_sqdist(const DeviceRows& x, const DeviceRows& c, float* out, int64_t stream);
void centroid_update(const DeviceRows& x, const int64_t* labels, int64_t k, double* sums, int64_t* counts,
                     int64_t stream);
// prices: (K,) host, in/out; labels: (N,) device.
SolveStats balanced_assign(const DeviceRows& x, const DeviceRows& c, int64_t cap, std::vector<double>& prices,
                           bool warm, int64_t* labels, int64_t stream);

}  // namespace cbtm::cuda
