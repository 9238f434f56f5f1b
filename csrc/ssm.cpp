// Mamba's selective scan on the CPU: forward, backward and the decoding step, registered for the schemas that
// python/tritium/ops/ssm.py defines (the math is there and in tritium.reference.selective_scan):
//
//   dt_t = softplus(delta_t + bias);  x_t = exp(dt_t A) x_{t-1} + dt_t u_t B_t;  y_t = <x_t, C_t> + D u_t;
//   out_t = y_t silu(z_t)
//
// Vectorised across channels: a work item is one batch entry and blocks of W = Vec::size() consecutive channels
// (the lanes), so B_t[n] and C_t[n], shared by the channels of a group, are broadcast scalars and y_t needs no
// horizontal sum. The sequences are (batch, dim, L) with L contiguous: each chunk of K steps is transposed into
// (K, W) tiles first (and B, C of the chunk into (K, N)), an O(K W) copy beside the O(K W N) recurrence. A block
// whose lanes span two groups (dim / G not a multiple of W) reads B and C per lane from (K, N, W) tiles instead.
//
// The forward writes the state every K steps (`states`); the backward recomputes a chunk's states and exp(dt A)
// from the state before it into (K, N, W) buffers (L1/L2-sized), then runs the adjoint through the chunk in
// reverse:  g_t = dout_t silu(z_t);  h_t = C_t g_t + exp(dt_{t+1} A) h_{t+1};  dB, dC sum h_t dt_t u_t and
// g_t x_t over the group's channels (lane sums per chunk into per-item partials: no races), dA, dD and the bias
// gradient sum over time per channel (per batch partials, summed at the end).
#include "vec.h"

namespace tritium {
namespace {

template <typename T>
struct Seq {  // a (batch, dim, L) operand with a unit L stride
  const T* p;
  int64_t sb, sd;
  const T* at(int64_t b, int64_t d) const { return p + b * sb + d * sd; }
};
template <typename T>
Seq<T> seq(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return {nullptr, 0, 0};
  return {t->const_data_ptr<T>(), t->stride(0), t->stride(1)};
}

template <typename T>
struct Scan {
  using A_t = acc_type<T>;
  using V = Vectorized<A_t>;
  static constexpr int64_t W = V::size();
  int64_t batch, dim, L, N, G, K, nchunks, dg;
  Seq<T> u, delta, z;
  const A_t *A, *B, *C, *D, *bias;
  bool softplus;

  int64_t group(int64_t d) const { return d / dg; }
  // all lanes of the block at d0 are channels of one group
  bool uniform(int64_t d0) const { return d0 + W <= dim && group(d0) == group(d0 + W - 1); }

  // tile[j * W + w] = s(b, d0 + w)[t0 + j] for j < k (zero lanes past dim)
  template <typename S>
  void load_tile(A_t* tile, const Seq<S>& s, int64_t b, int64_t d0, int64_t t0, int64_t k) const {
    for (int64_t w = 0; w < W; ++w) {
      const int64_t d = d0 + w;
      if (d < dim) {
        const S* p = s.at(b, d) + t0;
        for (int64_t j = 0; j < k; ++j) tile[j * W + w] = static_cast<A_t>(p[j]);
      } else {
        for (int64_t j = 0; j < k; ++j) tile[j * W + w] = A_t(0);
      }
    }
  }
  // out(b, d0 + w)[t0 + j] = tile[j * W + w] for the block's channels
  void store_tile(T* out, int64_t b, int64_t d0, int64_t t0, int64_t k, const A_t* tile) const {
    for (int64_t w = 0; w < W && d0 + w < dim; ++w) {
      T* p = out + (b * dim + d0 + w) * L + t0;
      for (int64_t j = 0; j < k; ++j) p[j] = static_cast<T>(tile[j * W + w]);
    }
  }
  // pre = delta + bias and dt = softplus(pre) (or pre) tiles of a chunk
  void dt_tiles(A_t* pre, A_t* dt, int64_t b, int64_t d0, int64_t t0, int64_t k) const {
    load_tile(pre, delta, b, d0, t0, k);
    alignas(64) A_t bl[W] = {};
    if (bias)
      for (int64_t w = 0; w < W && d0 + w < dim; ++w) bl[w] = bias[d0 + w];
    const V bv = V::loadu(bl);
    for (int64_t j = 0; j < k; ++j) {
      V x = V::loadu(pre + j * W) + bv;
      x.store(pre + j * W);
      if (softplus) x = V::blendv(tritium::softplus(x), x, x > V(A_t(20)));
      x.store(dt + j * W);
    }
  }
  // lanes of a per-channel parameter p (dim, N) at n: out[n * W + w] = p[(d0 + w) * N + n]
  void lanes(A_t* out, const A_t* p, int64_t d0) const {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t w = 0; w < W; ++w) out[n * W + w] = d0 + w < dim ? p[(d0 + w) * N + n] : A_t(0);
  }
  V lanes1(const A_t* p, int64_t d0) const {  // a (dim,) parameter's lanes (zeros when absent)
    alignas(64) A_t l[W] = {};
    if (p)
      for (int64_t w = 0; w < W && d0 + w < dim; ++w) l[w] = p[d0 + w];
    return V::loadu(l);
  }
  // B or C of a chunk: uniform blocks (K, N) scalars of the block's group, else (K, N, W) lanes
  void bc_tile(A_t* tile, const A_t* p, bool uni, int64_t b, int64_t d0, int64_t t0, int64_t k) const {
    if (uni) {
      const A_t* s = p + (b * G + group(d0)) * N * L + t0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < k; ++j) tile[j * N + n] = s[n * L + j];
      return;
    }
    for (int64_t w = 0; w < W; ++w) {
      const bool on = d0 + w < dim;
      const A_t* s = on ? p + (b * G + group(d0 + w)) * N * L + t0 : nullptr;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < k; ++j) tile[(j * N + n) * W + w] = on ? s[n * L + j] : A_t(0);
    }
  }
  template <bool Uni>
  static V bc(const A_t* tile, int64_t N, int64_t j, int64_t n) {
    if constexpr (Uni) return V(tile[j * N + n]);
    return V::loadu(tile + (j * N + n) * W);
  }
};

// The recurrence through one chunk (k steps) for the states [n0, n0 + R) of a block, those R states in registers
// across the steps (independent chains; the loop over all N states per step would serialise on y's sum):
// h_n = exp(dt A_n) h_n + dt u B_n; y_j += sum_n h_n C_n (into the y tile). Record: also keep every step's states
// and decays (the backward's recompute), in (k, N, W) buffers.
template <typename T, int R, bool Uni, bool Record>
inline void chunk_states(const Scan<T>& s, int64_t n0, int64_t k, const acc_type<T>* dt, const acc_type<T>* dtu,
                         const acc_type<T>* bt, const acc_type<T>* ct, const acc_type<T>* al, acc_type<T>* h,
                         acc_type<T>* yb, acc_type<T>* hs, acc_type<T>* es) {
  using V = typename Scan<T>::V;
  constexpr int64_t W = Scan<T>::W;
  const int64_t N = s.N, NW = N * W;
  V hv[R], av[R];
  for (int r = 0; r < R; ++r) {
    hv[r] = V::loadu(h + (n0 + r) * W);
    av[r] = V::loadu(al + (n0 + r) * W);
  }
  for (int64_t j = 0; j < k; ++j) {
    const V dtv = V::loadu(dt + j * W), x = V::loadu(dtu + j * W);
    V y[R];
    for (int r = 0; r < R; ++r) {
      const V e = fexp(dtv * av[r]);
      hv[r] = at::vec::fmadd(e, hv[r], x * Scan<T>::template bc<Uni>(bt, N, j, n0 + r));
      y[r] = hv[r] * Scan<T>::template bc<Uni>(ct, N, j, n0 + r);
      if constexpr (Record) {
        e.store(es + j * NW + (n0 + r) * W);
        hv[r].store(hs + j * NW + (n0 + r) * W);
      }
    }
    for (int r = 1; r < R; ++r) y[0] = y[0] + y[r];
    (V::loadu(yb + j * W) + y[0]).store(yb + j * W);
  }
  for (int r = 0; r < R; ++r) hv[r].store(h + (n0 + r) * W);
}

// The adjoint through one chunk, in reverse, for the states [n0, n0 + R) (their adjoints and dA sums in
// registers): with g_j the output's gradient and dh the state adjoint carried from step j + 1,
//   dh_n += C_n g;  dC_n += g x_n;  dB_n += dh_n dt u;  q = dh_n exp(dt A_n) x_{j-1,n};  dA_n += q dt;
//   ddt += q A_n + dh_n B_n u;  du += dh_n B_n dt;  dh_n *= exp(dt A_n)
// ddt and du add into their tiles; dB and dC into the lane sums accB, accC (k, N) vectors.
template <typename T, int R, bool Uni>
inline void chunk_adjoint(const Scan<T>& s, int64_t n0, int64_t k, const acc_type<T>* dt, const acc_type<T>* ub,
                          const acc_type<T>* gb, const acc_type<T>* bt, const acc_type<T>* ct, const acc_type<T>* al,
                          const acc_type<T>* hs, const acc_type<T>* es, const acc_type<T>* h0, acc_type<T>* dh,
                          acc_type<T>* dAs, acc_type<T>* ddb, acc_type<T>* dub, typename Scan<T>::V* accB,
                          typename Scan<T>::V* accC) {
  using V = typename Scan<T>::V;
  constexpr int64_t W = Scan<T>::W;
  const int64_t N = s.N, NW = N * W;
  V dhv[R], av[R], dav[R];
  for (int r = 0; r < R; ++r) {
    dhv[r] = V::loadu(dh + (n0 + r) * W);
    av[r] = V::loadu(al + (n0 + r) * W);
    dav[r] = V::loadu(dAs + (n0 + r) * W);
  }
  for (int64_t j = k - 1; j >= 0; --j) {
    const V dtv = V::loadu(dt + j * W), uv = V::loadu(ub + j * W), gv = V::loadu(gb + j * W), dtu = dtv * uv;
    const acc_type<T>* hp = j > 0 ? hs + (j - 1) * NW : h0;
    V ddt(0), du(0);
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r;
      const V bv = Scan<T>::template bc<Uni>(bt, N, j, n);
      const V dhn = at::vec::fmadd(Scan<T>::template bc<Uni>(ct, N, j, n), gv, dhv[r]);
      const V e = V::loadu(es + j * NW + n * W);
      accC[j * N + n] = at::vec::fmadd(gv, V::loadu(hs + j * NW + n * W), accC[j * N + n]);
      accB[j * N + n] = at::vec::fmadd(dhn, dtu, accB[j * N + n]);
      const V q = dhn * e * V::loadu(hp + n * W);
      dav[r] = at::vec::fmadd(q, dtv, dav[r]);
      const V dhb = dhn * bv;
      ddt = at::vec::fmadd(q, av[r], at::vec::fmadd(dhb, uv, ddt));
      du = at::vec::fmadd(dhb, dtv, du);
      dhv[r] = dhn * e;
    }
    (V::loadu(ddb + j * W) + ddt).store(ddb + j * W);
    (V::loadu(dub + j * W) + du).store(dub + j * W);
  }
  for (int r = 0; r < R; ++r) {
    dhv[r].store(dh + (n0 + r) * W);
    dav[r].store(dAs + (n0 + r) * W);
  }
}

// f.template operator()<R>() for the state blocks of 4 (the last one 1..4): one register block per call
template <typename F>
inline void state_blocks(int64_t N, F&& f) {
  for (int64_t n0 = 0; n0 < N; n0 += 4) {
    switch (std::min<int64_t>(4, N - n0)) {
      case 4: f.template operator()<4>(n0); break;
      case 3: f.template operator()<3>(n0); break;
      case 2: f.template operator()<2>(n0); break;
      default: f.template operator()<1>(n0); break;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// forward: one item = (batch entry, channel block); the state stays in a (N, W) buffer across the chunks
// ---------------------------------------------------------------------------------------------------------
template <typename T>
void scan_fwd_item(const Scan<T>& s, int64_t b, int64_t d0, T* out, acc_type<T>* states, std::vector<acc_type<T>>& buf) {
  using A_t = acc_type<T>;
  using V = typename Scan<T>::V;
  constexpr int64_t W = Scan<T>::W;
  const int64_t K = s.K, N = s.N;
  const bool uni = s.uniform(d0);
  const int64_t bcn = uni ? K * N : K * N * W;
  buf.assign(6 * K * W + 2 * N * W + 2 * bcn, A_t(0));
  A_t *pre = buf.data(), *dt = pre + K * W, *ub = dt + K * W, *zb = ub + K * W, *yb = zb + K * W, *dtu = yb + K * W;
  A_t *h = dtu + K * W, *al = h + N * W, *bt = al + N * W, *ct = bt + bcn;
  s.lanes(al, s.A, d0);
  const V dv = s.lanes1(s.D, d0);
  for (int64_t c = 0; c < s.nchunks; ++c) {
    const int64_t t0 = c * K, k = std::min(K, s.L - t0);
    s.dt_tiles(pre, dt, b, d0, t0, k);
    s.load_tile(ub, s.u, b, d0, t0, k);
    if (s.z.p) s.load_tile(zb, s.z, b, d0, t0, k);
    s.bc_tile(bt, s.B, uni, b, d0, t0, k);
    s.bc_tile(ct, s.C, uni, b, d0, t0, k);
    for (int64_t j = 0; j < k; ++j) {
      const V uv = V::loadu(ub + j * W);
      (V::loadu(dt + j * W) * uv).store(dtu + j * W);
      (s.D ? dv * uv : V(0)).store(yb + j * W);
    }
    state_blocks(N, [&]<int R>(int64_t n0) {
      if (uni) chunk_states<T, R, true, false>(s, n0, k, dt, dtu, bt, ct, al, h, yb, nullptr, nullptr);
      else chunk_states<T, R, false, false>(s, n0, k, dt, dtu, bt, ct, al, h, yb, nullptr, nullptr);
    });
    if (s.z.p) {
      for (int64_t j = 0; j < k; ++j) {
        const V zv = V::loadu(zb + j * W);
        (V::loadu(yb + j * W) * zv * fsigmoid(zv)).store(yb + j * W);
      }
    }
    s.store_tile(out, b, d0, t0, k, yb);
    for (int64_t w = 0; w < W && d0 + w < s.dim; ++w)
      for (int64_t n = 0; n < N; ++n) states[((b * s.dim + d0 + w) * s.nchunks + c) * N + n] = h[n * W + w];
  }
}

template <typename T>
Scan<T> make_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                  const c10::optional<at::Tensor>& bias, bool softplus, int64_t chunk) {
  using A_t = acc_type<T>;
  Scan<T> s;
  s.batch = u.size(0), s.dim = u.size(1), s.L = u.size(2), s.N = A.size(1), s.G = B.size(1), s.K = chunk;
  s.nchunks = (s.L + chunk - 1) / chunk, s.dg = s.dim / s.G;
  s.u = seq<T>(u), s.delta = seq<T>(delta), s.z = seq<T>(z);
  s.A = A.const_data_ptr<A_t>(), s.B = B.const_data_ptr<A_t>(), s.C = C.const_data_ptr<A_t>();
  s.D = D ? D->const_data_ptr<A_t>() : nullptr, s.bias = bias ? bias->const_data_ptr<A_t>() : nullptr;
  s.softplus = softplus;
  return s;
}

void check_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                const c10::optional<at::Tensor>& bias, int64_t chunk) {
  TORCH_CHECK(u.dim() == 3 && u.stride(2) == 1, "u must be (batch, dim, L) with a unit L stride, got ", u.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  TORCH_CHECK(delta.sizes() == u.sizes() && delta.stride(2) == 1 && delta.scalar_type() == u.scalar_type(),
              "delta must be like u ", u.sizes(), ", got ", delta.sizes(), " ", delta.scalar_type());
  const auto acc = at::toOpMathType(u.scalar_type());
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim && A.is_contiguous() && A.scalar_type() == acc,
              "A must be a contiguous (", dim, ", N) ", acc, " tensor, got ", A.sizes(), " ", A.scalar_type());
  const int64_t N = A.size(1);
  for (const auto* p : {&B, &C})
    TORCH_CHECK(p->dim() == 4 && p->size(0) == batch && p->size(1) > 0 && dim % p->size(1) == 0 &&
                    p->size(2) == N && p->size(3) == L && p->is_contiguous() && p->scalar_type() == acc,
                "B and C must be contiguous (", batch, ", G, ", N, ", ", L, ") ", acc, " tensors with dim % G == 0, got ",
                p->sizes(), " ", p->scalar_type());
  TORCH_CHECK(B.size(1) == C.size(1), "B and C must have the same groups");
  for (const auto* p : {&D, &bias})
    if (p->has_value())
      TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == dim && (*p)->is_contiguous() && (*p)->scalar_type() == acc,
                  "D and delta_bias must be contiguous (", dim, ",) ", acc, " tensors, got ", (*p)->sizes());
  if (z) TORCH_CHECK(z->sizes() == u.sizes() && z->stride(2) == 1 && z->scalar_type() == u.scalar_type(),
                     "z must be like u ", u.sizes(), ", got ", z->sizes());
  TORCH_CHECK(chunk > 0, "chunk must be positive, got ", chunk);
}

std::tuple<at::Tensor, at::Tensor> selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta,
                                                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                                      const c10::optional<at::Tensor>& D,
                                                      const c10::optional<at::Tensor>& z,
                                                      const c10::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                                      int64_t chunk) {
  check_scan(u, delta, A, B, C, D, z, delta_bias, chunk);
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  auto out = at::empty({batch, dim, L}, u.options());
  auto states = at::empty({batch, dim, (L + chunk - 1) / chunk, N}, A.options());
  TRITIUM_DISPATCH_FLOATING(u.scalar_type(), "tritium_selective_scan_fwd", [&] {
    const auto s = make_scan<scalar_t>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk);
    const int64_t nblk = (dim + Scan<scalar_t>::W - 1) / Scan<scalar_t>::W;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    auto* st = states.mutable_data_ptr<acc_type<scalar_t>>();
    at::parallel_for(0, batch * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_type<scalar_t>> buf;
      for (int64_t i = begin; i < end; ++i)
        scan_fwd_item(s, i / nblk, (i % nblk) * Scan<scalar_t>::W, o, st, buf);
    });
  });
  return {out, states};
}

// ---------------------------------------------------------------------------------------------------------
// backward: one item = (batch entry, a range of channel blocks); chunks in reverse, the item's blocks inside,
// each block's adjoint state and dA sums carried across chunks
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct Grads {
  using A_t = acc_type<T>;
  Seq<T> dout;
  const A_t *states, *dlast;
  T *du, *ddelta, *dz;
  A_t *dA_part, *dD_part, *db_part, *dB_part, *dC_part;  // (batch, dim, N), (batch, dim) x2, (S, batch, G, N, L) x2
};

template <typename T>
void scan_bwd_item(const Scan<T>& s, const Grads<T>& g, int64_t b, int64_t split, int64_t blk0, int64_t blk1) {
  using A_t = acc_type<T>;
  using V = typename Scan<T>::V;
  constexpr int64_t W = Scan<T>::W;
  const int64_t K = s.K, N = s.N, L = s.L, nb = blk1 - blk0, NW = N * W;
  std::vector<A_t> carry(nb * (2 * NW + 2 * W), A_t(0));  // per block: dh, dA sums, dD sums, bias-grad sums
  std::vector<A_t> buf(9 * K * W + 3 * NW + 4 * K * NW, A_t(0));
  A_t *pre = buf.data(), *dt = pre + K * W, *ub = dt + K * W, *zb = ub + K * W, *yb = zb + K * W;
  A_t *gb = yb + K * W, *dub = gb + K * W, *ddb = dub + K * W, *dtu = ddb + K * W;
  A_t *al = dtu + K * W, *h0 = al + NW, *hrun = h0 + NW;
  A_t *hs = hrun + NW, *es = hs + K * NW, *bt = es + K * NW, *ct = bt + K * NW;
  std::vector<V> accB(K * N), accC(K * N);
  A_t* dB_item = g.dB_part + (split * s.batch + b) * s.G * N * L;
  A_t* dC_item = g.dC_part + (split * s.batch + b) * s.G * N * L;
  int64_t acc_group = -1;  // the group whose lane sums accB/accC hold (-1: none)
  int64_t t0 = 0, k = 0;
  auto flush = [&]() {
    if (acc_group < 0) return;
    A_t* pb = dB_item + acc_group * N * L + t0;
    A_t* pc = dC_item + acc_group * N * L + t0;
    for (int64_t j = 0; j < k; ++j)
      for (int64_t n = 0; n < N; ++n) {
        pb[n * L + j] += hsum(accB[j * N + n]);
        pc[n * L + j] += hsum(accC[j * N + n]);
        accB[j * N + n] = V(0);
        accC[j * N + n] = V(0);
      }
    acc_group = -1;
  };
  for (int64_t i = 0; i < nb; ++i) {  // the adjoint state starts at dlast
    const int64_t d0 = (blk0 + i) * W;
    if (g.dlast) s.lanes(carry.data() + i * (2 * NW + 2 * W), g.dlast + b * s.dim * N, d0);
  }
  for (auto& v : accB) v = V(0);
  for (auto& v : accC) v = V(0);
  for (int64_t c = s.nchunks - 1; c >= 0; --c) {
    t0 = c * K, k = std::min(K, L - t0);
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t d0 = (blk0 + i) * W;
      A_t *dh = carry.data() + i * (2 * NW + 2 * W), *dAs = dh + NW, *dDs = dAs + NW, *dbs = dDs + W;
      const bool uni = s.uniform(d0);
      s.lanes(al, s.A, d0);
      if (c > 0) {
        for (int64_t w = 0; w < W; ++w)
          for (int64_t n = 0; n < N; ++n)
            h0[n * W + w] = d0 + w < s.dim ? g.states[((b * s.dim + d0 + w) * s.nchunks + c - 1) * N + n] : A_t(0);
      } else {
        std::fill(h0, h0 + NW, A_t(0));
      }
      s.dt_tiles(pre, dt, b, d0, t0, k);
      s.load_tile(ub, s.u, b, d0, t0, k);
      s.load_tile(gb, g.dout, b, d0, t0, k);
      if (s.z.p) s.load_tile(zb, s.z, b, d0, t0, k);
      s.bc_tile(bt, s.B, uni, b, d0, t0, k);
      s.bc_tile(ct, s.C, uni, b, d0, t0, k);
      const V dv = s.lanes1(s.D, d0);
      // recompute the chunk's states x_t, exp(dt_t A) and the pre-gate outputs y_t
      std::copy(h0, h0 + NW, hrun);
      for (int64_t j = 0; j < k; ++j) {
        const V uv = V::loadu(ub + j * W);
        (V::loadu(dt + j * W) * uv).store(dtu + j * W);
        (s.D ? dv * uv : V(0)).store(yb + j * W);
      }
      state_blocks(N, [&]<int R>(int64_t n0) {
        if (uni) chunk_states<T, R, true, true>(s, n0, k, dt, dtu, bt, ct, al, hrun, yb, hs, es);
        else chunk_states<T, R, false, true>(s, n0, k, dt, dtu, bt, ct, al, hrun, yb, hs, es);
      });
      // a block in another group than the pending sums, or spanning groups: flush the sums first
      if (!uni || s.group(d0) != acc_group) flush();
      V dDv = V::loadu(dDs), dbv = V::loadu(dbs);
      for (int64_t j = 0; j < k; ++j) {  // the output's gradient g (and dz), du's D term, ddt from zero
        V gv = V::loadu(gb + j * W);
        const V uv = V::loadu(ub + j * W);
        if (s.z.p) {  // out = y silu(z): dz = dout y sig (1 + z (1 - sig)); g = dout silu(z)
          const V zv = V::loadu(zb + j * W), sg = fsigmoid(zv);
          (gv * V::loadu(yb + j * W) * sg * at::vec::fmadd(zv, V(1) - sg, V(1))).store(zb + j * W);
          gv = gv * zv * sg;
          gv.store(gb + j * W);
        }
        if (s.D) dDv = at::vec::fmadd(gv, uv, dDv);
        (s.D ? dv * gv : V(0)).store(dub + j * W);
        V(0).store(ddb + j * W);
      }
      state_blocks(N, [&]<int R>(int64_t n0) {
        if (uni) chunk_adjoint<T, R, true>(s, n0, k, dt, ub, gb, bt, ct, al, hs, es, h0, dh, dAs, ddb, dub,
                                           accB.data(), accC.data());
        else chunk_adjoint<T, R, false>(s, n0, k, dt, ub, gb, bt, ct, al, hs, es, h0, dh, dAs, ddb, dub,
                                        accB.data(), accC.data());
      });
      for (int64_t j = 0; j < k; ++j) {
        V ddt = V::loadu(ddb + j * W);
        if (s.softplus) {  // d softplus(x) = sigmoid(x) (1 above the threshold 20)
          const V x = V::loadu(pre + j * W);
          ddt = V::blendv(ddt * fsigmoid(x), ddt, x > V(A_t(20)));
          ddt.store(ddb + j * W);
        }
        dbv = dbv + ddt;
      }
      dDv.store(dDs);
      dbv.store(dbs);
      s.store_tile(g.du, b, d0, t0, k, dub);
      s.store_tile(g.ddelta, b, d0, t0, k, ddb);
      if (s.z.p) s.store_tile(g.dz, b, d0, t0, k, zb);
      if (uni) {
        acc_group = s.group(d0);
      } else {  // lanes of several groups: each lane's sums go to its own group's row now
        for (int64_t j = 0; j < k; ++j)
          for (int64_t n = 0; n < N; ++n) {
            alignas(64) A_t lb[W], lc[W];
            accB[j * N + n].store(lb);
            accC[j * N + n].store(lc);
            for (int64_t w = 0; w < W && d0 + w < s.dim; ++w) {
              const int64_t gw = s.group(d0 + w);
              dB_item[(gw * N + n) * L + t0 + j] += lb[w];
              dC_item[(gw * N + n) * L + t0 + j] += lc[w];
            }
          }
        for (auto& v : accB) v = V(0);
        for (auto& v : accC) v = V(0);
      }
    }
    flush();
  }
  for (int64_t i = 0; i < nb; ++i) {  // the per-channel sums of this batch entry
    const int64_t d0 = (blk0 + i) * W;
    const A_t *dAs = carry.data() + i * (2 * NW + 2 * W) + NW, *dDs = dAs + NW, *dbs = dDs + W;
    for (int64_t w = 0; w < W && d0 + w < s.dim; ++w) {
      for (int64_t n = 0; n < N; ++n) g.dA_part[(b * s.dim + d0 + w) * N + n] = dAs[n * W + w];
      g.dD_part[b * s.dim + d0 + w] = dDs[w];
      g.db_part[b * s.dim + d0 + w] = dbs[w];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                   const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                   const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                   bool delta_softplus, int64_t chunk, const at::Tensor& states,
                   const c10::optional<at::Tensor>& dlast) {
  check_scan(u, delta, A, B, C, D, z, delta_bias, chunk);
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1), G = B.size(1);
  const int64_t nchunks = (L + chunk - 1) / chunk;
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.stride(2) == 1 && dout.scalar_type() == u.scalar_type(),
              "dout must be like u ", u.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(states.sizes() == at::IntArrayRef({batch, dim, nchunks, N}) && states.is_contiguous() &&
                  states.scalar_type() == A.scalar_type(),
              "states must be the forward's (", batch, ", ", dim, ", ", nchunks, ", ", N, "), got ", states.sizes());
  if (dlast)
    TORCH_CHECK(dlast->sizes() == at::IntArrayRef({batch, dim, N}) && dlast->is_contiguous() &&
                    dlast->scalar_type() == A.scalar_type(),
                "dlast must be a contiguous (", batch, ", ", dim, ", ", N, ") tensor, got ", dlast->sizes());
  auto du = at::empty({batch, dim, L}, u.options()), ddelta = at::empty({batch, dim, L}, u.options());
  auto dz = z ? at::empty({batch, dim, L}, u.options()) : at::empty({0}, u.options());
  auto fo = A.options();
  auto dA_part = at::empty({batch, dim, N}, fo), dD_part = at::empty({batch, dim}, fo);
  auto db_part = at::empty({batch, dim}, fo);
  at::Tensor dB_part, dC_part;
  TRITIUM_DISPATCH_FLOATING(u.scalar_type(), "tritium_selective_scan_bwd", [&] {
    using A_t = acc_type<scalar_t>;
    constexpr int64_t W = Scan<scalar_t>::W;
    const int64_t nblk = (dim + W - 1) / W;
    // splits of the channel blocks per batch entry: enough items for every thread (each split its own dB, dC)
    const int64_t S = std::min(nblk, std::max<int64_t>(1, (2 * at::get_num_threads() + batch - 1) / batch));
    dB_part = at::zeros({S, batch, G, N, L}, fo);
    dC_part = at::zeros({S, batch, G, N, L}, fo);
    const auto s = make_scan<scalar_t>(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk);
    Grads<scalar_t> g{seq<scalar_t>(dout), states.const_data_ptr<A_t>(),
                      dlast ? dlast->const_data_ptr<A_t>() : nullptr, du.mutable_data_ptr<scalar_t>(),
                      ddelta.mutable_data_ptr<scalar_t>(), z ? dz.mutable_data_ptr<scalar_t>() : nullptr,
                      dA_part.mutable_data_ptr<A_t>(), dD_part.mutable_data_ptr<A_t>(), db_part.mutable_data_ptr<A_t>(),
                      dB_part.mutable_data_ptr<A_t>(), dC_part.mutable_data_ptr<A_t>()};
    at::parallel_for(0, batch * S, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / S, sp = i % S;
        scan_bwd_item(s, g, b, sp, nblk * sp / S, nblk * (sp + 1) / S);
      }
    });
  });
  auto dB = dB_part.size(0) == 1 ? dB_part[0] : dB_part.sum(0);
  auto dC = dC_part.size(0) == 1 ? dC_part[0] : dC_part.sum(0);
  auto dD = D ? dD_part.sum(0) : at::empty({0}, fo);
  auto dbias = delta_bias ? db_part.sum(0) : at::empty({0}, fo);
  return {du, ddelta, dA_part.sum(0), dB, dC, dD, dz, dbias};
}

// ---------------------------------------------------------------------------------------------------------
// the decoding step: one (batch, channel) row of the state per task, vectorised over the state's N
// ---------------------------------------------------------------------------------------------------------
at::Tensor selective_state_update(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                  const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                  const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& dt_bias,
                                  bool dt_softplus) {
  TORCH_CHECK(x.dim() == 2, "x must be (batch, dim), got ", x.sizes());
  const int64_t batch = x.size(0), dim = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim && A.is_contiguous() && A.scalar_type() == acc,
              "A must be a contiguous (", dim, ", N) ", acc, " tensor, got ", A.sizes());
  const int64_t N = A.size(1);
  TORCH_CHECK(state.dim() == 3 && state.size(0) == batch && state.size(1) == dim && state.size(2) == N &&
                  (state.stride(2) == 1 || N == 1) && state.scalar_type() == acc,
              "state must be (", batch, ", ", dim, ", ", N, ") ", acc, " with a unit last stride, got ", state.sizes(),
              " ", state.scalar_type());
  TORCH_CHECK(dt.sizes() == x.sizes() && dt.scalar_type() == x.scalar_type(), "dt must be like x, got ", dt.sizes());
  if (z) TORCH_CHECK(z->sizes() == x.sizes() && z->scalar_type() == x.scalar_type(), "z must be like x, got ", z->sizes());
  for (const auto* p : {&B, &C})
    TORCH_CHECK(p->dim() == 3 && p->size(0) == batch && p->size(1) > 0 && dim % p->size(1) == 0 && p->size(2) == N &&
                    p->is_contiguous() && p->scalar_type() == acc,
                "B and C must be contiguous (", batch, ", G, ", N, ") ", acc, " tensors, got ", p->sizes());
  TORCH_CHECK(B.size(1) == C.size(1), "B and C must have the same groups");
  for (const auto* p : {&D, &dt_bias})
    if (p->has_value())
      TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == dim && (*p)->is_contiguous() && (*p)->scalar_type() == acc,
                  "D and dt_bias must be contiguous (", dim, ",) ", acc, " tensors, got ", (*p)->sizes());
  auto y = at::empty({batch, dim}, x.options());
  const int64_t G = B.size(1), dg = dim / G;
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_selective_state_update", [&] {
    using A_t = acc_type<scalar_t>;
    using V = Vectorized<A_t>;
    constexpr int64_t W = V::size();
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *tp = dt.const_data_ptr<scalar_t>();
    const scalar_t* zp = z ? z->const_data_ptr<scalar_t>() : nullptr;
    const A_t *ap = A.const_data_ptr<A_t>(), *bp = B.const_data_ptr<A_t>(), *cp = C.const_data_ptr<A_t>();
    const A_t *dp = D ? D->const_data_ptr<A_t>() : nullptr, *bias = dt_bias ? dt_bias->const_data_ptr<A_t>() : nullptr;
    A_t* sp = state.mutable_data_ptr<A_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * dim, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / dim, d = i % dim, gi = d / dg;
        const A_t xv = static_cast<A_t>(xp[b * x.stride(0) + d * x.stride(1)]);
        A_t t = static_cast<A_t>(tp[b * dt.stride(0) + d * dt.stride(1)]) + (bias ? bias[d] : A_t(0));
        if (dt_softplus && t <= A_t(20)) t = std::log1p(std::exp(t));
        A_t* row = sp + b * state.stride(0) + d * state.stride(1);
        const A_t *ar = ap + d * N, *br = bp + (b * G + gi) * N, *cr = cp + (b * G + gi) * N;
        const V tv(t), txv(t * xv);
        V yv(0);
        int64_t n = 0;
        for (; n + W <= N; n += W) {
          const V hn = at::vec::fmadd(fexp(tv * V::loadu(ar + n)), V::loadu(row + n), txv * V::loadu(br + n));
          hn.store(row + n);
          yv = at::vec::fmadd(hn, V::loadu(cr + n), yv);
        }
        A_t yacc = hsum(yv);
        for (; n < N; ++n) {
          row[n] = std::exp(t * ar[n]) * row[n] + t * xv * br[n];
          yacc += row[n] * cr[n];
        }
        if (dp) yacc += dp[d] * xv;
        if (zp) {
          const A_t zv = static_cast<A_t>(zp[b * z->stride(0) + d * z->stride(1)]);
          yacc *= zv / (A_t(1) + std::exp(-zv));
        }
        yp[b * dim + d] = static_cast<scalar_t>(yacc);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
  m.impl("selective_state_update", &selective_state_update);
}

}  // namespace tritium
