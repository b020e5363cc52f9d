// StepPlan: the host side of fastnn's optimizers. It holds the parameters of one device and their
// state once, and at each step reads every parameter's .grad in C++ (no per-parameter Python work),
// skips those without one, and runs the Adam or SGD kernel over the rest in one call. On CUDA it
// keeps the device tables of the last launch and reuses them while the tensors are the same, so a
// model of thousands of small tensors pays no per-step table upload.
#include <torch/extension.h>

#include "common.h"
#include "module.h"
#include "optim/optim.h"

namespace fastnn {
namespace optim {
namespace {

namespace py = pybind11;

class StepPlan {
 public:
  StepPlan(const std::string& kind, std::vector<at::Tensor> params, std::vector<int64_t> groups)
      : kind_(kind == "adam" ? Kind::Adam : Kind::Sgd), slots_(params.size()) {
    FASTNN_CHECK_ARG(kind == "adam" || kind == "sgd", "kind", "'adam' or 'sgd'", kind);
    FASTNN_CHECK_ARG(groups.size() == params.size(), "groups", "one group index per parameter",
                     std::to_string(groups.size()));
    for (size_t i = 0; i < params.size(); ++i) {
      slots_[i].param = params[i];
      slots_[i].group = (int)groups[i];
    }
    has_state_.assign(params.size(), false);
  }

  // Adam: (exp_avg, exp_avg_sq, max_exp_avg_sq or None, step). SGD: (momentum_buffer, first_step).
  void set_adam_state(int64_t i, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                      c10::optional<at::Tensor> max_exp_avg_sq, at::Tensor step) {
    Slot s = at_index(i);
    s.exp_avg = std::move(exp_avg);
    s.exp_avg_sq = std::move(exp_avg_sq);
    s.max_exp_avg_sq = max_exp_avg_sq.value_or(at::Tensor());
    s.step = std::move(step);
    validate_slot(kind_, s, (size_t)i, s.max_exp_avg_sq.defined(), false);
    slots_[i] = std::move(s);
    has_state_[i] = true;
  }

  void set_sgd_state(int64_t i, c10::optional<at::Tensor> momentum_buffer, bool first_step) {
    Slot s = at_index(i);
    s.exp_avg = momentum_buffer.value_or(at::Tensor());
    s.first_step = first_step;
    validate_slot(kind_, s, (size_t)i, false, s.exp_avg.defined());
    slots_[i] = std::move(s);
    has_state_[i] = true;
  }

  // Parameters that have a gradient but no state yet: the optimizer initialises those first.
  std::vector<int64_t> missing_state() const {
    std::vector<int64_t> out;
    for (size_t i = 0; i < slots_.size(); ++i) {
      if (!has_state_[i] && slots_[i].param.grad().defined()) out.push_back((int64_t)i);
    }
    return out;
  }

  // One step. `groups` holds, per group, (lr, lr_tensor or None, beta1, beta2, eps, weight_decay,
  // amsgrad, maximize, decoupled, momentum, dampening, nesterov). Returns how many parameters
  // were stepped (those with a gradient).
  int64_t step(const py::list& groups, c10::optional<at::Tensor> grad_scale,
               c10::optional<at::Tensor> found_inf, c10::optional<at::Tensor> clip_coef) {
    std::vector<Group> gs = parse_groups(groups);
    validate_groups(kind_, gs);
    Scaling scaling{grad_scale.value_or(at::Tensor()), found_inf.value_or(at::Tensor()),
                    clip_coef.value_or(at::Tensor())};
#ifdef FASTNN_WITH_CUDA
    if (same_as_last_launch()) {
      validate_scaling(scaling, slots_[active_[0]].param.device());
      relaunch_cuda(kind_, cache_, gs, scaling, slots_[active_[0]].param.device());
      return (int64_t)active_.size();
    }
#endif
    std::vector<Slot> active = gather(gs);
    if (active.empty()) return 0;
    validate_scaling(scaling, active[0].param.device());
    bool first_steps = false;
    for (const Slot& s : active) first_steps = first_steps || s.first_step;
    run(active, gs, scaling);
#ifdef FASTNN_WITH_CUDA
    remember_launch(active, first_steps);
#endif
    if (first_steps) {
      // SGD buffers initialised from the gradient: the next step updates them, unless this step
      // was skipped for an inf/NaN gradient (the rare case that needs to read found_inf here).
      const bool skipped = scaling.found_inf.defined() && scaling.found_inf.item<double>() != 0.0;
      if (!skipped) {
        for (Slot& s : slots_) s.first_step = false;
      }
    }
    return (int64_t)active.size();
  }

  // Global norm of the gradients present and the clipping factor, as grad_norm_clip_coef.
  std::tuple<at::Tensor, at::Tensor> grad_norm(double max_norm, double norm_type,
                                               c10::optional<at::Tensor> grad_scale) {
    std::vector<at::Tensor> grads;
    for (const Slot& s : slots_) {
      at::Tensor g = s.param.grad();
      if (g.defined()) grads.push_back(g);
    }
    const at::Tensor scale = grad_scale.value_or(at::Tensor());
    if (grads.empty()) {
      auto opts = slots_.empty() ? at::TensorOptions().dtype(at::kFloat)
                                 : slots_[0].param.options().dtype(at::kFloat);
      return {at::zeros({}, opts), at::ones({}, opts)};
    }
#ifdef FASTNN_WITH_CUDA
    if (grads[0].is_cuda()) return grad_norm_cuda(grads, max_norm, norm_type, scale, &norm_cache_);
#endif
    return grad_norm_cpu(grads, max_norm, norm_type, scale);
  }

  int64_t size() const { return (int64_t)slots_.size(); }

 private:
#ifdef FASTNN_WITH_CUDA
  // The fast path of a step: the parameters with a gradient, and every address, are those of the
  // last launch, whose device table is still cached. Costs a few nanoseconds per parameter and no
  // allocation, so thousands of small tensors pay no per-step host work beyond this check.
  bool same_as_last_launch() const {
    if (!cache_.valid || active_.empty()) return false;
    size_t k = 0;
    for (size_t i = 0; i < slots_.size(); ++i) {
      const at::Tensor& g = slots_[i].param.grad();
      if (!g.defined()) continue;
      if (k == active_.size() || active_[k] != i || g.layout() != at::kStrided || !g.is_contiguous() ||
          g.const_data_ptr() != grad_addr_[k] || slots_[i].param.const_data_ptr() != param_addr_[k]) {
        return false;
      }
      ++k;
    }
    return k == active_.size();
  }

  void remember_launch(const std::vector<Slot>& active, bool first_steps) {
    active_.clear();
    grad_addr_.clear();
    param_addr_.clear();
    // A table holding first-step flags (SGD) changes at the next step: don't reuse it.
    if (!cache_.valid || first_steps || !active[0].param.is_cuda()) {
      cache_.valid = false;
      return;
    }
    for (size_t i = 0, k = 0; i < slots_.size() && k < active.size(); ++i) {
      if (slots_[i].param.is_same(active[k].param)) {
        active_.push_back(i);
        grad_addr_.push_back(active[k].grad.const_data_ptr());
        param_addr_.push_back(active[k].param.const_data_ptr());
        ++k;
      }
    }
  }
#endif

  Slot& at_index(int64_t i) {
    FASTNN_CHECK_ARG(i >= 0 && i < (int64_t)slots_.size(), "index",
                     "a parameter index below " + std::to_string(slots_.size()), std::to_string(i));
#ifdef FASTNN_WITH_CUDA
    cache_.valid = false;  // the state changes: the next step rebuilds the table
#endif
    return slots_[i];
  }

  // The slots whose parameter has a gradient. Slots were checked when their state was set;
  // a gradient always matches its parameter (torch checks that on assignment), except that it
  // may be sparse.
  std::vector<Slot> gather(const std::vector<Group>& gs) const {
    std::vector<Slot> active;
    active.reserve(slots_.size());
    for (size_t i = 0; i < slots_.size(); ++i) {
      at::Tensor g = slots_[i].param.grad();
      if (!g.defined()) continue;
      TORCH_CHECK(g.layout() == at::kStrided,
                  "fastnn.optim: sparse gradients are not supported (parameter ", i,
                  "); consider torch.optim.SparseAdam");
      TORCH_CHECK(has_state_[i], "fastnn.optim: parameter ", i,
                  " has a gradient but no optimizer state (call missing_state() first)");
      const Slot& s = slots_[i];
      FASTNN_CHECK_ARG(s.group >= 0 && s.group < (int)gs.size(), "groups",
                       "at least " + std::to_string(s.group + 1) + " groups",
                       std::to_string(gs.size()));
      TORCH_CHECK(kind_ != Kind::Adam || !gs[s.group].amsgrad || s.max_exp_avg_sq.defined(),
                  "fastnn.optim: amsgrad is on for parameter ", i,
                  " but it has no max_exp_avg_sq state");
      TORCH_CHECK(kind_ != Kind::Sgd || gs[s.group].momentum == 0.0 || s.exp_avg.defined(),
                  "fastnn.optim: momentum is on for parameter ", i,
                  " but it has no momentum_buffer state");
      active.push_back(s);
      active.back().grad = std::move(g);
    }
    return active;
  }

  static std::vector<Group> parse_groups(const py::list& groups) {
    std::vector<Group> out;
    out.reserve(groups.size());
    for (const py::handle& h : groups) {
      const py::tuple t = py::reinterpret_borrow<py::tuple>(h);
      FASTNN_CHECK_ARG(t.size() == 12, "groups", "tuples of 12 hyperparameters",
                       std::to_string(t.size()));
      Group g;
      g.lr = t[0].cast<double>();
      if (!t[1].is_none()) g.lr_tensor = t[1].cast<at::Tensor>();
      g.beta1 = t[2].cast<double>();
      g.beta2 = t[3].cast<double>();
      g.eps = t[4].cast<double>();
      g.weight_decay = t[5].cast<double>();
      g.amsgrad = t[6].cast<bool>();
      g.maximize = t[7].cast<bool>();
      g.decoupled = t[8].cast<bool>();
      g.momentum = t[9].cast<double>();
      g.dampening = t[10].cast<double>();
      g.nesterov = t[11].cast<bool>();
      out.push_back(std::move(g));
    }
    return out;
  }

  void run(std::vector<Slot>& active, const std::vector<Group>& gs, const Scaling& scaling) {
#ifdef FASTNN_WITH_CUDA
    if (active[0].param.is_cuda()) {
      step_cuda(kind_, active, gs, scaling, &cache_);
      return;
    }
#endif
    step_cpu(kind_, active, gs, scaling);
  }

  Kind kind_;
  std::vector<Slot> slots_;
  std::vector<bool> has_state_;
#ifdef FASTNN_WITH_CUDA
  CudaTableCache cache_;
  CudaTableCache norm_cache_;
  // What the cached table was built from (same_as_last_launch).
  std::vector<size_t> active_;
  std::vector<const void*> grad_addr_, param_addr_;
#endif
};

}  // namespace
}  // namespace optim

void bind_optim(pybind11::module_& m) {
  using optim::StepPlan;
  pybind11::class_<StepPlan>(m, "StepPlan",
                             "Host-side step plan of fastnn's optimizers (one device).")
      .def(pybind11::init<const std::string&, std::vector<at::Tensor>, std::vector<int64_t>>(),
           pybind11::arg("kind"), pybind11::arg("params"), pybind11::arg("groups"))
      .def("set_adam_state", &StepPlan::set_adam_state)
      .def("set_sgd_state", &StepPlan::set_sgd_state)
      .def("missing_state", &StepPlan::missing_state)
      .def("step", &StepPlan::step, pybind11::arg("groups"), pybind11::arg("grad_scale") = pybind11::none(),
           pybind11::arg("found_inf") = pybind11::none(), pybind11::arg("clip_coef") = pybind11::none())
      .def("grad_norm", &StepPlan::grad_norm, pybind11::arg("max_norm"), pybind11::arg("norm_type") = 2.0,
           pybind11::arg("grad_scale") = pybind11::none())
      .def("__len__", &StepPlan::size);
}

}  // namespace fastnn
