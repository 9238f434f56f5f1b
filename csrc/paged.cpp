// Paged KV cache CPU kernels, registered for the CPU key of the tritium ops python/tritium/ops/paged.py defines:
//   append_kv               k_pool[slot / bs, slot % bs] = k[t] (and v), slot = slot_mapping[t] (< 0: skipped)
//   paged_attention_decode  one query token per sequence against its pages (GQA), split-K flash-decoding
//
// Decode work is split into items (sequence, KV head, split of at most `split_len` tokens); every split length is
// the same, so OpenMP's static partition of the items gives each core the same number of tokens whatever the mix
// of sequence lengths, and one long sequence is spread over every core. Each item keeps, for the G = q_heads /
// kv_heads query heads sharing its KV head, the running max m, the sum l of exp(s - m) and the unnormalised output;
// a merge pass combines the splits with their logsumexp. K and V are read once per item (each token's head row
// is D contiguous elements); scores and accumulators stay in float (double for float64).
// Block-table entries are int32; every pool offset is computed in int64.
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

// Tokens scored per step: scores of a chunk, one rescale of the accumulators, then the chunk's V rows (from L1).
constexpr int64_t kChunk = 32;
// Query heads handled together per pass over a chunk (a GQA group larger than this is done in tiles).
constexpr int64_t kHeadTile = 8;
constexpr int64_t kMinSplit = 256;

struct Item {
  int64_t b, h, start, stop, slot;  // sequence, KV head, token range, index into the partial buffers
};

template <typename T>
void decode_items(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                  const at::Tensor& block_tables, const std::vector<Item>& items, double scale,
                  c10::optional<double> softcap, at::Tensor& part_acc, at::Tensor& part_ml) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k_pool.size(2), bs = k_pool.size(1), G = Hq / Hkv;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k_pool.const_data_ptr<T>();
  const T* vp = v_pool.const_data_ptr<T>();
  const int32_t* tab = block_tables.const_data_ptr<int32_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ts0 = block_tables.stride(0), ts1 = block_tables.stride(1);
  const int64_t ks0 = k_pool.stride(0), ks1 = k_pool.stride(1), ks2 = k_pool.stride(2);
  const int64_t vs0 = v_pool.stride(0), vs1 = v_pool.stride(1), vs2 = v_pool.stride(2);
  acc_t* pacc = part_acc.mutable_data_ptr<acc_t>();  // (items, G, D)
  acc_t* pml = part_ml.mutable_data_ptr<acc_t>();    // (items, G, 2): m, l
  const bool has_cap = softcap.has_value();
  const acc_t cap = has_cap ? static_cast<acc_t>(*softcap) : acc_t(1);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t Dv = D - D % K;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t ib, int64_t ie) {
    std::vector<acc_t> qf(kHeadTile * D);
    acc_t s[kHeadTile][kChunk];
    const T* krow[kChunk];
    const T* vrow[kChunk];
    for (int64_t it = ib; it < ie; ++it) {
      const Item& w = items[it];
      for (int64_t g0 = 0; g0 < G; g0 += kHeadTile) {
        const int64_t gt = std::min(kHeadTile, G - g0);
        acc_t* acc = pacc + (w.slot * G + g0) * D;
        acc_t* ml = pml + (w.slot * G + g0) * 2;
        for (int64_t g = 0; g < gt; ++g) {
          const T* qr = qp + w.b * qs0 + (w.h * G + g0 + g) * qs1;
          for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<acc_t>(qr[d]) * static_cast<acc_t>(scale);
          std::fill(acc + g * D, acc + (g + 1) * D, acc_t(0));
          ml[2 * g] = ninf;
          ml[2 * g + 1] = 0;
        }
        for (int64_t p0 = w.start; p0 < w.stop; p0 += kChunk) {
          const int64_t n = std::min(kChunk, w.stop - p0);
          for (int64_t j = 0; j < n; ++j) {
            const int64_t pos = p0 + j;
            const int64_t blk = static_cast<int64_t>(tab[w.b * ts0 + (pos / bs) * ts1]), off = pos % bs;
            krow[j] = kp + blk * ks0 + off * ks1 + w.h * ks2;
            vrow[j] = vp + blk * vs0 + off * vs1 + w.h * vs2;
          }
          // scores s[g][j] = (q_g * scale) . k_j
          for (int64_t j = 0; j < n; ++j) {
            const T* kr = krow[j];
            Vec a[kHeadTile];
            for (int64_t g = 0; g < gt; ++g) a[g] = Vec(0);
            int64_t d = 0;
            for (; d < Dv; d += K) {
              const Vec kv = IO::load(kr + d);
              for (int64_t g = 0; g < gt; ++g) a[g] = at::vec::fmadd(Vec::loadu(qf.data() + g * D + d), kv, a[g]);
            }
            for (int64_t g = 0; g < gt; ++g) {
              acc_t x = at::vec::vec_reduce_all<acc_t>([](Vec& u, Vec& v) { return u + v; }, a[g]);
              for (int64_t dd = d; dd < D; ++dd) x += qf[g * D + dd] * static_cast<acc_t>(kr[dd]);
              s[g][j] = has_cap ? cap * std::tanh(x / cap) : x;
            }
          }
          // online softmax update, then acc_g = acc_g * alpha + sum_j p_gj v_j
          for (int64_t g = 0; g < gt; ++g) {
            acc_t mx = ml[2 * g];
            for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[g][j]);
            const acc_t alpha = std::exp(ml[2 * g] - mx);  // exp(-inf) = 0 on the first chunk
            acc_t sum = 0;
            for (int64_t j = 0; j < n; ++j) {
              s[g][j] = std::exp(s[g][j] - mx);
              sum += s[g][j];
            }
            ml[2 * g] = mx;
            ml[2 * g + 1] = ml[2 * g + 1] * alpha + sum;
            acc_t* ag = acc + g * D;
            const Vec va(alpha);
            int64_t d = 0;
            for (; d < Dv; d += K) {
              Vec r = Vec::loadu(ag + d) * va;
              for (int64_t j = 0; j < n; ++j) r = at::vec::fmadd(Vec(s[g][j]), IO::load(vrow[j] + d), r);
              r.store(ag + d);
            }
            for (; d < D; ++d) {
              acc_t r = ag[d] * alpha;
              for (int64_t j = 0; j < n; ++j) r += s[g][j] * static_cast<acc_t>(vrow[j][d]);
              ag[d] = r;
            }
          }
        }
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
  const int64_t G = Hq / Hkv;
  const int32_t* lens = seq_lens.const_data_ptr<int32_t>();
  std::vector<int64_t> start(B), stop(B);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    stop[b] = std::max<int64_t>(lens[b * seq_lens.stride(0)], 0);
    start[b] = window.has_value() ? std::max<int64_t>(stop[b] - *window, 0) : 0;
    total += (stop[b] - start[b]) * Hkv;
  }
  const int64_t threads = at::get_num_threads();
  // one split per (sequence, head) when there are enough of them to keep every core busy; else smaller splits
  int64_t split = std::max<int64_t>(kMinSplit, (total + 4 * threads - 1) / (4 * threads));
  split = (split + kChunk - 1) / kChunk * kChunk;
  std::vector<Item> items;
  std::vector<int64_t> first(B * Hkv + 1, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      first[b * Hkv + h] = static_cast<int64_t>(items.size());
      for (int64_t s = start[b]; s < stop[b]; s += split)
        items.push_back({b, h, s, std::min(stop[b], s + split), static_cast<int64_t>(items.size())});
    }
  first[B * Hkv] = static_cast<int64_t>(items.size());
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = q.options().dtype(acc_type);
  const int64_t NI = std::max<int64_t>(static_cast<int64_t>(items.size()), 1);
  at::Tensor part_acc = at::empty({NI, G, D}, opts), part_ml = at::empty({NI, G, 2}, opts);
  at::Tensor out = empty({B, Hq, D}, q.options());
  TRITIUM_DISPATCH_FLOATING(q.scalar_type(), "tritium_paged_attention_decode", [&] {
    using acc_t = typename VecIO<scalar_t>::acc_t;
    decode_items<scalar_t>(q, k_pool, v_pool, block_tables, items, scale, softcap, part_acc, part_ml);
    const acc_t* pacc = part_acc.const_data_ptr<acc_t>();
    const acc_t* pml = part_ml.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // merge: out = sum_s acc_s exp(m_s - M) / sum_s l_s exp(m_s - M); an empty sequence gives zeros
    at::parallel_for(0, B * Hkv, 1, [&](int64_t pb, int64_t pe) {
      std::vector<acc_t> o(D), wts;
      for (int64_t bh = pb; bh < pe; ++bh) {
        const int64_t i0 = first[bh], i1 = first[bh + 1];
        for (int64_t g = 0; g < G; ++g) {
          acc_t M = -std::numeric_limits<acc_t>::infinity(), L = 0;
          for (int64_t i = i0; i < i1; ++i) M = std::max(M, pml[(i * G + g) * 2]);
          std::fill(o.begin(), o.end(), acc_t(0));
          for (int64_t i = i0; i < i1; ++i) {
            const acc_t w = std::exp(pml[(i * G + g) * 2] - M);
            L += w * pml[(i * G + g) * 2 + 1];
            const acc_t* a = pacc + (i * G + g) * D;
            for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
          }
          const acc_t inv = L > 0 ? acc_t(1) / L : acc_t(0);
          scalar_t* dst = op + (bh * G + g) * D;  // (b, h * G + g) of the contiguous output
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] * inv);
        }
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
