// CUDA distance ops: the same semantics as the CPU ones (distance_cpu.h). Plain pointers only, so
// nvcc never sees pybind11; arrays are validated by bind_cuda.cpp. Matrices (MatrixView) are
// device rows with unit column stride, of dtype f32/f16/bf16.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "balanced_solver.h"
#include "common.h"

namespace cbtm::cuda {

int device_count();          // 0 when no usable device
std::string device_status();  // why no device is usable, or the device names

void assign(const MatrixView& x, const MatrixView& c, const float* bias, int64_t* labels, float* sqdist,
            int64_t stream);
void pairwise_sqdist(const MatrixView& x, const MatrixView& c, float* out, int64_t stream);
// prices: (K,) host, in/out; labels: (N,) device.
SolveStats balanced_assign(const MatrixView& x, const MatrixView& c, int64_t cap, std::vector<double>& prices,
                           bool warm, int64_t* labels, int64_t stream);

}  // namespace cbtm::cuda
