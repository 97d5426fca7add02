// CUDA k-means M-step: per-cluster sums (float64 atomics) and counts.
#include "centroid_cuda.h"
#include "cuda_common.cuh"

namespace cbtm::cuda {
namespace {

template <class T>
__global__ void centroid_kernel(const T* __restrict__ x, int64_t ldx, int64_t n, int64_t d,
                                const int64_t* __restrict__ labels, int64_t k, double* sums,
                                unsigned long long* counts, int* bad) {
  const int64_t i = blockIdx.x;
  if (i >= n) return;
  const int64_t l = labels[i];
  if (l < 0 || l >= k) {
    if (threadIdx.x == 0) atomicOr(bad, 1);
    return;
  }
  for (int64_t t = threadIdx.x; t < d; t += blockDim.x) atomicAdd(&sums[l * d + t], (double)load(x, i * ldx + t));
  if (threadIdx.x == 0) atomicAdd(&counts[l], 1ULL);
}

}  // namespace

void centroid_update(const MatrixView& x, const int64_t* labels, int64_t k, double* sums, int64_t* counts,
                     int64_t stream) {
  const cudaStream_t s = as_stream(stream);
  if (x.n == 0) return;
  BadFlag bad(s);
  auto* cnt = reinterpret_cast<unsigned long long*>(counts);
  const unsigned blocks = (unsigned)x.n;
  switch (x.dtype) {
    case DType::f32:
      centroid_kernel<<<blocks, 128, 0, s>>>(static_cast<const float*>(x.data), x.ld, x.n, x.d, labels, k, sums, cnt, bad.get());
      break;
    case DType::f16:
      centroid_kernel<<<blocks, 128, 0, s>>>(static_cast<const __half*>(x.data), x.ld, x.n, x.d, labels, k, sums, cnt, bad.get());
      break;
    case DType::bf16:
      centroid_kernel<<<blocks, 128, 0, s>>>(static_cast<const __nv_bfloat16*>(x.data), x.ld, x.n, x.d, labels, k, sums, cnt, bad.get());
      break;
    default:
      throw ValueError("x: expected float32, float16 or bfloat16");
  }
  CBTM_CUDA_CHECK(cudaGetLastError());
  bad.check("centroid_update: a label is outside [0, K)");
}

}  // namespace cbtm::cuda
