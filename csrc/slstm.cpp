// xLSTM's sLSTM cell on the CPU: forward and backward of the scan, registered for the schemas
// python/tritium/ops/slstm.py defines (the recurrence, the specification, is there). Per step, with the gate
// preactivations raw_g = wx_g + h_{t-1} R_g (R block-diagonal: one (Dh, Dh) block per head) for g = i, f, z, o:
//
//   m_t = max(i, logsigmoid(f) + m_{t-1});  ig = e^{i - m_t};  fg = e^{logsigmoid(f) + m_{t-1} - m_t}
//   c_t = fg c_{t-1} + ig tanh(z);  n_t = fg n_{t-1} + ig;  h_t = sigmoid(o) c_t / n_t
//
// Heads do not interact, so one work item is one (batch, head): its h, c, n, m (Dh each) and its four (Dh, Dh)
// recurrent blocks stay in cache across the steps. Per step the four gates' products with h run with their
// accumulators in registers (gates_matvec) and the gate math on vectors. The forward saves every step's (h, c, n, m)
// and gates (ig, fg, tanh z, sigmoid o, sigmoid(-f)); the backward walks the steps in reverse with the adjoints of
// (h, c, n) (dh through the blocks' transposes, rows_matvec) and keeps every step's gate gradients, from which dR is
// one batched product after the scan. m is the stabiliser: h does not depend on it and no gradient flows through it.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

template <typename A>
inline void axpy_(A alpha, const A* x, A* y, int64_t np) {
  using Vec = Vectorized<A>;
  const Vec av(alpha);
  for (int64_t j = 0; j < np; j += Vec::size()) at::vec::fmadd(av, Vec::loadu(x + j), Vec::loadu(y + j)).store(y + j);
}

// raw[g][0, DP) = x[g][0, DP) + sum_k h[k] Rb[g][k][0, DP) for the four gates (x's gate rows ldx apart; Rb's rows
// padded to DP = NV vectors; x may be raw itself): G gates at a time, their G NV accumulators in registers across
// the Dh steps of k (one broadcast of h[k] and G NV fused multiply-adds per step, no store of the accumulator in
// between)
template <typename A, int NV>
inline void gates_matvec(const A* Rb, int64_t Dh, int64_t DP, const A* h, const A* x, int64_t ldx, A* raw) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  constexpr int G = NV <= 4 ? 4 : 2;
  for (int g0 = 0; g0 < 4; g0 += G) {
    Vec acc[G][NV];
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < NV; ++v) acc[g][v] = Vec::loadu(x + (g0 + g) * ldx + v * W);
    for (int64_t k = 0; k < Dh; ++k) {
      const Vec hk(h[k]);
      for (int g = 0; g < G; ++g) {
        const A* r = Rb + ((g0 + g) * Dh + k) * DP;
        for (int v = 0; v < NV; ++v) acc[g][v] = at::vec::fmadd(hk, Vec::loadu(r + v * W), acc[g][v]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < NV; ++v) acc[g][v].store(raw + (g0 + g) * DP + v * W);
  }
}

// f(std::integral_constant<int, NV>) for NV = nv in 1 .. 8 (the vector counts the register-blocked products are
// instantiated for); false for a wider row, which the caller handles with its accumulators in memory
template <typename F>
bool with_vectors(int64_t nv, F&& f) {
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 5: f(std::integral_constant<int, 5>{}); return true;
    case 6: f(std::integral_constant<int, 6>{}); return true;
    case 7: f(std::integral_constant<int, 7>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

template <typename A>
void gates_matvec_any(const A* Rb, int64_t Dh, int64_t DP, const A* h, const A* x, int64_t ldx, A* raw) {
  if (with_vectors(DP / Vectorized<A>::size(),
                   [&](auto nv) { gates_matvec<A, decltype(nv)::value>(Rb, Dh, DP, h, x, ldx, raw); }))
    return;
  // a wide head: the accumulator row in memory, one row of R at a time
  if (x != raw)
    for (int64_t g = 0; g < 4; ++g) std::copy(x + g * ldx, x + g * ldx + DP, raw + g * DP);
  for (int64_t g = 0; g < 4; ++g)
    for (int64_t k = 0; k < Dh; ++k) axpy_(h[k], Rb + (g * Dh + k) * DP, raw + g * DP, DP);
}

// out[0, DP) = sum over the rows i < rows of coef(i) RbT[i][0, DP), coef(i) = draw[(i / Dh) DP + i % Dh] (the
// backward's dh = sum_g R_g draw_g, on the blocks' transposes RbT[g][j] = R_g[:, j]): two accumulator sets of NV
// vectors (two chains per output vector), all in registers
template <typename A, int NV>
inline void rows_matvec(const A* RbT, int64_t Dh, int64_t DP, const A* draw, A* out) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec a0[NV], a1[NV];
  for (int v = 0; v < NV; ++v) a0[v] = Vec(A(0)), a1[v] = Vec(A(0));
  for (int64_t g = 0; g < 4; ++g) {
    const A* cg = draw + g * DP;
    const A* rg = RbT + g * Dh * DP;
    int64_t j = 0;
    for (; j + 2 <= Dh; j += 2) {
      const Vec c0(cg[j]), c1(cg[j + 1]);
      for (int v = 0; v < NV; ++v) {
        a0[v] = at::vec::fmadd(c0, Vec::loadu(rg + j * DP + v * W), a0[v]);
        a1[v] = at::vec::fmadd(c1, Vec::loadu(rg + (j + 1) * DP + v * W), a1[v]);
      }
    }
    if (j < Dh) {
      const Vec c0(cg[j]);
      for (int v = 0; v < NV; ++v) a0[v] = at::vec::fmadd(c0, Vec::loadu(rg + j * DP + v * W), a0[v]);
    }
  }
  for (int v = 0; v < NV; ++v) (a0[v] + a1[v]).store(out + v * W);
}

template <typename A>
void rows_matvec_any(const A* RbT, int64_t Dh, int64_t DP, const A* draw, A* out) {
  if (with_vectors(DP / Vectorized<A>::size(),
                   [&](auto nv) { rows_matvec<A, decltype(nv)::value>(RbT, Dh, DP, draw, out); }))
    return;
  std::fill(out, out + DP, A(0));
  for (int64_t g = 0; g < 4; ++g)
    for (int64_t j = 0; j < Dh; ++j) axpy_(draw[g * DP + j], RbT + (g * Dh + j) * DP, out, DP);
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
  auto y = empty({B, L, D}, wx.options());
  auto states = empty({B, L, 4, D}, wx.options().dtype(acc));
  auto gates = empty({B, L, 5, D}, wx.options().dtype(acc));
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
      using Vec = Vectorized<A>;
      // the item's state, padded to DP: the padding lanes of raw stay 0 (x and R are 0 there), those of h, c, n, m
      // evolve harmlessly (finite) and are never stored
      std::vector<A> Rb(4 * Dh * DP, A(0)), raw(4 * DP, A(0)), h(DP), c(DP), n(DP), m(DP);
      const Vec one(A(1)), zero(A(0));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / H, hd = item % H;
        for (int64_t g = 0; g < 4; ++g)  // R_g's block of this head, rows padded to DP
          for (int64_t k = 0; k < Dh; ++k)
            std::copy(Rp + ((g * H + hd) * Dh + k) * Dh, Rp + ((g * H + hd) * Dh + k) * Dh + Dh,
                      Rb.data() + (g * Dh + k) * DP);
        std::fill(h.begin(), h.end(), A(0));
        std::fill(c.begin(), c.end(), A(0));
        std::fill(n.begin(), n.end(), A(0));
        std::fill(m.begin(), m.end(), -std::numeric_limits<A>::infinity());
        load_init(h0, c0, n0, m0, bi * D + hd * Dh, Dh, h.data(), c.data(), n.data(), m.data());
        for (int64_t t = 0; t < L; ++t) {
          const T* x = wxp + (bi * L + t) * 4 * D;
          if (std::is_same_v<T, A> && DP == Dh) {  // x's gate rows are whole vectors of A: read in place
            // (the cast only spells T = A: this branch is not discarded, the dispatch's lambda is no template)
            gates_matvec_any(Rb.data(), Dh, DP, h.data(), reinterpret_cast<const A*>(x + hd * Dh), D, raw.data());
          } else {
            for (int64_t g = 0; g < 4; ++g) to_acc(x + g * D + hd * Dh, raw.data() + g * DP, Dh);
            gates_matvec_any(Rb.data(), Dh, DP, h.data(), raw.data(), DP, raw.data());
          }
          A* st = sp + (bi * L + t) * 4 * D + hd * Dh;
          A* ga = gp + (bi * L + t) * 5 * D + hd * Dh;
          T* yo = yp + (bi * L + t) * D + hd * Dh;
          // the gates on vectors (vec.h's inlined exp, sigmoid and log1p of [0, 1]; ATen's tanh), five
          // transcendentals an element: e^-|f| gives both logsigmoid(f) and sigmoid(-f), and of ig = e^(i - m_t) and
          // fg = e^(logsigmoid(f) + m_{t-1} - m_t) one is e^0 = 1 (m_t is the larger exponent), the other e^-|i - lf - m|
          for (int64_t j = 0; j < DP; j += W) {
            const int64_t cnt = std::min<int64_t>(W, Dh - j);
            const Vec iv = Vec::loadu(raw.data() + j), fv = Vec::loadu(raw.data() + DP + j);
            const Vec z = Vec::loadu(raw.data() + 2 * DP + j).tanh();
            const Vec o = fsigmoid(Vec::loadu(raw.data() + 3 * DP + j));
            const Vec ef = fexp(fv.abs().neg());  // e^-|f|
            const Vec lf = at::vec::minimum(fv, zero) - add_log1p_unit(zero, ef);
            const Vec sf = Vec::blendv(ef, one, fv < zero) / (one + ef);  // sigmoid(-f)
            const Vec mp = Vec::loadu(m.data() + j);
            const Vec lm = lf + mp;
            const Vec mn = at::vec::maximum(iv, lm);
            const Vec i_wins = iv >= lm;  // m_t = i: ig = 1 (also at m_{t-1} = -inf); else fg = 1
            const Vec e = fexp((iv - lm).abs().neg());
            const Vec ig = Vec::blendv(e, one, i_wins), fg = Vec::blendv(one, e, i_wins);
            const Vec cv = fg * Vec::loadu(c.data() + j) + ig * z;
            const Vec nv = fg * Vec::loadu(n.data() + j) + ig;
            const Vec hv = o * cv / nv;
            cv.store(c.data() + j);
            nv.store(n.data() + j);
            mn.store(m.data() + j);
            hv.store(h.data() + j);
            store_out(yo + j, hv, cnt, false);
            hv.store(st + j, cnt), cv.store(st + D + j, cnt), nv.store(st + 2 * D + j, cnt);
            mn.store(st + 3 * D + j, cnt);
            ig.store(ga + j, cnt), fg.store(ga + D + j, cnt), z.store(ga + 2 * D + j, cnt);
            o.store(ga + 3 * D + j, cnt), sf.store(ga + 4 * D + j, cnt);
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
  auto dwx = empty(wx.sizes(), wx.options());
  // every step's gate preactivation gradients in the accumulation dtype (dwx holds them rounded to wx's dtype):
  // dR_g = sum over (b, t) of h_{t-1}^T draw_g, one batched product after the scan
  auto draw_all = empty({B, L, 4, D}, wx.options().dtype(acc));
  auto dh0 = at::empty({B, D}, wx.options().dtype(acc)), dc0 = at::empty_like(dh0), dn0 = at::empty_like(dh0);
  TRITIUM_DISPATCH_FLOATING(wx.scalar_type(), "tritium_slstm_bwd", [&] {
    using T = scalar_t;
    using A = acc_type<T>;
    using Vec = Vectorized<A>;
    constexpr int64_t W = Vec::size();
    const int64_t DP = (Dh + W - 1) / W * W;
    const T* dyp = dy.const_data_ptr<T>();
    const A *Rp = R.const_data_ptr<A>(), *sp = states.const_data_ptr<A>(), *gp = gates.const_data_ptr<A>();
    T* dwxp = dwx.mutable_data_ptr<T>();
    A *drp = draw_all.mutable_data_ptr<A>(), *dh0p = dh0.mutable_data_ptr<A>(), *dc0p = dc0.mutable_data_ptr<A>();
    A* dn0p = dn0.mutable_data_ptr<A>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      // padded to DP: the padding lanes of every input are 0 (the initial state's too), so those of draw and dh
      // are 0 and RbT's padding columns add nothing
      std::vector<A> RbT(4 * Dh * DP, A(0)), draw(4 * DP, A(0)), dh(DP), dc(DP), dn(DP), dya(DP, A(0));
      std::vector<A> ih(DP), ic(DP), in_(DP), im(DP);
      const Vec one(A(1));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / H, hd = item % H, off = bi * D + hd * Dh;
        for (int64_t g = 0; g < 4; ++g)  // RbT[g][j][k] = R_g[k][j]
          for (int64_t k = 0; k < Dh; ++k)
            for (int64_t j = 0; j < Dh; ++j) RbT[(g * Dh + j) * DP + k] = Rp[((g * H + hd) * Dh + k) * Dh + j];
        for (auto* v : {&dh, &dc, &dn, &ih, &ic, &in_}) std::fill(v->begin(), v->end(), A(0));
        load_init(dhT, dcT, dnT, c10::optional<at::Tensor>(), off, Dh, dh.data(), dc.data(), dn.data(), im.data());
        load_init(h0, c0, n0, m0, off, Dh, ih.data(), ic.data(), in_.data(), im.data());
        for (int64_t t = L - 1; t >= 0; --t) {
          const A* st = sp + (bi * L + t) * 4 * D + hd * Dh;
          const A* ga = gp + (bi * L + t) * 5 * D + hd * Dh;
          const A* pv = t > 0 ? sp + (bi * L + t - 1) * 4 * D + hd * Dh : nullptr;  // h, c, n at D strides
          to_acc(dyp + (bi * L + t) * D + hd * Dh, dya.data(), Dh);
          T* dxo = dwxp + (bi * L + t) * 4 * D + hd * Dh;
          A* dro = drp + (bi * L + t) * 4 * D + hd * Dh;
          for (int64_t j = 0; j < DP; j += W) {
            const int64_t cnt = std::min<int64_t>(W, Dh - j);
            auto ld = [&](const A* q) { return cnt == W ? Vec::loadu(q) : Vec::loadu(q, cnt); };
            const Vec c = ld(st + D + j), n = ld(st + 2 * D + j);
            const Vec ig = ld(ga + j), fg = ld(ga + D + j), z = ld(ga + 2 * D + j), o = ld(ga + 3 * D + j);
            const Vec sf = ld(ga + 4 * D + j);
            const Vec cp = pv ? ld(pv + D + j) : Vec::loadu(ic.data() + j);
            const Vec np = pv ? ld(pv + 2 * D + j) : Vec::loadu(in_.data() + j);
            // n is 0 only in the padding lanes (n_t >= ig > 0 in the row's): 1 there keeps them finite
            const Vec nn = cnt == W ? n : Vec::set(one, n, cnt);
            const Vec dyt = Vec::loadu(dya.data() + j) + Vec::loadu(dh.data() + j);
            const Vec dct = Vec::loadu(dc.data() + j) + dyt * o / nn;
            const Vec dnt = Vec::loadu(dn.data() + j) - dyt * o * c / (nn * nn);
            const Vec d3 = dyt * c / nn * o * (one - o);
            const Vec d2 = dct * ig * (one - z * z);
            const Vec d0 = (dct * z + dnt) * ig;
            const Vec d1 = (dct * cp + dnt * np) * fg * sf;
            d0.store(draw.data() + j), d1.store(draw.data() + DP + j);
            d2.store(draw.data() + 2 * DP + j), d3.store(draw.data() + 3 * DP + j);
            (dct * fg).store(dc.data() + j);
            (dnt * fg).store(dn.data() + j);
            const Vec dg[4] = {d0, d1, d2, d3};
            for (int64_t g = 0; g < 4; ++g) {
              store_out(dxo + g * D + j, dg[g], cnt, false);
              dg[g].store(dro + g * D + j, cnt);
            }
          }
          rows_matvec_any(RbT.data(), Dh, DP, draw.data(), dh.data());  // dh_{t-1} = sum_g R_g draw_g
        }
        std::copy(dh.begin(), dh.begin() + Dh, dh0p + off);
        std::copy(dc.begin(), dc.begin() + Dh, dc0p + off);
        std::copy(dn.begin(), dn.begin() + Dh, dn0p + off);
      }
    });
  });
  // dR[g, hd] = sum over (b, t) of h_{t-1}[hd]^T draw[b, t, g, hd]: h_{-1} = h0 (zeros when absent)
  const auto hs = states.select(2, 0);  // (B, L, D)
  auto hprev = empty({B, L, D}, hs.options());
  if (L > 1) hprev.narrow(1, 1, L - 1).copy_(hs.narrow(1, 0, L - 1));
  if (L > 0) {
    if (h0)
      hprev.select(1, 0).copy_(*h0);
    else
      hprev.select(1, 0).zero_();
  }
  const auto dR = at::einsum("nhk,nghj->ghkj", {hprev.view({B * L, H, Dh}), draw_all.view({B * L, 4, H, Dh})});
  return {dwx, dR.contiguous(), dh0, dc0, dn0};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("slstm_fwd", &slstm_fwd);
  m.impl("slstm_bwd", &slstm_bwd);
}

}  // namespace tritium
