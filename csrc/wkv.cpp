// RWKV-7's wkv recurrence on the CPU (RWKV-6's at the end of the file): forward, backward and the decoding step,
// registered for the schemas that python/tritium/ops/wkv.py defines (the math is there, as flash-linear-attention's
// naive references define it):
//
//   S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T        S: (K, V) per (batch, head)
//   o_t = scale S_t^T r_t
//
// One work item is one (batch, head): its state stays in a (K, VP) buffer (VP = V rounded up to the vector width,
// the padding columns zero and staying zero), 16 KB at K = V = 64, in L1 across the steps. A step is one pass over
// the state's rows: the update, the output's sum and the next step's a^T S (so the state is read once per step).
// The forward writes the state every C steps (`states`: (B, H, ceil(T / C), K, V), the last the final state); the
// backward recomputes one chunk's states from the one before it into a (C, K, VP) buffer (L2-sized) and runs the
// adjoint through the chunk in reverse, with dS the state's adjoint carried from step t + 1:
//   dS += scale r_t do_t^T;  dr_t = scale S_t do_t;  dk_t = dS v_t;  dv_t = dS^T k_t;  sa = S_{t-1}^T a_t;
//   db_t = dS sa;  dsa = dS^T b_t;  dw_t = exp(w_t) * rowsum(dS * S_{t-1});  da_t = S_{t-1} dsa;
//   dS <- diag(exp(w_t)) dS + a_t dsa^T   (the adjoint of S_{t-1})
#include <algorithm>
#include <vector>

#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

// steps ahead whose input rows a loop over time asks for
constexpr int64_t kAhead = 8;

template <typename T>
struct Seq4 {  // a (B, T, H, D) operand with a unit D stride
  const T* p;
  int64_t sb, st, sh;
  const T* at(int64_t b, int64_t t, int64_t h) const { return p + b * sb + t * st + h * sh; }
};
template <typename T>
Seq4<T> seq4(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The sizes of a wkv call (either version) and the state's layout: (K, VP) rows padded to the vector width.
template <typename T>
struct WkvDims {
  using A = acc_type<T>;
  using Vec = Vectorized<A>;
  static constexpr int64_t W = Vec::size();
  int64_t B, L, H, K, V, VP, KP, C, nchunks;
  A scale;
  const A* h0;  // (B, H, K, V) contiguous, or null (a zero initial state)

  void set(int64_t B_, int64_t L_, int64_t H_, int64_t K_, int64_t V_, double scale_, const A* h0_, int64_t chunk) {
    B = B_, L = L_, H = H_, K = K_, V = V_;
    VP = (V + W - 1) / W * W, KP = (K + W - 1) / W * W;
    C = chunk, nchunks = (L + chunk - 1) / chunk;
    scale = static_cast<A>(scale_), h0 = h0_;
  }
  // dst[0, n) = src[0, n) in A, zeros in [n, npad)
  static void load(const T* src, A* dst, int64_t n, int64_t npad) {
    to_acc(src, dst, n);
    std::fill(dst + n, dst + npad, A(0));
  }
  // the padded (K, VP) state from a (K, V) one (zeros when null)
  void load_state(const A* src, A* S) const {
    std::fill(S, S + K * VP, A(0));
    if (src)
      for (int64_t i = 0; i < K; ++i) std::copy(src + i * V, src + i * V + V, S + i * VP);
  }
  void store_state(const A* S, A* dst) const {
    for (int64_t i = 0; i < K; ++i) std::copy(S + i * VP, S + i * VP + V, dst + i * V);
  }
};

template <typename T>
struct Wkv : WkvDims<T> {
  Seq4<T> r, w, k, v, a, b;
};

// the (B, H, D) operands of a decoding step as (B, 1, H, D) sequences of one step
template <typename T>
Seq4<T> step_seq(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), 0, t.stride(1)};
}

// S^T a over the rows of a (K, VP) state into sa (VP)
template <typename A>
inline void state_t_vec(const A* S, const A* a, A* sa, int64_t K, int64_t VP) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  for (int64_t j = 0; j < VP; j += W) {
    Vec acc(0);
    for (int64_t i = 0; i < K; ++i) acc = at::vec::fmadd(Vec(a[i]), Vec::loadu(S + i * VP + j), acc);
    acc.store(sa + j);
  }
}

// One step from Sp into Sn (they may alias), for the column blocks [j, j + NB W):
//   Decay:  Sn = diag(d) Sp + bb sa^T + kk v^T        else:  Sn = Sp + bb sa^T + kk v^T
// then o = Sn^T rr and san = Sn^T an (the next step's a^T S; Next only). Rows inner: o, san, sa and v of the blocks
// stay in registers, and the NB blocks' sums are independent chains (one block alone would wait on the latency of
// each multiply-add down the rows). Each block's registers are named variables, not arrays: GCC kept arrays of
// vectors in memory and stored the sums back on every row.
template <typename A, int NB, bool Next, bool Decay>
inline void step_blocks(const A* Sp, A* Sn, const A* d, const A* rr, const A* kk, const A* bb, const A* an,
                        const A* v, const A* sa, A* o, A* san, int64_t K, int64_t VP, int64_t j) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec v0, v1, v2, v3, s0, s1, s2, s3, o0(0), o1(0), o2(0), o3(0), n0(0), n1(0), n2(0), n3(0);
  v0 = Vec::loadu(v + j), s0 = Vec::loadu(sa + j);
  if constexpr (NB > 1) v1 = Vec::loadu(v + j + W), s1 = Vec::loadu(sa + j + W);
  if constexpr (NB > 2) v2 = Vec::loadu(v + j + 2 * W), s2 = Vec::loadu(sa + j + 2 * W);
  if constexpr (NB > 3) v3 = Vec::loadu(v + j + 3 * W), s3 = Vec::loadu(sa + j + 3 * W);
  for (int64_t i = 0; i < K; ++i) {
    const Vec bv(bb[i]), kv(kk[i]), rv(rr[i]);
    Vec dv, av;
    if constexpr (Decay) dv = Vec(d[i]);
    if constexpr (Next) av = Vec(an[i]);
    const A* sp = Sp + i * VP + j;
    A* sn = Sn + i * VP + j;
    auto col = [&](int64_t c, const Vec& vv, const Vec& sv, Vec& ov, Vec& nv) {
      Vec s;
      if constexpr (Decay) {
        s = at::vec::fmadd(dv, Vec::loadu(sp + c), at::vec::fmadd(bv, sv, kv * vv));
      } else {
        s = at::vec::fmadd(bv, sv, at::vec::fmadd(kv, vv, Vec::loadu(sp + c)));
      }
      s.store(sn + c);
      ov = at::vec::fmadd(rv, s, ov);
      if constexpr (Next) nv = at::vec::fmadd(av, s, nv);
    };
    col(0, v0, s0, o0, n0);
    if constexpr (NB > 1) col(W, v1, s1, o1, n1);
    if constexpr (NB > 2) col(2 * W, v2, s2, o2, n2);
    if constexpr (NB > 3) col(3 * W, v3, s3, o3, n3);
  }
  auto put = [&](int64_t c, const Vec& ov, const Vec& nv) {
    ov.store(o + j + c);
    if constexpr (Next) nv.store(san + j + c);
  };
  put(0, o0, n0);
  if constexpr (NB > 1) put(W, o1, n1);
  if constexpr (NB > 2) put(2 * W, o2, n2);
  if constexpr (NB > 3) put(3 * W, o3, n3);
}

template <typename A, bool Next, bool Decay>
inline void step_cols(const A* Sp, A* Sn, const A* d, const A* rr, const A* kk, const A* bb, const A* an,
                      const A* v, const A* sa, A* o, A* san, int64_t K, int64_t VP) {
  constexpr int64_t W = Vectorized<A>::size();
  for (int64_t j = 0; j < VP;) {
    const int64_t nb = std::min<int64_t>(4, (VP - j) / W);
    switch (nb) {
      case 4: step_blocks<A, 4, Next, Decay>(Sp, Sn, d, rr, kk, bb, an, v, sa, o, san, K, VP, j); break;
      case 3: step_blocks<A, 3, Next, Decay>(Sp, Sn, d, rr, kk, bb, an, v, sa, o, san, K, VP, j); break;
      case 2: step_blocks<A, 2, Next, Decay>(Sp, Sn, d, rr, kk, bb, an, v, sa, o, san, K, VP, j); break;
      default: step_blocks<A, 1, Next, Decay>(Sp, Sn, d, rr, kk, bb, an, v, sa, o, san, K, VP, j); break;
    }
    j += nb * W;
  }
}

// One step over all the columns; d null: no decay (the forward's scaled rows), an null: no next a^T S.
template <typename A>
inline void step(const A* Sp, A* Sn, const A* d, const A* rr, const A* kk, const A* bb, const A* an, const A* v,
                 const A* sa, A* o, A* san, int64_t K, int64_t VP) {
  if (d) {
    if (an) step_cols<A, true, true>(Sp, Sn, d, rr, kk, bb, an, v, sa, o, san, K, VP);
    else step_cols<A, false, true>(Sp, Sn, d, rr, kk, bb, an, v, sa, o, san, K, VP);
  } else {
    if (an) step_cols<A, true, false>(Sp, Sn, d, rr, kk, bb, an, v, sa, o, san, K, VP);
    else step_cols<A, false, false>(Sp, Sn, d, rr, kk, bb, an, v, sa, o, san, K, VP);
  }
}

// e[0, n) = exp(e[0, n)) (e padded to a multiple of the vector width)
template <typename A>
inline void exp_inplace(A* e, int64_t npad) {
  using Vec = Vectorized<A>;
  for (int64_t i = 0; i < npad; i += Vec::size()) fexp(Vec::loadu(e + i)).store(e + i);
}

// the per-step vectors of one (batch, head) in A: r, exp(w), k, a, b (KP each), v (VP)
template <typename T>
struct StepIn {
  using A = acc_type<T>;
  const A *r, *k, *a, *b, *v;  // the input rows themselves where they are A and unpadded, else rb...vb
  A *e, *rb, *kb, *ab, *bb, *vb;
  void alloc(std::vector<A>& buf, int64_t& off, int64_t KP, int64_t VP) {
    A** ps[] = {&e, &rb, &kb, &ab, &bb};
    for (A** p : ps) *p = buf.data() + off, off += KP;
    vb = buf.data() + off, off += VP;
  }
  // ask for step t's rows (ahead of their use: the steps of one head are a stride of H rows apart, which the
  // hardware prefetchers do not follow across pages)
  static void prefetch(const Wkv<T>& s, int64_t bi, int64_t t, int64_t h) {
    if (t < 0 || t >= s.L) return;
    for (const Seq4<T>* q : {&s.r, &s.w, &s.k, &s.a, &s.b}) prefetch_l2(q->at(bi, t, h), s.K * sizeof(T));
    prefetch_l2(s.v.at(bi, t, h), s.V * sizeof(T));
  }
  // src itself (A rows needing no padding), else src in A padded with zeros into buf
  static const A* row(const T* src, A* buf, int64_t n, int64_t npad) {
    if constexpr (std::is_same_v<T, A>) {
      if (n == npad) return src;
    }
    Wkv<T>::load(src, buf, n, npad);
    return buf;
  }
  void load(const Wkv<T>& s, int64_t bi, int64_t t, int64_t h) {
    r = row(s.r.at(bi, t, h), rb, s.K, s.KP);
    Wkv<T>::load(s.w.at(bi, t, h), e, s.K, s.KP);
    exp_inplace(e, s.KP);
    k = row(s.k.at(bi, t, h), kb, s.K, s.KP);
    a = row(s.a.at(bi, t, h), ab, s.K, s.KP);
    b = row(s.b.at(bi, t, h), bb, s.K, s.KP);
    v = row(s.v.at(bi, t, h), vb, s.V, s.VP);
  }
};

template <typename T>
Wkv<T> make_wkv(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& a, const at::Tensor& b, double scale, const c10::optional<at::Tensor>& h0,
                int64_t chunk) {
  Wkv<T> s;
  s.set(r.size(0), r.size(1), r.size(2), r.size(3), v.size(3), scale, h0 ? h0->const_data_ptr<acc_type<T>>() : nullptr,
        chunk);
  s.r = seq4<T>(r), s.w = seq4<T>(w), s.k = seq4<T>(k), s.v = seq4<T>(v), s.a = seq4<T>(a), s.b = seq4<T>(b);
  return s;
}

// the backward's own arguments (both versions): dout like v, the forward's states, dht
void check_wkv_bwd(const at::Tensor& dout, const at::Tensor& r, const at::Tensor& v, int64_t chunk,
                   const at::Tensor& states, const c10::optional<at::Tensor>& dht) {
  const int64_t B = r.size(0), L = r.size(1), H = r.size(2), K = r.size(3), V = v.size(3);
  const int64_t nchunks = (L + chunk - 1) / chunk;
  const auto acc = at::toOpMathType(r.scalar_type());
  TORCH_CHECK(dout.sizes() == v.sizes() && dout.stride(3) == 1 && dout.scalar_type() == r.scalar_type(),
              "dout must be like v ", v.sizes(), " with a unit last stride, got ", dout.sizes());
  TORCH_CHECK(states.sizes() == at::IntArrayRef({B, H, nchunks, K, V}) && states.is_contiguous() &&
                  states.scalar_type() == acc,
              "states must be the forward's (", B, ", ", H, ", ", nchunks, ", ", K, ", ", V, "), got ",
              states.sizes());
  if (dht)
    TORCH_CHECK(dht->sizes() == at::IntArrayRef({B, H, K, V}) && dht->is_contiguous() && dht->scalar_type() == acc,
                "dht must be a contiguous (", B, ", ", H, ", ", K, ", ", V, ") ", acc, " tensor, got ", dht->sizes());
}

// a decoding step's arguments (both versions): r and the others (B, H, K), v (B, H, V), the carried state
void check_wkv_step(const at::Tensor& state, const at::Tensor& r, std::initializer_list<const at::Tensor*> like_r,
                    const char* names, const at::Tensor& v) {
  TORCH_CHECK(r.dim() == 3 && r.stride(2) == 1, "r must be (B, H, K) with a unit K stride, got ", r.sizes());
  for (const auto* p : like_r)
    TORCH_CHECK(p->sizes() == r.sizes() && p->stride(2) == 1 && p->scalar_type() == r.scalar_type(), names,
                " must be like r ", r.sizes(), ", got ", p->sizes(), " ", p->scalar_type());
  TORCH_CHECK(v.dim() == 3 && v.size(0) == r.size(0) && v.size(1) == r.size(1) && v.stride(2) == 1 &&
                  v.scalar_type() == r.scalar_type(),
              "v must be (B, H, V) like r, got ", v.sizes());
  const auto acc = at::toOpMathType(r.scalar_type());
  TORCH_CHECK(state.sizes() == at::IntArrayRef({r.size(0), r.size(1), r.size(2), v.size(2)}) &&
                  state.is_contiguous() && state.scalar_type() == acc,
              "state must be a contiguous (B, H, K, V) ", acc, " tensor, got ", state.sizes(), " ",
              state.scalar_type());
}

// item(i / H, i % H, buf) for every (batch, head) i, a scratch vector per thread
template <typename A, typename F>
void for_items(int64_t B, int64_t H, int64_t grain, const F& item) {
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf;
    for (int64_t i = begin; i < end; ++i) item(i / H, i % H, buf);
  });
}

// a decoding step's items: as many as 16384 state elements a task
inline int64_t step_grain(int64_t K, int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(K * V, 1)); }

void check_wkv(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& h0, int64_t chunk) {
  TORCH_CHECK(r.dim() == 4 && r.stride(3) == 1, "r must be (B, T, H, K) with a unit K stride, got ", r.sizes());
  for (const auto* p : {&w, &k, &a, &b})
    TORCH_CHECK(p->sizes() == r.sizes() && p->stride(3) == 1 && p->scalar_type() == r.scalar_type(),
                "w, k, a and b must be like r ", r.sizes(), " ", r.scalar_type(), ", got ", p->sizes(), " ",
                p->scalar_type());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == r.size(0) && v.size(1) == r.size(1) && v.size(2) == r.size(2) &&
                  v.stride(3) == 1 && v.scalar_type() == r.scalar_type(),
              "v must be (B, T, H, V) like r with a unit V stride, got ", v.sizes(), " ", v.scalar_type());
  const auto acc = at::toOpMathType(r.scalar_type());
  if (h0)
    TORCH_CHECK(h0->sizes() == at::IntArrayRef({r.size(0), r.size(2), r.size(3), v.size(3)}) &&
                    h0->is_contiguous() && h0->scalar_type() == acc,
                "initial_state must be a contiguous (B, H, K, V) ", acc, " tensor, got ", h0->sizes(), " ",
                h0->scalar_type());
  TORCH_CHECK(chunk > 0, "chunk must be positive, got ", chunk);
}

// ---------------------------------------------------------------------------------------------------------
// forward: one item = (batch, head)
// ---------------------------------------------------------------------------------------------------------
// The forward keeps the state's rows scaled, S = diag(c) St with c the product of the decays since St was last
// renormalised, so that most steps have no decay term (four multiply-adds per state element, not five):
//   sa_t = St_{t-1}^T (c_{t-1} a_t);  c_t = c_{t-1} exp(w_t);
//   St_t = St_{t-1} + (b_t / c_t) sa_t^T + (k_t / c_t) v_t^T;  o_t = St_t^T (scale c_t r_t)
// When some c_t would fall below kMinScale (1 / c_t, and St's rows with it, growing without bound), the step
// renormalises instead: St_t = diag(c_{t-1} exp(w_t)) St_{t-1} + b_t sa_t^T + k_t v_t^T, c_t = 1 (the plain step).
// Rounding is relative, so scaled rows carry the same relative error as the plain recurrence's.
constexpr double kMinScale = 1.0 / (1 << 20);

// The forward runs a group of G heads of one batch row (as many as keep enough groups for the threads): its
// inputs are read kBlock steps at a time into an L2 block, each step's G heads one contiguous G-row stretch per
// input, so the reads stream (one head alone would walk rows H apart, a stride the hardware prefetchers do not
// follow, touching a new page every step); then each head runs the block's steps with its state in L1, and the
// block's outputs go back to their rows together. The block (r, exp(w), k, a, b, v per step and head: about 24 KB a
// head at K = V = 64; only exp(w) where the rows are read in place, the others asked for into L2 as it is filled)
// and the group's states stay in L2.
constexpr int64_t kBlock = 16;

template <typename T>
void wkv_fwd_group(const Wkv<T>& s, int64_t bi, int64_t h0, int64_t G, T* out, acc_type<T>* states,
                   std::vector<acc_type<T>>& buf) {
  using A = acc_type<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const int64_t K = s.K, V = s.V, VP = s.VP, KP = s.KP;
  // Rows already in A with no padding to add (float32 and float64 at K and V multiples of the vector width) are
  // read where they are: the block holds only exp(w). Otherwise it holds r, exp(w), k, a, b, v per step and head.
  const bool direct = std::is_same_v<T, A> && K == KP && V == VP;
  const int64_t RS = direct ? KP : 5 * KP + VP, EO = direct ? 0 : KP;  // RS: a step's rows in the block, EO: exp(w)'s
  const int64_t TB = std::min(kBlock, s.L), HS = K * VP + VP + KP;     // HS: a head's state, sa and c
  buf.assign(G * HS + VP + 6 * KP + G * (TB + 1) * RS + G * TB * VP, A(0));
  A *hs = buf.data(), *san = hs + G * HS, *an = san + VP, *cn = an + KP, *rr = cn + KP, *kk = rr + KP;
  A *bb = kk + KP, *blk = bb + KP, *ob = blk + G * (TB + 1) * RS;
  // steps [t0, t0 + n) of the group's heads into the block (and a of step t0 + n, the last step's next a^T S,
  // where there is one): head g's step j at blk + (g (TB + 1) + j) RS. Read in place, the rows are asked for into
  // L2 here, a block's worth ahead of their use.
  auto gather = [&](int64_t t0, int64_t n) {
    for (int64_t j = 0; j <= n; ++j) {
      const int64_t t = t0 + j;
      if (j == n && t >= s.L) break;
      for (int64_t g = 0; g < G; ++g) {
        A* row = blk + (g * (TB + 1) + j) * RS;
        const int64_t h = h0 + g;
        if (direct) {
          if (j == n) continue;
          if constexpr (std::is_same_v<T, A>) {
            const A* w = s.w.at(bi, t, h);
            for (int64_t i = 0; i < KP; i += W) fexp(Vec::loadu(w + i)).store(row + i);
          }
          for (const Seq4<T>* q : {&s.r, &s.k, &s.a, &s.b}) prefetch_l2(q->at(bi, t, h), K * sizeof(T));
          prefetch_l2(s.v.at(bi, t, h), V * sizeof(T));
          continue;
        }
        Wkv<T>::load(s.a.at(bi, t, h), row + 3 * KP, K, KP);
        if (j == n) continue;
        Wkv<T>::load(s.r.at(bi, t, h), row, K, KP);
        Wkv<T>::load(s.w.at(bi, t, h), row + KP, K, KP);
        exp_inplace(row + KP, KP);
        Wkv<T>::load(s.k.at(bi, t, h), row + 2 * KP, K, KP);
        Wkv<T>::load(s.b.at(bi, t, h), row + 4 * KP, K, KP);
        Wkv<T>::load(s.v.at(bi, t, h), row + 5 * KP, V, VP);
      }
    }
  };
  // an input row of head h at step t0 + j: in place, or its copy at offset off of the block's row
  auto in = [&](const Seq4<T>& q, int64_t off, const A* hb, int64_t j, int64_t t, int64_t h) -> const A* {
    if constexpr (std::is_same_v<T, A>) {
      if (direct) return q.at(bi, t, h);
    }
    return hb + j * RS + off;
  };
  for (int64_t g = 0; g < G; ++g) {
    const int64_t item = bi * s.H + h0 + g;
    s.load_state(s.h0 ? s.h0 + item * K * V : nullptr, hs + g * HS);
    std::fill(hs + g * HS + K * VP + VP, hs + (g + 1) * HS, A(1));
  }
  const Vec floor(static_cast<A>(kMinScale)), sc(s.scale);
  for (int64_t t0 = 0; t0 < s.L; t0 += TB) {
    const int64_t n = std::min(TB, s.L - t0);
    gather(t0, n);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t item = bi * s.H + h0 + g;
      A *S = hs + g * HS, *sa = S + K * VP, *c = sa + VP;
      const A* hb = blk + g * (TB + 1) * RS;
      const int64_t h = h0 + g;
      if (t0 == 0) state_t_vec(S, in(s.a, 3 * KP, hb, 0, 0, h), sa, K, VP);
      // the true state of the scaled one into dst (K, V)
      auto save = [&](A* dst) {
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) dst[i * V + j] = S[i * VP + j] * c[i];
      };
      for (int64_t j = 0; j < n; ++j) {
        const int64_t t = t0 + j;
        const A *r = in(s.r, 0, hb, j, t, h), *e = hb + j * RS + EO, *k = in(s.k, 2 * KP, hb, j, t, h);
        const A *b = in(s.b, 4 * KP, hb, j, t, h), *v = in(s.v, 5 * KP, hb, j, t, h);
        const bool more = t + 1 < s.L;
        // cn = c exp(w); renormalise when any row's falls below the floor (a NaN scale goes the plain way too)
        bool renorm = false;
        for (int64_t i = 0; i < KP; i += W) {
          const Vec x = Vec::loadu(c + i) * Vec::loadu(e + i);
          x.store(cn + i);
          renorm |= (x >= floor).zero_mask() != 0;  // a lane below the floor, or NaN
        }
        if (renorm) {
          std::fill(c, c + KP, A(1));
        } else {
          for (int64_t i = 0; i < KP; i += W) {
            const Vec x = Vec::loadu(cn + i), ix = Vec(1) / x;
            x.store(c + i);
            (ix * Vec::loadu(k + i)).store(kk + i);
            (ix * Vec::loadu(b + i)).store(bb + i);
          }
        }
        for (int64_t i = 0; i < KP; i += W) (sc * Vec::loadu(c + i) * Vec::loadu(r + i)).store(rr + i);
        if (more) {
          const A* a1 = in(s.a, 3 * KP, hb, j + 1, t + 1, h);
          for (int64_t i = 0; i < KP; i += W) (Vec::loadu(c + i) * Vec::loadu(a1 + i)).store(an + i);
        }
        step(S, S, renorm ? cn : nullptr, rr, renorm ? k : kk, renorm ? b : bb, more ? an : nullptr, v, sa,
             ob + (g * TB + j) * VP, san, K, VP);
        std::copy(san, san + VP, sa);
        if ((t + 1) % s.C == 0 || !more) save(states + (item * s.nchunks + t / s.C) * K * V);
      }
    }
    for (int64_t j = 0; j < n; ++j)  // the block's outputs to their rows
      for (int64_t g = 0; g < G; ++g) {
        T* op = out + ((bi * s.L + t0 + j) * s.H + h0 + g) * V;
        const A* oj = ob + (g * TB + j) * VP;
        if constexpr (std::is_same_v<T, A>) {
          std::memcpy(op, oj, V * sizeof(A));
        } else {
          for (int64_t jv = 0; jv < V; ++jv) op[jv] = static_cast<T>(oj[jv]);
        }
      }
  }
}

template <typename T>
void wkv_fwd_item(const Wkv<T>& s, int64_t bi, int64_t h, T* out, acc_type<T>* states, std::vector<acc_type<T>>& buf) {
  wkv_fwd_group(s, bi, h, 1, out, states, buf);
}

// heads per group: all of a batch row's, halved until there are 4 groups a thread (or one head a group)
inline int64_t fwd_group(int64_t B, int64_t H) {
  int64_t G = H;
  while (G > 1 && B * ((H + G - 1) / G) < 4 * at::get_num_threads()) G = (G + 1) / 2;
  return G;
}

std::tuple<at::Tensor, at::Tensor> wkv7_fwd(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                            double scale, const c10::optional<at::Tensor>& h0, int64_t chunk) {
  check_wkv(r, w, k, v, a, b, h0, chunk);
  const int64_t B = r.size(0), L = r.size(1), H = r.size(2), K = r.size(3), V = v.size(3);
  const int64_t nchunks = (L + chunk - 1) / chunk;
  const auto acc = at::toOpMathType(r.scalar_type());
  auto out = empty({B, L, H, V}, r.options());
  auto states = empty({B, H, nchunks, K, V}, r.options().dtype(acc));
  TRITIUM_DISPATCH_FLOATING(r.scalar_type(), "tritium_wkv7_fwd", [&] {
    const auto s = make_wkv<scalar_t>(r, w, k, v, a, b, scale, h0, chunk);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    auto* st = states.mutable_data_ptr<acc_type<scalar_t>>();
    const int64_t G = fwd_group(B, H), NG = (H + G - 1) / G;
    at::parallel_for(0, B * NG, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_type<scalar_t>> buf;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t h0 = i % NG * G;
        wkv_fwd_group(s, i / NG, h0, std::min(G, H - h0), o, st, buf);
      }
    });
  });
  return {out, states};
}

// ---------------------------------------------------------------------------------------------------------
// backward: one item = (batch, head); chunks in reverse, each recomputed from the state saved before it
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct WkvGrads {
  using A = acc_type<T>;
  Seq4<T> dout;
  const A *states, *dht;
  T *dr, *dw, *dk, *dv, *da, *db;  // contiguous (B, T, H, K) / (B, T, H, V)
  A* dh0;                           // (B, H, K, V)
};

// out[i] = the sum of the lanes of p[i] for i < K (p padded to KP rows)
template <typename A>
inline void lane_sums(const Vectorized<A>* p, A* out, int64_t KP) {
  constexpr int64_t W = Vectorized<A>::size();
  for (int64_t i = 0; i < KP; i += W) reduce_lanes(p + i).store(out + i);
}

// The adjoint of one step for the column blocks [j, j + NB W) of the state (their do, v, a^T S, dsa and dv in
// registers): rows down, dS += scale r do^T and the row dots of dr (S_t do), dk (dS v), db (dS sa), dw (dS S_{t-1})
// added into the partial-sum vectors; dsa = dS^T b and dv = dS^T k; then rows again, dS <- diag(e) dS + a dsa^T and
// da's row dots (S_{t-1} dsa). The columns' dsa is complete after the first pass, so the second follows at once,
// on the same (K, NB W) slice of the state while it is in L1.
template <typename A, int NB, typename In>
inline void adjoint_blocks(A scale, const In& in, const A* dov, const A* sa, const A* Sc, const A* Sp, A* dS,
                           A* dvv, Vectorized<A>* pr, Vectorized<A>* pk, Vectorized<A>* pb, Vectorized<A>* pw,
                           Vectorized<A>* pa, int64_t K, int64_t VP, int64_t j) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec dv_[NB], vv[NB], sv[NB], ds[NB], dv[NB];
  for (int n = 0; n < NB; ++n) {
    dv_[n] = Vec::loadu(dov + j + n * W), vv[n] = Vec::loadu(in.v + j + n * W), sv[n] = Vec::loadu(sa + j + n * W);
    ds[n] = Vec(0), dv[n] = Vec(0);
  }
  for (int64_t i = 0; i < K; ++i) {
    const Vec sr(scale * in.r[i]), bv(in.b[i]), kv(in.k[i]);
    A* row = dS + i * VP + j;
    const A *sc = Sc + i * VP + j, *sp = Sp + i * VP + j;
    Vec ar = pr[i], ak = pk[i], ab = pb[i], aw = pw[i];
    for (int n = 0; n < NB; ++n) {
      const Vec d = at::vec::fmadd(sr, dv_[n], Vec::loadu(row + n * W));
      d.store(row + n * W);
      ar = at::vec::fmadd(Vec::loadu(sc + n * W), dv_[n], ar);
      ak = at::vec::fmadd(d, vv[n], ak);
      ab = at::vec::fmadd(d, sv[n], ab);
      aw = at::vec::fmadd(d, Vec::loadu(sp + n * W), aw);
      ds[n] = at::vec::fmadd(bv, d, ds[n]);
      dv[n] = at::vec::fmadd(kv, d, dv[n]);
    }
    pr[i] = ar, pk[i] = ak, pb[i] = ab, pw[i] = aw;
  }
  for (int n = 0; n < NB; ++n) dv[n].store(dvv + j + n * W);
  for (int64_t i = 0; i < K; ++i) {
    const Vec ev(in.e[i]), av(in.a[i]);
    A* row = dS + i * VP + j;
    const A* sp = Sp + i * VP + j;
    Vec aa = pa[i];
    for (int n = 0; n < NB; ++n) {
      at::vec::fmadd(ev, Vec::loadu(row + n * W), av * ds[n]).store(row + n * W);
      aa = at::vec::fmadd(Vec::loadu(sp + n * W), ds[n], aa);
    }
    pa[i] = aa;
  }
}

template <typename T>
void wkv_bwd_item(const Wkv<T>& s, const WkvGrads<T>& g, int64_t bi, int64_t h) {
  using A = acc_type<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const int64_t K = s.K, V = s.V, VP = s.VP, KP = s.KP, C = s.C;
  const int64_t item = bi * s.H + h;
  std::vector<A> buf(2 * K * VP + C * K * VP + C * VP + 4 * VP + 6 * KP + VP + 5 * KP, A(0));
  A *dS = buf.data(), *S0 = dS + K * VP, *Sb = S0 + K * VP, *sab = Sb + C * K * VP, *dov = sab + C * VP;
  A *dsa = dov + VP, *dvv = dsa + VP, *o = dvv + VP;  // o: the recompute's (unused) outputs
  A *gr = o + VP, *gw = gr + KP, *gk = gw + KP, *gb = gk + KP, *ga = gb + KP, *an = ga + KP;
  int64_t off = (an + KP) - buf.data();
  StepIn<T> in;
  in.alloc(buf, off, KP, VP);
  std::vector<Vec> pv(5 * KP);
  Vec *pr = pv.data(), *pk = pr + KP, *pb = pk + KP, *pw = pb + KP, *pa = pw + KP;
  s.load_state(g.dht ? g.dht + item * K * V : nullptr, dS);
  for (int64_t c = s.nchunks - 1; c >= 0; --c) {
    const int64_t t0 = c * C, kc = std::min(C, s.L - t0);
    s.load_state(c > 0 ? g.states + (item * s.nchunks + c - 1) * K * V : (s.h0 ? s.h0 + item * K * V : nullptr), S0);
    // recompute the chunk's states S_t (Sb[j]) and the a^T S_{t-1} of each step (sab[j])
    Wkv<T>::load(s.a.at(bi, t0, h), an, K, KP);
    state_t_vec(S0, an, sab, K, VP);
    for (int64_t j = 0; j < kc; ++j) {
      StepIn<T>::prefetch(s, bi, t0 + j + kAhead, h);
      in.load(s, bi, t0 + j, h);
      const bool more = j + 1 < kc;
      if (more) Wkv<T>::load(s.a.at(bi, t0 + j + 1, h), an, K, KP);
      step(j ? Sb + (j - 1) * K * VP : S0, Sb + j * K * VP, in.e, in.r, in.k, in.b, more ? an : nullptr, in.v,
           sab + j * VP, o, sab + (j + 1) * VP * more, K, VP);
    }
    for (int64_t j = kc - 1; j >= 0; --j) {
      const int64_t t = t0 + j;
      if (t >= kAhead) prefetch_l2(g.dout.at(bi, t - kAhead, h), V * sizeof(T));
      in.load(s, bi, t, h);
      Wkv<T>::load(g.dout.at(bi, t, h), dov, V, VP);
      const A *Sp = j ? Sb + (j - 1) * K * VP : S0, *Sc = Sb + j * K * VP, *sa = sab + j * VP;
      for (int64_t i = 0; i < KP; ++i) pr[i] = pk[i] = pb[i] = pw[i] = pa[i] = Vec(0);
      for (int64_t j0 = 0; j0 < VP;) {  // groups of up to 4 column blocks (the adjoint's columns are independent)
        const int64_t nb = std::min<int64_t>(4, (VP - j0) / W);
        switch (nb) {
          case 4: adjoint_blocks<A, 4>(s.scale, in, dov, sa, Sc, Sp, dS, dvv, pr, pk, pb, pw, pa, K, VP, j0); break;
          case 3: adjoint_blocks<A, 3>(s.scale, in, dov, sa, Sc, Sp, dS, dvv, pr, pk, pb, pw, pa, K, VP, j0); break;
          case 2: adjoint_blocks<A, 2>(s.scale, in, dov, sa, Sc, Sp, dS, dvv, pr, pk, pb, pw, pa, K, VP, j0); break;
          default: adjoint_blocks<A, 1>(s.scale, in, dov, sa, Sc, Sp, dS, dvv, pr, pk, pb, pw, pa, K, VP, j0); break;
        }
        j0 += nb * W;
      }
      lane_sums(pr, gr, KP);
      lane_sums(pk, gk, KP);
      lane_sums(pb, gb, KP);
      lane_sums(pw, gw, KP);
      lane_sums(pa, ga, KP);
      const int64_t ko = ((bi * s.L + t) * s.H + h) * K;
      for (int64_t i = 0; i < K; ++i) {
        g.dr[ko + i] = static_cast<T>(s.scale * gr[i]);
        g.dw[ko + i] = static_cast<T>(in.e[i] * gw[i]);
        g.dk[ko + i] = static_cast<T>(gk[i]);
        g.db[ko + i] = static_cast<T>(gb[i]);
        g.da[ko + i] = static_cast<T>(ga[i]);
      }
      T* dvp = g.dv + ((bi * s.L + t) * s.H + h) * V;
      for (int64_t jv = 0; jv < V; ++jv) dvp[jv] = static_cast<T>(dvv[jv]);
    }
  }
  s.store_state(dS, g.dh0 + item * K * V);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
wkv7_bwd(const at::Tensor& dout, const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
         const at::Tensor& a, const at::Tensor& b, double scale, const c10::optional<at::Tensor>& h0, int64_t chunk,
         const at::Tensor& states, const c10::optional<at::Tensor>& dht) {
  check_wkv(r, w, k, v, a, b, h0, chunk);
  check_wkv_bwd(dout, r, v, chunk, states, dht);
  const int64_t B = r.size(0), L = r.size(1), H = r.size(2), K = r.size(3), V = v.size(3);
  const auto acc = at::toOpMathType(r.scalar_type());
  auto dr = empty({B, L, H, K}, r.options()), dw = empty(dr.sizes(), r.options()), dk = empty(dr.sizes(), r.options());
  auto da = empty(dr.sizes(), r.options()), db = empty(dr.sizes(), r.options()), dv = empty({B, L, H, V}, r.options());
  auto dh0 = at::empty({B, H, K, V}, r.options().dtype(acc));
  TRITIUM_DISPATCH_FLOATING(r.scalar_type(), "tritium_wkv7_bwd", [&] {
    using A = acc_type<scalar_t>;
    const auto s = make_wkv<scalar_t>(r, w, k, v, a, b, scale, h0, chunk);
    WkvGrads<scalar_t> g{seq4<scalar_t>(dout), states.const_data_ptr<A>(), dht ? dht->const_data_ptr<A>() : nullptr,
                         dr.mutable_data_ptr<scalar_t>(), dw.mutable_data_ptr<scalar_t>(),
                         dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
                         da.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<scalar_t>(), dh0.mutable_data_ptr<A>()};
    for_items<A>(B, H, 1, [&](int64_t bi, int64_t h, auto&) { wkv_bwd_item(s, g, bi, h); });
  });
  return {dr, dw, dk, dv, da, db, dh0};
}

// ---------------------------------------------------------------------------------------------------------
// the decoding step: one token per (batch, head) from a carried state; returns (o, the new state)
// ---------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> wkv7_step(const at::Tensor& state, const at::Tensor& r, const at::Tensor& w,
                                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
                                             const at::Tensor& b, double scale) {
  check_wkv_step(state, r, {&w, &k, &a, &b}, "w, k, a and b", v);
  const int64_t B = r.size(0), H = r.size(1), K = r.size(2), V = v.size(2);
  auto out = at::empty({B, H, V}, r.options());
  auto next = at::empty_like(state);
  TRITIUM_DISPATCH_FLOATING(r.scalar_type(), "tritium_wkv7_step", [&] {
    using A = acc_type<scalar_t>;
    Wkv<scalar_t> s;
    s.set(B, 1, H, K, V, scale, state.const_data_ptr<A>(), 1);
    s.r = step_seq<scalar_t>(r), s.w = step_seq<scalar_t>(w), s.k = step_seq<scalar_t>(k);
    s.v = step_seq<scalar_t>(v), s.a = step_seq<scalar_t>(a), s.b = step_seq<scalar_t>(b);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    A* st = next.mutable_data_ptr<A>();
    for_items<A>(B, H, step_grain(K, V), [&](int64_t bi, int64_t h, auto& buf) { wkv_fwd_item(s, bi, h, o, st, buf); });
  });
  return {out, next};
}

// ---------------------------------------------------------------------------------------------------------
// RWKV-6 (fla's naive_recurrent_rwkv6): a diagonal decay and a bonus u for the current token,
//   o_t = scale (S_{t-1} + diag(u) k_t v_t^T)^T r_t;   S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T
// with u (H, K). One pass per step over the state's rows: the output reads the old row, then the row is updated.
// Backward, dS the adjoint of S_t, vdo = v_t . do_t, ru = sum_i r_i u_i k_i:
//   dk_t = dS v_t + scale u r_t vdo;  dv_t = dS^T k_t + scale ru do_t;  dw_t = exp(w_t) rowsum(dS S_{t-1});
//   dS <- diag(exp(w_t)) dS + scale r_t do_t^T;  dr_t = scale (S_{t-1} do_t + u k_t vdo);  du += scale r_t k_t vdo
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct Wkv6 : WkvDims<T> {
  using A = acc_type<T>;
  Seq4<T> r, k, v, w;
  const A* u;  // (H, K)

  // r, exp(w), k (KP each) and v (VP) of step t; returns ru = sum_i r_i u_i k_i
  A load_step(int64_t bi, int64_t t, int64_t h, A* rr, A* e, A* kk, A* vv) const {
    const int64_t K = this->K, KP = this->KP;
    WkvDims<T>::load(r.at(bi, t, h), rr, K, KP);
    WkvDims<T>::load(w.at(bi, t, h), e, K, KP);
    exp_inplace(e, KP);
    WkvDims<T>::load(k.at(bi, t, h), kk, K, KP);
    WkvDims<T>::load(v.at(bi, t, h), vv, this->V, this->VP);
    A ru(0);
    for (int64_t i = 0; i < K; ++i) ru += rr[i] * u[h * K + i] * kk[i];
    return ru;
  }
};

// One step from Sp into Sn (they may alias): o = Sp^T rr + ru v (unscaled); Sn = diag(e) Sp + kk v^T
template <typename A>
inline void step6(const A* Sp, A* Sn, const A* e, const A* rr, const A* kk, const A* v, A ru, A* o, int64_t K,
                  int64_t VP) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  for (int64_t j = 0; j < VP; j += W) {
    const Vec vv = Vec::loadu(v + j);
    Vec ov = Vec(ru) * vv;
    for (int64_t i = 0; i < K; ++i) {
      const Vec s = Vec::loadu(Sp + i * VP + j);
      ov = at::vec::fmadd(Vec(rr[i]), s, ov);
      at::vec::fmadd(Vec(e[i]), s, Vec(kk[i]) * vv).store(Sn + i * VP + j);
    }
    ov.store(o + j);
  }
}

template <typename T>
Wkv6<T> make_wkv6(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                  const at::Tensor& u, double scale, const c10::optional<at::Tensor>& h0, int64_t chunk) {
  Wkv6<T> s;
  s.set(r.size(0), r.size(1), r.size(2), r.size(3), v.size(3), scale, h0 ? h0->const_data_ptr<acc_type<T>>() : nullptr,
        chunk);
  s.r = seq4<T>(r), s.k = seq4<T>(k), s.v = seq4<T>(v), s.w = seq4<T>(w);
  s.u = u.const_data_ptr<acc_type<T>>();
  return s;
}

void check_wkv6(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                const at::Tensor& u, const c10::optional<at::Tensor>& h0, int64_t chunk) {
  check_wkv(r, w, k, v, k, k, h0, chunk);
  const auto acc = at::toOpMathType(r.scalar_type());
  TORCH_CHECK(u.sizes() == at::IntArrayRef({r.size(2), r.size(3)}) && u.is_contiguous() && u.scalar_type() == acc,
              "u must be a contiguous (H, K) ", acc, " tensor, got ", u.sizes(), " ", u.scalar_type());
}

template <typename T>
void wkv6_fwd_item(const Wkv6<T>& s, int64_t bi, int64_t h, T* out, acc_type<T>* states,
                   std::vector<acc_type<T>>& buf) {
  using A = acc_type<T>;
  const int64_t K = s.K, V = s.V, VP = s.VP, KP = s.KP;
  buf.assign(K * VP + 2 * VP + 3 * KP, A(0));
  A *S = buf.data(), *o = S + K * VP, *vv = o + VP, *rr = vv + VP, *e = rr + KP, *kk = e + KP;
  const int64_t item = bi * s.H + h;
  s.load_state(s.h0 ? s.h0 + item * K * V : nullptr, S);
  for (int64_t t = 0; t < s.L; ++t) {
    const A ru = s.load_step(bi, t, h, rr, e, kk, vv);
    step6(S, S, e, rr, kk, vv, ru, o, K, VP);
    T* op = out + ((bi * s.L + t) * s.H + h) * V;
    for (int64_t j = 0; j < V; ++j) op[j] = static_cast<T>(o[j] * s.scale);
    if ((t + 1) % s.C == 0 || t + 1 == s.L) s.store_state(S, states + (item * s.nchunks + t / s.C) * K * V);
  }
}

std::tuple<at::Tensor, at::Tensor> wkv6_fwd(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& w, const at::Tensor& u, double scale,
                                            const c10::optional<at::Tensor>& h0, int64_t chunk) {
  check_wkv6(r, k, v, w, u, h0, chunk);
  const int64_t B = r.size(0), L = r.size(1), H = r.size(2), K = r.size(3), V = v.size(3);
  const int64_t nchunks = (L + chunk - 1) / chunk;
  auto out = empty({B, L, H, V}, r.options());
  auto states = empty({B, H, nchunks, K, V}, r.options().dtype(at::toOpMathType(r.scalar_type())));
  TRITIUM_DISPATCH_FLOATING(r.scalar_type(), "tritium_wkv6_fwd", [&] {
    const auto s = make_wkv6<scalar_t>(r, k, v, w, u, scale, h0, chunk);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    auto* st = states.mutable_data_ptr<acc_type<scalar_t>>();
    for_items<acc_type<scalar_t>>(B, H, 1, [&](int64_t bi, int64_t h, auto& buf) { wkv6_fwd_item(s, bi, h, o, st, buf); });
  });
  return {out, states};
}

template <typename T>
struct Wkv6Grads {
  using A = acc_type<T>;
  Seq4<T> dout;
  const A *states, *dht;
  T *dr, *dk, *dv, *dw;  // contiguous (B, T, H, K) / (B, T, H, V)
  A *du_part, *dh0;      // (B, H, K), (B, H, K, V)
};

template <typename T>
void wkv6_bwd_item(const Wkv6<T>& s, const Wkv6Grads<T>& g, int64_t bi, int64_t h) {
  using A = acc_type<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const int64_t K = s.K, V = s.V, VP = s.VP, KP = s.KP, C = s.C;
  const int64_t item = bi * s.H + h;
  std::vector<A> buf(2 * K * VP + C * K * VP + 3 * VP + 7 * KP, A(0));
  A *dS = buf.data(), *S0 = dS + K * VP, *Sb = S0 + K * VP, *dov = Sb + C * K * VP, *vv = dov + VP;
  A *dvv = vv + VP, *rr = dvv + VP, *e = rr + KP, *kk = e + KP, *gr = kk + KP, *gk = gr + KP, *gw = gk + KP;
  A* dus = gw + KP;
  std::vector<Vec> pr(KP), pk(KP), pw(KP);
  const A* u = s.u + h * K;
  s.load_state(g.dht ? g.dht + item * K * V : nullptr, dS);
  for (int64_t c = s.nchunks - 1; c >= 0; --c) {
    const int64_t t0 = c * C, kc = std::min(C, s.L - t0);
    s.load_state(c > 0 ? g.states + (item * s.nchunks + c - 1) * K * V : (s.h0 ? s.h0 + item * K * V : nullptr), S0);
    for (int64_t j = 0; j < kc; ++j) {  // the chunk's states S_t into Sb[j] (the outputs into dvv, unused)
      const A ru = s.load_step(bi, t0 + j, h, rr, e, kk, vv);
      step6(j ? Sb + (j - 1) * K * VP : S0, Sb + j * K * VP, e, rr, kk, vv, ru, dvv, K, VP);
    }
    for (int64_t j = kc - 1; j >= 0; --j) {
      const int64_t t = t0 + j;
      const A ru = s.load_step(bi, t, h, rr, e, kk, vv);
      Wkv<T>::load(g.dout.at(bi, t, h), dov, V, VP);
      const A* Sp = j ? Sb + (j - 1) * K * VP : S0;
      Vec vd(0);
      for (int64_t jv = 0; jv < VP; jv += W) vd = at::vec::fmadd(Vec::loadu(vv + jv), Vec::loadu(dov + jv), vd);
      const A vdo = hsum(vd), sc = s.scale;
      for (int64_t jv = 0; jv < VP; jv += W) (Vec(sc * ru) * Vec::loadu(dov + jv)).store(dvv + jv);
      for (int64_t i = 0; i < K; ++i) {
        const Vec ev(e[i]), kv(kk[i]), sr(sc * rr[i]);
        Vec ak(0), aw(0), ar(0);
        A* row = dS + i * VP;
        for (int64_t jv = 0; jv < VP; jv += W) {
          const Vec d = Vec::loadu(row + jv), sp = Vec::loadu(Sp + i * VP + jv), dv_ = Vec::loadu(dov + jv);
          ak = at::vec::fmadd(d, Vec::loadu(vv + jv), ak);
          aw = at::vec::fmadd(d, sp, aw);
          ar = at::vec::fmadd(sp, dv_, ar);
          at::vec::fmadd(kv, d, Vec::loadu(dvv + jv)).store(dvv + jv);
          at::vec::fmadd(ev, d, sr * dv_).store(row + jv);
        }
        pk[i] = ak, pw[i] = aw, pr[i] = ar;
      }
      for (int64_t i = K; i < KP; ++i) pr[i] = pk[i] = pw[i] = Vec(0);
      lane_sums(pr.data(), gr, KP);
      lane_sums(pk.data(), gk, KP);
      lane_sums(pw.data(), gw, KP);
      const int64_t ko = ((bi * s.L + t) * s.H + h) * K;
      for (int64_t i = 0; i < K; ++i) {
        g.dr[ko + i] = static_cast<T>(sc * (gr[i] + u[i] * kk[i] * vdo));
        g.dk[ko + i] = static_cast<T>(gk[i] + sc * u[i] * rr[i] * vdo);
        g.dw[ko + i] = static_cast<T>(e[i] * gw[i]);
        dus[i] += sc * rr[i] * kk[i] * vdo;
      }
      T* dvp = g.dv + ((bi * s.L + t) * s.H + h) * V;
      for (int64_t jv = 0; jv < V; ++jv) dvp[jv] = static_cast<T>(dvv[jv]);
    }
  }
  s.store_state(dS, g.dh0 + item * K * V);
  std::copy(dus, dus + K, g.du_part + item * K);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
wkv6_bwd(const at::Tensor& dout, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
         const at::Tensor& u, double scale, const c10::optional<at::Tensor>& h0, int64_t chunk,
         const at::Tensor& states, const c10::optional<at::Tensor>& dht) {
  check_wkv6(r, k, v, w, u, h0, chunk);
  check_wkv_bwd(dout, r, v, chunk, states, dht);
  const int64_t B = r.size(0), L = r.size(1), H = r.size(2), K = r.size(3), V = v.size(3);
  const auto acc = at::toOpMathType(r.scalar_type());
  auto dr = empty({B, L, H, K}, r.options()), dk = empty(dr.sizes(), r.options()), dw = empty(dr.sizes(), r.options());
  auto dv = empty({B, L, H, V}, r.options());
  auto du_part = at::empty({B, H, K}, r.options().dtype(acc));
  auto dh0 = at::empty({B, H, K, V}, r.options().dtype(acc));
  TRITIUM_DISPATCH_FLOATING(r.scalar_type(), "tritium_wkv6_bwd", [&] {
    using A = acc_type<scalar_t>;
    const auto s = make_wkv6<scalar_t>(r, k, v, w, u, scale, h0, chunk);
    Wkv6Grads<scalar_t> g{seq4<scalar_t>(dout), states.const_data_ptr<A>(),
                          dht ? dht->const_data_ptr<A>() : nullptr, dr.mutable_data_ptr<scalar_t>(),
                          dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
                          dw.mutable_data_ptr<scalar_t>(), du_part.mutable_data_ptr<A>(), dh0.mutable_data_ptr<A>()};
    for_items<A>(B, H, 1, [&](int64_t bi, int64_t h, auto&) { wkv6_bwd_item(s, g, bi, h); });
  });
  return {dr, dk, dv, dw, du_part.sum(0), dh0};
}

std::tuple<at::Tensor, at::Tensor> wkv6_step(const at::Tensor& state, const at::Tensor& r, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& w, const at::Tensor& u,
                                             double scale) {
  check_wkv_step(state, r, {&k, &w}, "k and w", v);
  const int64_t B = r.size(0), H = r.size(1), K = r.size(2), V = v.size(2);
  const auto acc = at::toOpMathType(r.scalar_type());
  TORCH_CHECK(u.sizes() == at::IntArrayRef({H, K}) && u.is_contiguous() && u.scalar_type() == acc,
              "u must be a contiguous (H, K) ", acc, " tensor, got ", u.sizes());
  auto out = at::empty({B, H, V}, r.options());
  auto next = at::empty_like(state);
  TRITIUM_DISPATCH_FLOATING(r.scalar_type(), "tritium_wkv6_step", [&] {
    using A = acc_type<scalar_t>;
    Wkv6<scalar_t> s;
    s.set(B, 1, H, K, V, scale, state.const_data_ptr<A>(), 1);
    s.r = step_seq<scalar_t>(r), s.k = step_seq<scalar_t>(k), s.v = step_seq<scalar_t>(v), s.w = step_seq<scalar_t>(w);
    s.u = u.const_data_ptr<A>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    A* st = next.mutable_data_ptr<A>();
    for_items<A>(B, H, step_grain(K, V), [&](int64_t bi, int64_t h, auto& buf) { wkv6_fwd_item(s, bi, h, o, st, buf); });
  });
  return {out, next};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("wkv7_fwd", &wkv7_fwd);
  m.impl("wkv7_bwd", &wkv7_bwd);
  m.impl("wkv7_step", &wkv7_step);
  m.impl("wkv6_fwd", &wkv6_fwd);
  m.impl("wkv6_bwd", &wkv6_bwd);
  m.impl("wkv6_step", &wkv6_step);
}

}  // namespace tritium
