// CUDA kernels. One tiled distance kernel (128 points per block, 32 centres per register tile,
// 32 dimensions per shared-memory chunk) with a fused epilogue per op: no N x K matrix except
// where the op returns one.
#include <cmath>
#include <limits>

#include "cuda_common.cuh"
#include "distance_cuda.h"

namespace cbtm::cuda {
namespace {

constexpr int TP = 128;  // points per block, one per thread
constexpr int KT = 32;   // centres per register tile
constexpr int DT = 32;   // dimensions per shared-memory chunk

// Squared distances of 128 points (rows idx[i] or i) to all K centres, handed to epi.take() tile by
// tile; epi.finish() once per point. c: (K, D) float32 compact, cnorm: (K,).
template <class T, class Epi>
__global__ void __launch_bounds__(TP) dist_kernel(const T* __restrict__ x, int64_t ldx, int64_t n, int64_t d,
                                                  const float* __restrict__ c, const float* __restrict__ cnorm,
                                                  int64_t k, const int64_t* __restrict__ idx, Epi epi) {
  __shared__ float xs[DT][TP + 1];  // x chunk, transposed
  __shared__ float cs[KT][DT + 1];  // centre chunk
  const int t = threadIdx.x;
  const int64_t first = (int64_t)blockIdx.x * TP;
  const int64_t i = first + t;
  const bool valid = i < n;
  typename Epi::State st;
  float xn = 0.f;
  for (int64_t k0 = 0; k0 < k; k0 += KT) {
    float acc[KT];
#pragma unroll
    for (int j = 0; j < KT; ++j) acc[j] = 0.f;
    for (int64_t d0 = 0; d0 < d; d0 += DT) {
      for (int e = t; e < TP * DT; e += TP) {  // coalesced: consecutive threads, consecutive columns
        const int p = e / DT, dd = e % DT;
        const int64_t ip = first + p;
        float v = 0.f;
        if (ip < n && d0 + dd < d) v = load(x, (idx ? idx[ip] : ip) * ldx + d0 + dd);
        xs[dd][p] = v;
      }
      for (int e = t; e < KT * DT; e += TP) {
        const int j = e / DT, dd = e % DT;
        cs[j][dd] = (k0 + j < k && d0 + dd < d) ? c[(k0 + j) * d + d0 + dd] : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int dd = 0; dd < DT; ++dd) {
        const float xv = xs[dd][t];
        if (k0 == 0) xn += xv * xv;
#pragma unroll
        for (int j = 0; j < KT; ++j) acc[j] = fmaf(xv, cs[j][dd], acc[j]);
      }
      __syncthreads();
    }
    if (valid) {
#pragma unroll
      for (int j = 0; j < KT; ++j)
        if (k0 + j < k) epi.take(st, i, k0 + j, xn + cnorm[k0 + j] - 2.f * acc[j]);
    }
  }
  if (valid) epi.finish(st, i, xn);
}

struct AssignEpi {
  const float* bias;
  int64_t* labels;
  float* sqdist;
  int* bad;
  struct State {
    float v = INFINITY, dist = 0.f;
    int64_t j = 0;
  };
  __device__ void take(State& s, int64_t, int64_t j, float dist) const {
    const float v = dist + (bias ? bias[j] : 0.f);
    if (v < s.v) {
      s.v = v;
      s.j = j;
      s.dist = dist;
    }
  }
  __device__ void finish(State& s, int64_t i, float xn) const {
    if (!(xn <= kNormLimit)) atomicOr(bad, 1);  // NaN, Inf or overflow
    labels[i] = s.j;
    sqdist[i] = fmaxf(s.dist, 0.f);
  }
};

struct PairwiseEpi {
  float* out;
  int64_t k;
  int* bad;
  bool clamp;
  struct State {};
  __device__ void take(State&, int64_t i, int64_t j, float dist) const {
    out[i * k + j] = clamp ? fmaxf(dist, 0.f) : dist;
  }
  __device__ void finish(State&, int64_t, float xn) const {
    if (!(xn <= kNormLimit)) atomicOr(bad, 1);  // NaN, Inf or overflow
  }
};

struct PassEpi {  // argmin of d + prices and the margin to the second best
  const double* prices;
  int32_t* labels;
  float* margin;
  int* bad;
  struct State {
    double b1 = INFINITY, b2 = INFINITY;
    int32_t j1 = 0;
  };
  __device__ void take(State& s, int64_t, int64_t j, float dist) const {
    const double v = (double)dist + prices[j];
    if (v < s.b1) {
      s.b2 = s.b1;
      s.b1 = v;
      s.j1 = (int32_t)j;
    } else if (v < s.b2) {
      s.b2 = v;
    }
  }
  __device__ void finish(State& s, int64_t i, float xn) const {
    if (!(xn <= kNormLimit)) atomicOr(bad, 1);  // NaN, Inf or overflow
    labels[i] = s.j1;
    margin[i] = (float)(s.b2 - s.b1);
  }
};

__global__ void centers_kernel(const void* c, DType dt, int64_t k, int64_t d, int64_t ld, float* out,
                               float* norm) {
  const int64_t j = blockIdx.x;
  float s = 0.f;
  for (int64_t t = threadIdx.x; t < d; t += blockDim.x) {
    float v;
    if (dt == DType::f32) v = static_cast<const float*>(c)[j * ld + t];
    else if (dt == DType::f16) v = __half2float(static_cast<const __half*>(c)[j * ld + t]);
    else v = __bfloat162float(static_cast<const __nv_bfloat16*>(c)[j * ld + t]);
    out[j * d + t] = v;
    s += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  __shared__ float part[32];
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float tot = 0.f;
    for (int w = 0; w < (int)(blockDim.x + 31) / 32; ++w) tot += part[w];
    norm[j] = tot;
  }
}

__global__ void widen_kernel(const int32_t* in, int64_t* out, int64_t n) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i];
}

// Centres as compact float32 on the device, with their squared norms.
struct DeviceCenters {
  DeviceCenters(const MatrixView& c, cudaStream_t s) : k(c.n), d(c.d), data((size_t)c.n * c.d, s), norm(c.n, s) {
    centers_kernel<<<(unsigned)k, 128, 0, s>>>(c.data, c.dtype, k, d, c.ld, data.get(), norm.get());
    CBTM_CUDA_CHECK(cudaGetLastError());
  }
  int64_t k, d;
  Buffer<float> data, norm;
};

template <class Epi>
void launch(const MatrixView& x, const DeviceCenters& c, const int64_t* idx, int64_t n, Epi epi, cudaStream_t s) {
  if (n == 0) return;
  const unsigned blocks = (unsigned)((n + TP - 1) / TP);
  switch (x.dtype) {
    case DType::f32:
      dist_kernel<<<blocks, TP, 0, s>>>(static_cast<const float*>(x.data), x.ld, n, x.d, c.data.get(), c.norm.get(),
                                        c.k, idx, epi);
      break;
    case DType::f16:
      dist_kernel<<<blocks, TP, 0, s>>>(static_cast<const __half*>(x.data), x.ld, n, x.d, c.data.get(),
                                        c.norm.get(), c.k, idx, epi);
      break;
    case DType::bf16:
      dist_kernel<<<blocks, TP, 0, s>>>(static_cast<const __nv_bfloat16*>(x.data), x.ld, n, x.d, c.data.get(),
                                        c.norm.get(), c.k, idx, epi);
      break;
    default:
      throw ValueError("x: expected float32, float16 or bfloat16");
  }
  CBTM_CUDA_CHECK(cudaGetLastError());
}

constexpr const char* kNonFinite =
    "x contains NaN or Inf, or a point whose squared norm exceeds 4.25e37 (squared distances would overflow "
    "float32: scale the data down)";

// Distances for the host-side balanced solver: full passes and cached rows run on the GPU.
class CudaOracle final : public DistanceOracle {
 public:
  CudaOracle(const MatrixView& x, const DeviceCenters& c, cudaStream_t s)
      : x_(x), c_(c), s_(s), prices_(c.k, s), labels_(x.n, s), margin_(x.n, s) {}
  void full_pass(const double* prices, int32_t* labels, float* margin) override {
    const int64_t n = x_.n;
    rows_computed += n;
    BadFlag bad(s_);
    CBTM_CUDA_CHECK(cudaMemcpyAsync(prices_.get(), prices, c_.k * sizeof(double), cudaMemcpyHostToDevice, s_));
    launch(x_, c_, nullptr, n, PassEpi{prices_.get(), labels_.get(), margin_.get(), bad.get()}, s_);
    bad.check(kNonFinite);
    CBTM_CUDA_CHECK(cudaMemcpyAsync(labels, labels_.get(), n * sizeof(int32_t), cudaMemcpyDeviceToHost, s_));
    CBTM_CUDA_CHECK(cudaMemcpyAsync(margin, margin_.get(), n * sizeof(float), cudaMemcpyDeviceToHost, s_));
    CBTM_CUDA_CHECK(cudaStreamSynchronize(s_));
  }
  void rows(const int64_t* idx, int64_t n, float* out) override {
    if (n == 0) return;
    rows_computed += n;
    Buffer<int64_t> didx(n, s_);
    Buffer<float> dout((size_t)n * c_.k, s_);
    BadFlag bad(s_);
    CBTM_CUDA_CHECK(cudaMemcpyAsync(didx.get(), idx, n * sizeof(int64_t), cudaMemcpyHostToDevice, s_));
    launch(x_, c_, didx.get(), n, PairwiseEpi{dout.get(), c_.k, bad.get(), false}, s_);
    CBTM_CUDA_CHECK(cudaMemcpyAsync(out, dout.get(), (size_t)n * c_.k * sizeof(float), cudaMemcpyDeviceToHost, s_));
    CBTM_CUDA_CHECK(cudaStreamSynchronize(s_));
  }

 private:
  const MatrixView& x_;
  const DeviceCenters& c_;
  cudaStream_t s_;
  Buffer<double> prices_;
  Buffer<int32_t> labels_;
  Buffer<float> margin_;
};

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string device_status() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable CUDA device: ") + cudaGetErrorString(err);
  }
  std::string out;
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) == cudaSuccess)
      out += (i ? "; " : "") + std::to_string(i) + ": " + prop.name + " (sm_" + std::to_string(prop.major) +
             std::to_string(prop.minor) + ")";
  }
  return n ? out : "no CUDA device";
}

void assign(const MatrixView& x, const MatrixView& c, const float* bias, int64_t* labels, float* sqdist,
            int64_t stream) {
  const cudaStream_t s = as_stream(stream);
  DeviceCenters dc(c, s);
  BadFlag bad(s);
  launch(x, dc, nullptr, x.n, AssignEpi{bias, labels, sqdist, bad.get()}, s);
  bad.check(kNonFinite);
}

void pairwise_sqdist(const MatrixView& x, const MatrixView& c, float* out, int64_t stream) {
  const cudaStream_t s = as_stream(stream);
  DeviceCenters dc(c, s);
  BadFlag bad(s);
  launch(x, dc, nullptr, x.n, PairwiseEpi{out, dc.k, bad.get(), true}, s);
  bad.check(kNonFinite);
}

SolveStats balanced_assign(const MatrixView& x, const MatrixView& c, int64_t cap, std::vector<double>& prices,
                           bool warm, int64_t* labels, int64_t stream) {
  const cudaStream_t s = as_stream(stream);
  DeviceCenters dc(c, s);
  CudaOracle oracle(x, dc, s);
  std::vector<int32_t> host(x.n);
  const SolveStats st = balanced_solve(oracle, x.n, dc.k, cap, prices, host.data(), warm);
  Buffer<int32_t> dev(x.n, s);
  CBTM_CUDA_CHECK(cudaMemcpyAsync(dev.get(), host.data(), x.n * sizeof(int32_t), cudaMemcpyHostToDevice, s));
  widen_kernel<<<(unsigned)((x.n + 255) / 256), 256, 0, s>>>(dev.get(), labels, x.n);
  CBTM_CUDA_CHECK(cudaGetLastError());
  CBTM_CUDA_CHECK(cudaStreamSynchronize(s));
  return st;
}

}  // namespace cbtm::cuda
