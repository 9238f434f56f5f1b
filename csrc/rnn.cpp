// LSTM and GRU cell CPU kernels (forward and backward), registered for the CPU key of the tritium ops whose
// schemas python/tritium/ops/rnn.py defines.
//
// One call is one time step of one layer-direction: the recurrent matmul (h @ W_hh^T) and the up-front input
// projection stay matmuls in the caller; everything elementwise between them (the gate nonlinearities, the
// cell update, the output) is one pass over the (batch, hidden) tile here, forward and backward.
// Gate orders follow torch.nn.LSTM (i, f, g, o) and torch.nn.GRU (r, z, n).
//
//   lstm fwd:  i,f,o = sigmoid(G_i,f,o); g = tanh(G_g); c' = f*c + i*g; h' = o*tanh(c')
//   lstm bwd:  dc~ = dc' + dh*o*(1-tanh(c')^2); dG = [dc~*g*i(1-i), dc~*c*f(1-f), dc~*i*(1-g^2),
//              dh*tanh(c')*o(1-o)]; dc = dc~*f
//   gru fwd:   r,z = sigmoid(X_r,z + H_r,z); n = tanh(X_n + r*H_n); h' = n + z*(h - n)
//   gru bwd:   dn~ = dh*(1-z)*(1-n^2); dz~ = dh*(h-n)*z(1-z); dr~ = dn~*H_n*r(1-r);
//              dX = [dr~, dz~, dn~]; dH = [dr~, dz~, dn~*r]; dh_direct = dh*z
//   rnn fwd:   h' = act(X + h W_hh^T), act tanh or relu (torch.nn.RNN's Elman cell; both biases in X)
//   rnn bwd:   dP = dh * act'(h'), act' = 1 - h'^2 (tanh) or h' > 0 (relu, 0 at 0 as torch's)
// Rows (batch entries) are independent: at::parallel_for splits them; each row is read and written once.
// The scan ops (lstm_scan_fwd/bwd, gru_scan_fwd/bwd, rnn_scan_fwd/bwd) run a whole layer-direction through time here, so a step
// costs one matmul and one cell pass, with no Python, allocation or copy in between.
#include "panel.h"
#include "pool.h"

namespace tritium {
namespace {

template <typename V>
inline V vsigmoid(const V& x) {
  return fsigmoid(x);
}
template <typename A>
inline A ssigmoid(A x) {
  return A(1) / (A(1) + std::exp(-x));
}


// A (rows, cols) operand: base pointer and row stride (the column stride is 1).
template <typename T>
struct Mat {
  T* p;
  int64_t s;
  T* row(int64_t b) const { return p + b * s; }
};
template <typename T>
Mat<const T> cmat(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0)};
}
template <typename T>
Mat<T> mmat(at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), t.stride(0)};
}

inline void check_gates(const at::Tensor& t, int64_t B, int64_t width, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == width, name, " must be (", B, ", ", width,
              "), got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || width <= 1, name, " must have a contiguous last dimension");
}

// ---------------------------------------------------------------------------------------------------------
// the cell row kernels: B rows of H hidden units, split across threads by rows
// ---------------------------------------------------------------------------------------------------------
template <typename T>
void lstm_fwd_rows(int64_t B, int64_t H, Mat<const T> G, Mat<const T> C, Mat<T> Hn, Mat<T> CN, Mat<T> A) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using acc_t = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  at::parallel_for(0, B, row_grain(8 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T *g = G.row(b), *cr = C.row(b);
      T *a = A.row(b), *hr = Hn.row(b), *cnr = CN.row(b);
      int64_t j = 0;
      for (; j + K <= H; j += K) {
        Vec i = vsigmoid(IO::load(g + j)), f = vsigmoid(IO::load(g + H + j));
        Vec gg = ftanh(IO::load(g + 2 * H + j)), o = vsigmoid(IO::load(g + 3 * H + j));
        Vec cv = at::vec::fmadd(f, IO::load(cr + j), i * gg);
        IO::store(a + j, i);
        IO::store(a + H + j, f);
        IO::store(a + 2 * H + j, gg);
        IO::store(a + 3 * H + j, o);
        IO::store(cnr + j, cv);
        IO::store(hr + j, o * ftanh(cv));
      }
      for (; j < H; ++j) {
        acc_t i = ssigmoid<acc_t>(g[j]), f = ssigmoid<acc_t>(g[H + j]);
        acc_t gg = std::tanh(static_cast<acc_t>(g[2 * H + j])), o = ssigmoid<acc_t>(g[3 * H + j]);
        acc_t cv = f * static_cast<acc_t>(cr[j]) + i * gg;
        a[j] = i;
        a[H + j] = f;
        a[2 * H + j] = gg;
        a[3 * H + j] = o;
        cnr[j] = cv;
        hr[j] = o * std::tanh(cv);
      }
    }
  });
}

// DC and DCP may alias (the scan updates the carried dc in place: each element is read before it is written).
template <typename T>
void lstm_bwd_rows(int64_t B, int64_t H, Mat<const T> DH, Mat<const T> DC, Mat<const T> A, Mat<const T> CN,
                   Mat<const T> C, Mat<T> DG, Mat<T> DCP) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using acc_t = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  at::parallel_for(0, B, row_grain(12 * H), [&](int64_t begin, int64_t end) {
    const Vec one(1);
    for (int64_t b = begin; b < end; ++b) {
      const T *dhr = DH.row(b), *dcr = DC.row(b), *a = A.row(b), *cnr = CN.row(b), *cr = C.row(b);
      T *dg = DG.row(b), *dco = DCP.row(b);
      int64_t j = 0;
      for (; j + K <= H; j += K) {
        Vec i = IO::load(a + j), f = IO::load(a + H + j), gg = IO::load(a + 2 * H + j), o = IO::load(a + 3 * H + j);
        Vec tc = ftanh(IO::load(cnr + j)), d = IO::load(dhr + j);
        Vec dcc = at::vec::fmadd(d * o, one - tc * tc, IO::load(dcr + j));
        IO::store(dg + j, dcc * gg * i * (one - i));
        IO::store(dg + H + j, dcc * IO::load(cr + j) * f * (one - f));
        IO::store(dg + 2 * H + j, dcc * i * (one - gg * gg));
        IO::store(dg + 3 * H + j, d * tc * o * (one - o));
        IO::store(dco + j, dcc * f);
      }
      for (; j < H; ++j) {
        acc_t i = a[j], f = a[H + j], gg = a[2 * H + j], o = a[3 * H + j];
        acc_t tc = std::tanh(static_cast<acc_t>(cnr[j])), d = dhr[j];
        acc_t dcc = static_cast<acc_t>(dcr[j]) + d * o * (1 - tc * tc);
        dg[j] = dcc * gg * i * (1 - i);
        dg[H + j] = dcc * static_cast<acc_t>(cr[j]) * f * (1 - f);
        dg[2 * H + j] = dcc * i * (1 - gg * gg);
        dg[3 * H + j] = d * tc * o * (1 - o);
        dco[j] = dcc * f;
      }
    }
  });
}

template <typename T>
void gru_fwd_rows(int64_t B, int64_t H, Mat<const T> X, Mat<const T> Q, Mat<const T> Hp, Mat<T> Hn, Mat<T> S) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using acc_t = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  at::parallel_for(0, B, row_grain(12 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T *x = X.row(b), *q = Q.row(b), *hr = Hp.row(b);
      T *s = S.row(b), *out = Hn.row(b);
      int64_t j = 0;
      for (; j + K <= H; j += K) {
        Vec r = vsigmoid(IO::load(x + j) + IO::load(q + j));
        Vec z = vsigmoid(IO::load(x + H + j) + IO::load(q + H + j));
        Vec qn = IO::load(q + 2 * H + j);
        Vec n = ftanh(at::vec::fmadd(r, qn, IO::load(x + 2 * H + j)));
        IO::store(s + j, r);
        IO::store(s + H + j, z);
        IO::store(s + 2 * H + j, n);
        IO::store(s + 3 * H + j, qn);
        IO::store(out + j, at::vec::fmadd(z, IO::load(hr + j) - n, n));
      }
      for (; j < H; ++j) {
        acc_t r = ssigmoid<acc_t>(static_cast<acc_t>(x[j]) + static_cast<acc_t>(q[j]));
        acc_t z = ssigmoid<acc_t>(static_cast<acc_t>(x[H + j]) + static_cast<acc_t>(q[H + j]));
        acc_t qn = q[2 * H + j];
        acc_t n = std::tanh(static_cast<acc_t>(x[2 * H + j]) + r * qn);
        s[j] = r;
        s[H + j] = z;
        s[2 * H + j] = n;
        s[3 * H + j] = qn;
        out[j] = n + z * (static_cast<acc_t>(hr[j]) - n);
      }
    }
  });
}

// EXTRA (optional, p == nullptr: none) is added to dh_direct: the scan folds in the output gradient of the
// previous step there.
template <typename T>
void gru_bwd_rows(int64_t B, int64_t H, Mat<const T> DH, Mat<const T> S, Mat<const T> Hp, Mat<const T> EXTRA,
                  Mat<T> DX, Mat<T> DQ, Mat<T> DHD) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using acc_t = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  at::parallel_for(0, B, row_grain(12 * H), [&](int64_t begin, int64_t end) {
    const Vec one(1);
    for (int64_t b = begin; b < end; ++b) {
      const T *d = DH.row(b), *s = S.row(b), *hr = Hp.row(b);
      const T* ex = EXTRA.p ? EXTRA.row(b) : nullptr;
      T *ox = DX.row(b), *oq = DQ.row(b), *od = DHD.row(b);
      int64_t j = 0;
      for (; j + K <= H; j += K) {
        Vec r = IO::load(s + j), z = IO::load(s + H + j), n = IO::load(s + 2 * H + j), qn = IO::load(s + 3 * H + j);
        Vec g = IO::load(d + j);
        Vec dn = g * (one - z) * (one - n * n);
        Vec dz = g * (IO::load(hr + j) - n) * z * (one - z);
        Vec dr = dn * qn * r * (one - r);
        IO::store(ox + j, dr);
        IO::store(ox + H + j, dz);
        IO::store(ox + 2 * H + j, dn);
        IO::store(oq + j, dr);
        IO::store(oq + H + j, dz);
        IO::store(oq + 2 * H + j, dn * r);
        IO::store(od + j, ex ? at::vec::fmadd(g, z, IO::load(ex + j)) : g * z);
      }
      for (; j < H; ++j) {
        acc_t r = s[j], z = s[H + j], n = s[2 * H + j], qn = s[3 * H + j], g = d[j];
        acc_t dn = g * (1 - z) * (1 - n * n);
        acc_t dz = g * (static_cast<acc_t>(hr[j]) - n) * z * (1 - z);
        acc_t dr = dn * qn * r * (1 - r);
        ox[j] = dr;
        ox[H + j] = dz;
        ox[2 * H + j] = dn;
        oq[j] = dr;
        oq[H + j] = dz;
        oq[2 * H + j] = dn * r;
        od[j] = g * z + (ex ? static_cast<acc_t>(ex[j]) : acc_t(0));
      }
    }
  });
}

// The Elman cell: Y (B rows of H) holds the pre-activation X + h W_hh^T and gets act of it, in place.
template <typename T>
void rnn_act_rows(int64_t B, int64_t H, Mat<T> Y, bool relu) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using acc_t = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  at::parallel_for(0, B, row_grain(8 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* y = Y.row(b);
      int64_t j = 0;
      for (; j + K <= H; j += K) {
        const Vec v = IO::load(y + j);
        IO::store(y + j, relu ? at::vec::clamp_min(v, Vec(0)) : ftanh(v));
      }
      for (; j < H; ++j) {
        const acc_t v = y[j];
        // relu keeps NaN (torch's relu propagates it)
        y[j] = relu ? (v < 0 ? acc_t(0) : v) : std::tanh(v);
      }
    }
  });
}

// dP = dh * act'(h') from the cell's output h' (B rows of H)
template <typename T>
void rnn_bwd_rows(int64_t B, int64_t H, Mat<const T> DH, Mat<const T> HN, Mat<T> DP, bool relu) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using acc_t = acc_type<T>;
  constexpr int64_t K = IO::kSize;
  at::parallel_for(0, B, row_grain(8 * H), [&](int64_t begin, int64_t end) {
    const Vec one(1), zero(0);
    for (int64_t b = begin; b < end; ++b) {
      const T *d = DH.row(b), *h = HN.row(b);
      T* o = DP.row(b);
      int64_t j = 0;
      for (; j + K <= H; j += K) {
        const Vec g = IO::load(d + j), hv = IO::load(h + j);
        IO::store(o + j, relu ? Vec::blendv(zero, g, hv > zero) : g * (one - hv * hv));
      }
      for (; j < H; ++j) {
        const acc_t g = d[j], hv = h[j];
        o[j] = relu ? (hv > 0 ? g : acc_t(0)) : g * (1 - hv * hv);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// the cell ops (one time step)
// ---------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd(const at::Tensor& gates, const at::Tensor& c) {
  TORCH_CHECK(c.dim() == 2, "c must be 2-D (batch, hidden), got ", c.dim(), "-D");
  const int64_t B = c.size(0), H = c.size(1);
  check_gates(gates, B, 4 * H, "gates");
  check_gates(c, B, H, "c");
  TORCH_CHECK(gates.scalar_type() == c.scalar_type(), "gates and c must have the same dtype");
  auto h = empty({B, H}, c.options()), cn = empty({B, H}, c.options()), act = empty({B, 4 * H}, c.options());
  TRITIUM_DISPATCH_FLOATING(c.scalar_type(), "tritium_lstm_cell_fwd", [&] {
    lstm_fwd_rows<scalar_t>(B, H, cmat<scalar_t>(gates), cmat<scalar_t>(c), mmat<scalar_t>(h), mmat<scalar_t>(cn),
                            mmat<scalar_t>(act));
  });
  return {h, cn, act};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_bwd(const at::Tensor& dh, const at::Tensor& dc, const at::Tensor& act,
                                                 const at::Tensor& cn, const at::Tensor& c) {
  TORCH_CHECK(c.dim() == 2, "c must be 2-D (batch, hidden), got ", c.dim(), "-D");
  const int64_t B = c.size(0), H = c.size(1);
  check_gates(dh, B, H, "grad_h");
  check_gates(dc, B, H, "grad_c");
  check_gates(act, B, 4 * H, "act");
  check_gates(cn, B, H, "c_new");
  check_gates(c, B, H, "c");
  auto dgates = empty({B, 4 * H}, c.options()), dcp = empty({B, H}, c.options());
  TRITIUM_DISPATCH_FLOATING(c.scalar_type(), "tritium_lstm_cell_bwd", [&] {
    lstm_bwd_rows<scalar_t>(B, H, cmat<scalar_t>(dh), cmat<scalar_t>(dc), cmat<scalar_t>(act), cmat<scalar_t>(cn),
                            cmat<scalar_t>(c), mmat<scalar_t>(dgates), mmat<scalar_t>(dcp));
  });
  return {dgates, dcp};
}

std::tuple<at::Tensor, at::Tensor> gru_cell_fwd(const at::Tensor& xg, const at::Tensor& hg, const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 2, "h must be 2-D (batch, hidden), got ", h.dim(), "-D");
  const int64_t B = h.size(0), H = h.size(1);
  check_gates(xg, B, 3 * H, "input_gates");
  check_gates(hg, B, 3 * H, "hidden_gates");
  check_gates(h, B, H, "h");
  auto hn = empty({B, H}, h.options()), saved = empty({B, 4 * H}, h.options());
  TRITIUM_DISPATCH_FLOATING(h.scalar_type(), "tritium_gru_cell_fwd", [&] {
    gru_fwd_rows<scalar_t>(B, H, cmat<scalar_t>(xg), cmat<scalar_t>(hg), cmat<scalar_t>(h), mmat<scalar_t>(hn),
                           mmat<scalar_t>(saved));
  });
  return {hn, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_bwd(const at::Tensor& dh, const at::Tensor& saved,
                                                            const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 2, "h must be 2-D (batch, hidden), got ", h.dim(), "-D");
  const int64_t B = h.size(0), H = h.size(1);
  check_gates(dh, B, H, "grad_h");
  check_gates(saved, B, 4 * H, "saved");
  check_gates(h, B, H, "h");
  auto dx = empty({B, 3 * H}, h.options()), dq = empty({B, 3 * H}, h.options()), dhd = empty({B, H}, h.options());
  TRITIUM_DISPATCH_FLOATING(h.scalar_type(), "tritium_gru_cell_bwd", [&] {
    gru_bwd_rows<scalar_t>(B, H, cmat<scalar_t>(dh), cmat<scalar_t>(saved), cmat<scalar_t>(h),
                           Mat<const scalar_t>{nullptr, 0}, mmat<scalar_t>(dx), mmat<scalar_t>(dq),
                           mmat<scalar_t>(dhd));
  });
  return {dx, dq, dhd};
}

// ---------------------------------------------------------------------------------------------------------
// the scans: a whole layer-direction through time. Per step one matmul into a scratch buffer (StepWeight::mm, which
// also adds the precomputed input projection or the carried gradient) and one fused cell pass writing
// straight into the (T, B, .) outputs: no per-step allocation or copy.
// ---------------------------------------------------------------------------------------------------------
inline int64_t step_at(int64_t k, int64_t T, bool reverse) { return reverse ? T - 1 - k : k; }

// The recurrent weight of a scan, ready for its per-step products y (B, N) = x (B, K) @ w^T [+ c]: float/double
// pack w (N, K) once into column panels for panel_gemm (csrc/panel.h: register tiles with no reduction epilogue,
// and the packing paid once per scan instead of BLAS's repacking on every step's call); 16-bit keeps w for
// at::addmm (oneDNN's bf16 kernels).
template <typename T>
struct StepWeight {
  at::Tensor w, packed;  // w as given: the product is x @ w^T, or x @ w when transposed
  bool transposed;
  int64_t N, K;
  StepWeight(const at::Tensor& w_, bool transposed_)
      : w(w_.contiguous()), transposed(transposed_), N(w_.size(transposed_ ? 1 : 0)), K(w_.size(transposed_ ? 0 : 1)) {
    if constexpr (std::is_same_v<T, acc_type<T>>) {
      packed = at::empty({panel::packed_size<T>(N, K)}, w.options());
      if (transposed)  // w (K, N): its column panels, no transposed copy first
        panel::pack_cols<T>(w.const_data_ptr<T>(), N, K, N, packed.mutable_data_ptr<T>());
      else
        panel::pack<T>(w.const_data_ptr<T>(), K, N, K, packed.mutable_data_ptr<T>());
    }
  }
  // y = x @ w^T (x @ w when transposed) [+ c]; c null, (B, N) or a bias (N)
  void mm(at::Tensor& y, const at::Tensor& x, const at::Tensor* c) const {
    if constexpr (std::is_same_v<T, acc_type<T>>) {
      const T* cp = c ? c->const_data_ptr<T>() : nullptr;
      const int64_t ldc = c && c->dim() == 2 ? c->stride(0) : 0;
      panel_gemm<T>(x.const_data_ptr<T>(), x.stride(0), x.size(0), K, packed.const_data_ptr<T>(), N,
                    y.mutable_data_ptr<T>(), y.stride(0), cp, ldc);
    } else {
      const at::Tensor b = transposed ? w : w.t();
      if (c)
        at::addmm_out(y, *c, x, b);
      else
        at::mm_out(y, x, b);
    }
  }
};

void check_scan_input(const at::Tensor& xproj, int64_t G, const at::Tensor& w_hh, const at::Tensor& h0) {
  TORCH_CHECK(xproj.dim() == 3 && xproj.size(2) % G == 0, "xproj must be (T, B, ", G, "*H), got ", xproj.sizes());
  TORCH_CHECK(xproj.stride(2) == 1, "xproj must have a contiguous last dimension");
  const int64_t B = xproj.size(1), H = xproj.size(2) / G;
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == G * H && w_hh.size(1) == H, "w_hh must be (", G * H, ", ", H,
              "), got ", w_hh.sizes());
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == B && h0.size(1) == H, "h0 must be (", B, ", ", H, "), got ",
              h0.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_scan_fwd(const at::Tensor& xproj, const at::Tensor& w_hh,
                                                             const at::Tensor& h0, const at::Tensor& c0,
                                                             bool reverse) {
  check_scan_input(xproj, 4, w_hh, h0);
  const int64_t T = xproj.size(0), B = xproj.size(1), H = xproj.size(2) / 4;
  check_gates(c0, B, H, "c0");
  check_gates(h0, B, H, "h0");
  auto hs = empty({T, B, H}, xproj.options()), cs = empty({T, B, H}, xproj.options());
  auto acts = empty({T, B, 4 * H}, xproj.options());
  auto gates = at::empty({B, 4 * H}, xproj.options());
  TRITIUM_DISPATCH_FLOATING(xproj.scalar_type(), "tritium_lstm_scan_fwd", [&] {
    const StepWeight<scalar_t> w(w_hh, false);
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = step_at(k, T, reverse), tp = step_at(k - 1, T, reverse);
      const at::Tensor h_prev = k == 0 ? h0 : hs[tp], c_prev = k == 0 ? c0 : cs[tp];
      const at::Tensor xt = xproj[t];
      w.mm(gates, h_prev, &xt);  // (B, 4H) = xproj_t + h_{t-1} W_hh^T
      at::Tensor ht = hs[t], ct = cs[t], at_ = acts[t];
      lstm_fwd_rows<scalar_t>(B, H, cmat<scalar_t>(gates), cmat<scalar_t>(c_prev), mmat<scalar_t>(ht),
                              mmat<scalar_t>(ct), mmat<scalar_t>(at_));
    }
  });
  return {hs, cs, acts};
}

// dhs (T, B, H): the gradient reaching every step's output h_t (h_T's own gradient included); dcT (B, H).
// Returns dgates (T, B, 4H) (w.r.t. the pre-activations, i.e. w.r.t. xproj), dh0, dc0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_scan_bwd(const at::Tensor& dhs, const at::Tensor& dcT,
                                                             const at::Tensor& w_hh, const at::Tensor& h0,
                                                             const at::Tensor& c0, const at::Tensor& cs,
                                                             const at::Tensor& acts, bool reverse) {
  check_scan_input(acts, 4, w_hh, h0);
  const int64_t T = acts.size(0), B = acts.size(1), H = acts.size(2) / 4;
  TORCH_CHECK(dhs.dim() == 3 && dhs.size(0) == T && dhs.size(1) == B && dhs.size(2) == H && dhs.stride(2) == 1,
              "grad of the outputs must be (T, B, H) with a contiguous last dimension, got ", dhs.sizes());
  check_gates(dcT, B, H, "grad_c");
  auto dgates = empty({T, B, 4 * H}, acts.options());
  auto dc = dcT.clone(at::MemoryFormat::Contiguous);  // the carried dc, updated in place step by step
  auto dh = at::empty({B, H}, acts.options());
  auto dh0 = at::empty({B, H}, acts.options());
  TRITIUM_DISPATCH_FLOATING(acts.scalar_type(), "tritium_lstm_scan_bwd", [&] {
    const StepWeight<scalar_t> wt(w_hh, true);  // dG W_hh
    for (int64_t k = T - 1; k >= 0; --k) {
      const int64_t t = step_at(k, T, reverse), tp = step_at(k - 1, T, reverse);
      const at::Tensor c_prev = k == 0 ? c0 : cs[tp];
      const at::Tensor dh_in = k == T - 1 ? dhs[t] : dh;
      at::Tensor dg = dgates[t];
      lstm_bwd_rows<scalar_t>(B, H, cmat<scalar_t>(dh_in), cmat<scalar_t>(dc), cmat<scalar_t>(acts[t]),
                              cmat<scalar_t>(cs[t]), cmat<scalar_t>(c_prev), mmat<scalar_t>(dg),
                              mmat<scalar_t>(dc));
      if (k > 0) {
        const at::Tensor dprev = dhs[tp];
        wt.mm(dh, dg, &dprev);  // dh_{t-1} = its output's gradient + dG_t W_hh
      } else {
        wt.mm(dh0, dg, nullptr);
      }
    }
  });
  return {dgates, dh0, dc};
}

std::tuple<at::Tensor, at::Tensor> gru_scan_fwd(const at::Tensor& xproj, const at::Tensor& w_hh,
                                                const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                bool reverse) {
  check_scan_input(xproj, 3, w_hh, h0);
  const int64_t T = xproj.size(0), B = xproj.size(1), H = xproj.size(2) / 3;
  check_gates(h0, B, H, "h0");
  auto hs = empty({T, B, H}, xproj.options()), saved = empty({T, B, 4 * H}, xproj.options());
  auto q = at::empty({B, 3 * H}, xproj.options());
  const c10::optional<at::Tensor> bias = b_hh.has_value() ? c10::optional<at::Tensor>(b_hh->contiguous()) : c10::nullopt;
  TRITIUM_DISPATCH_FLOATING(xproj.scalar_type(), "tritium_gru_scan_fwd", [&] {
    const StepWeight<scalar_t> w(w_hh, false);
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = step_at(k, T, reverse), tp = step_at(k - 1, T, reverse);
      const at::Tensor h_prev = k == 0 ? h0 : hs[tp];
      w.mm(q, h_prev, bias ? &*bias : nullptr);  // (B, 3H) = h_{t-1} W_hh^T + b_hh
      at::Tensor ht = hs[t], st = saved[t];
      gru_fwd_rows<scalar_t>(B, H, cmat<scalar_t>(xproj[t]), cmat<scalar_t>(q), cmat<scalar_t>(h_prev),
                             mmat<scalar_t>(ht), mmat<scalar_t>(st));
    }
  });
  return {hs, saved};
}

// Returns dxproj (T, B, 3H), dq (T, B, 3H) (w.r.t. h W_hh^T + b_hh per step), dh0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_scan_bwd(const at::Tensor& dhs, const at::Tensor& w_hh,
                                                            const at::Tensor& h0, const at::Tensor& hs,
                                                            const at::Tensor& saved, bool reverse) {
  TORCH_CHECK(hs.dim() == 3 && saved.dim() == 3 && saved.size(2) == 4 * hs.size(2) && saved.stride(2) == 1,
              "hs must be (T, B, H) and saved (T, B, 4H), got ", hs.sizes(), " and ", saved.sizes());
  check_scan_input(dhs.new_empty({0, hs.size(1), 3 * hs.size(2)}), 3, w_hh, h0);
  const int64_t T = hs.size(0), B = hs.size(1), H = hs.size(2);
  TORCH_CHECK(dhs.dim() == 3 && dhs.size(0) == T && dhs.size(1) == B && dhs.size(2) == H && dhs.stride(2) == 1,
              "grad of the outputs must be (T, B, H) with a contiguous last dimension, got ", dhs.sizes());
  auto dx = empty({T, B, 3 * H}, hs.options()), dq = empty({T, B, 3 * H}, hs.options());
  auto dh = at::empty({B, H}, hs.options()), direct = at::empty({B, H}, hs.options());
  auto dh0 = at::empty({B, H}, hs.options());
  TRITIUM_DISPATCH_FLOATING(hs.scalar_type(), "tritium_gru_scan_bwd", [&] {
    const StepWeight<scalar_t> wt(w_hh, true);  // dQ W_hh
    for (int64_t k = T - 1; k >= 0; --k) {
      const int64_t t = step_at(k, T, reverse), tp = step_at(k - 1, T, reverse);
      const at::Tensor h_prev = k == 0 ? h0 : hs[tp];
      const at::Tensor dh_in = k == T - 1 ? dhs[t] : dh;
      at::Tensor dxt = dx[t], dqt = dq[t];
      Mat<const scalar_t> extra{nullptr, 0};
      if (k > 0) extra = cmat<scalar_t>(dhs[tp]);
      gru_bwd_rows<scalar_t>(B, H, cmat<scalar_t>(dh_in), cmat<scalar_t>(saved[t]), cmat<scalar_t>(h_prev), extra,
                             mmat<scalar_t>(dxt), mmat<scalar_t>(dqt), mmat<scalar_t>(direct));
      // dh_{t-1} = dh*z (+ its output's gradient) + dQ_t W_hh
      wt.mm(k > 0 ? dh : dh0, dqt, &direct);
    }
  });
  return {dx, dq, dh0};
}

// hs (T, B, H) of an Elman RNN layer-direction: xproj (T, B, H) = x W_ih^T + b_ih + b_hh, w_hh (H, H).
at::Tensor rnn_scan_fwd(const at::Tensor& xproj, const at::Tensor& w_hh, const at::Tensor& h0, bool reverse,
                        bool relu) {
  check_scan_input(xproj, 1, w_hh, h0);
  const int64_t T = xproj.size(0), B = xproj.size(1), H = xproj.size(2);
  check_gates(h0, B, H, "h0");
  auto hs = empty({T, B, H}, xproj.options());
  TRITIUM_DISPATCH_FLOATING(xproj.scalar_type(), "tritium_rnn_scan_fwd", [&] {
    const StepWeight<scalar_t> w(w_hh, false);
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = step_at(k, T, reverse), tp = step_at(k - 1, T, reverse);
      const at::Tensor h_prev = k == 0 ? h0 : hs[tp];
      const at::Tensor xt = xproj[t];
      at::Tensor ht = hs[t];
      w.mm(ht, h_prev, &xt);  // the pre-activation xproj_t + h_{t-1} W_hh^T, straight into h_t
      rnn_act_rows<scalar_t>(B, H, mmat<scalar_t>(ht), relu);
    }
  });
  return hs;
}

// Returns dpre (T, B, H) (w.r.t. the pre-activations, i.e. w.r.t. xproj) and dh0.
std::tuple<at::Tensor, at::Tensor> rnn_scan_bwd(const at::Tensor& dhs, const at::Tensor& w_hh, const at::Tensor& h0,
                                                const at::Tensor& hs, bool reverse, bool relu) {
  TORCH_CHECK(hs.dim() == 3 && hs.stride(2) == 1, "hs must be (T, B, H) with a contiguous last dimension, got ",
              hs.sizes());
  check_scan_input(hs, 1, w_hh, h0);
  const int64_t T = hs.size(0), B = hs.size(1), H = hs.size(2);
  TORCH_CHECK(dhs.dim() == 3 && dhs.size(0) == T && dhs.size(1) == B && dhs.size(2) == H && dhs.stride(2) == 1,
              "grad of the outputs must be (T, B, H) with a contiguous last dimension, got ", dhs.sizes());
  auto dpre = empty({T, B, H}, hs.options());
  auto dh = at::empty({B, H}, hs.options()), dh0 = at::empty({B, H}, hs.options());
  TRITIUM_DISPATCH_FLOATING(hs.scalar_type(), "tritium_rnn_scan_bwd", [&] {
    const StepWeight<scalar_t> wt(w_hh, true);  // dP W_hh
    for (int64_t k = T - 1; k >= 0; --k) {
      const int64_t t = step_at(k, T, reverse), tp = step_at(k - 1, T, reverse);
      const at::Tensor dh_in = k == T - 1 ? dhs[t] : dh;
      at::Tensor dp = dpre[t];
      rnn_bwd_rows<scalar_t>(B, H, cmat<scalar_t>(dh_in), cmat<scalar_t>(hs[t]), mmat<scalar_t>(dp), relu);
      if (k > 0) {
        const at::Tensor dprev = dhs[tp];
        wt.mm(dh, dp, &dprev);  // dh_{t-1} = its output's gradient + dP_t W_hh
      } else {
        wt.mm(dh0, dp, nullptr);
      }
    }
  });
  return {dpre, dh0};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("lstm_cell_fwd", &lstm_cell_fwd);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd);
  m.impl("gru_cell_fwd", &gru_cell_fwd);
  m.impl("gru_cell_bwd", &gru_cell_bwd);
  m.impl("lstm_scan_fwd", &lstm_scan_fwd);
  m.impl("lstm_scan_bwd", &lstm_scan_bwd);
  m.impl("gru_scan_fwd", &gru_scan_fwd);
  m.impl("gru_scan_bwd", &gru_scan_bwd);
  m.impl("rnn_scan_fwd", &rnn_scan_fwd);
  m.impl("rnn_scan_bwd", &rnn_scan_bwd);
}

}  // namespace tritium
