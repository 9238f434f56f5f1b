// Fused sampling CPU kernel, registered for the CPU key of tritium::sample_fwd (python/tritium/ops/sampling.py).
//
// One row per task (rows in parallel); a row's logits are converted once into a float scratch row (192 KiB for
// a 49152 vocabulary: it stays in L2) and every later pass reads it there:
//   1. z = float(logits), max (NaN-propagating: a NaN, +inf or all -inf row is flagged: token -1, logprob NaN)
//   2. raw log-sum-exp (for the chosen token's log-probability under the model's raw distribution)
//   3. penalties over the row's history (each distinct token once: repetition, then frequency * count and
//      presence), logit bias; temperature 0 -> argmax (first maximal index, as torch.argmax)
//   4. z /= T, e = exp(z - max z) in place (e of the most likely token is 1)
//   5. top_k: the k-th largest e by a size-k min-heap fed only by vectors holding a lane above the heap's minimum
//      (no sort of the vocabulary); top_p: the mass of the top-k set, a threshold narrowing the candidates to
//      those that can be in the nucleus, and a sort of those few values only; min_p: e >= min_p.
//      The kept set is always {e >= cut} (ties at a cut are kept), exactly as tritium.reference defines it.
//   6. the draw: the first token, in index order, where the running kept mass passes u * (kept mass), skipping
//      whole vectors whose masked sum does not reach it.
#include "pool.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace tritium {
namespace {

using Vec = Vectorized<float>;
constexpr int64_t K = Vec::size();

inline bool any_lane(const Vec& mask) {  // comparison results: all bits set (true) or zero (false) per lane
  return mask.zero_mask() != (1 << K) - 1;
}

// logits of any dtype as float vectors (double rows are sampled in float too)
template <typename T>
inline Vec load_f(const T* p) {
  if constexpr (std::is_same_v<T, double>) {
    float tmp[K];
    for (int64_t j = 0; j < K; ++j) tmp[j] = static_cast<float>(p[j]);
    return Vec::loadu(tmp);
  } else {
    return VecIO<T>::load(p);
  }
}

// sum of e over lanes with e >= c
inline float masked_sum(const float* e, int64_t n, float c) {
  Vec acc(0), vc(c);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    Vec v = Vec::loadu(e + i);
    acc = acc + Vec::blendv(Vec(0), v, v >= vc);
  }
  float s = hsum(acc);
  for (; i < n; ++i)
    if (e[i] >= c) s += e[i];
  return s;
}

// the k-th largest e (k >= 1); -1 when fewer than k values (then every value is at or above the cut)
float kth_largest(const float* e, int64_t n, int64_t k) {
  if (k >= n) return -1.f;
  std::vector<float> heap;
  heap.reserve(k);
  auto push = [&](float v) {
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.push_back(v);
      std::push_heap(heap.begin(), heap.end(), std::greater<float>());
    } else if (v > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
      heap.back() = v;
      std::push_heap(heap.begin(), heap.end(), std::greater<float>());
    }
  };
  int64_t i = 0;
  for (; i < n && static_cast<int64_t>(heap.size()) < k; ++i) push(e[i]);
  for (; i + K <= n; i += K) {
    if (!any_lane(Vec::loadu(e + i) > Vec(heap.front()))) continue;
    for (int64_t j = i; j < i + K; ++j) push(e[j]);
  }
  for (; i < n; ++i) push(e[i]);
  return heap.front();
}

// top-p cut over {e >= floor} with kept mass `mass`: the smallest kept value such that the mass strictly above
// it is < top_p * mass
float top_p_cut(const float* e, int64_t n, float floor, float mass, float top_p, std::vector<float>& cand) {
  const float target = top_p * mass;
  // narrow: a threshold t whose mass above already reaches the target bounds the nucleus (every token below t
  // has at least that much mass strictly above it)
  float lo = floor;
  for (float t = 1.f / 64; t > floor; t *= 1.f / 64) {
    if (masked_sum(e, n, t) >= target) {
      lo = t;
      break;
    }
  }
  cand.clear();
  for (int64_t i = 0; i < n; ++i)
    if (e[i] >= lo) cand.push_back(e[i]);
  std::sort(cand.begin(), cand.end(), std::greater<float>());
  float cum = 0, cut = cand.empty() ? floor : cand[0];
  for (size_t i = 0; i < cand.size(); ++i) {
    if (i > 0 && cand[i] < cand[i - 1] && cum >= target) break;
    cum += cand[i];
    cut = cand[i];
  }
  return cut;
}

template <typename T>
void sample_row(const T* x, int64_t V, const float* prm, float u, const int64_t* hist, int64_t L,
                const int64_t* bidx, const float* bval, int64_t NB, std::vector<float>& z,
                std::vector<int64_t>& toks, std::vector<float>& cand, int64_t* tok_out, float* lp_out) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  float* zp = z.data();
  // 1. convert, max
  Vec vmax(-inf);
  int64_t i = 0;
  for (; i + K <= V; i += K) {
    Vec v = load_f(x + i);
    v.store(zp + i);
    vmax = at::vec::maximum(vmax, v);
  }
  float rmax = hmax(vmax);
  for (; i < V; ++i) {
    zp[i] = static_cast<float>(x[i]);
    rmax = std::isnan(zp[i]) ? zp[i] : std::max(rmax, zp[i]);
  }
  if (!std::isfinite(rmax)) {
    *tok_out = -1;
    *lp_out = nan;
    return;
  }
  // 2. raw log-sum-exp
  Vec vs(0);
  const Vec vrm(rmax);
  for (i = 0; i + K <= V; i += K) vs = vs + fexp(Vec::loadu(zp + i) - vrm);
  float rsum = hsum(vs);
  for (; i < V; ++i) rsum += std::exp(zp[i] - rmax);
  const float raw_lse = rmax + std::log(rsum);
  // 3. penalties, bias
  const float temperature = prm[0], top_p = prm[2], min_p = prm[3], rep = prm[4], pres = prm[5], freq = prm[6];
  const int64_t top_k = static_cast<int64_t>(prm[1]);
  const bool penalized = L > 0 && (rep != 1.f || pres != 0.f || freq != 0.f);
  if (penalized) {
    toks.clear();
    for (int64_t j = 0; j < L; ++j)
      if (hist[j] >= 0 && hist[j] < V) toks.push_back(hist[j]);
    std::sort(toks.begin(), toks.end());
    for (size_t a = 0; a < toks.size();) {
      size_t b = a;
      while (b < toks.size() && toks[b] == toks[a]) ++b;
      float& v = zp[toks[a]];
      v = v > 0 ? v / rep : v * rep;
      v -= freq * static_cast<float>(b - a) + pres;
      a = b;
    }
  }
  for (int64_t j = 0; j < NB; ++j)
    if (bidx[j] >= 0 && bidx[j] < V) zp[bidx[j]] += bval[j];
  int64_t token = -1;
  if (temperature == 0.f) {  // greedy
    // the raw maximum, unless penalties or a bias moved the logits
    float best = rmax;
    if (penalized || NB > 0) {
      Vec m(-inf);
      for (i = 0; i + K <= V; i += K) m = at::vec::maximum(m, Vec::loadu(zp + i));
      best = hmax(m);
      for (; i < V; ++i) best = std::isnan(zp[i]) ? zp[i] : std::max(best, zp[i]);
    }
    if (std::isfinite(best)) {  // its first index, a vector of compares at a time
      const Vec vb(best);
      for (i = 0; token < 0 && i + K <= V; i += K) {
        const int eq = ~(Vec::loadu(zp + i) == vb).zero_mask() & ((1 << K) - 1);
        if (eq) token = i + __builtin_ctz(static_cast<unsigned>(eq));
      }
      for (; token < 0 && i < V; ++i)
        if (zp[i] == best) token = i;
    }
  } else {
    // 4. e = exp(z / T - max)
    const float invT = 1.f / temperature;
    Vec m(-inf);
    const Vec vt(invT);
    for (i = 0; i + K <= V; i += K) {
      Vec v = Vec::loadu(zp + i) * vt;
      v.store(zp + i);
      m = at::vec::maximum(m, v);
    }
    float zmax = hmax(m);
    for (; i < V; ++i) {
      zp[i] *= invT;
      zmax = std::isnan(zp[i]) ? zp[i] : std::max(zmax, zp[i]);
    }
    if (std::isfinite(zmax)) {
      const Vec vz(zmax);
      for (i = 0; i + K <= V; i += K) fexp(Vec::loadu(zp + i) - vz).store(zp + i);
      for (; i < V; ++i) zp[i] = std::exp(zp[i] - zmax);
      // 5. cuts
      float cut = 0.f;
      if (top_k > 0) cut = std::max(cut, kth_largest(zp, V, top_k));
      if (top_p < 1.f) cut = top_p_cut(zp, V, cut, masked_sum(zp, V, cut), top_p, cand);
      if (min_p > 0.f) cut = std::max(cut, min_p);
      // 6. draw: first index where the running kept mass exceeds u * mass
      const float target = u * masked_sum(zp, V, cut);
      float cum = 0;
      const Vec vc(cut);
      int64_t last = -1;
      for (i = 0; i + K <= V && token < 0; i += K) {
        Vec v = Vec::loadu(zp + i);
        Vec kept = Vec::blendv(Vec(0), v, v >= vc);
        float s = hsum(kept);
        if (s > 0) {
          if (cum + s > target) {
            for (int64_t j = i; j < i + K; ++j)
              if (zp[j] >= cut && zp[j] > 0) {
                cum += zp[j];
                last = j;
                if (cum > target) {
                  token = j;
                  break;
                }
              }
          } else {
            cum += s;
            for (int64_t j = i + K - 1; j >= i; --j)
              if (zp[j] >= cut && zp[j] > 0) {
                last = j;
                break;
              }
          }
        }
      }
      for (; i < V && token < 0; ++i)
        if (zp[i] >= cut && zp[i] > 0) {
          cum += zp[i];
          last = i;
          if (cum > target) token = i;
        }
      if (token < 0) token = last;  // u * mass rounded up to the whole mass: the last kept token
    }
  }
  *tok_out = token;
  *lp_out = token >= 0 ? static_cast<float>(x[token]) - raw_lse : nan;
}

std::tuple<at::Tensor, at::Tensor> sample_fwd(const at::Tensor& logits, const at::Tensor& uniform,
                                              const at::Tensor& params, const c10::optional<at::Tensor>& history,
                                              const c10::optional<at::Tensor>& bias_idx,
                                              const c10::optional<at::Tensor>& bias_val) {
  check_rows(logits, "logits");
  TORCH_CHECK(uniform.scalar_type() == at::kFloat && params.scalar_type() == at::kFloat && params.is_contiguous() &&
                  uniform.is_contiguous(),
              "sample_fwd: uniform and params must be contiguous float32");
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor hist = history.has_value() ? history->contiguous() : at::Tensor();
  at::Tensor bi = bias_idx.has_value() ? bias_idx->contiguous() : at::Tensor();
  at::Tensor bv = bias_val.has_value() ? bias_val->contiguous() : at::Tensor();
  const int64_t L = hist.defined() ? hist.size(1) : 0, NB = bi.defined() ? bi.size(1) : 0;
  auto tokens = tritium::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = tritium::empty({B}, logits.options().dtype(at::kFloat));
  TRITIUM_DISPATCH_FLOATING(logits.scalar_type(), "tritium_sample", [&] {
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    const float* up = uniform.const_data_ptr<float>();
    const float* pp = params.const_data_ptr<float>();
    const int64_t* hp = L ? hist.const_data_ptr<int64_t>() : nullptr;
    const int64_t* bip = NB ? bi.const_data_ptr<int64_t>() : nullptr;
    const float* bvp = NB ? bv.const_data_ptr<float>() : nullptr;
    int64_t* tp = tokens.mutable_data_ptr<int64_t>();
    float* lp = logprobs.mutable_data_ptr<float>();
    const int64_t sx = logits.stride(0);
    at::parallel_for(0, B, 1, [&](int64_t rb, int64_t re) {
      std::vector<float> z(V), cand;
      std::vector<int64_t> toks;
      for (int64_t r = rb; r < re; ++r)
        sample_row<scalar_t>(xp + r * sx, V, pp + r * 7, up[r], hp ? hp + r * L : nullptr, L,
                             bip ? bip + r * NB : nullptr, bvp ? bvp + r * NB : nullptr, NB, z, toks, cand,
                             tp + r, lp + r);
    });
  });
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) { m.impl("sample_fwd", &sample_fwd); }

}  // namespace tritium
