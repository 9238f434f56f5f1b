// KL divergence and distillation CPU kernels, registered for the CPU key of the tritium ops whose schemas
// python/tritium/ops/cross_entropy.py defines.
//
// kl_div (torch's pointwise definition, x = input log-probabilities, t = target):
//   log_target = false:  l = xlogy(t, t) - t x      (xlogy(0, y) = 0 unless y is NaN)
//   log_target = true:   l = exp(t) (t - x)
// kl_div_fwd writes l (reduction 'none') or its sum times `scale` (1 for 'sum', 1/numel for 'mean', 1/batch for
// 'batchmean'), rounded once to the input dtype; the sum is accumulated in blocks of the accumulation type
// and across blocks in double. kl_div_bwd writes both gradients in one pass, with torch's formulas (those of its
// autograd through xlogy, mul and exp, including its NaN at t = 0 for the target's gradient):
//   false: dx = -g t,        dt = g (xlogy(t != 0, t) + t / t - x)
//   true:  dx = -g exp(t),   dt = g exp(t) (t - x + 1)
// g is the upstream gradient: one value (a reduced loss) or one per element.
//
// distill_fwd: per row of student logits s and teacher logits u at inverse temperature k (> 0),
//   a = k s, b = k u,  KL(softmax(b) || softmax(a)) = sum_j q_j (log q_j - log p_j),  q = softmax(b), p = softmax(a)
// in two passes (max; exp sums plus sum_j e^b_j (b_j - a_j)): KL = A / Sb - log Sb + log Sa with both
// shifted by their row max. Classes where the teacher's probability is 0 (a -inf logit) contribute 0, the limit
// of q log q. The row's output is wk KL (kl_weight wk; 1 for the plain per-row KL).
// With a target (int64 (M,), distillation's hard-label term, fused so the logits are read and one gradient row is
// written once for both terms), each row adds the mean cross-entropy's share at temperature 1:
//   loss_r = wk KL_r + wc (lse(s) - s_t),   wc = ce_weight / n_valid
// where n_valid counts the targets != ignore_index (torch's 'mean' divisor), counted here before any row is
// touched, with cross_entropy's check of the targets (for_valid_targets; the Triton launcher instead sums them into
// a tensor the kernel reads, so no host sync). An ignored row adds 0 * wc: with every row ignored wc is inf (or
// NaN) and the loss NaN, torch's 0/0. A non-ignored row costs one more exp per class and pass (softmax(s)).
// With need_grad, the gradient row of loss_r with respect to s,
//   wk k (p - q) + wc (softmax(s) - onehot(t))      (no cross-entropy part on ignored rows)
// is written in the accumulation dtype (the backward rounds once while scaling rows by the upstream gradient, as
// cross_entropy): one (M, C) buffer for both terms, so the backward is one cross_entropy_bwd.
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

constexpr int64_t kBlock = 4096;  // elements per accumulation block of the sum (and per parallel task unit)

template <typename V>
TRITIUM_INLINE V kl_vec(const V& x, const V& t, bool log_target) {
  if (log_target) return fexp(t) * (t - x);
  const V xlogy = V::blendv(t * flog(t), V(0), t == V(0));
  return at::vec::fnmadd(t, x, xlogy);
}

template <typename A>
inline A kl_scalar(A x, A t, bool log_target) {
  if (log_target) return std::exp(t) * (t - x);
  return (t == A(0) ? A(0) : t * std::log(t)) - t * x;
}

void check_pair(const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK(input.sizes() == target.sizes(), "kl_div: target must have input's shape ", input.sizes(), ", got ",
              target.sizes());
  TORCH_CHECK(input.scalar_type() == target.scalar_type(), "kl_div: target must have input's dtype ",
              input.scalar_type(), ", got ", target.scalar_type());
  TORCH_CHECK(input.is_contiguous() && target.is_contiguous(), "kl_div: input and target must be contiguous");
}

at::Tensor kl_div_fwd(const at::Tensor& input, const at::Tensor& target, bool log_target, bool sum, double scale) {
  check_pair(input, target);
  const int64_t n = input.numel();
  at::Tensor out = sum ? tritium::empty({}, input.options()) : empty(input.sizes(), input.options());
  TRITIUM_DISPATCH_FLOATING(input.scalar_type(), "tritium_kl_div_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    using IO = VecIO<scalar_t>;
    using Vec = typename IO::Vec;
    constexpr int64_t K = IO::kSize;
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const scalar_t* tp = target.const_data_ptr<scalar_t>();
    if (!sum) {
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, 8 * kBlock, [&](int64_t begin, int64_t end) {
        int64_t i = begin;
        for (; i + K <= end; i += K) IO::store(op + i, kl_vec(IO::load(xp + i), IO::load(tp + i), log_target));
        for (; i < end; ++i)
          op[i] = static_cast<scalar_t>(kl_scalar<acc_t>(static_cast<acc_t>(xp[i]), static_cast<acc_t>(tp[i]), log_target));
      });
      return;
    }
    // blocks of kBlock elements summed in acc_t, blocks summed in double; the block boundaries do not depend on
    // the number of threads, so the result is the same for any thread count up to the last double additions
    const double total = at::parallel_reduce(
        0, (n + kBlock - 1) / kBlock, 8, 0.0,
        [&](int64_t b0, int64_t b1, double acc) {
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
            Vec s0(0), s1(0);
            int64_t i = begin;
            for (; i + 2 * K <= end; i += 2 * K) {
              s0 = s0 + kl_vec(IO::load(xp + i), IO::load(tp + i), log_target);
              s1 = s1 + kl_vec(IO::load(xp + i + K), IO::load(tp + i + K), log_target);
            }
            for (; i + K <= end; i += K) s0 = s0 + kl_vec(IO::load(xp + i), IO::load(tp + i), log_target);
            acc_t s = hsum(s0 + s1);
            for (; i < end; ++i) s += kl_scalar<acc_t>(static_cast<acc_t>(xp[i]), static_cast<acc_t>(tp[i]), log_target);
            acc += static_cast<double>(s);
          }
          return acc;
        },
        std::plus<double>());
    out.fill_(total * scale);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> kl_div_bwd(const at::Tensor& grad, const at::Tensor& input,
                                              const at::Tensor& target, bool log_target, bool need_input,
                                              bool need_target) {
  check_pair(input, target);
  const int64_t n = input.numel();
  const bool scalar_grad = grad.dim() == 0;
  TORCH_CHECK(scalar_grad || (grad.sizes() == input.sizes() && grad.is_contiguous()),
              "kl_div_bwd: grad must be 0-d or a contiguous tensor of input's shape, got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "kl_div_bwd: grad must have input's dtype");
  at::Tensor dx = need_input ? empty(input.sizes(), input.options()) : at::empty({0}, input.options());
  at::Tensor dt = need_target ? empty(input.sizes(), input.options()) : at::empty({0}, input.options());
  TRITIUM_DISPATCH_FLOATING(input.scalar_type(), "tritium_kl_div_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    using IO = VecIO<scalar_t>;
    using Vec = typename IO::Vec;
    constexpr int64_t K = IO::kSize;
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const scalar_t* tp = target.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const acc_t g0 = static_cast<acc_t>(gp[0]);
    scalar_t* dxp = need_input ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dtp = need_target ? dt.mutable_data_ptr<scalar_t>() : nullptr;
    auto vec_step = [&](int64_t i) {
      const Vec x = IO::load(xp + i), t = IO::load(tp + i), g = scalar_grad ? Vec(g0) : IO::load(gp + i);
      if (log_target) {
        const Vec e = fexp(t), ge = g * e;
        if (dxp) IO::store(dxp + i, ge.neg());
        if (dtp) IO::store(dtp + i, ge * (t - x + Vec(1)));
      } else {
        if (dxp) IO::store(dxp + i, (g * t).neg());
        if (dtp) {
          const Vec lt = Vec::blendv(flog(t), Vec(0), t == Vec(0));
          IO::store(dtp + i, g * (lt + t / t - x));
        }
      }
    };
    auto scalar_step = [&](int64_t i) {
      const acc_t x = static_cast<acc_t>(xp[i]), t = static_cast<acc_t>(tp[i]);
      const acc_t g = scalar_grad ? g0 : static_cast<acc_t>(gp[i]);
      if (log_target) {
        const acc_t ge = g * std::exp(t);
        if (dxp) dxp[i] = static_cast<scalar_t>(-ge);
        if (dtp) dtp[i] = static_cast<scalar_t>(ge * (t - x + acc_t(1)));
      } else {
        if (dxp) dxp[i] = static_cast<scalar_t>(-(g * t));
        if (dtp) dtp[i] = static_cast<scalar_t>(g * ((t == acc_t(0) ? acc_t(0) : std::log(t)) + t / t - x));
      }
    };
    at::parallel_for(0, n, 8 * kBlock, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      for (; i + K <= end; i += K) vec_step(i);
      for (; i < end; ++i) scalar_step(i);
    });
  });
  return {dx, dt};
}

// One row of distill_fwd (the formulas above): the row's KL and, with kCE, its cross-entropy lse(s) - s_t (ce is
// left alone otherwise). Two passes over the row after its maxima: sums of exp (fexp), then, with gr, the
// gradient row wk k (p - q), plus wc (softmax(s) - onehot(t)) with kCE, from the first pass's exp(a - max a) and
// exp(b - max b) kept in the task's scratch rows (L2-resident for a vocabulary-wide row; exp(s - max s) in a
// third one when kPow is 0), so the second computes no exp; it is streamed around the cache when `nt`.
// kPow: the temperature 1 / k when it is 1 or 2, where exp(s - max s) = exp(k (s - max s))^kPow, the student's exp
// at temperature T raised to T (k = 1 / 2 and a = k s - k max s are exact, so this only rounds once more);
// 0: its own exp.
template <bool kCE, int kPow, typename scalar_t>
void distill_row(const scalar_t* sr, const scalar_t* ur, int64_t C, acc_type<scalar_t> k, acc_type<scalar_t> wk,
                 acc_type<scalar_t> wc, int64_t t, acc_type<scalar_t>* gr, acc_type<scalar_t>* scratch, bool nt,
                 acc_type<scalar_t>& kl, acc_type<scalar_t>& ce) {
  using acc_t = acc_type<scalar_t>;
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  acc_t* abuf = scratch;
  acc_t* bbuf = gr ? scratch + C : nullptr;
  acc_t* cbuf = gr ? scratch + 2 * C : nullptr;
  auto cexp = [](const Vec& x, const Vec& ea, const Vec& vms) {
    if constexpr (kPow == 1) return ea;
    if constexpr (kPow == 2) return ea * ea;
    return fexp(x - vms);
  };
  auto cexp_s = [](acc_t x, acc_t ea, acc_t ms) {
    if constexpr (kPow == 1) return ea;
    if constexpr (kPow == 2) return ea * ea;
    return std::exp(x - ms);
  };
  const acc_t ms = row_max_acc(sr, C);
  const acc_t ma = k * ms, mb = k * row_max_acc(ur, C);
  const Vec vk(k), vma(ma), vmb(mb), vms(ms), zero(0);
  // the sums in blocks of kSumBlock elements, each block's own vectors added into the row's: a lane's running sum
  // takes a vocabulary-wide row's 4096 (AVX-512) or 8192 (AVX2) terms in pieces, whose rounding errors grew past
  // the tolerance in the KL's difference of sums (8 lanes, 65537 columns)
  constexpr int64_t kSumBlock = 1024;
  Vec sa(0), sb(0), sc(0), A(0);
  int64_t i = 0;
  while (i + K <= C) {
    Vec ba(0), bb(0), bc(0), bA(0);
    for (const int64_t stop = std::min(C - K, i + kSumBlock); i <= stop; i += K) {
      const Vec x = IO::load(sr + i);
      const Vec a = at::vec::fmsub(x, vk, vma), b = at::vec::fmsub(IO::load(ur + i), vk, vmb);
      const Vec ea = fexp(a), eb = fexp(b);
      ba = ba + ea;
      bb = bb + eb;
      bA = bA + Vec::blendv(eb * (b - a), zero, eb == zero);
      if (gr) {
        ea.store(abuf + i);
        eb.store(bbuf + i);
      }
      if constexpr (kCE) {
        const Vec ec = cexp(x, ea, vms);
        bc = bc + ec;
        if (kPow == 0 && gr) ec.store(cbuf + i);
      }
    }
    sa = sa + ba;
    sb = sb + bb;
    sc = sc + bc;
    A = A + bA;
  }
  acc_t Sa = hsum(sa), Sb = hsum(sb), Sc = hsum(sc), As = hsum(A);
  for (; i < C; ++i) {
    const acc_t x = static_cast<acc_t>(sr[i]);
    const acc_t a = x * k - ma, b = static_cast<acc_t>(ur[i]) * k - mb;
    const acc_t ea = std::exp(a), eb = std::exp(b);
    Sa += ea;
    Sb += eb;
    As += eb == acc_t(0) ? acc_t(0) : eb * (b - a);
    if (gr) {
      abuf[i] = ea;
      bbuf[i] = eb;
    }
    if constexpr (kCE) {
      const acc_t ec = cexp_s(x, ea, ms);
      Sc += ec;
      if (kPow == 0 && gr) cbuf[i] = ec;
    }
  }
  // As is relative to the two shifts: sum q (b' - a') with b' = b - mb, a' = a - ma
  kl = As / Sb - std::log(Sb) + std::log(Sa);
  if constexpr (kCE) ce = ms + std::log(Sc) - static_cast<acc_t>(sr[t]);
  if (!gr) return;
  const acc_t ka = wk * k / Sa, kb = wk * k / Sb, kc = wc / Sc;
  const Vec vka(ka), vkb(kb), vkc(kc);
  for (i = 0; i + K <= C; i += K) {
    const Vec ea = Vec::loadu(abuf + i);
    Vec g = ea * vka - Vec::loadu(bbuf + i) * vkb;
    if constexpr (kCE && kPow == 0) g = at::vec::fmadd(Vec::loadu(cbuf + i), vkc, g);
    if constexpr (kCE && kPow != 0) g = at::vec::fmadd(cexp(ea, ea, vms), vkc, g);
    store_out(gr + i, g, K, nt);
  }
  for (; i < C; ++i) {
    acc_t g = abuf[i] * ka - bbuf[i] * kb;
    if constexpr (kCE) g += (kPow == 0 ? cbuf[i] : cexp_s(abuf[i], abuf[i], ms)) * kc;  // cbuf: kPow 0 only
    gr[i] = g;
  }
  if (nt) stream_fence();  // the streamed row is in memory before the target's entry is read back
  if constexpr (kCE) gr[t] -= wc;
}

std::tuple<at::Tensor, at::Tensor> distill_fwd(const at::Tensor& s, const at::Tensor& u, double inv_temp,
                                               bool need_grad, const c10::optional<at::Tensor>& target,
                                               int64_t ignore_index, double kl_weight, double ce_weight) {
  check_rows(s, "student_logits");
  check_rows(u, "teacher_logits");
  TORCH_CHECK(s.sizes() == u.sizes() && s.scalar_type() == u.scalar_type(),
              "distill: teacher_logits must have the student's shape and dtype");
  TORCH_CHECK(inv_temp > 0, "distill: the inverse temperature must be positive, got ", inv_temp);
  const int64_t M = s.size(0), C = s.size(1);
  // the targets are checked (cross_entropy's check and error) and counted before any row is touched
  int64_t n_valid = 0;
  if (target.has_value()) for_valid_targets(*target, M, C, ignore_index, [&](int64_t) { ++n_valid; });
  const auto acc_dtype = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = tritium::empty({M}, s.options().dtype(acc_dtype));
  auto grad = need_grad ? empty({M, C}, s.options().dtype(acc_dtype)) : at::empty({0}, s.options().dtype(acc_dtype));
  TRITIUM_DISPATCH_FLOATING(s.scalar_type(), "tritium_distill_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const int64_t ss = s.stride(0), su = u.stride(0);
    const int64_t* tp = target.has_value() ? target->const_data_ptr<int64_t>() : nullptr;
    const int64_t st = target.has_value() ? target->stride(0) : 0;
    const acc_t k = static_cast<acc_t>(inv_temp), wk = static_cast<acc_t>(kl_weight);
    // the mean over the non-ignored rows: inf (NaN for ce_weight 0) when every row is ignored, so the loss is NaN
    // as torch's 0/0, while the gradient, whose cross-entropy part lives on non-ignored rows only, stays finite
    const acc_t wc = tp ? static_cast<acc_t>(ce_weight / static_cast<double>(n_valid)) : acc_t(0);
    acc_t* lp = loss.mutable_data_ptr<acc_t>();
    acc_t* gp = need_grad ? grad.mutable_data_ptr<acc_t>() : nullptr;
    // the gradient rows are streamed when the logits and they outgrow the cache
    const bool nt = need_grad && stream_outputs(M * C * (2 * s.element_size() + grad.element_size()));
    const int pw = inv_temp == 1.0 ? 1 : inv_temp == 0.5 ? 2 : 0;  // kPow of distill_row
    at::parallel_for(0, M, row_grain(2 * C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(need_grad ? 3 * C : 0);  // the task's exp rows (distill_row)
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* sr = sp + r * ss;
        const scalar_t* ur = up + r * su;
        acc_t* gr = gp ? gp + r * C : nullptr;
        const int64_t t = tp ? tp[r * st] : ignore_index;
        acc_t kl, ce = 0;
        if (tp && t != ignore_index) {
          auto row = pw == 1 ? &distill_row<true, 1, scalar_t>
                     : pw == 2 ? &distill_row<true, 2, scalar_t> : &distill_row<true, 0, scalar_t>;
          row(sr, ur, C, k, wk, wc, t, gr, scratch.data(), nt, kl, ce);
          lp[r] = wk * kl + wc * ce;
        } else {
          distill_row<false, 0, scalar_t>(sr, ur, C, k, wk, wc, t, gr, scratch.data(), nt, kl, ce);
          lp[r] = tp ? wk * kl + acc_t(0) * wc : wk * kl;  // an ignored row: 0 / n_valid (NaN for 0 rows)
        }
      }
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("kl_div_fwd", &kl_div_fwd);
  m.impl("kl_div_bwd", &kl_div_bwd);
  m.impl("distill_fwd", &distill_fwd);
}

}  // namespace tritium
