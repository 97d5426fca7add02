// Helpers shared by the bindings of cbtm._C and cbtm._cuda: arrays received from Python through
// DLPack (numpy arrays, torch tensors, anything exporting __dlpack__) as a borrowed view that
// releases the producer's tensor exactly once, and the solver statistics as a dict.
#pragma once
#include <pybind11/pybind11.h>

#include "balanced_solver.h"
#include "common.h"
#include "dlpack.h"

namespace cbtm {
namespace py = pybind11;

class Array {
 public:
  // cuda: the array must live on a CUDA device (stream -1 asks the producer not to synchronise:
  // callers launch on the producer's current stream). Otherwise it must live in host memory.
  Array(py::handle obj, const char* name, bool cuda) : name_(name) {
    if (!py::hasattr(obj, "__dlpack__"))
      throw ValueError(std::string(name) + ": expected an array exporting __dlpack__ (numpy or torch)");
    py::object capsule = export_capsule(obj, cuda);
    PyObject* cap = capsule.ptr();
    const DLTensor* t = nullptr;
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
      versioned_ = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
      PyCapsule_SetName(cap, "used_dltensor_versioned");
      t = &versioned_->dl_tensor;
      readonly = (versioned_->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
      legacy_ = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
      PyCapsule_SetName(cap, "used_dltensor");
      t = &legacy_->dl_tensor;
    } else {
      throw ValueError(std::string(name) + ": __dlpack__ did not return a DLPack capsule");
    }
    data = static_cast<char*>(t->data) + t->byte_offset;
    device_type = t->device.device_type;
    device_id = t->device.device_id;
    ndim = t->ndim;
    if (ndim < 1 || ndim > 2) throw ValueError(std::string(name) + ": expected a 1-D or 2-D array");
    int64_t compact = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      shape[i] = t->shape[i];
      strides[i] = t->strides ? t->strides[i] : compact;
      compact *= shape[i];
    }
    if (ndim == 1) {
      shape[1] = 1;
      strides[1] = 1;
    }
    if (t->dtype.lanes != 1) throw ValueError(std::string(name) + ": vector dtypes are not supported");
    const int code = t->dtype.code, bits = t->dtype.bits;
    if (code == kDLFloat && bits == 32) dtype = DType::f32;
    else if (code == kDLFloat && bits == 16) dtype = DType::f16;
    else if (code == kDLBfloat && bits == 16) dtype = DType::bf16;
    else if (code == kDLFloat && bits == 64) dtype = DType::f64;
    else if (code == kDLInt && bits == 64) dtype = DType::i64;
    else if (code == kDLInt && bits == 32) dtype = DType::i32;
    else throw ValueError(std::string(name) + ": unsupported dtype (code " + std::to_string(code) + ", " + std::to_string(bits) + " bits)");
    const bool on_cuda = device_type == kDLCUDA || device_type == kDLCUDAManaged;
    const bool on_host = device_type == kDLCPU || device_type == kDLCUDAHost;
    if (cuda && !on_cuda) throw ValueError(std::string(name) + ": expected a CUDA array");
    if (!cuda && !on_host) throw ValueError(std::string(name) + ": expected a host (CPU) array");
  }
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
  ~Array() {
    if (versioned_ && versioned_->deleter) versioned_->deleter(versioned_);
    if (legacy_ && legacy_->deleter) legacy_->deleter(legacy_);
  }

  int64_t rows() const { return shape[0]; }
  int64_t cols() const { return shape[1]; }
  bool row_contiguous() const { return strides[1] == 1 || shape[1] == 1; }
  bool compact() const { return row_contiguous() && (strides[0] == shape[1] || shape[0] <= 1); }
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
  MatrixView view() const { return {data, dtype, shape[0], shape[1], strides[0], strides[1]}; }

  void expect(DType t) const {
    if (dtype != t)
      throw ValueError(std::string(name_) + ": expected " + dtype_name(t) + ", got " + dtype_name(dtype));
  }
  void expect_output(DType t, int64_t r, int64_t c) const {
    expect(t);
    if (readonly) throw ValueError(std::string(name_) + ": output array is read-only");
    if (rows() != r || cols() != c || !compact())
      throw ValueError(std::string(name_) + ": output must be a compact array of shape (" + std::to_string(r) + ", " + std::to_string(c) + ")");
  }

  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t shape[2] = {0, 0};
  int64_t strides[2] = {0, 0};
  int device_type = 0;
  int device_id = 0;
  bool readonly = false;

 private:
  static py::object export_capsule(py::handle obj, bool cuda) {
    py::object fn = obj.attr("__dlpack__");
    try {
      py::dict kw;
      kw["max_version"] = py::make_tuple(1, 0);
      if (cuda) kw["stream"] = -1;
      return fn(**kw);
    } catch (py::error_already_set& e) {
      if (!e.matches(PyExc_TypeError)) throw;
    }
    py::dict kw;
    if (cuda) kw["stream"] = -1;
    return fn(**kw);
  }

  const char* name_;
  DLManagedTensor* legacy_ = nullptr;
  DLManagedTensorVersioned* versioned_ = nullptr;
};

// Statistics of one balanced solve of n points, as returned to Python.
inline py::dict stats_dict(const SolveStats& st, int64_t n) {
  py::dict out;
  out["effective_passes"] = (double)st.rows / (double)n;
  out["rounds"] = st.rounds;
  out["augments"] = st.augments;
  out["cached"] = st.cached;
  return out;
}

}  // namespace cbtm
