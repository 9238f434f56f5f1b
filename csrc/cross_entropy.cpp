// Cross-entropy CPU kernels for class-index targets, registered for the CPU key of the tritium ops whose schemas
// python/tritium/ops/cross_entropy.py defines.
//
// Forward, per row of C logits x with target t (weights w, smoothing eps; w = 1 without weights, W = sum_c w_c):
//   lse = log(sum_c exp(x_c)),  loss = (1 - eps) w_t (lse - x_t) + eps/C (W lse - sum_c w_c x_c)
//   grad_j = p_j ((1 - eps) w_t + eps W / C) - eps/C w_j - [j == t] (1 - eps) w_t,   p_j = exp(x_j - lse)
// (torch's cross_entropy with label_smoothing). With `mean`, losses and gradient rows are divided by the total
// weight (sum of w_t over non-ignored rows, torch's 'mean' divisor), so the per-row losses sum to the mean loss
// (0/0 = NaN when every row is ignored, as torch). The gradient rows are written in the forward in the
// accumulation dtype (no softmax is kept; the backward rounds once to the input dtype while scaling rows by the
// upstream gradient). Ignored rows give loss 0 and gradient 0.
// Three passes per row (max; sum of exp kept in a buffer; gradient): one read of the row from memory, one write.
//
// cross_entropy_z_fwd adds two options (Liger-Kernel's LigerCrossEntropyLoss lse_square_scale and softcap):
// with softcap c > 0 every logit is read as y = c tanh(x / c) (never stored: tanh is monotonic, so the row max is
// c tanh(max x / c), and pass 3 recomputes tanh); with z_loss z > 0 each non-ignored row adds z lse^2 (lse of the
// capped logits), not weighted by the class weights and, with `mean`, divided by the number of non-ignored rows.
// Gradient: d/dy of the above (the cross-entropy's plus 2 z lse p_j), times dy/dx = 1 - (y / c)^2 (computed as
// 4 e / (1 + e)^2, e = exp(-2 |x| / c), which does not cancel near saturation).
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_z_fwd(const at::Tensor& x, const at::Tensor& target,
                                                                   const c10::optional<at::Tensor>& weight,
                                                                   int64_t ignore_index, double label_smoothing,
                                                                   bool mean, bool need_grad, double z_loss,
                                                                   double softcap) {
  TORCH_CHECK(z_loss >= 0, "z_loss must be >= 0, got ", z_loss);
  TORCH_CHECK(softcap >= 0, "softcap must be > 0 (or 0: off), got ", softcap);
  const bool ext = z_loss != 0 || softcap != 0;  // else the plain cross-entropy below, unchanged
  check_rows(x, "input");
  const int64_t M = x.size(0), C = x.size(1);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = tritium::empty({M}, x.options().dtype(acc_dtype));
  auto grad = need_grad ? empty({M, C}, x.options().dtype(acc_dtype)) : at::empty({0}, x.options().dtype(acc_dtype));
  auto total = tritium::empty({}, x.options().dtype(acc_dtype));
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_cross_entropy_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    using IO = VecIO<scalar_t>;
    using Vec = typename IO::Vec;
    constexpr int64_t K = IO::kSize;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.has_value() ? weight->const_data_ptr<scalar_t>() : nullptr;
    // targets are validated (as torch's nll_loss does) and the total weight summed before any row is touched
    double tw = 0, wsum = 0, nvalid = 0;
    for_valid_targets(target, M, C, ignore_index, [&](int64_t t) {
      tw += wp ? static_cast<double>(static_cast<acc_t>(wp[t])) : 1.0;
      nvalid += 1;
    });
    const int64_t* tp = target.const_data_ptr<int64_t>();
    const int64_t st = target.stride(0), sx = x.stride(0);
    if (wp) {
      for (int64_t c = 0; c < C; ++c) wsum += static_cast<acc_t>(wp[c]);
    } else {
      wsum = static_cast<double>(C);
    }
    total.fill_(tw);
    const acc_t eps = static_cast<acc_t>(label_smoothing), W = static_cast<acc_t>(wsum);
    const acc_t b = eps / static_cast<acc_t>(C);
    const acc_t inv = mean ? static_cast<acc_t>(1.0 / tw) : acc_t(1);  // inf when every row is ignored
    acc_t* lp = loss.mutable_data_ptr<acc_t>();
    acc_t* gp = need_grad ? grad.mutable_data_ptr<acc_t>() : nullptr;
    const acc_t zl = static_cast<acc_t>(z_loss), cap = static_cast<acc_t>(softcap);
    const acc_t icap = cap != 0 ? acc_t(1) / cap : acc_t(0);
    const acc_t invz = mean ? static_cast<acc_t>(1.0 / nvalid) : acc_t(1);  // z-loss's 'mean': per non-ignored row
    // one non-ignored row with the options (see the top of the file): y = cap(x), the same three passes on y
    const Vec vcap(cap), vicap(icap);
    // the vector passes' tanh is vec.h's inlined ftanh (4e-7 from float64; Sleef's, called out of line, was two
    // thirds of a capped row's time), the scalar max and target std::tanh
    auto capv = [&](Vec v) { return cap != 0 ? vcap * ftanh(v * vicap) : v; };
    auto caps = [&](acc_t v) { return cap != 0 ? cap * std::tanh(v * icap) : v; };
    // dy/dx = 1 - tanh^2(x / c) = 4 e / (1 + e)^2 with e = exp(-2 |x| / c): no cancellation where tanh is near +-1
    auto sech2v = [&](Vec v) {
      const Vec e = (v * vicap).abs() * Vec(-2), ee = fexp(e), d = Vec(1) + ee;
      return Vec(4) * ee / (d * d);
    };
    auto sech2s = [&](acc_t v) {
      const acc_t e = std::exp(-2 * std::abs(v * icap)), d = 1 + e;
      return 4 * e / (d * d);
    };
    auto ext_row = [&](const scalar_t* xr, int64_t t, acc_t* gr, acc_t* lr) {
      acc_t* buf = gr;
      const acc_t m = caps(row_max_acc(xr, C));
      const Vec vm(m);
      Vec s0(0), q0(0);
      int64_t i = 0;
      for (; i + K <= C; i += K) {
        Vec v = capv(IO::load(xr + i)), e = fexp(v - vm);
        s0 = s0 + e;
        if (buf) e.store(buf + i);
        if (eps != 0) q0 = wp ? at::vec::fmadd(v, IO::load(wp + i), q0) : q0 + v;
      }
      acc_t s = hsum(s0), q = hsum(q0);
      for (; i < C; ++i) {
        const acc_t v = caps(static_cast<acc_t>(xr[i])), e = std::exp(v - m);
        s += e;
        if (buf) buf[i] = e;
        if (eps != 0) q += wp ? v * static_cast<acc_t>(wp[i]) : v;
      }
      const acc_t lse = m + std::log(s);
      const acc_t wt = wp ? static_cast<acc_t>(wp[t]) : acc_t(1);
      const acc_t yt = caps(static_cast<acc_t>(xr[t]));
      acc_t l = (1 - eps) * wt * (lse - yt);
      if (eps != 0) l += b * (W * lse - q);
      *lr = l * inv + zl * lse * lse * invz;
      if (!gr) return;
      // dL/dy_j = p_j (a inv + 2 z lse invz) - b w_j inv - [j == t] (1 - eps) w_t inv, times 1 - tanh(x_j / c)^2
      const acc_t a = (1 - eps) * wt + b * W, ap = a * inv + 2 * zl * lse * invz, pa = ap / s, bi = b * inv;
      const Vec vpa(pa), vb(bi);
      for (i = 0; i + K <= C; i += K) {
        Vec g = Vec::loadu(buf + i) * vpa;
        if (eps != 0) g = wp ? at::vec::fnmadd(vb, IO::load(wp + i), g) : g - vb;
        if (cap != 0) g = g * sech2v(IO::load(xr + i));
        g.store(gr + i);
      }
      for (; i < C; ++i) {
        acc_t g = buf[i] * pa;
        if (eps != 0) g -= bi * (wp ? static_cast<acc_t>(wp[i]) : acc_t(1));
        if (cap != 0) g *= sech2s(static_cast<acc_t>(xr[i]));
        gr[i] = g;
      }
      acc_t gt = std::exp(yt - lse) * ap - (1 - eps) * wt * inv;
      if (eps != 0) gt -= bi * wt;
      if (cap != 0) gt *= sech2s(static_cast<acc_t>(xr[t]));
      gr[t] = gt;
    };
    // the gradient rows streamed around the cache when they outgrow it: exp(x - m) then goes to a row buffer that
    // stays in L2 and each gradient line is written once; otherwise the row of grad is that buffer
    const bool nt = gp && !ext && stream_outputs(M * C * (x.element_size() + sizeof(acc_t)));
    at::parallel_for(0, M, row_grain(C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> tmp(nt ? C : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t t = tp[r * st];
        acc_t* gr = gp ? gp + r * C : nullptr;
        if (t == ignore_index) {
          lp[r] = mean ? acc_t(0) * inv : acc_t(0);  // NaN in the mean over zero rows
          if (gr) std::fill(gr, gr + C, acc_t(0));
          continue;
        }
        const scalar_t* xr = xp + r * sx;
        acc_t* buf = nt ? tmp.data() : gr;
        if (ext) {
          ext_row(xr, t, gr, lp + r);
          continue;
        }
        const acc_t m = row_max_acc(xr, C);
        const Vec vm(m);
        // pass 2: sum exp(x - m) (kept in buf for the gradient) and, with smoothing, sum w_c x_c
        const auto [s, q] = [&] {
          Vec s0(0), s1(0), q0(0);
          int64_t j = 0;
          for (; j + 2 * K <= C; j += 2 * K) {
            Vec v0 = IO::load(xr + j), v1 = IO::load(xr + j + K);
            Vec e0 = fexp(v0 - vm), e1 = fexp(v1 - vm);
            s0 = s0 + e0;
            s1 = s1 + e1;
            if (buf) {
              e0.store(buf + j);
              e1.store(buf + j + K);
            }
            if (eps != 0) q0 = wp ? at::vec::fmadd(v0, IO::load(wp + j), at::vec::fmadd(v1, IO::load(wp + j + K), q0))
                                  : q0 + v0 + v1;
          }
          for (; j + K <= C; j += K) {
            Vec v = IO::load(xr + j), e = fexp(v - vm);
            s0 = s0 + e;
            if (buf) e.store(buf + j);
            if (eps != 0) q0 = wp ? at::vec::fmadd(v, IO::load(wp + j), q0) : q0 + v;
          }
          acc_t sum = hsum(s0 + s1), qs = hsum(q0);
          for (; j < C; ++j) {
            const acc_t v = static_cast<acc_t>(xr[j]), e = std::exp(v - m);
            sum += e;
            if (buf) buf[j] = e;
            if (eps != 0) qs += wp ? v * static_cast<acc_t>(wp[j]) : v;
          }
          return std::make_pair(sum, qs);
        }();
        const acc_t lse = m + std::log(s);
        const acc_t wt = wp ? static_cast<acc_t>(wp[t]) : acc_t(1);
        const acc_t xt = static_cast<acc_t>(xr[t]);
        acc_t l = (1 - eps) * wt * (lse - xt);
        if (eps != 0) l += b * (W * lse - q);
        lp[r] = l * inv;
        if (!gr) continue;
        // pass 3: grad_j = (e_j / s * a - b w_j) * inv, then the target's own term
        const acc_t a = (1 - eps) * wt + b * W, pa = a / s * inv, bi = b * inv;
        const Vec vpa(pa), vb(bi);
        int64_t i = 0;
        for (; i + K <= C; i += K) {
          Vec g = Vec::loadu(buf + i) * vpa;
          if (eps != 0) g = wp ? at::vec::fnmadd(vb, IO::load(wp + i), g) : g - vb;
          store_out(gr + i, g, K, nt);
        }
        if (nt) stream_fence();  // the streamed lines land before the plain stores below touch them
        for (; i < C; ++i) {
          acc_t g = buf[i] * pa;
          if (eps != 0) g -= bi * (wp ? static_cast<acc_t>(wp[i]) : acc_t(1));
          gr[i] = g;
        }
        acc_t gt = std::exp(xt - lse) * a - (1 - eps) * wt;
        if (eps != 0) gt -= b * wt;
        gr[t] = gt * inv;
      }
    });
  });
  return {loss, grad, total};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& x, const at::Tensor& target,
                                                                 const c10::optional<at::Tensor>& weight,
                                                                 int64_t ignore_index, double label_smoothing,
                                                                 bool mean, bool need_grad) {
  return cross_entropy_z_fwd(x, target, weight, ignore_index, label_smoothing, mean, need_grad, 0.0, 0.0);
}

// dx[r, :] = grad[r, :] * dloss[r], rounded to `dtype`  (grad (M, C) in the accumulation type from the forward;
// dloss (M,) in the accumulation type, any stride)
at::Tensor cross_entropy_bwd(const at::Tensor& grad, const at::Tensor& dloss, at::ScalarType dtype) {
  check_rows(grad, "grad");
  const int64_t M = grad.size(0), C = grad.size(1);
  TORCH_CHECK(dloss.dim() == 1 && dloss.size(0) == M, "dloss must be (rows,)");
  auto dx = empty({M, C}, grad.options().dtype(dtype));
  TORCH_CHECK(grad.scalar_type() == (dtype == at::kDouble ? at::kDouble : at::kFloat),
              "grad must be in the accumulation dtype of ", dtype);
  TORCH_CHECK(dloss.scalar_type() == grad.scalar_type(), "dloss must be in the accumulation dtype");
  TRITIUM_DISPATCH_FLOATING(dtype, "tritium_cross_entropy_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    using IO = VecIO<scalar_t>;
    using Vec = typename IO::Vec;
    constexpr int64_t K = IO::kSize;
    const acc_t* gp = grad.const_data_ptr<acc_t>();
    const acc_t* dp = dloss.const_data_ptr<acc_t>();
    scalar_t* xp = dx.mutable_data_ptr<scalar_t>();
    const int64_t sg = grad.stride(0), sd = dloss.stride(0);
    // streamed around the cache when the rows outgrow it (the gradient of a vocabulary-wide loss)
    const bool nt = stream_outputs(M * C * (grad.element_size() + dx.element_size()));
    at::parallel_for(0, M, row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t d = dp[r * sd];
        const Vec vd(d);
        const acc_t* gr = gp + r * sg;
        scalar_t* xr = xp + r * C;
        int64_t i = 0;
        for (; i + K <= C; i += K) store_out(xr + i, Vec::loadu(gr + i) * vd, K, nt);
        for (; i < C; ++i) xr[i] = static_cast<scalar_t>(gr[i] * d);
      }
      if (nt) stream_fence();
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
  m.impl("cross_entropy_z_fwd", &cross_entropy_z_fwd);
}

}  // namespace tritium
