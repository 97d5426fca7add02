// cbtm._cuda: CUDA kernels. Arrays arrive through DLPack; outputs are allocated by cbtm/ops.py;
// kernels run on the stream passed in (the producer's current stream). Importable without a GPU.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "binding.h"
#include "centroid_cuda.h"
#include "distance_cuda.h"

namespace py = pybind11;
using cbtm::Array;
using cbtm::DType;
using cbtm::ValueError;

namespace {

// Makes the array's device current for the duration of a call.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&prev_);
    if (cudaSetDevice(device) != cudaSuccess) throw std::runtime_error("cannot select CUDA device " + std::to_string(device));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};

// Device rows with unit column stride (row stride of a single row: its length).
cbtm::MatrixView rows_of(const Array& a, const char* name) {
  if (a.ndim != 2) throw ValueError(std::string(name) + " must be 2-D");
  if (a.dtype != DType::f32 && a.dtype != DType::f16 && a.dtype != DType::bf16)
    throw ValueError(std::string(name) + ": expected float32, float16 or bfloat16");
  if (!a.row_contiguous()) throw ValueError(std::string(name) + ": rows must be contiguous (call .contiguous())");
  cbtm::MatrixView v = a.view();
  if (a.rows() <= 1) v.ld = a.cols();
  v.cs = 1;
  return v;
}

struct Inputs {
  Inputs(py::handle x, py::handle c) : xa(x, "x", true), ca(c, "centers", true), guard(xa.device_id) {
    if (ca.device_id != xa.device_id) throw ValueError("x and centers are on different CUDA devices");
    xr = rows_of(xa, "x");
    cr = rows_of(ca, "centers");
    if (xr.d != cr.d) throw ValueError("x and centers must have the same number of columns");
  }
  Array xa, ca;
  DeviceGuard guard;
  cbtm::MatrixView xr{}, cr{};
};

void assign(py::handle x, py::handle centers, py::object bias, py::handle labels, py::handle sqdist, int64_t stream) {
  Inputs in(x, centers);
  Array lab(labels, "labels", true), dist(sqdist, "sqdist", true);
  lab.expect_output(DType::i64, in.xr.n, 1);
  dist.expect_output(DType::f32, in.xr.n, 1);
  std::unique_ptr<Array> ba;
  const float* b = nullptr;
  if (!bias.is_none()) {
    ba = std::make_unique<Array>(bias, "bias", true);
    ba->expect(DType::f32);
    if (ba->rows() != in.cr.n || !ba->compact()) throw ValueError("bias must be a compact float32 array of shape (K,)");
    b = ba->ptr<float>();
  }
  py::gil_scoped_release nogil;
  cbtm::cuda::assign(in.xr, in.cr, b, lab.ptr<int64_t>(), dist.ptr<float>(), stream);
}

void pairwise_sqdist(py::handle x, py::handle centers, py::handle out, int64_t stream) {
  Inputs in(x, centers);
  Array o(out, "out", true);
  o.expect_output(DType::f32, in.xr.n, in.cr.n);
  py::gil_scoped_release nogil;
  cbtm::cuda::pairwise_sqdist(in.xr, in.cr, o.ptr<float>(), stream);
}

void centroid_update(py::handle x, py::handle labels, py::handle sums, py::handle counts, int64_t stream) {
  Array xa(x, "x", true), la(labels, "labels", true), sa(sums, "sums", true), ca(counts, "counts", true);
  DeviceGuard guard(xa.device_id);
  const auto xr = rows_of(xa, "x");
  la.expect(DType::i64);
  if (la.rows() != xr.n || !la.compact()) throw ValueError("labels must be a compact int64 array of shape (N,)");
  const int64_t k = sa.rows();
  sa.expect_output(DType::f64, k, xr.d);
  ca.expect_output(DType::i64, k, 1);
  py::gil_scoped_release nogil;
  cbtm::cuda::centroid_update(xr, la.ptr<int64_t>(), k, sa.ptr<double>(), ca.ptr<int64_t>(), stream);
}

py::dict balanced_assign(py::handle x, py::handle centers, int64_t capacity, py::handle prices, bool warm,
                         py::handle labels, int64_t stream) {
  Inputs in(x, centers);
  Array lab(labels, "labels", true), pa(prices, "prices", true);
  lab.expect_output(DType::i64, in.xr.n, 1);
  pa.expect_output(DType::f32, in.cr.n, 1);
  std::vector<float> hp(in.cr.n);
  cudaMemcpy(hp.data(), pa.data, in.cr.n * sizeof(float), cudaMemcpyDeviceToHost);
  std::vector<double> p(hp.begin(), hp.end());
  cbtm::SolveStats st;
  {
    py::gil_scoped_release nogil;
    st = cbtm::cuda::balanced_assign(in.xr, in.cr, capacity, p, warm, lab.ptr<int64_t>(), stream);
  }
  std::copy(p.begin(), p.end(), hp.begin());
  cudaMemcpy(pa.data, hp.data(), in.cr.n * sizeof(float), cudaMemcpyHostToDevice);
  return cbtm::stats_dict(st, in.xr.n);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "cbtm CUDA kernels; call them through cbtm.ops";
  py::register_exception<ValueError>(m, "KernelValueError", PyExc_ValueError);
  m.def("device_count", &cbtm::cuda::device_count);
  m.def("device_status", &cbtm::cuda::device_status);
  m.def("assign", &assign, py::arg("x"), py::arg("centers"), py::arg("bias"), py::arg("labels"), py::arg("sqdist"),
        py::arg("stream"));
  m.def("pairwise_sqdist", &pairwise_sqdist, py::arg("x"), py::arg("centers"), py::arg("out"), py::arg("stream"));
  m.def("centroid_update", &centroid_update, py::arg("x"), py::arg("labels"), py::arg("sums"), py::arg("counts"),
        py::arg("stream"));
  m.def("balanced_assign", &balanced_assign, py::arg("x"), py::arg("centers"), py::arg("capacity"), py::arg("prices"),
        py::arg("warm"), py::arg("labels"), py::arg("stream"));
}
