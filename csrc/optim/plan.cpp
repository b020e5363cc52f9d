// StepPlan: the host side of fastnn's optimizers for the parameters of one device. Each step it
// reads, in C++, what the optimizer holds now: every parameter of param_groups, its .grad and
// its state entries in optimizer.state. It keeps none of them between steps, so whatever the user
// changed since the last step (state cleared or replaced, a parameter swapped in a group's list,
// p.data resized, amsgrad or momentum switched on) is what the step sees, and every tensor is
// checked before anything is written. The one thing kept is the CUDA launch's device table,
// keyed on its whole content (StepPlan::caches_, see optim.h).
//
// The per-parameter work is a few dictionary lookups and comparisons in C++, so a model of
// thousands of tensors pays no per-parameter Python work.
#include <torch/extension.h>

#include <set>
#include <utility>

#include "common.h"
#include "module.h"
#include "optim/optim.h"

namespace fastnn {
namespace optim {
namespace {

namespace py = pybind11;

using Position = std::pair<int64_t, int64_t>;  // (group index, index in the group's params)

std::string state_name(const Position& pos, const char* key) {
  const std::string param = "param_groups[" + std::to_string(pos.first) + "]['params'][" +
                            std::to_string(pos.second) + "]";
  return key ? "state['" + std::string(key) + "'] of " + param : param;
}

// The tensor the kernels step for the Python tensor `obj`: itself, or for a DTensor (FSDP2's
// sharded parameters, tensor-parallel placements) its local shard. A DTensor is a wrapper without
// storage; its `_local_tensor` holds this rank's data, and every tensor of a slot is a DTensor
// with the same placement (checked for the gradient, whose placement the autograd engine chooses),
// so stepping the local shards steps the DTensors exactly. Other tensor subclasses without
// storage are refused with an error rather than read as memory they do not have.
// `name()` names the tensor in an error (built only when one is raised).
template <typename Name>
at::Tensor local_tensor(PyObject* obj, const Name& name) {
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python)) return t;
  py::object local = py::getattr(py::handle(obj), "_local_tensor", py::none());
  if (local.is_none()) {
    if (t.has_storage()) return t;  // a subclass over its own storage
    FASTNN_CHECK_ARG(false, name(), "a tensor or a DTensor",
                     "a tensor subclass without storage (" + std::string(Py_TYPE(obj)->tp_name) + ")");
  }
  FASTNN_CHECK_ARG(THPVariable_Check(local.ptr()), name(), "a DTensor whose _local_tensor is a tensor",
                   "an object of type " + std::string(Py_TYPE(local.ptr())->tp_name));
  return THPVariable_Unpack(local.ptr());
}

// The gradient of a parameter, as local_tensor; a DTensor gradient must have the parameter's
// placements (a Partial gradient of a Replicate parameter holds partial sums: stepping it would
// be silently wrong, so it is refused).
at::Tensor local_grad(PyObject* param, const at::Tensor& wrapper, const Position& pos) {
  at::Tensor g = wrapper.grad();
  if (!g.defined() || !g.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python)) return g;
  py::object grad = py::reinterpret_steal<py::object>(THPVariable_Wrap(g));
  auto name = [&pos] { return "grad of " + state_name(pos, nullptr); };
  // _spec.placements: slot and dataclass field reads, no Python code per parameter.
  py::object want_spec = py::getattr(py::handle(param), "_spec", py::none());
  py::object got_spec = py::getattr(grad, "_spec", py::none());
  if (!want_spec.is_none() && !got_spec.is_none()) {
    py::object want = want_spec.attr("placements"), got = got_spec.attr("placements");
    FASTNN_CHECK_ARG(want.equal(got), name(),
                     "a DTensor with the parameter's placements " + py::str(want).cast<std::string>(),
                     py::str(got).cast<std::string>() + " (redistribute the gradient before step())");
  }
  return local_tensor(grad.ptr(), name);
}

// The state entry `key` of one parameter's state dict, or an undefined tensor when absent or None.
at::Tensor state_tensor(PyObject* entry, const char* key, const Position& pos) {
  PyObject* v = PyDict_GetItemString(entry, key);  // borrowed; no error for a missing key
  if (v == nullptr || v == Py_None) return at::Tensor();
  FASTNN_CHECK_ARG(THPVariable_Check(v), state_name(pos, key), "a tensor",
                   "an object of type " + std::string(Py_TYPE(v)->tp_name));
  return local_tensor(v, [&] { return state_name(pos, key); });
}

class StepPlan {
 public:
  StepPlan(const std::string& kind, at::Device device)
      : kind_(kind == "adam" ? Kind::Adam : Kind::Sgd), device_(device) {
    FASTNN_CHECK_ARG(kind == "adam" || kind == "sgd", "kind", "'adam' or 'sgd'", kind);
  }

  // One step over the parameters of this device that have a gradient.
  //   param_groups, state: the optimizer's own (read, never kept);
  //   groups: each group's typed settings, in param_groups' order;
  //   first_step: (SGD) positions whose momentum buffer was just made: set it to the gradient.
  // Returns (stepped, on_device, missing). When `missing` (positions of parameters with a gradient
  // whose state the optimizer has not made yet) is not empty nothing was run: the optimizer makes
  // that state and calls again. `on_device` counts this device's parameters, so the optimizer
  // sees when a parameter moved in or out of it.
  std::tuple<int64_t, int64_t, std::vector<Position>> step(
      const py::list& param_groups, const py::dict& state, const std::vector<Group>& groups,
      c10::optional<at::Tensor> grad_scale, c10::optional<at::Tensor> found_inf,
      c10::optional<at::Tensor> clip_coef, const std::vector<Position>& first_step) {
    FASTNN_CHECK_ARG(groups.size() == param_groups.size(), "groups",
                     std::to_string(param_groups.size()) + " group settings (one per group)",
                     std::to_string(groups.size()));
    validate_groups(kind_, groups);
    Scaling scaling{grad_scale.value_or(at::Tensor()), found_inf.value_or(at::Tensor()),
                    clip_coef.value_or(at::Tensor())};
    validate_scaling(scaling, device_);
    for (const Group& g : groups) validate_lr_tensor(g, device_);
    const std::set<Position> first(first_step.begin(), first_step.end());
    std::vector<Slot> active;
    std::vector<Position> missing;
    const int64_t on_device = gather(param_groups, state, groups, first, scaling, active, missing);
    if (!missing.empty() || active.empty()) return {0, on_device, missing};
#ifdef FASTNN_WITH_CUDA
    if (device_.is_cuda()) {
      step_cuda(kind_, active, groups, scaling, &caches_);
      return {(int64_t)active.size(), on_device, missing};
    }
#endif
    step_cpu(kind_, active, groups, scaling);
    return {(int64_t)active.size(), on_device, missing};
  }

  // Global norm of this device's gradients and the clipping factor, as grad_norm_clip_coef.
  std::tuple<at::Tensor, at::Tensor> grad_norm(const py::list& param_groups, double max_norm,
                                               double norm_type, c10::optional<at::Tensor> grad_scale) {
    std::vector<at::Tensor> grads;
    for_each_param(param_groups, [&](const at::Tensor&, const Position& pos, PyObject* obj) {
      at::Tensor g = local_grad(obj, THPVariable_Unpack(obj), pos);
      if (g.defined()) grads.push_back(std::move(g));
    });
    const at::Tensor scale = grad_scale.value_or(at::Tensor());
    if (grads.empty()) {
      auto opts = at::TensorOptions().dtype(at::kFloat).device(device_);
      return {at::zeros({}, opts), at::ones({}, opts)};
    }
#ifdef FASTNN_WITH_CUDA
    if (device_.is_cuda()) return grad_norm_cuda(grads, max_norm, norm_type, scale, &norm_cache_);
#endif
    return grad_norm_cpu(grads, max_norm, norm_type, scale);
  }

  // The gradient norm of each class of this device's parameters: classes[i] is the class of the
  // i-th parameter of this device in param_groups' order. The optimizers sort the parameters by
  // the process groups their norm is reduced over (none for plain and replicated ones). Returns
  // (float32 norms of shape [n_classes], on_device); nothing is computed when `classes` does not
  // have one entry per parameter of this device (the parameters changed: the caller re-plans).
  std::tuple<at::Tensor, int64_t> grad_norms(const py::list& param_groups, const std::vector<int64_t>& classes,
                                             int64_t n_classes, c10::optional<at::Tensor> grad_scale) {
    FASTNN_CHECK_ARG(n_classes >= 1, "n_classes", "at least 1", std::to_string(n_classes));
    for (int64_t c : classes) {
      FASTNN_CHECK_ARG(c >= 0 && c < n_classes, "classes", "entries in [0, n_classes)", std::to_string(c));
    }
    std::vector<std::vector<at::Tensor>> grads(n_classes);
    size_t i = 0;
    const int64_t on_device = for_each_param(param_groups, [&](const at::Tensor&, const Position& pos, PyObject* obj) {
      const size_t k = i++;
      if (k >= classes.size()) return;
      at::Tensor g = local_grad(obj, THPVariable_Unpack(obj), pos);
      if (g.defined()) grads[classes[k]].push_back(std::move(g));
    });
    if (on_device != (int64_t)classes.size()) return {at::Tensor(), on_device};
    const at::Tensor scale = grad_scale.value_or(at::Tensor());
    std::vector<at::Tensor> norms;
    for (int64_t c = 0; c < n_classes; ++c) {
      if (grads[c].empty()) {
        norms.push_back(at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device_)));
        continue;
      }
#ifdef FASTNN_WITH_CUDA
      if (device_.is_cuda()) {
        if (class_caches_.size() < (size_t)n_classes) class_caches_.resize(n_classes);
        norms.push_back(std::get<0>(grad_norm_cuda(grads[c], 1.0, 2.0, scale, &class_caches_[c])));
        continue;
      }
#endif
      norms.push_back(std::get<0>(grad_norm_cpu(grads[c], 1.0, 2.0, scale)));
    }
    return {at::stack(norms), on_device};
  }

 private:
  // Calls fn(param, position, its Python object) for every parameter of this device; returns how many there are.
  template <typename F>
  int64_t for_each_param(const py::list& param_groups, const F& fn) const {
    int64_t on_device = 0;
    for (size_t gi = 0; gi < param_groups.size(); ++gi) {
      PyObject* group = PyList_GET_ITEM(param_groups.ptr(), gi);
      PyObject* params = PyDict_Check(group) ? PyDict_GetItemString(group, "params") : nullptr;
      FASTNN_CHECK_ARG(params != nullptr && PyList_Check(params),
                       "param_groups[" + std::to_string(gi) + "]", "a dict with a 'params' list",
                       "an object without one");
      for (Py_ssize_t pi = 0; pi < PyList_GET_SIZE(params); ++pi) {
        PyObject* obj = PyList_GET_ITEM(params, pi);
        const Position pos{(int64_t)gi, (int64_t)pi};
        FASTNN_CHECK_ARG(THPVariable_Check(obj), state_name(pos, nullptr), "a tensor",
                         "an object of type " + std::string(Py_TYPE(obj)->tp_name));
        const at::Tensor p = local_tensor(obj, [&pos] { return state_name(pos, nullptr); });
        if (p.device() != device_) continue;
        ++on_device;
        fn(p, pos, obj);
      }
    }
    return on_device;
  }

  // The slots of the parameters with a gradient, each checked; or the positions whose state is
  // missing. Reads each parameter's state entries from `state` as they are now.
  int64_t gather(const py::list& param_groups, const py::dict& state, const std::vector<Group>& groups,
                 const std::set<Position>& first, const Scaling& scaling, std::vector<Slot>& active,
                 std::vector<Position>& missing) const {
    const bool unscale = scaling.grad_scale.defined();
    return for_each_param(param_groups, [&](const at::Tensor& p, const Position& pos, PyObject* obj) {
      at::Tensor grad = local_grad(obj, THPVariable_Unpack(obj), pos);
      if (!grad.defined()) return;
      TORCH_CHECK(grad.layout() == at::kStrided, "fastnn.optim: sparse gradients are not supported (",
                  state_name(pos, nullptr), "); consider torch.optim.SparseAdam");
      const Group& g = groups[pos.first];
      const bool momentum = kind_ == Kind::Sgd && g.momentum != 0.0;
      Slot s;
      s.param = p;
      s.grad = std::move(grad);
      s.group = (int)pos.first;
      if (kind_ == Kind::Adam || momentum) {
        // Borrowed; a missing key is not inserted (state is a defaultdict: a parameter without
        // a step gets no entry, as in torch).
        PyObject* entry = PyDict_GetItemWithError(state.ptr(), obj);
        if (entry == nullptr && PyErr_Occurred()) throw py::error_already_set();
        if (entry != nullptr) {
          FASTNN_CHECK_ARG(PyDict_Check(entry), "state of " + state_name(pos, nullptr), "a dict",
                           "an object of type " + std::string(Py_TYPE(entry)->tp_name));
        }
        if (entry == nullptr || !read_state(entry, g, pos, s)) {
          missing.push_back(pos);
          return;
        }
        s.first_step = momentum && first.count(pos) > 0;
      }
      validate_slot(kind_, s, g.amsgrad, momentum, unscale, [&pos](const char*, const char* key) {
        return state_name(pos, key);
      });
      active.push_back(std::move(s));
    });
  }

  // Fills the slot's state tensors from one parameter's state dict; false when one is missing.
  bool read_state(PyObject* entry, const Group& g, const Position& pos, Slot& s) const {
    if (kind_ == Kind::Sgd) {
      s.exp_avg = state_tensor(entry, "momentum_buffer", pos);
      return s.exp_avg.defined();
    }
    s.exp_avg = state_tensor(entry, "exp_avg", pos);
    s.exp_avg_sq = state_tensor(entry, "exp_avg_sq", pos);
    s.step = state_tensor(entry, "step", pos);
    if (g.amsgrad) s.max_exp_avg_sq = state_tensor(entry, "max_exp_avg_sq", pos);
    if (!s.exp_avg.defined() || !s.exp_avg_sq.defined() || !s.step.defined() ||
        (g.amsgrad && !s.max_exp_avg_sq.defined())) {
      return false;
    }
    if (s.step.scalar_type() != at::kFloat || s.step.device() != s.param.device()) {
      // A step counter set by the user (torch keeps it on the CPU): the kernels read it as float32
      // on the parameter's device, so it is moved there, in the state, once.
      FASTNN_CHECK_ARG(s.step.numel() == 1 && at::isFloatingType(s.step.scalar_type()),
                       state_name(pos, "step"), "a floating-point tensor with one element",
                       describe(s.step));
      s.step = s.step.to(s.param.device(), at::kFloat);
      PyObject* moved = THPVariable_Wrap(s.step);
      const int rc = PyDict_SetItemString(entry, "step", moved);
      Py_DECREF(moved);
      if (rc != 0) throw py::error_already_set();
    }
    return true;
  }

  Kind kind_;
  at::Device device_;
#ifdef FASTNN_WITH_CUDA
  std::vector<CudaTableCache> caches_;
  CudaTableCache norm_cache_;
  std::vector<CudaTableCache> class_caches_;
#endif
};

}  // namespace
}  // namespace optim

void bind_optim(pybind11::module_& m) {
  namespace py = pybind11;
  using optim::Group;
  using optim::StepPlan;
  py::class_<Group>(m, "OptimGroup", "The settings of one parameter group, as the step kernels read them.")
      .def(py::init(&optim::make_group),
           py::kw_only(), py::arg("lr"), py::arg("lr_tensor") = py::none(), py::arg("beta1") = 0.9,
           py::arg("beta2") = 0.999, py::arg("eps") = 1e-8, py::arg("weight_decay") = 0.0,
           py::arg("amsgrad") = false, py::arg("maximize") = false, py::arg("decoupled") = false,
           py::arg("momentum") = 0.0, py::arg("dampening") = 0.0, py::arg("nesterov") = false)
      .def_readonly("lr", &Group::lr)
      .def_readonly("weight_decay", &Group::weight_decay)
      .def_readonly("amsgrad", &Group::amsgrad)
      .def_readonly("momentum", &Group::momentum);
  py::class_<StepPlan>(m, "StepPlan", "Host-side step of fastnn's optimizers for one device.")
      .def(py::init<const std::string&, at::Device>(), py::arg("kind"), py::arg("device"))
      .def("step", &StepPlan::step, py::arg("param_groups"), py::arg("state"), py::arg("groups"),
           py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
           py::arg("clip_coef") = py::none(), py::arg("first_step") = std::vector<std::pair<int64_t, int64_t>>())
      .def("grad_norm", &StepPlan::grad_norm, py::arg("param_groups"), py::arg("max_norm"),
           py::arg("norm_type") = 2.0, py::arg("grad_scale") = py::none())
      .def("grad_norms", &StepPlan::grad_norms, py::arg("param_groups"), py::arg("classes"),
           py::arg("n_classes"), py::arg("grad_scale") = py::none());
}

}  // namespace fastnn
