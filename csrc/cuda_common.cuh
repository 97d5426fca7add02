// Helpers shared by the CUDA kernels (device code: include from .cu files only).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"

namespace cbtm::cuda {

#define CBTM_CUDA_CHECK(expr)                                                                      \
  do {                                                                                             \
    const cudaError_t err_ = (expr);                                                               \
    if (err_ != cudaSuccess)                                                                       \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err_) + " (" #expr ")"); \
  } while (0)

inline cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Device memory released on scope exit (stream-ordered).
template <class T>
class Buffer {
 public:
  Buffer(size_t n, cudaStream_t s) : n_(n), s_(s) {
    if (n) CBTM_CUDA_CHECK(cudaMallocAsync(&p_, n * sizeof(T), s));
  }
  ~Buffer() {
    if (p_) cudaFreeAsync(p_, s_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
  size_t n_;
  cudaStream_t s_;
};

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

// A device flag raised by kernels on non-finite input.
class BadFlag {
 public:
  explicit BadFlag(cudaStream_t s) : s_(s), buf_(1, s) { CBTM_CUDA_CHECK(cudaMemsetAsync(buf_.get(), 0, sizeof(int), s)); }
  int* get() const { return buf_.get(); }
  void check(const char* msg) const {
    int h = 0;
    CBTM_CUDA_CHECK(cudaMemcpyAsync(&h, buf_.get(), sizeof(int), cudaMemcpyDeviceToHost, s_));
    CBTM_CUDA_CHECK(cudaStreamSynchronize(s_));
    if (h) throw ValueError(msg);
  }

 private:
  cudaStream_t s_;
  Buffer<int> buf_;
};

}  // namespace cbtm::cuda
