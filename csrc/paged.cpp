// Paged KV cache CPU kernels, registered for the CPU key of the tritium ops python/tritium/ops/paged.py defines:
//   append_kv               k_pool[slot / bs, slot % bs] = k[t] (and v), slot = slot_mapping[t] (< 0: skipped)
//   paged_attention_decode  one query token per sequence against its pages (GQA), split-K flash-decoding
//
// Decode work is split into items (sequence, split of at most `split` tokens, all heads); every split has the same
// length, so OpenMP's static partition of the items gives each core the same number of tokens whatever the mix of
// sequence lengths, and one long sequence is spread over every core. Each item keeps, per query head, the running
// max m, the sum l of exp(s - m) and the unnormalised output; a merge pass combines the splits with their
// logsumexp. K and V are read once, token by token in memory order; scores and accumulators stay in float (double
// for float64).
// Block-table entries are int32; every pool offset is computed in int64.
#include "pool.h"
#include "vec.h"

#include <cmath>
#include <limits>
#include <vector>

namespace tritium {
namespace {

void append_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool, const at::Tensor& v_pool,
               const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k_pool.dim() == 4 && v_pool.dim() == 4,
              "append_kv: k, v must be (tokens, kv_heads, head_dim) and the pools 4-D");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_pool.stride(3) == 1 && v_pool.stride(3) == 1,
              "append_kv: head_dim must be contiguous");
  TORCH_CHECK(k.scalar_type() == k_pool.scalar_type() && v.scalar_type() == v_pool.scalar_type(),
              "append_kv: k/v must have the pools' dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "append_kv: slot_mapping must be int64");
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2), bs = k_pool.size(1);
  const int64_t es = k.element_size();
  const int64_t* sm = slot_mapping.const_data_ptr<int64_t>();
  const int64_t ss = slot_mapping.stride(0);
  struct Side {
    const char* src;
    char* dst;
    int64_t s0, s1, p0, p1, p2;
  };
  const Side sides[2] = {
      {static_cast<const char*>(k.const_data_ptr()), static_cast<char*>(k_pool.mutable_data_ptr()), k.stride(0),
       k.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2)},
      {static_cast<const char*>(v.const_data_ptr()), static_cast<char*>(v_pool.mutable_data_ptr()), v.stride(0),
       v.stride(1), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2)}};
  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(H * D, 1)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t slot = sm[t * ss];
      if (slot < 0) continue;  // padding token
      const int64_t blk = slot / bs, off = slot % bs;
      for (const Side& s : sides)
        for (int64_t h = 0; h < H; ++h)
          std::memcpy(s.dst + (blk * s.p0 + off * s.p1 + h * s.p2) * es, s.src + (t * s.s0 + h * s.s1) * es, D * es);
    }
  });
}

// Tokens per step: one vector of scores per query head (16 for float), so a step's scores are one
// transpose-and-add reduction (reduce_lanes) instead of a horizontal sum per token.
constexpr int64_t kMinSplit = 256;

// A work item is a token range of one sequence, for ALL its heads: a token's K (and V) rows of every KV head are
// one contiguous run of kv_heads * head_dim elements, so a step (a block of tokens) reads contiguous memory,
// which is what lets a paged cache stream like a contiguous one.
struct Item {
  int64_t b, start, stop;
};

// One step (K tokens, rows krow / vrow at KV head offset ko / vo) for a group of GN query heads sharing that KV
// head: scores, the online softmax update of each head's m and l, and acc = alpha acc + sum_j p_j v_j.
// qg: the group's scaled query rows (stride D); acc, ml: the group's accumulators (stride D) and (m, l) pairs.
// GN is a compile-time count so that every per-head array lives in registers; the scores are computed one head at
// a time (K partial vectors live, then one transpose-and-add reduction), the V rows read once for all GN heads.
// DV > 0: head_dim == DV vectors exactly; DV == 0: nv full vectors plus a scalar tail up to D.
template <typename T, int DV, int GN>
inline void group_step(const acc_type<T>* qg, const T* const* krow, const T* const* vrow, int64_t ko, int64_t vo,
                       int64_t n, int64_t D, int64_t nv_any, bool has_cap, acc_type<T> cap, acc_type<T>* acc,
                       acc_type<T>* ml) {
  const int64_t nv = DV > 0 ? DV : nv_any;  // a constant for DV > 0, so the vector loops unroll into registers
  using IO = VecIO<T>;
  using acc_t = acc_type<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  constexpr int64_t kMaxDV = DV > 0 ? DV : 16;
  const int64_t Dv = nv * K;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  alignas(64) acc_t pbuf[GN][K];
  acc_t alphas[GN];
  for (int g = 0; g < GN; ++g) {
    const acc_t* q = qg + g * D;
    Vec qv[kMaxDV], part[K];
    for (int64_t c = 0; c < nv; ++c) qv[c] = Vec::loadu(q + c * K);
    for (int64_t j = 0; j < K; ++j) {
      const T* kr = krow[j] + ko;
      Vec a = nv > 0 ? qv[0] * IO::load(kr) : Vec(0);
      for (int64_t c = 1; c < nv; ++c) a = at::vec::fmadd(qv[c], IO::load(kr + c * K), a);
      part[j] = a;
    }
    Vec sv = reduce_lanes<acc_t>(part);
    if (Dv < D) {  // scalar tail of head_dim
      alignas(64) acc_t tail[K];
      for (int64_t j = 0; j < K; ++j) {
        const T* kr = krow[j] + ko;
        acc_t x = 0;
        for (int64_t d = Dv; d < D; ++d) x += q[d] * static_cast<acc_t>(kr[d]);
        tail[j] = x;
      }
      sv = sv + Vec::loadu(tail);
    }
    if (has_cap) sv = ftanh(sv / Vec(cap)) * Vec(cap);
    if (n < K) sv = Vec::set(Vec(ninf), sv, n);  // steps past the end score -inf
    // online softmax: m' = max(m, max_j s), rescale by exp(m - m'), p_j = exp(s_j - m')
    const acc_t mx = std::max(ml[2 * g], hmax(sv));
    const acc_t alpha = std::exp(ml[2 * g] - mx);  // exp(-inf) = 0 on the first step
    const Vec pv = fexp(sv - Vec(mx));
    pv.store(pbuf[g]);
    ml[2 * g] = mx;
    ml[2 * g + 1] = ml[2 * g + 1] * alpha + hsum(pv);
    alphas[g] = alpha;
  }
  Vec av[GN][kMaxDV];
  for (int g = 0; g < GN; ++g)
    for (int64_t c = 0; c < nv; ++c) av[g][c] = Vec::loadu(acc + g * D + c * K) * Vec(alphas[g]);
  for (int64_t j = 0; j < n; ++j) {
    const T* vr = vrow[j] + vo;
    Vec vv[kMaxDV];
    for (int64_t c = 0; c < nv; ++c) vv[c] = IO::load(vr + c * K);
    for (int g = 0; g < GN; ++g) {
      const Vec p(pbuf[g][j]);
      for (int64_t c = 0; c < nv; ++c) av[g][c] = at::vec::fmadd(p, vv[c], av[g][c]);
    }
  }
  for (int g = 0; g < GN; ++g) {
    acc_t* ag = acc + g * D;
    for (int64_t c = 0; c < nv; ++c) av[g][c].store(ag + c * K);
    if (Dv < D) {
      for (int64_t d = Dv; d < D; ++d) ag[d] *= alphas[g];
      for (int64_t j = 0; j < n; ++j) {
        const T* vr = vrow[j] + vo;
        for (int64_t d = Dv; d < D; ++d) ag[d] += pbuf[g][j] * static_cast<acc_t>(vr[d]);
      }
    }
  }
}

// The query heads of one KV head in groups of at most GB (their PV accumulators, GB x head_dim vectors, in
// registers): full groups, then the remainder, each a group_step of its compile-time size.
template <typename T, int DV, int GB>
inline void kv_head_step(int64_t G, const acc_type<T>* qh, const T* const* krow, const T* const* vrow, int64_t ko,
                         int64_t vo, int64_t n, int64_t D, int64_t nv, bool has_cap, acc_type<T> cap,
                         acc_type<T>* acc, acc_type<T>* ml) {
  auto run = [&](auto gn, int64_t g0) {
    group_step<T, DV, decltype(gn)::value>(qh + g0 * D, krow, vrow, ko, vo, n, D, nv, has_cap, cap, acc + g0 * D,
                                           ml + 2 * g0);
  };
  int64_t g0 = 0;
  for (; g0 + GB <= G; g0 += GB) run(std::integral_constant<int, GB>{}, g0);
  switch (G - g0) {
    case 0: break;
    case 1: run(std::integral_constant<int, 1>{}, g0); break;
    case 2: if constexpr (GB > 2) { run(std::integral_constant<int, 2>{}, g0); break; } [[fallthrough]];
    case 3: if constexpr (GB > 3) { run(std::integral_constant<int, 3>{}, g0); break; } [[fallthrough]];
    default: TORCH_CHECK(false, "paged_attention_decode: internal error, head group remainder ", G - g0);
  }
}

// DV > 0: head_dim == DV vectors exactly (loops unroll); DV == 0: any head_dim (runtime vector count plus a
// scalar tail). Query heads go in groups of up to 4 (head_dim 64: 16 accumulators), 2 (128) or 1 (any other).
template <typename T, int DV>
void decode_items(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                  const at::Tensor& block_tables, const std::vector<Item>& items, double scale,
                  c10::optional<double> softcap, at::Tensor& part_acc, at::Tensor& part_ml) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  constexpr int64_t K = IO::kSize;  // tokens per step
  constexpr int64_t kMaxDV = DV > 0 ? DV : 16;
  constexpr int GB = DV == 4 ? 4 : DV == 8 ? 2 : 1;  // query heads per register group
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k_pool.size(2), bs = k_pool.size(1), G = Hq / Hkv;
  const int64_t nv = DV > 0 ? DV : std::min<int64_t>(D / K, kMaxDV);  // full vectors per row
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k_pool.const_data_ptr<T>();
  const T* vp = v_pool.const_data_ptr<T>();
  const int32_t* tab = block_tables.const_data_ptr<int32_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ts0 = block_tables.stride(0), ts1 = block_tables.stride(1);
  const int64_t ks0 = k_pool.stride(0), ks1 = k_pool.stride(1), ks2 = k_pool.stride(2);
  const int64_t vs0 = v_pool.stride(0), vs1 = v_pool.stride(1), vs2 = v_pool.stride(2);
  acc_t* pacc = part_acc.mutable_data_ptr<acc_t>();  // (items, Hq, D)
  acc_t* pml = part_ml.mutable_data_ptr<acc_t>();    // (items, Hq, 2): m, l
  const bool has_cap = softcap.has_value();
  const acc_t cap = has_cap ? static_cast<acc_t>(*softcap) : acc_t(1);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t row_bytes = Hkv * D * int64_t(sizeof(T));
  // The K and V row pointers (KV head 0) of the step at token p0 of a sequence whose block-table row is trow: one
  // division, then a walk along the table; the tokens past stop repeat the last row.
  auto step_rows = [&](const int32_t* trow, int64_t p0, int64_t stop, const T** krow, const T** vrow) {
    const int64_t n = std::min(K, stop - p0);
    int64_t pi = p0 / bs, off = p0 - pi * bs;
    int64_t blk = static_cast<int64_t>(trow[pi * ts1]);
    for (int64_t j = 0; j < K; ++j) {
      krow[j] = kp + blk * ks0 + off * ks1;
      vrow[j] = vp + blk * vs0 + off * vs1;
      if (j + 1 < n && ++off == bs) {
        off = 0;
        blk = static_cast<int64_t>(trow[++pi * ts1]);
      }
    }
    return n;
  };
  // Read one byte of every cache line of the K and V rows (all heads) of the step at token p0, so that the step is
  // in cache when it is computed: blocks are scattered, which the hardware prefetchers do not follow, and on the
  // CPUs measured prefetch instructions left the step's loads missing where plain loads, overlapped out of order
  // with this step's arithmetic, did not.
  auto touch_step = [&](const int32_t* trow, int64_t p0, int64_t stop) {
    const T* krow[K];
    const T* vrow[K];
    const int64_t nn = step_rows(trow, p0, stop, krow, vrow);
    int sum = 0;
    for (int64_t j = 0; j < nn; ++j) {
      const volatile char* kr = reinterpret_cast<const char*>(krow[j]);
      const volatile char* vr = reinterpret_cast<const char*>(vrow[j]);
      for (int64_t o = 0; o < row_bytes; o += 64) sum += kr[o] + vr[o];
    }
    asm volatile("" : : "r"(sum));
  };
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t ib, int64_t ie) {
    std::vector<acc_t> qf(Hq * D);
    const T* krow[K];
    const T* vrow[K];
    for (int64_t it = ib; it < ie; ++it) {
      const Item& w = items[it];
      acc_t* acc = pacc + it * Hq * D;
      acc_t* ml = pml + it * Hq * 2;
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const T* qr = qp + w.b * qs0 + hq * qs1;
        for (int64_t d = 0; d < D; ++d) qf[hq * D + d] = static_cast<acc_t>(qr[d]) * static_cast<acc_t>(scale);
        ml[2 * hq] = ninf;
        ml[2 * hq + 1] = 0;
      }
      std::fill(acc, acc + Hq * D, acc_t(0));
      const int32_t* trow = tab + w.b * ts0;
      for (int64_t p0 = w.start; p0 < w.stop; p0 += K) {
        const int64_t n = step_rows(trow, p0, w.stop, krow, vrow);
        // the next step, in this item or the next of this thread's range
        if (p0 + K < w.stop)
          touch_step(trow, p0 + K, w.stop);
        else if (it + 1 < ie)
          touch_step(tab + items[it + 1].b * ts0, items[it + 1].start, items[it + 1].stop);
        for (int64_t h = 0; h < Hkv; ++h)
          kv_head_step<T, DV, GB>(G, qf.data() + h * G * D, krow, vrow, h * ks2, h * vs2, n, D, nv, has_cap, cap,
                                  acc + h * G * D, ml + 2 * h * G);
      }
    }
  });
}

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  c10::optional<double> softcap, c10::optional<int64_t> window) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.dim() == 4, "paged_attention_decode: bad ranks");
  TORCH_CHECK(q.stride(2) == 1 && k_pool.stride(3) == 1 && v_pool.stride(3) == 1,
              "paged_attention_decode: head_dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "paged_attention_decode: block_tables and seq_lens must be int32");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_pool.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "paged_attention_decode: q_heads must be a multiple of kv_heads");
  const int32_t* lens = seq_lens.const_data_ptr<int32_t>();
  std::vector<int64_t> start(B), stop(B);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    stop[b] = std::max<int64_t>(lens[b * seq_lens.stride(0)], 0);
    start[b] = window.has_value() ? std::max<int64_t>(stop[b] - *window, 0) : 0;
    total += stop[b] - start[b];
  }
  const int64_t threads = at::get_num_threads();
  // equal-length splits, about 4 per thread (OpenMP's static partition then balances), at least kMinSplit tokens
  int64_t split = std::max<int64_t>(kMinSplit, (total + 4 * threads - 1) / (4 * threads));
  split = (split + 15) / 16 * 16;  // whole steps (16 float / 8 double tokens)
  std::vector<Item> items;
  std::vector<int64_t> first(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    first[b] = static_cast<int64_t>(items.size());
    for (int64_t s = start[b]; s < stop[b]; s += split) items.push_back({b, s, std::min(stop[b], s + split)});
  }
  first[B] = static_cast<int64_t>(items.size());
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = q.options().dtype(acc_dtype);
  const int64_t NI = std::max<int64_t>(static_cast<int64_t>(items.size()), 1);
  at::Tensor part_acc = at::empty({NI, Hq, D}, opts), part_ml = at::empty({NI, Hq, 2}, opts);
  at::Tensor out = empty({B, Hq, D}, q.options());
  TRITIUM_DISPATCH_FLOATING(q.scalar_type(), "tritium_paged_attention_decode", [&] {
    using acc_t = typename VecIO<scalar_t>::acc_t;
    constexpr int64_t K = VecIO<scalar_t>::kSize;
    // head_dim 64 and 128 (nearly every model) get unrolled loops; anything else the generic ones
    if (D == 4 * K)
      decode_items<scalar_t, 4>(q, k_pool, v_pool, block_tables, items, scale, softcap, part_acc, part_ml);
    else if (D == 8 * K)
      decode_items<scalar_t, 8>(q, k_pool, v_pool, block_tables, items, scale, softcap, part_acc, part_ml);
    else
      decode_items<scalar_t, 0>(q, k_pool, v_pool, block_tables, items, scale, softcap, part_acc, part_ml);
    const acc_t* pacc = part_acc.const_data_ptr<acc_t>();
    const acc_t* pml = part_ml.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // merge: out = sum_s acc_s exp(m_s - M) / sum_s l_s exp(m_s - M); an empty sequence gives zeros
    at::parallel_for(0, B * Hq, 16, [&](int64_t pb, int64_t pe) {
      std::vector<acc_t> o(D);
      for (int64_t r = pb; r < pe; ++r) {
        const int64_t b = r / Hq, hq = r % Hq, i0 = first[b], i1 = first[b + 1];
        acc_t M = -std::numeric_limits<acc_t>::infinity(), L = 0;
        for (int64_t i = i0; i < i1; ++i) M = std::max(M, pml[(i * Hq + hq) * 2]);
        std::fill(o.begin(), o.end(), acc_t(0));
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t w = std::exp(pml[(i * Hq + hq) * 2] - M);
          L += w * pml[(i * Hq + hq) * 2 + 1];
          const acc_t* a = pacc + (i * Hq + hq) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
        }
        const acc_t inv = L > 0 ? acc_t(1) / L : acc_t(0);
        scalar_t* dst = op + r * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] * inv);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("append_kv", &append_kv);
  m.impl("paged_attention_decode", &paged_attention_decode);
}

}  // namespace tritium
