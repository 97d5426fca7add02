// cbtm._C: CPU kernels. Arrays arrive through DLPack; outputs are allocated by cbtm/ops.py.
#include <pybind11/pybind11.h>

#include <omp.h>

#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "attention_cpu.h"
#include "binding.h"
#include "centroid_cpu.h"
#include "layers_cpu.h"
#include "mixture_cpu.h"
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

void decode_attention(py::handle q, py::handle k, py::handle v, py::handle slots, py::handle lengths,
                      int64_t kv_heads, int64_t length, double scale, py::handle out) {
  Array qa(q, "q", false), ka(k, "k", false), va(v, "v", false), sa(slots, "slots", false),
      la(lengths, "lengths", false), oa(out, "out", false);
  if (!qa.compact() || !ka.compact() || !va.compact()) throw ValueError("q, k and v must be compact");
  if (qa.dtype != ka.dtype || va.dtype != ka.dtype) throw ValueError("q, k and v must share one dtype");
  const int64_t P = qa.rows(), D = ka.cols();
  if (va.rows() != ka.rows() || va.cols() != D) throw ValueError("k and v must have the same shape");
  if (D < 1 || qa.cols() % D) throw ValueError("q's columns must be a multiple of the head dimension");
  const int64_t hq = qa.cols() / D;
  if (kv_heads < 1 || hq % kv_heads) throw ValueError("the query heads must be a multiple of kv_heads");
  if (length < 1 || ka.rows() % (kv_heads * length)) throw ValueError("k's rows must be slots * kv_heads * length");
  const int64_t n_slots = ka.rows() / (kv_heads * length);
  sa.expect(DType::i64);
  la.expect(DType::i64);
  if (sa.rows() != P || la.rows() != P || !sa.compact() || !la.compact())
    throw ValueError("slots and lengths must be compact int64 arrays of shape (P,)");
  oa.expect_output(DType::f32, P, hq * D);
  const int64_t *sp = sa.ptr<int64_t>(), *lp = la.ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    if (sp[p] < 0 || sp[p] >= n_slots) throw ValueError("slots must lie in [0, " + std::to_string(n_slots) + ")");
    if (lp[p] < 1 || lp[p] > length) throw ValueError("lengths must lie in [1, " + std::to_string(length) + "]");
  }
  py::gil_scoped_release nogil;
  cpu::decode_attention(qa.data, ka.data, va.data, qa.dtype, sp, lp, P, hq, kv_heads, length, D, (float)scale,
                        oa.ptr<float>());
}

void varlen_attention(py::handle qkv, py::handle lengths, int64_t heads, int64_t kv_heads, double scale,
                      py::handle out) {
  Array xa(qkv, "qkv", false), la(lengths, "lengths", false), oa(out, "out", false);
  xa.expect(DType::f32);
  la.expect(DType::i64);
  if (xa.ndim != 2 || !xa.row_contiguous() || (xa.rows() > 1 && xa.strides[0] < xa.cols()))
    throw ValueError("qkv must be 2-D with unit column stride and non-overlapping rows");
  if (heads < 1 || kv_heads < 1 || heads % kv_heads) throw ValueError("heads must be a positive multiple of kv_heads");
  const int64_t n = xa.rows(), cols = heads + 2 * kv_heads;
  if (xa.cols() % cols || xa.cols() == 0) throw ValueError("qkv's columns must be (heads + 2 kv_heads) * head_dim");
  const int64_t D = xa.cols() / cols;
  if (!la.compact() || la.cols() != 1) throw ValueError("lengths must be a compact int64 array of shape (P,)");
  const int64_t P = la.rows();
  const int64_t* lp = la.ptr<int64_t>();
  int64_t total = 0;
  for (int64_t p = 0; p < P; ++p) {
    if (lp[p] < 0) throw ValueError("lengths must be >= 0");
    total += lp[p];
  }
  if (total != n) throw ValueError("lengths must sum to qkv's rows (" + std::to_string(n) + "), not " + std::to_string(total));
  if (!(scale > 0) || !std::isfinite(scale)) throw ValueError("scale must be a positive finite number");
  oa.expect_output(DType::f32, n, heads * D);
  py::gil_scoped_release nogil;
  cpu::varlen_attention(xa.ptr<float>(), xa.strides[0], lp, P, heads, kv_heads, D, (float)scale, oa.ptr<float>());
}

void weighted_logsumexp_rows(py::list tables, py::handle idx, py::handle log_weights, py::handle out) {
  const int64_t k = (int64_t)py::len(tables);
  if (k < 1) throw ValueError("tables: at least one table is needed");
  std::vector<std::unique_ptr<Array>> ta;
  std::vector<const void*> ptrs;
  std::vector<int64_t> ld;
  for (py::handle t : tables) {
    ta.push_back(std::make_unique<Array>(t, "tables", false));
    const Array& a = *ta.back();
    if (a.ndim != 2 || !a.row_contiguous()) throw ValueError("tables must be 2-D with unit column stride");
    if (a.dtype != ta[0]->dtype || a.cols() != ta[0]->cols()) throw ValueError("tables must share one dtype and width");
    ptrs.push_back(a.data);
    ld.push_back(a.strides[0]);
  }
  const DType dtype = ta[0]->dtype;
  if (dtype != DType::f32 && dtype != DType::bf16) throw ValueError("tables must be float32 or bfloat16");
  const int64_t V = ta[0]->cols();
  if (V < 1) throw ValueError("tables have no columns");
  Array ia(idx, "idx", false), wa(log_weights, "log_weights", false), oa(out, "out", false);
  ia.expect(DType::i64);
  wa.expect(DType::f32);
  if (!wa.compact() || wa.ndim != 2 || wa.cols() != k) throw ValueError("log_weights must be a compact (B, k) array");
  const int64_t B = wa.rows();
  if (!ia.compact() || ia.ndim != 2 || ia.rows() != k || ia.cols() != B) throw ValueError("idx must be a compact (k, B) array");
  oa.expect_output(DType::f32, B, V);
  const int64_t* ip = ia.ptr<int64_t>();
  const float* wp = wa.ptr<float>();
  for (int64_t j = 0; j < k; ++j)
    for (int64_t b = 0; b < B; ++b) {
      const float w = wp[b * k + j];
      if (std::isnan(w) || w == std::numeric_limits<float>::infinity())
        throw ValueError("log_weights contain NaN or +inf (use -inf to drop an expert from a row)");
      if (w != -std::numeric_limits<float>::infinity() && (ip[j * B + b] < 0 || ip[j * B + b] >= ta[j]->rows()))
        throw ValueError("idx: row " + std::to_string(ip[j * B + b]) + " is outside table " + std::to_string(j));
    }
  py::gil_scoped_release nogil;
  cpu::weighted_logsumexp_rows(ptrs.data(), ld.data(), dtype, ip, wp, k, B, V, oa.ptr<float>());
}

void grouped_rms_norm(py::handle x, py::handle weight, py::handle expert, double eps, py::handle out) {
  Array xa(x, "x", false), wa(weight, "weight", false), ea(expert, "expert", false), oa(out, "out", false);
  xa.expect(DType::f32);
  wa.expect(DType::f32);
  ea.expect(DType::i64);
  const int64_t n = xa.rows(), d = xa.cols(), k = wa.rows();
  if (!xa.compact() || !wa.compact() || wa.cols() != d) throw ValueError("x (N, D) and weight (K, D) must be compact");
  if (ea.rows() != n || !ea.compact()) throw ValueError("expert must be a compact int64 array of shape (N,)");
  oa.expect_output(DType::f32, n, d);
  const int64_t* e = ea.ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    if (e[i] < 0 || e[i] >= k) throw ValueError("expert ids must lie in [0, " + std::to_string(k) + ")");
  py::gil_scoped_release nogil;
  cpu::grouped_rms_norm(xa.ptr<float>(), wa.ptr<float>(), e, n, d, (float)eps, oa.ptr<float>());
}

void rotary(py::handle x, py::handle cos, py::handle sin, int64_t heads) {
  Array xa(x, "x", false), ca(cos, "cos", false), sa(sin, "sin", false);
  xa.expect(DType::f32);
  ca.expect(DType::f32);
  sa.expect(DType::f32);
  if (xa.readonly) throw ValueError("x: is read-only (rotated in place)");
  const int64_t n = xa.rows(), d = ca.cols();
  if (!xa.row_contiguous()) throw ValueError("x must have unit column stride");
  if (d < 2 || d % 2 || heads < 1 || xa.cols() != heads * d) throw ValueError("x must be (N, heads * D) with D even");
  if (!ca.compact() || !sa.compact() || ca.rows() != n || sa.rows() != n || sa.cols() != d)
    throw ValueError("cos and sin must be compact (N, D) arrays");
  py::gil_scoped_release nogil;
  cpu::rotary(xa.ptr<float>(), xa.strides[0], ca.ptr<float>(), sa.ptr<float>(), n, heads, d);
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
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("slots"),
        py::arg("lengths"), py::arg("kv_heads"), py::arg("length"), py::arg("scale"), py::arg("out"));
  m.def("varlen_attention", &varlen_attention, py::arg("qkv"), py::arg("lengths"), py::arg("heads"),
        py::arg("kv_heads"), py::arg("scale"), py::arg("out"));
  m.def("weighted_logsumexp_rows", &weighted_logsumexp_rows, py::arg("tables"), py::arg("idx"), py::arg("log_weights"),
        py::arg("out"));
  m.def("grouped_rms_norm", &grouped_rms_norm, py::arg("x"), py::arg("weight"), py::arg("expert"), py::arg("eps"),
        py::arg("out"));
  m.def("rotary", &rotary, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("heads"));
  m.def("num_threads", [] { return omp_get_max_threads(); });
  m.def("cpu_isa", &cpu::isa_name, "instruction set of the CPU micro-kernels (distance, attention, mixture): avx512, avx2 or generic");
}
