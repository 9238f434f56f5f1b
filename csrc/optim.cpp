// Fused multi-tensor optimizer steps (AdamW, SGD), registered for the CPU key of the tritium ops whose schemas
// python/tritium/ops/optim.py defines; python/tritium/optim.py's optimizers call them once per group of tensors
// sharing a dtype.
//
// One call takes lists of tensors (params, grads, state) and updates them all in place. The work is the
// concatenation of the tensors' elements: at::parallel_for splits that flat range [0, total) into contiguous
// pieces, and each piece walks the tensors it overlaps (a prefix-sum table of their sizes locates the first),
// so many small tensors (norm weights, biases) and a few large ones (embeddings) spread over the threads alike,
// with one parallel region per call instead of one per tensor.
//
// Per element, in the accumulation type (float for float32 / bfloat16 / float16, double for float64), with
// torch.optim's formulas and order of operations (torch/optim/adam.py and sgd.py, single-tensor path):
//   AdamW  g = maximize ? -grad : grad;  p *= 1 - lr wd;  m = lerp(m, g, 1 - b1);  v = v b2 + (1 - b2) g g;
//          vmax = max(vmax, v) (amsgrad, then used for v);  p -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//   SGD    g = maximize ? -grad : grad;  g += wd p;  buf = first step ? g : momentum buf + (1 - dampening) g;
//          g = nesterov ? g + momentum buf : buf (momentum != 0);  p -= lr g
// Master weights: params are float32 copies, grads the 16-bit model's gradients (bfloat16 / float16, widened on
// load), and each updated param is also stored rounded to nearest even into params16 (the 16-bit model weights).
// Steps are per-tensor float scalars (torch.optim's state["step"]): each is incremented once, then read.
#include "vec.h"

namespace tritium {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task at least: a few hundred KB of traffic

// Element offsets of the tensors in the flat range: offsets[i] is where tensor i starts, offsets[n] the total.
std::vector<int64_t> flat_offsets(at::TensorList ts) {
  std::vector<int64_t> off(ts.size() + 1, 0);
  for (size_t i = 0; i < ts.size(); ++i) off[i + 1] = off[i] + ts[i].numel();
  return off;
}

// f(tensor index, begin, end) over [begin, end) of each tensor's elements, the flat range split over threads.
template <typename F>
void for_each_piece(const std::vector<int64_t>& off, const F& f) {
  const int64_t total = off.back();
  if (total == 0) return;
  at::parallel_for(0, total, kGrain, [&](int64_t b, int64_t e) {
    // the last tensor starting at or before b (empty tensors share their successor's offset and are skipped)
    int64_t t = std::upper_bound(off.begin(), off.end(), b) - off.begin() - 1;
    while (b < e) {
      const int64_t stop = std::min(e, off[t + 1]);
      if (stop > b) f(t, b - off[t], stop - off[t]);
      b = std::max(b, stop);
      ++t;
    }
  });
}

// Each list must hold n tensors (or be empty where allowed), and every tensor must have its param's shape and
// strides, densely stored, so one flat index addresses the same element of all of them.
void check_list(at::TensorList ts, at::TensorList params, const char* op, const char* name, bool may_be_empty) {
  if (may_be_empty && ts.empty()) return;
  TORCH_CHECK(ts.size() == params.size(), op, ": ", name, " must hold one tensor per param (", params.size(),
              "), got ", ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].device().is_cpu(), op, ": ", name, "[", i, "] must be a CPU tensor, got ", ts[i].device());
    TORCH_CHECK(ts[i].sizes() == params[i].sizes() && ts[i].strides() == params[i].strides(), op, ": ", name, "[",
                i, "] must have the shape and strides of params[", i, "] ", params[i].sizes(), ", got ",
                ts[i].sizes(), " with strides ", ts[i].strides());
    TORCH_CHECK(ts[i].is_non_overlapping_and_dense(), op, ": ", name, "[", i, "] must be densely stored");
  }
}

// The dtypes of one call: params P (and their state), grads G; G == P, or P float32 with 16-bit G (master
// weights, where params16 of dtype G receive the rounded update).
void check_dtypes(at::TensorList params, at::TensorList grads, at::TensorList params16, const char* op) {
  if (params.empty()) return;
  const auto p = params[0].scalar_type(), g = grads[0].scalar_type();
  TORCH_CHECK(p == at::kFloat || p == at::kDouble || p == at::kBFloat16 || p == at::kHalf, op,
              ": params must be float32, float64, bfloat16 or float16, got ", p);
  if (params16.empty()) {
    TORCH_CHECK(g == p, op, ": grads must have the params' dtype ", p, ", got ", g);
  } else {
    TORCH_CHECK(p == at::kFloat && (g == at::kBFloat16 || g == at::kHalf) && params16[0].scalar_type() == g, op,
                ": with params16, params must be float32 and grads and params16 both bfloat16 or both float16, got ",
                p, ", ", g, " and ", params16[0].scalar_type());
  }
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == p && grads[i].scalar_type() == g &&
                    (params16.empty() || params16[i].scalar_type() == g), op,
                ": every tensor of a list must share one dtype (params[0] ", p, ", grads[0] ", g, "), tensor ", i,
                " has ", params[i].scalar_type(), " and ", grads[i].scalar_type());
  }
}

// The lists every step checks first: params densely stored on the CPU, grads and params16 (may be empty) matching
// them, and the dtypes of the three.
void check_params(at::TensorList params, at::TensorList grads, at::TensorList params16, const char* op) {
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(params[i].device().is_cpu() && params[i].is_non_overlapping_and_dense(), op, ": params[", i,
                "] must be a densely stored CPU tensor");
  check_list(grads, params, op, "grads", false);
  check_list(params16, params, op, "params16", true);
  check_dtypes(params, grads, params16, op);
}

// The learning rate: lr_tensor's value when given (a scheduler's tensor lr), else lr.
double read_lr(const std::optional<at::Tensor>& lr_tensor, double lr, const char* op) {
  if (!lr_tensor.has_value()) return lr;
  TORCH_CHECK(lr_tensor->numel() == 1 && lr_tensor->device().is_cpu(), op,
              ": lr_tensor must be a one-element CPU tensor, got ", lr_tensor->sizes(), " on ", lr_tensor->device());
  return lr_tensor->item<double>();
}

template <typename T>
inline T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// ---- AdamW ----
template <typename A>
struct AdamConst {
  A decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, sign;
};

template <typename A>
struct AdamPerTensor {
  A step_size, bc2_sqrt;  // lr / (1 - beta1^t), sqrt(1 - beta2^t)
};

// torch.lerp(m, g, w): m + w (g - m) for w < 0.5, else g - (g - m)(1 - w) (ATen's two-sided formula)
template <typename V, typename A>
inline V lerp(const V& m, const V& g, A w) {
  return w < A(0.5) ? m + V(w) * (g - m) : g - (g - m) * V(A(1) - w);
}

// One piece [b, e) of one tensor: params P, grads G, optional 16-bit copies (G) of the updated params. The vector
// loop takes two accumulation-type vectors at a time (load2 / store2: a 16-bit type converts one full-width
// vector per load or store instead of a half-filled one each).
template <typename P, typename G, bool kAmsgrad, bool kOut16>
void adamw_piece(P* p, const G* g, P* m, P* v, P* vmax, G* p16, int64_t b, int64_t e, const AdamConst<acc_type<P>>& c,
                 const AdamPerTensor<acc_type<P>>& t) {
  using A = acc_type<P>;
  using Vec = Vectorized<A>;
  static_assert(std::is_same_v<acc_type<G>, A>, "grads widen to the params' accumulation type");
  constexpr int64_t K = Vec::size();
  const Vec decay(c.decay), b2(c.beta2), omb2(c.one_minus_beta2), eps(c.eps), sign(c.sign), bc2(t.bc2_sqrt),
      neg_step(-t.step_size);
  // one vector of the update; vm: the stored running max (amsgrad), replaced by the new one
  auto update = [&](Vec gv, Vec& pv, Vec& mv, Vec& vv, Vec& vm) {
    gv = gv * sign;
    pv = pv * decay;
    mv = lerp(mv, gv, c.one_minus_beta1);
    vv = vv * b2 + omb2 * gv * gv;
    Vec vd = vv;
    if constexpr (kAmsgrad) {
      vm = at::vec::maximum(vm, vv);
      vd = vm;
    }
    pv = pv + neg_step * mv / (vd.sqrt() / bc2 + eps);
  };
  int64_t i = b;
  for (; i + 2 * K <= e; i += 2 * K) {
    auto [g0, g1] = load2(g + i);
    auto [p0, p1] = load2(p + i);
    auto [m0, m1] = load2(m + i);
    auto [v0, v1] = load2(v + i);
    Vec x0, x1;
    if constexpr (kAmsgrad) std::tie(x0, x1) = load2(vmax + i);
    update(g0, p0, m0, v0, x0);
    update(g1, p1, m1, v1, x1);
    store2(m + i, m0, m1);
    store2(v + i, v0, v1);
    if constexpr (kAmsgrad) store2(vmax + i, x0, x1);
    store2(p + i, p0, p1);
    if constexpr (kOut16) store2(p16 + i, p0, p1);
  }
  for (; i < e; ++i) {  // the same formulas on scalars
    const A gs = static_cast<A>(g[i]) * c.sign;
    A ps = static_cast<A>(p[i]) * c.decay;
    const A ms0 = static_cast<A>(m[i]);
    const A ms = c.one_minus_beta1 < A(0.5) ? ms0 + c.one_minus_beta1 * (gs - ms0)
                                            : gs - (gs - ms0) * (A(1) - c.one_minus_beta1);
    A vs = static_cast<A>(v[i]) * c.beta2 + c.one_minus_beta2 * gs * gs;
    m[i] = static_cast<P>(ms);
    v[i] = static_cast<P>(vs);
    if constexpr (kAmsgrad) {
      const A old = static_cast<A>(vmax[i]);
      vs = (old != old || old > vs) ? old : vs;  // NaN-propagating max, as torch.maximum
      vmax[i] = static_cast<P>(vs);
    }
    ps = ps + (-t.step_size) * ms / (std::sqrt(vs) / t.bc2_sqrt + c.eps);
    p[i] = static_cast<P>(ps);
    if constexpr (kOut16) p16[i] = static_cast<G>(ps);
  }
}

template <typename P, typename G, bool kAmsgrad, bool kOut16>
void adamw_run(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList params16, const AdamConst<acc_type<P>>& c,
               const std::vector<AdamPerTensor<acc_type<P>>>& per) {
  for_each_piece(flat_offsets(params), [&](int64_t t, int64_t b, int64_t e) {
    adamw_piece<P, G, kAmsgrad, kOut16>(ptr<P>(params[t]), ptr<const G>(grads[t]), ptr<P>(exp_avgs[t]),
                                        ptr<P>(exp_avg_sqs[t]), kAmsgrad ? ptr<P>(max_exp_avg_sqs[t]) : nullptr,
                                        kOut16 ? ptr<G>(params16[t]) : nullptr, b, e, c, per[t]);
  });
}

// Increment each step once and return its new value (steps are float scalars on the CPU: torch.optim's state).
std::vector<double> bump_steps(at::TensorList steps, const char* op) {
  std::vector<double> out(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].device().is_cpu() && steps[i].is_floating_point(), op,
                ": state_steps[", i, "] must be a one-element floating CPU tensor, got ", steps[i].sizes(), " ",
                steps[i].scalar_type(), " on ", steps[i].device());
    at::Tensor s = steps[i];
    s.add_(1);
    out[i] = s.item<double>();
  }
  return out;
}

// Calls launch(P(), G()) for a group's types: P the params' (and state's) type, G the grads'; with 16-bit params
// written from float32 masters (out16), P is float and G the grads' 16-bit type.
template <typename L>
void dispatch_group(at::ScalarType pt, at::ScalarType gt, bool out16, const L& launch) {
  if (out16) {
    if (gt == at::kBFloat16)
      launch(float(), c10::BFloat16());
    else
      launch(float(), c10::Half());
  } else {
    TRITIUM_DISPATCH_FLOATING(pt, "tritium_optimizer_step", [&] { launch(scalar_t(), scalar_t()); });
  }
}

void adamw_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::TensorList params16,
                 const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2,
                 double weight_decay, double eps, bool maximize) {
  const char* op = "adamw_step_";
  check_params(params, grads, params16, op);
  check_list(exp_avgs, params, op, "exp_avgs", false);
  check_list(exp_avg_sqs, params, op, "exp_avg_sqs", false);
  check_list(max_exp_avg_sqs, params, op, "max_exp_avg_sqs", true);
  TORCH_CHECK(state_steps.size() == params.size(), op, ": state_steps must hold one tensor per param (",
              params.size(), "), got ", state_steps.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto p = params[i].scalar_type();
    TORCH_CHECK(exp_avgs[i].scalar_type() == p && exp_avg_sqs[i].scalar_type() == p &&
                    (max_exp_avg_sqs.empty() || max_exp_avg_sqs[i].scalar_type() == p),
                op, ": the state of params[", i, "] must have its dtype ", p);
  }
  const double lr_v = read_lr(lr_tensor, lr, op);
  const std::vector<double> steps = bump_steps(state_steps, op);
  if (params.empty()) return;
  const bool amsgrad = !max_exp_avg_sqs.empty(), out16 = !params16.empty();
  auto launch = [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    using A = acc_type<P>;
    const AdamConst<A> c{static_cast<A>(1 - lr_v * weight_decay), static_cast<A>(beta1), static_cast<A>(1 - beta1),
                         static_cast<A>(beta2), static_cast<A>(1 - beta2), static_cast<A>(eps),
                         static_cast<A>(maximize ? -1 : 1)};
    std::vector<AdamPerTensor<A>> per(params.size());
    for (size_t i = 0; i < params.size(); ++i)  // torch's bias corrections, in double as in its Python
      per[i] = {static_cast<A>(lr_v / (1 - std::pow(beta1, steps[i]))),
                static_cast<A>(std::sqrt(1 - std::pow(beta2, steps[i])))};
    if constexpr (std::is_same_v<P, G>) {
      if (amsgrad)
        adamw_run<P, G, true, false>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, params16, c, per);
      else
        adamw_run<P, G, false, false>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, params16, c, per);
    } else {
      if (amsgrad)
        adamw_run<P, G, true, true>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, params16, c, per);
      else
        adamw_run<P, G, false, true>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, params16, c, per);
    }
  };
  dispatch_group(params[0].scalar_type(), grads[0].scalar_type(), out16, launch);
}

// ---- SGD ----
template <typename A>
struct SgdConst {
  A lr, weight_decay, momentum, one_minus_dampening, sign;
};

template <typename P, typename G, bool kMomentum, bool kFirst, bool kNesterov, bool kOut16>
void sgd_piece(P* p, const G* g, P* buf, G* p16, int64_t b, int64_t e, const SgdConst<acc_type<P>>& c) {
  using A = acc_type<P>;
  using Vec = Vectorized<A>;
  constexpr int64_t K = Vec::size();
  const Vec neg_lr(-c.lr), wd(c.weight_decay), mom(c.momentum), omd(c.one_minus_dampening), sign(c.sign);
  auto update = [&](Vec gv, Vec& pv, Vec& bv) {
    gv = gv * sign + wd * pv;  // wd = 0 adds exact zeros
    if constexpr (kMomentum) {
      bv = kFirst ? gv : bv * mom + omd * gv;
      gv = kNesterov ? gv + mom * bv : bv;
    }
    pv = pv + neg_lr * gv;
  };
  int64_t i = b;
  for (; i + 2 * K <= e; i += 2 * K) {
    auto [g0, g1] = load2(g + i);
    auto [p0, p1] = load2(p + i);
    Vec b0, b1;
    if constexpr (kMomentum && !kFirst) std::tie(b0, b1) = load2(buf + i);
    update(g0, p0, b0);
    update(g1, p1, b1);
    if constexpr (kMomentum) store2(buf + i, b0, b1);
    store2(p + i, p0, p1);
    if constexpr (kOut16) store2(p16 + i, p0, p1);
  }
  for (; i < e; ++i) {
    const A ps = static_cast<A>(p[i]);
    A gs = static_cast<A>(g[i]) * c.sign + c.weight_decay * ps;
    if constexpr (kMomentum) {
      const A bs = kFirst ? gs : static_cast<A>(buf[i]) * c.momentum + c.one_minus_dampening * gs;
      buf[i] = static_cast<P>(bs);
      gs = kNesterov ? gs + c.momentum * bs : bs;
    }
    const A out = ps + (-c.lr) * gs;
    p[i] = static_cast<P>(out);
    if constexpr (kOut16) p16[i] = static_cast<G>(out);
  }
}

void sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList params16,
               const std::optional<at::Tensor>& lr_tensor, double lr, double weight_decay, double momentum,
               double dampening, bool nesterov, bool maximize, bool is_first_step) {
  const char* op = "sgd_step_";
  check_params(params, grads, params16, op);
  check_list(momentum_buffers, params, op, "momentum_buffers", true);
  for (size_t i = 0; i < momentum_buffers.size(); ++i)
    TORCH_CHECK(momentum_buffers[i].scalar_type() == params[i].scalar_type(), op, ": momentum_buffers[", i,
                "] must have the dtype of params[", i, "] ", params[i].scalar_type(), ", got ",
                momentum_buffers[i].scalar_type());
  TORCH_CHECK(momentum == 0 || !momentum_buffers.empty(), op, ": momentum ", momentum,
              " needs momentum_buffers (one per param)");
  const double lr_v = read_lr(lr_tensor, lr, op);
  if (params.empty()) return;
  const bool out16 = !params16.empty(), has_mom = momentum != 0;
  auto launch = [&](auto p_tag, auto g_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    using A = acc_type<P>;
    constexpr bool kOut16 = !std::is_same_v<P, G>;
    const SgdConst<A> c{static_cast<A>(lr_v), static_cast<A>(weight_decay), static_cast<A>(momentum),
                        static_cast<A>(1 - dampening), static_cast<A>(maximize ? -1 : 1)};
    auto run = [&](auto mom_tag, auto first_tag, auto nest_tag) {
      constexpr bool kM = decltype(mom_tag)::value, kF = decltype(first_tag)::value, kN = decltype(nest_tag)::value;
      for_each_piece(flat_offsets(params), [&](int64_t t, int64_t b, int64_t e) {
        sgd_piece<P, G, kM, kF, kN, kOut16>(ptr<P>(params[t]), ptr<const G>(grads[t]),
                                            kM ? ptr<P>(momentum_buffers[t]) : nullptr,
                                            kOut16 ? ptr<G>(params16[t]) : nullptr, b, e, c);
      });
    };
    using T = std::true_type;
    using F = std::false_type;
    if (!has_mom)
      run(F(), F(), F());
    else if (is_first_step)
      nesterov ? run(T(), T(), T()) : run(T(), T(), F());
    else
      nesterov ? run(T(), F(), T()) : run(T(), F(), F());
  };
  dispatch_group(params[0].scalar_type(), grads[0].scalar_type(), out16, launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("adamw_step_", &adamw_step_);
  m.impl("sgd_step_", &sgd_step_);
}

}  // namespace tritium
