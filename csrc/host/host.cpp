// cnnkern._host: the host side of a planned call (cnnkern/ops/_plan.py) in C++.
//
// A warm eager call is a key lookup, then the replay of the work recorded on its first call:
// allocations, views, Triton launches and CUDA C++ op calls. Both are what every warm call pays
// for on the CPU, and in Python they cost more than the launches themselves: a tensor's part of
// a key (shape, strides, dtype, device, requires_grad, alignment) is about 6,000 instructions
// read attribute by attribute, an allocation through torch.empty_strided's argument parser
// about 8,000. Here the key is one call and a replay is one call.
//
// Built without CUDA (torch's C++ API only), so that it exists wherever cnnkern is built;
// cnnkern/ops/_plan.py runs the same work in Python where this module is missing.

#include <torch/extension.h>

#include <ATen/Context.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <dlfcn.h>

#include <cstring>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

PyObject* g_tensor_type = nullptr;     // torch.Tensor
PyObject* g_parameter_type = nullptr;  // torch.nn.Parameter

void put(std::string& buf, int64_t v) { buf.append(reinterpret_cast<const char*>(&v), sizeof v); }

// The address of a tensor's first element (0 for a tensor without storage or memory, as meta
// tensors), without data_ptr()'s checks, which throw for those.
uintptr_t address(const at::Tensor& t) {
  if (!t.has_storage()) return 0;
  const void* base = t.storage().data();
  if (base == nullptr) return 0;
  return reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(t.storage_offset() * t.itemsize());
}

// What a planned call's key holds of its tensor arguments (each a tensor or None) and of the
// global state the ops read, as bytes: per tensor its class (torch.Tensor or Parameter; any other
// class is not planned), sizes, strides, dtype, device, requires_grad and 16-byte alignment; then
// grad mode, deterministic mode and cuDNN's TF32 flag. TypeError for an argument that is neither.
// (The two calls made on every warm call, this one and a program's run, are plain CPython fast
// calls: pybind11's dispatch would cost them about a thousand instructions each.)
PyObject* tensors_key(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  std::string buf;
  buf.reserve(32 + 8 * 14 * nargs);
  for (Py_ssize_t a = 0; a < nargs; ++a) {
    PyObject* obj = args[a];
    if (obj == Py_None) {
      put(buf, -1);
      continue;
    }
    PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
    if (type != g_tensor_type && type != g_parameter_type) {
      PyErr_SetString(PyExc_TypeError, "not a plain tensor");
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(obj);
    put(buf, type == g_tensor_type ? 0 : 1);
    put(buf, t.dim());
    for (int64_t s : t.sizes()) put(buf, s);
    for (int64_t s : t.strides()) put(buf, s);
    put(buf, static_cast<int64_t>(t.scalar_type()));
    put(buf, static_cast<int64_t>(t.device().type()));
    put(buf, t.device().index());
    put(buf, t.requires_grad());
    put(buf, static_cast<int64_t>(address(t) & 15));
  }
  put(buf, c10::GradMode::is_enabled());
  put(buf, at::globalContext().deterministicAlgorithms());
  put(buf, at::globalContext().allowTF32CuDNN());
  return PyBytes_FromStringAndSize(buf.data(), static_cast<Py_ssize_t>(buf.size()));
  END_HANDLE_TH_ERRORS
}

// A TypeError raised from inside a fast call (HANDLE_TH_ERRORS passes a set Python error on).
[[noreturn]] void type_error(const char* message) {
  PyErr_SetString(PyExc_TypeError, message);
  throw py::error_already_set();
}

// The CUDA driver's launch entry points, looked up in libcuda.so.1 (the library Triton's launcher
// opens, by the same name) the first time a program with a native launch is made; null where
// there is none. The types are the driver API's, spelled without cuda.h (this module builds
// without the CUDA toolkit): CUresult is an int, CUcontext, CUfunction and CUstream pointers.
struct Driver {
  using LaunchKernel = int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*,
                               void**, void**);
  using CtxGetCurrent = int (*)(void**);
  using GetErrorString = int (*)(int, const char**);
  LaunchKernel launch = nullptr;
  CtxGetCurrent ctx_get_current = nullptr;
  GetErrorString error_string = nullptr;

  static const Driver& get() {
    static const Driver driver = [] {
      Driver d;
      void* lib = dlopen("libcuda.so.1", RTLD_LAZY);
      if (lib != nullptr) {
        d.launch = reinterpret_cast<LaunchKernel>(dlsym(lib, "cuLaunchKernel"));
        d.ctx_get_current = reinterpret_cast<CtxGetCurrent>(dlsym(lib, "cuCtxGetCurrent"));
        d.error_string = reinterpret_cast<GetErrorString>(dlsym(lib, "cuGetErrorString"));
        if (d.ctx_get_current == nullptr || d.error_string == nullptr) d.launch = nullptr;
      }
      return d;
    }();
    return driver;
  }
};

// A Triton kernel's launch made here, through the driver, with its parameters packed as Triton's
// C launcher packs them (cnnkern/ops/_plan.py: _native): 8 bytes per parameter, the constants in
// place; each patch writes a pool tensor's address or a call's float into its parameter.
struct Native {
  static constexpr size_t kMaxParams = 64;
  struct Patch {
    int64_t param, place, kind;  // kind 0: a tensor's address; 1: a float as fp32; 2: as fp64
  };
  void* function = nullptr;
  unsigned grid[3] = {0, 0, 0};
  unsigned threads = 0, shared = 0;
  std::vector<uint64_t> params;
  std::vector<Patch> patches;
};

struct Alloc {
  std::vector<int64_t> sizes, strides;
  at::TensorOptions options;
  bool zero;
};

struct View {
  int64_t base;
  std::vector<int64_t> sizes, strides;
  int64_t delta;
};

// One step of the recorded work.
//   kind 0: Triton's C launcher:  fn(g0, g1, g2, stream, function, coop, pdl, metadata,
//           None x5, annotations, signature, (*pointers, *tail))
//   kind 1: Triton's launcher object: fn(g0, g1, g2, stream, function, metadata, None x3,
//           *pointers, *tail)
//   kind 2: a CUDA C++ op: fn(*arguments), each a pool tensor or a constant; it returns n_out
//           tensors, added to the pool.
// Kinds 0 and 1 hold their fixed arguments in `head` (the stream's place left empty) and take
// their tensors as device addresses, which Triton's launchers accept as they are; where their
// parameters were packed for the driver (`launch`), a replay in a current context launches them
// here instead.
struct Step {
  int kind = 0;
  py::object fn;
  std::vector<py::object> head;
  std::vector<int64_t> tensors;  // pool places of the kernel's tensor arguments (kinds 0, 1)
  py::tuple tail;                // the kernel's other arguments (kinds 0, 1)
  std::vector<std::pair<bool, py::object>> spec;  // kind 2: (is a pool place, place or constant)
  int64_t n_out = 0;
  bool native = false;  // kinds 0, 1: launched here (`launch`) where the driver allows
  Native launch;
};

std::vector<int64_t> int_list(py::handle h) {
  std::vector<int64_t> v;
  for (auto x : h) v.push_back(x.cast<int64_t>());
  return v;
}

class Program {
 public:
  // allocs: ((sizes, strides, dtype, device, zero), ...); views: ((base, sizes, strides, delta), ...);
  // steps: (0 | 1, fn, head, tensor places, tail, ...) or (2, op, ((is_place, value), ...), n_out);
  // dirty: the places of the inputs the steps write in place (cnnkern/ops/_plan.py: build; the
  // Python replay keeps a picker after the tail).
  // keep: the places the run returns as tensors besides the inputs (its outputs), or None for all
  Program(py::sequence allocs, py::sequence views, py::sequence steps, py::sequence dirty, py::object keep) {
    dirty_ = int_list(dirty);
    keep_all_ = keep.is_none();
    if (!keep_all_) {
      for (int64_t place : int_list(keep)) {
        if (place >= static_cast<int64_t>(keep_.size())) keep_.resize(place + 1, false);
        keep_[place] = true;
      }
    }
    for (auto a : allocs) {
      auto t = a.cast<py::tuple>();
      Alloc al;
      al.sizes = int_list(t[0]);
      al.strides = int_list(t[1]);
      al.options = at::TensorOptions().dtype(t[2].cast<at::ScalarType>()).device(t[3].cast<at::Device>());
      al.zero = t[4].cast<bool>();
      allocs_.push_back(std::move(al));
    }
    for (auto v : views) {
      auto t = v.cast<py::tuple>();
      views_.push_back(View{t[0].cast<int64_t>(), int_list(t[1]), int_list(t[2]), t[3].cast<int64_t>()});
    }
    for (auto s : steps) {
      auto t = s.cast<py::tuple>();
      Step st;
      st.kind = t[0].cast<int>();
      st.fn = py::reinterpret_borrow<py::object>(t[1]);
      if (st.kind == 2) {
        for (auto e : t[2]) {
          auto pair = e.cast<py::tuple>();
          st.spec.emplace_back(pair[0].cast<bool>(), py::reinterpret_borrow<py::object>(pair[1]));
        }
        st.n_out = t[3].cast<int64_t>();
      } else {
        for (auto h : t[2]) st.head.push_back(py::reinterpret_borrow<py::object>(h));
        st.tensors = int_list(t[3]);
        st.tail = t[4].cast<py::tuple>();
        if (t.size() > 6 && !t[6].is_none() && Driver::get().launch != nullptr) {
          auto d = t[6].cast<py::tuple>();
          Native& n = st.launch;
          n.function = reinterpret_cast<void*>(d[0].cast<uintptr_t>());
          for (int i = 0; i < 3; ++i) n.grid[i] = d[1 + i].cast<unsigned>();
          n.threads = d[4].cast<unsigned>();
          n.shared = d[5].cast<unsigned>();
          std::string bytes = d[6].cast<std::string>();
          n.params.resize(bytes.size() / 8);
          std::memcpy(n.params.data(), bytes.data(), n.params.size() * 8);
          for (auto h : d[7]) {
            auto p = h.cast<py::tuple>();
            n.patches.push_back({p[0].cast<int64_t>(), p[1].cast<int64_t>(), p[2].cast<int64_t>()});
          }
          st.native = n.params.size() <= Native::kMaxParams && bytes.size() % 8 == 0;
          any_native_ = any_native_ || st.native;
        }
      }
      steps_.push_back(std::move(st));
    }
  }

  // The work run with the call's tensors (a tuple of tensors, None or floats: a call's scalars,
  // which the steps pass on as they are) on `stream`: the pool, a list of the call's objects, then
  // every tensor the work made (None in the places not kept), in the order the Python replay
  // makes them.
  py::list run(py::tuple tensors, py::object stream) const {
    const Py_ssize_t n_in = PyTuple_GET_SIZE(tensors.ptr());
    std::vector<at::Tensor> pool;
    pool.reserve(n_in + allocs_.size() + views_.size() + 4);
    for (Py_ssize_t i = 0; i < n_in; ++i) {
      PyObject* obj = PyTuple_GET_ITEM(tensors.ptr(), i);
      // (None and floats first: THPVariable_Check of another object is a full isinstance check)
      if (obj == Py_None || PyFloat_Check(obj)) {
        pool.emplace_back();
        continue;
      }
      if (!THPVariable_Check(obj)) type_error("a program runs with tensors, floats or None");
      pool.push_back(THPVariable_Unpack(obj));
    }
    // a step's argument at `place`: the input object itself where the pool holds no tensor there
    // (a call's scalar), else the tensor's device address (launches) or the tensor (op calls)
    auto input = [&](int64_t place) -> PyObject* {
      return place < n_in && !pool[place].defined() ? PyTuple_GET_ITEM(tensors.ptr(), place) : nullptr;
    };
    for (const Alloc& a : allocs_) {
      at::Tensor t = at::empty_strided(a.sizes, a.strides, a.options);
      if (a.zero) t.zero_();
      pool.push_back(std::move(t));
    }
    for (const View& v : views_) {
      const at::Tensor& b = pool[v.base];
      pool.push_back(b.as_strided(v.sizes, v.strides, b.storage_offset() + v.delta));
    }
    // Native launches: on the stream the call gives, in the current context (where there is
    // none, Triton's launcher makes one current, so it launches), without the GIL, as Triton's
    // launcher launches; a call's floats read before it is released.
    bool native = false;
    void* cu_stream = nullptr;
    std::vector<double> scalars;
    if (any_native_) {
      void* ctx = nullptr;
      native = Driver::get().ctx_get_current(&ctx) == 0 && ctx != nullptr;
      if (native) {
        cu_stream = PyLong_AsVoidPtr(stream.ptr());
        if (cu_stream == nullptr && PyErr_Occurred()) throw py::error_already_set();
        scalars.resize(n_in);
        for (Py_ssize_t i = 0; i < n_in; ++i) {
          PyObject* obj = PyTuple_GET_ITEM(tensors.ptr(), i);
          if (PyFloat_Check(obj)) scalars[i] = PyFloat_AS_DOUBLE(obj);
        }
      }
    }
    PyThreadState* released = nullptr;
    auto hold_gil = [&released] {
      if (released != nullptr) {
        PyEval_RestoreThread(released);
        released = nullptr;
      }
    };
    for (const Step& s : steps_) {
      if (native && s.native) {
        if (released == nullptr) released = PyEval_SaveThread();
        int rc;
        try {
          rc = launch(s.launch, pool, scalars, cu_stream);
        } catch (...) {  // (a tensor without storage: data_ptr() throws)
          hold_gil();
          throw;
        }
        if (rc != 0) {
          hold_gil();
          const char* what = nullptr;
          Driver::get().error_string(rc, &what);
          throw std::runtime_error(std::string("cnnkern: a replayed kernel launch failed: CUDA error ") +
                                   std::to_string(rc) + " (" + (what != nullptr ? what : "unknown") + ")");
        }
        continue;
      }
      hold_gil();
      if (s.kind == 2) {
        call_op(s, pool, input);
        continue;
      }
      const Py_ssize_t n_head = static_cast<Py_ssize_t>(s.head.size());
      const Py_ssize_t n_kernel = static_cast<Py_ssize_t>(s.tensors.size()) + PyTuple_GET_SIZE(s.tail.ptr());
      // kind 0: the head with the stream in place 3, then one tuple of the kernel's arguments;
      // kind 1: the same, the kernel's arguments spread
      const Py_ssize_t n = s.kind == 0 ? n_head + 1 + 1 : n_head + 1 + n_kernel;
      py::tuple args(n);
      Py_ssize_t k = 0;
      for (Py_ssize_t i = 0; i < n_head; ++i) {
        if (i == 3) PyTuple_SET_ITEM(args.ptr(), k++, stream.inc_ref().ptr());
        PyTuple_SET_ITEM(args.ptr(), k++, s.head[i].inc_ref().ptr());
      }
      py::tuple kernel_args;
      PyObject* dst = args.ptr();
      Py_ssize_t at = k;
      if (s.kind == 0) {
        kernel_args = py::tuple(n_kernel);
        dst = kernel_args.ptr();
        at = 0;
      }
      for (int64_t place : s.tensors) {
        PyObject* arg = input(place);
        if (arg != nullptr) {
          Py_INCREF(arg);
        } else {
          arg = PyLong_FromVoidPtr(pool[place].data_ptr());
          if (arg == nullptr) throw py::error_already_set();
        }
        PyTuple_SET_ITEM(dst, at++, arg);
      }
      for (auto h : s.tail) PyTuple_SET_ITEM(dst, at++, py::reinterpret_borrow<py::object>(h).inc_ref().ptr());
      if (s.kind == 0) PyTuple_SET_ITEM(args.ptr(), k, kernel_args.release().ptr());
      PyObject* r = PyObject_Call(s.fn.ptr(), args.ptr(), nullptr);
      if (r == nullptr) throw py::error_already_set();
      Py_DECREF(r);
    }
    hold_gil();
    // inputs written in place: their versions bumped, as PyTorch's in-place ops (and the route) do
    for (int64_t place : dirty_) {
      if (!pool[place].is_inference()) torch::autograd::impl::bump_version(pool[place]);
    }
    py::list out(pool.size());
    for (size_t i = 0; i < pool.size(); ++i) {
      PyObject* obj = i < static_cast<size_t>(n_in) ? PyTuple_GET_ITEM(tensors.ptr(), i) : nullptr;
      if (obj != nullptr) {
        Py_INCREF(obj);
      } else {
        // (a workspace is freed here, without a Python object made for it and dropped)
        const bool kept = keep_all_ || (i < keep_.size() && keep_[i]);
        obj = kept && pool[i].defined() ? THPVariable_Wrap(pool[i]) : (Py_INCREF(Py_None), Py_None);
        if (obj == nullptr) throw py::error_already_set();
      }
      PyList_SET_ITEM(out.ptr(), i, obj);
    }
    return out;
  }

 private:
  // cuLaunchKernel with the step's parameters, its patches applied; the driver's result
  static int launch(const Native& n, const std::vector<at::Tensor>& pool, const std::vector<double>& scalars,
                    void* stream) {
    if (static_cast<uint64_t>(n.grid[0]) * n.grid[1] * n.grid[2] == 0) return 0;  // (as Triton's launcher)
    uint64_t values[Native::kMaxParams];
    void* params[Native::kMaxParams];
    const size_t count = n.params.size();
    std::memcpy(values, n.params.data(), count * 8);
    for (const Native::Patch& p : n.patches) {
      uint64_t v = 0;
      if (p.kind == 0) {
        v = reinterpret_cast<uintptr_t>(pool[p.place].data_ptr());
      } else if (p.kind == 1) {
        const float f = static_cast<float>(scalars[p.place]);
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        v = bits;
      } else {
        std::memcpy(&v, &scalars[p.place], 8);
      }
      values[p.param] = v;
    }
    for (size_t i = 0; i < count; ++i) params[i] = &values[i];
    return Driver::get().launch(n.function, n.grid[0], n.grid[1], n.grid[2], n.threads, 1, 1, n.shared, stream,
                                params, nullptr);
  }

  template <typename Input>
  static void call_op(const Step& s, std::vector<at::Tensor>& pool, const Input& input) {
    py::tuple args(s.spec.size());
    for (size_t i = 0; i < s.spec.size(); ++i) {
      const auto& [is_place, value] = s.spec[i];
      PyObject* obj;
      if (is_place) {
        const int64_t place = value.cast<int64_t>();
        const at::Tensor& t = pool[place];
        PyObject* given = input(place);
        obj = given != nullptr ? (Py_INCREF(given), given) : t.defined() ? THPVariable_Wrap(t) : (Py_INCREF(Py_None), Py_None);
        if (obj == nullptr) throw py::error_already_set();
      } else {
        obj = value.inc_ref().ptr();
      }
      PyTuple_SET_ITEM(args.ptr(), i, obj);
    }
    PyObject* r = PyObject_Call(s.fn.ptr(), args.ptr(), nullptr);
    if (r == nullptr) throw py::error_already_set();
    py::object result = py::reinterpret_steal<py::object>(r);
    auto add = [&pool](PyObject* t) {
      if (!THPVariable_Check(t)) type_error("a replayed CUDA C++ op returned something other than tensors");
      pool.push_back(THPVariable_Unpack(t));
    };
    if (s.n_out == 1) {
      add(result.ptr());
    } else if (s.n_out > 1) {
      for (auto h : result) add(h.ptr());
    }
  }

  std::vector<Alloc> allocs_;
  std::vector<View> views_;
  std::vector<Step> steps_;
  std::vector<int64_t> dirty_;
  std::vector<bool> keep_;
  bool keep_all_ = true;
  bool any_native_ = false;
};

// program.run(tensors, stream), bound to one program (bind()): a fast call on the warm path.
PyObject* run_bound(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 || !PyTuple_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "a program runs with (tensors: tuple, stream)");
    return nullptr;
  }
  const Program& program = py::cast<const Program&>(py::handle(self));
  return program.run(py::reinterpret_borrow<py::tuple>(args[0]), py::reinterpret_borrow<py::object>(args[1]))
      .release()
      .ptr();
  END_HANDLE_TH_ERRORS
}

PyMethodDef g_tensors_key_def = {"tensors_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&tensors_key)),
                                 METH_FASTCALL, "A planned call's key of its tensor arguments and the global state."};
PyMethodDef g_run_def = {"run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&run_bound)), METH_FASTCALL,
                         "Run the program: (tensors, stream) -> the pool."};

}  // namespace

PYBIND11_MODULE(_host, m) {
  m.doc() = "The host side of cnnkern's planned calls: keys and replays (cnnkern/ops/_plan.py).";
  m.def(
      "set_tensor_types",
      [](py::object tensor, py::object parameter) {
        g_tensor_type = tensor.inc_ref().ptr();
        g_parameter_type = parameter.inc_ref().ptr();
      },
      "The two tensor classes tensors_key plans for: torch.Tensor and torch.nn.Parameter.");
  m.add_object("tensors_key", py::reinterpret_steal<py::object>(PyCFunction_NewEx(&g_tensors_key_def, nullptr, nullptr)));
  py::class_<Program>(m, "Program")
      .def(py::init<py::sequence, py::sequence, py::sequence, py::sequence, py::object>(), py::arg("allocs"),
           py::arg("views"), py::arg("steps"), py::arg("dirty") = py::tuple(), py::arg("keep") = py::none());
  m.def(
      "bind",
      [](py::object program) {
        if (!py::isinstance<Program>(program)) type_error("bind takes a Program");
        return py::reinterpret_steal<py::object>(PyCFunction_NewEx(&g_run_def, program.ptr(), nullptr));
      },
      "program.run as a fast call: bind(program)(tensors, stream) -> the pool.");
}
