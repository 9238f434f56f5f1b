// xLSTM's sLSTM cell on the CPU: forward and backward of the scan, registered for the schemas
// python/tritium/ops/slstm.py defines (the recurrence, the specification, is there). Per step, with the gate
// preactivations raw_g = wx_g + h_{t-1} R_g (R block-diagonal: one (Dh, Dh) block per head) for g = i, f, z, o:
//
//   m_t = max(i, logsigmoid(f) + m_{t-1});  ig = e^{i - m_t};  fg = e^{logsigmoid(f) + m_{t-1} - m_t}
//   c_t = fg c_{t-1} + ig tanh(z);  n_t = fg n_{t-1} + ig;  h_t = sigmoid(o) c_t / n_t
//
// Heads do not interact, so one work item is one (batch, head): its h, c, n, m (Dh each) and its four (Dh, Dh)
// recurrent blocks stay in L1 across the steps. The forward saves every step's (h, c, n, m) and gates (ig, fg,
// tanh z, sigmoid o, sigmoid(-f)); the backward walks the steps in reverse with the adjoints of (h, c, n) and sums
// each item's share of dR. m is the stabiliser: h does not depend on it and no gradient flows through it.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace tritium {
namespace {

template <typename A>
inline void axpy_(A alpha, const A* x, A* y, int64_t np) {
  using Vec = Vectorized<A>;
  const Vec av(alpha);
  for (int64_t j = 0; j < np; j += Vec::size()) at::vec::fmadd(av, Vec::loadu(x + j), Vec::loadu(y + j)).store(y + j);
}

template <typename A>
inline A dot_(const A* a, const A* b, int64_t np) {
  using Vec = Vectorized<A>;
  Vec acc(0);
  for (int64_t j = 0; j < np; j += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc);
  return hsum(acc);
}

template <typename A>
inline A sigm(A x) {
  return A(1) / (A(1) + std::exp(-x));
}

void check_slstm(const at::Tensor& wx, const at::Tensor& R) {
  TORCH_CHECK(wx.dim() == 3 && wx.is_contiguous(), "wx must be a contiguous (B, T, 4 D) tensor, got ", wx.sizes());
  TORCH_CHECK(R.dim() == 4 && R.size(0) == 4 && R.size(2) == R.size(3) && R.is_contiguous() &&
                  R.scalar_type() == at::toOpMathType(wx.scalar_type()),
              "R must be a contiguous (4, H, Dh, Dh) ", at::toOpMathType(wx.scalar_type()), " tensor, got ", R.sizes(),
              " ", R.scalar_type());
  TORCH_CHECK(wx.size(2) == 4 * R.size(1) * R.size(2), "wx's last dim must be 4 H Dh = ", 4 * R.size(1) * R.size(2),
              ", got ", wx.size(2));
}

void check_vec_state(const c10::optional<at::Tensor>& t, int64_t B, int64_t D, at::ScalarType acc, const char* name) {
  if (t)
    TORCH_CHECK(t->sizes() == at::IntArrayRef({B, D}) && t->is_contiguous() && t->scalar_type() == acc, name,
                " must be a contiguous (B, D) ", acc, " tensor, got ", t->sizes(), " ", t->scalar_type());
}

// the initial (h, c, n, m) of item (bi, head) into h, c, n, m (Dh each): zeros and m = -inf when absent
template <typename A>
void load_init(const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& c0,
               const c10::optional<at::Tensor>& n0, const c10::optional<at::Tensor>& m0, int64_t off, int64_t Dh,
               A* h, A* c, A* n, A* m) {
  auto get = [&](const c10::optional<at::Tensor>& t, A* dst, A dflt) {
    if (t)
      std::copy(t->const_data_ptr<A>() + off, t->const_data_ptr<A>() + off + Dh, dst);
    else
      std::fill(dst, dst + Dh, dflt);
  };
  get(h0, h, A(0));
  get(c0, c, A(0));
  get(n0, n, A(0));
  get(m0, m, -std::numeric_limits<A>::infinity());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> slstm_fwd(
    const at::Tensor& wx, const at::Tensor& R, const c10::optional<at::Tensor>& h0,
    const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& n0, const c10::optional<at::Tensor>& m0) {
  check_slstm(wx, R);
  const int64_t B = wx.size(0), L = wx.size(1), H = R.size(1), Dh = R.size(2), D = H * Dh;
  const auto acc = at::toOpMathType(wx.scalar_type());
  for (const auto& [t, name] : {std::pair{&h0, "h0"}, {&c0, "c0"}, {&n0, "n0"}, {&m0, "m0"}})
    check_vec_state(*t, B, D, acc, name);
  auto y = at::empty({B, L, D}, wx.options());
  auto states = at::empty({B, L, 4, D}, wx.options().dtype(acc));
  auto gates = at::empty({B, L, 5, D}, wx.options().dtype(acc));
  TRITIUM_DISPATCH_FLOATING(wx.scalar_type(), "tritium_slstm_fwd", [&] {
    using T = scalar_t;
    using A = acc_type<T>;
    constexpr int64_t W = Vectorized<A>::size();
    const int64_t DP = (Dh + W - 1) / W * W;
    const T* wxp = wx.const_data_ptr<T>();
    const A* Rp = R.const_data_ptr<A>();
    T* yp = y.mutable_data_ptr<T>();
    A *sp = states.mutable_data_ptr<A>(), *gp = gates.mutable_data_ptr<A>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> Rb(4 * Dh * DP, A(0)), raw(4 * DP), h(DP, A(0)), c(Dh), n(Dh), m(Dh), xa(Dh);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / H, hd = item % H;
        for (int64_t g = 0; g < 4; ++g)  // R_g's block of this head, rows padded to DP
          for (int64_t k = 0; k < Dh; ++k)
            std::copy(Rp + ((g * H + hd) * Dh + k) * Dh, Rp + ((g * H + hd) * Dh + k) * Dh + Dh,
                      Rb.data() + (g * Dh + k) * DP);
        load_init(h0, c0, n0, m0, bi * D + hd * Dh, Dh, h.data(), c.data(), n.data(), m.data());
        for (int64_t t = 0; t < L; ++t) {
          const T* x = wxp + (bi * L + t) * 4 * D;
          std::fill(raw.begin(), raw.end(), A(0));
          for (int64_t g = 0; g < 4; ++g) {
            A* rg = raw.data() + g * DP;
            to_acc(x + g * D + hd * Dh, xa.data(), Dh);
            std::copy(xa.begin(), xa.end(), rg);
            for (int64_t k = 0; k < Dh; ++k) axpy_(h[k], Rb.data() + (g * Dh + k) * DP, rg, DP);
          }
          A* st = sp + (bi * L + t) * 4 * D + hd * Dh;
          A* ga = gp + (bi * L + t) * 5 * D + hd * Dh;
          T* yo = yp + (bi * L + t) * D + hd * Dh;
          for (int64_t j = 0; j < Dh; ++j) {
            const A iv = raw[j], fv = raw[DP + j], z = std::tanh(raw[2 * DP + j]), o = sigm(raw[3 * DP + j]);
            const A lf = std::min(fv, A(0)) - std::log1p(std::exp(-std::abs(fv)));
            const A mn = std::max(iv, lf + m[j]);
            const A ig = std::exp(iv - mn), fg = std::exp(lf + m[j] - mn);
            c[j] = fg * c[j] + ig * z;
            n[j] = fg * n[j] + ig;
            m[j] = mn;
            h[j] = o * c[j] / n[j];
            yo[j] = static_cast<T>(h[j]);
            st[j] = h[j], st[D + j] = c[j], st[2 * D + j] = n[j], st[3 * D + j] = mn;
            ga[j] = ig, ga[D + j] = fg, ga[2 * D + j] = z, ga[3 * D + j] = o, ga[4 * D + j] = sigm(-fv);
          }
        }
      }
    });
  });
  return {y, states, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> slstm_bwd(
    const at::Tensor& dy, const at::Tensor& wx, const at::Tensor& R, const c10::optional<at::Tensor>& h0,
    const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& n0, const c10::optional<at::Tensor>& m0,
    const at::Tensor& states, const at::Tensor& gates, const c10::optional<at::Tensor>& dhT,
    const c10::optional<at::Tensor>& dcT, const c10::optional<at::Tensor>& dnT) {
  check_slstm(wx, R);
  const int64_t B = wx.size(0), L = wx.size(1), H = R.size(1), Dh = R.size(2), D = H * Dh;
  const auto acc = at::toOpMathType(wx.scalar_type());
  for (const auto& [t, name] : {std::pair{&h0, "h0"}, {&c0, "c0"}, {&n0, "n0"}, {&m0, "m0"}, {&dhT, "dhT"},
                                {&dcT, "dcT"}, {&dnT, "dnT"}})
    check_vec_state(*t, B, D, acc, name);
  TORCH_CHECK(dy.sizes() == at::IntArrayRef({B, L, D}) && dy.is_contiguous() && dy.scalar_type() == wx.scalar_type(),
              "dy must be a contiguous (B, T, D) tensor like wx, got ", dy.sizes(), " ", dy.scalar_type());
  TORCH_CHECK(states.sizes() == at::IntArrayRef({B, L, 4, D}) && states.is_contiguous() && states.scalar_type() == acc &&
                  gates.sizes() == at::IntArrayRef({B, L, 5, D}) && gates.is_contiguous() &&
                  gates.scalar_type() == acc,
              "states and gates must be the forward's, got ", states.sizes(), " and ", gates.sizes());
  auto dwx = at::empty_like(wx);
  auto dR_part = at::zeros({B, 4, H, Dh, Dh}, R.options());
  auto dh0 = at::empty({B, D}, wx.options().dtype(acc)), dc0 = at::empty_like(dh0), dn0 = at::empty_like(dh0);
  TRITIUM_DISPATCH_FLOATING(wx.scalar_type(), "tritium_slstm_bwd", [&] {
    using T = scalar_t;
    using A = acc_type<T>;
    constexpr int64_t W = Vectorized<A>::size();
    const int64_t DP = (Dh + W - 1) / W * W;
    const T* dyp = dy.const_data_ptr<T>();
    const A *Rp = R.const_data_ptr<A>(), *sp = states.const_data_ptr<A>(), *gp = gates.const_data_ptr<A>();
    T* dwxp = dwx.mutable_data_ptr<T>();
    A *dRp = dR_part.mutable_data_ptr<A>(), *dh0p = dh0.mutable_data_ptr<A>(), *dc0p = dc0.mutable_data_ptr<A>();
    A* dn0p = dn0.mutable_data_ptr<A>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> Rb(4 * Dh * DP, A(0)), dRb(4 * Dh * DP), draw(4 * DP, A(0)), dh(Dh), dc(Dh), dn(Dh), dya(Dh);
      std::vector<A> ih(Dh), ic(Dh), in_(Dh), im(Dh);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / H, hd = item % H, off = bi * D + hd * Dh;
        for (int64_t g = 0; g < 4; ++g)
          for (int64_t k = 0; k < Dh; ++k)
            std::copy(Rp + ((g * H + hd) * Dh + k) * Dh, Rp + ((g * H + hd) * Dh + k) * Dh + Dh,
                      Rb.data() + (g * Dh + k) * DP);
        std::fill(dRb.begin(), dRb.end(), A(0));
        load_init(dhT, dcT, dnT, c10::optional<at::Tensor>(), off, Dh, dh.data(), dc.data(), dn.data(), im.data());
        load_init(h0, c0, n0, m0, off, Dh, ih.data(), ic.data(), in_.data(), im.data());
        for (int64_t t = L - 1; t >= 0; --t) {
          const A* st = sp + (bi * L + t) * 4 * D + hd * Dh;
          const A* ga = gp + (bi * L + t) * 5 * D + hd * Dh;
          const A* pv = t > 0 ? sp + (bi * L + t - 1) * 4 * D + hd * Dh : nullptr;  // h, c, n at D strides
          to_acc(dyp + (bi * L + t) * D + hd * Dh, dya.data(), Dh);
          for (int64_t j = 0; j < Dh; ++j) {
            const A c = st[D + j], n = st[2 * D + j];
            const A ig = ga[j], fg = ga[D + j], z = ga[2 * D + j], o = ga[3 * D + j], sf = ga[4 * D + j];
            const A cp = pv ? pv[D + j] : ic[j], np = pv ? pv[2 * D + j] : in_[j];
            const A dyt = dya[j] + dh[j];
            const A dct = dc[j] + dyt * o / n;
            const A dnt = dn[j] - dyt * o * c / (n * n);
            draw[3 * DP + j] = dyt * c / n * o * (A(1) - o);
            draw[2 * DP + j] = dct * ig * (A(1) - z * z);
            draw[j] = (dct * z + dnt) * ig;
            draw[DP + j] = (dct * cp + dnt * np) * fg * sf;
            dc[j] = dct * fg;
            dn[j] = dnt * fg;
          }
          T* dxo = dwxp + (bi * L + t) * 4 * D + hd * Dh;
          for (int64_t g = 0; g < 4; ++g)
            for (int64_t j = 0; j < Dh; ++j) dxo[g * D + j] = static_cast<T>(draw[g * DP + j]);
          // dh_{t-1} = sum_g R_g draw_g; dR_g += h_{t-1} draw_g^T
          for (int64_t k = 0; k < Dh; ++k) {
            const A hk = pv ? pv[k] : ih[k];
            A s = 0;
            for (int64_t g = 0; g < 4; ++g) {
              s += dot_(Rb.data() + (g * Dh + k) * DP, draw.data() + g * DP, DP);
              axpy_(hk, draw.data() + g * DP, dRb.data() + (g * Dh + k) * DP, DP);
            }
            dh[k] = s;
          }
        }
        for (int64_t g = 0; g < 4; ++g)
          for (int64_t k = 0; k < Dh; ++k)
            std::copy(dRb.data() + (g * Dh + k) * DP, dRb.data() + (g * Dh + k) * DP + Dh,
                      dRp + (((bi * 4 + g) * H + hd) * Dh + k) * Dh);
        std::copy(dh.begin(), dh.end(), dh0p + off);
        std::copy(dc.begin(), dc.end(), dc0p + off);
        std::copy(dn.begin(), dn.end(), dn0p + off);
      }
    });
  });
  return {dwx, dR_part.sum(0), dh0, dc0, dn0};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("slstm_fwd", &slstm_fwd);
  m.impl("slstm_bwd", &slstm_bwd);
}

}  // namespace tritium
