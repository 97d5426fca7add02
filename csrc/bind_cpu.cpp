// cbtm._C: CPU kernels. Arrays arrive through DLPack; outputs are allocated by cbtm/ops.py.
#include <pybind11/pybind11.h>

#include <omp.h>

#include <memory>

#include "binding.h"
#include "centroid_cpu.h"
#include "distance_cpu.h"

namespace py = pybind11;
using cbtm::Array;
using cbtm::DType;
using cbtm::ValueError;
namespace cpu = cbtm::cpu;

namespace {

struct Inputs {
  Inputs(py::handle x, py::handle c) : xa(x, "x", false), ca(c, "centers", false) {
    if (xa.ndim != 2 || ca.ndim != 2) throw ValueError("x and centers must be 2-D");
    if (xa.cols() != ca.cols()) throw ValueError("x and centers must have the same number of columns");
    px = cpu::load_points(xa.view(), "x");
    pc = cpu::load_points(ca.view(), "centers");
    packed = cpu::pack_centers(pc);
  }
  Array xa, ca;
  cpu::Points px, pc;
  cpu::Centers packed;
};

void assign(py::handle x, py::handle centers, py::object bias, py::handle labels, py::handle sqdist) {
  Inputs in(x, centers);
  Array lab(labels, "labels", false), dist(sqdist, "sqdist", false);
  lab.expect_output(DType::i64, in.px.n, 1);
  dist.expect_output(DType::f32, in.px.n, 1);
  const float* b = nullptr;
  std::unique_ptr<Array> ba;
  if (!bias.is_none()) {
    ba = std::make_unique<Array>(bias, "bias", false);
    ba->expect(DType::f32);
    if (ba->rows() != in.packed.k() || !ba->compact()) throw ValueError("bias must be a compact float32 array of shape (K,)");
    b = ba->ptr<float>();
  }
  py::gil_scoped_release nogil;
  cpu::assign(in.px, in.packed, b, lab.ptr<int64_t>(), dist.ptr<float>());
}

void pairwise_sqdist(py::handle x, py::handle centers, py::handle out) {
  Inputs in(x, centers);
  Array o(out, "out", false);
  o.expect_output(DType::f32, in.px.n, in.packed.k());
  py::gil_scoped_release nogil;
  cpu::pairwise_sqdist(in.px, in.packed, o.ptr<float>());
}

void centroid_update(py::handle x, py::handle labels, py::handle sums, py::handle counts) {
  Array xa(x, "x", false), la(labels, "labels", false), sa(sums, "sums", false), ca(counts, "counts", false);
  const cpu::Points px = cpu::load_points(xa.view(), "x");
  la.expect(DType::i64);
  if (la.rows() != px.n || !la.compact()) throw ValueError("labels must be a compact int64 array of shape (N,)");
  const int64_t k = sa.rows();
  sa.expect_output(DType::f64, k, px.d);
  ca.expect_output(DType::i64, k, 1);
  py::gil_scoped_release nogil;
  cpu::centroid_update(px, la.ptr<int64_t>(), k, sa.ptr<double>(), ca.ptr<int64_t>());
}

py::dict balanced_assign(py::handle x, py::handle centers, int64_t capacity, py::handle prices, bool warm,
                         py::handle labels) {
  Inputs in(x, centers);
  Array pa(prices, "prices", false), lab(labels, "labels", false);
  pa.expect_output(DType::f32, in.packed.k(), 1);
  lab.expect_output(DType::i64, in.px.n, 1);
  std::vector<double> p(pa.ptr<float>(), pa.ptr<float>() + in.packed.k());
  cbtm::SolveStats st;
  {
    py::gil_scoped_release nogil;
    st = cpu::balanced_assign(in.px, in.packed, capacity, p, warm, lab.ptr<int64_t>());
  }
  std::copy(p.begin(), p.end(), pa.ptr<float>());
  return cbtm::stats_dict(st, in.px.n);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cbtm CPU kernels (OpenMP); call them through cbtm.ops";
  py::register_exception<ValueError>(m, "KernelValueError", PyExc_ValueError);
  m.def("assign", &assign, py::arg("x"), py::arg("centers"), py::arg("bias"), py::arg("labels"), py::arg("sqdist"));
  m.def("pairwise_sqdist", &pairwise_sqdist, py::arg("x"), py::arg("centers"), py::arg("out"));
  m.def("centroid_update", &centroid_update, py::arg("x"), py::arg("labels"), py::arg("sums"), py::arg("counts"));
  m.def("balanced_assign", &balanced_assign, py::arg("x"), py::arg("centers"), py::arg("capacity"), py::arg("prices"),
        py::arg("warm"), py::arg("labels"));
  m.def("num_threads", [] { return omp_get_max_threads(); });
  m.def("cpu_isa", &cpu::isa_name, "instruction set of the distance kernels: avx512, avx2 or generic");
}
