// Rotary position embedding CPU kernel (q and k in one pass), registered for the CPU key of the tritium op
// whose schema python/tritium/ops/rope.py defines.
//
// Per token n at position p = positions[n], for every head of q and of k and every pair i < R/2 (R = rotary
// dim = 2 * cos.size(1) <= head dim; dims past R are copied):
//   half layout (Llama):        (x[i], x[i + R/2]) -> (x[i] c - x[i + R/2] s, x[i + R/2] c + x[i] s)
//   interleaved layout (GPT-J): (x[2i], x[2i + 1]) -> (x[2i] c - x[2i + 1] s, x[2i + 1] c + x[2i] s)
// with c = cos[p, i], s = sin[p, i] (float32), negated s for the backward (the inverse rotation).
// Tokens are independent: at::parallel_for over tokens; each token's cos/sin row is read once for all heads.
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

template <typename T>
void rotate_head(const T* x, T* y, const float* c, const float* s, int64_t half, int64_t D, bool interleaved,
                 float sign) {
  using IO = VecIO<T>;
  using Vec = Vectorized<float>;
  constexpr int64_t K = IO::kSize;
  if (!interleaved) {
    const T* x1 = x;
    const T* x2 = x + half;
    T* y1 = y;
    T* y2 = y + half;
    int64_t i = 0;
    if constexpr (std::is_same_v<typename IO::acc_t, float>) {
      const Vec vsign(sign);
      for (; i + K <= half; i += K) {
        Vec a = IO::load(x1 + i), b = IO::load(x2 + i), vc = Vec::loadu(c + i), vs = Vec::loadu(s + i) * vsign;
        IO::store(y1 + i, a * vc - b * vs);
        IO::store(y2 + i, b * vc + a * vs);
      }
    }
    for (; i < half; ++i) {
      using A = typename IO::acc_t;
      const A a = static_cast<A>(x1[i]), b = static_cast<A>(x2[i]), cc = c[i], ss = sign * s[i];
      y1[i] = static_cast<T>(a * cc - b * ss);
      y2[i] = static_cast<T>(b * cc + a * ss);
    }
  } else {
    using A = typename IO::acc_t;
    for (int64_t i = 0; i < half; ++i) {
      const A a = static_cast<A>(x[2 * i]), b = static_cast<A>(x[2 * i + 1]), cc = c[i], ss = sign * s[i];
      y[2 * i] = static_cast<T>(a * cc - b * ss);
      y[2 * i + 1] = static_cast<T>(b * cc + a * ss);
    }
  }
  if (y != x)
    for (int64_t i = 2 * half; i < D; ++i) y[i] = x[i];  // past the rotary dim: unchanged
}

// x (N, H, D) with unit last stride -> a new contiguous (N, H, D)
template <typename T>
void rope_tensor(const at::Tensor& x, at::Tensor& y, const float* cp, const float* sp, int64_t ld,
                 const int64_t* pos, int64_t max_pos, int64_t half, bool interleaved, float sign, int64_t n0,
                 int64_t n1) {
  const int64_t H = x.size(1), D = x.size(2), sn = x.stride(0), sh = x.stride(1);
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t p = pos[n];
    TORCH_CHECK(p >= 0 && p < max_pos, "rope: position ", p, " out of range of the tables [0, ", max_pos, ")");
    for (int64_t h = 0; h < H; ++h)
      rotate_head<T>(xp + n * sn + h * sh, yp + (n * H + h) * D, cp + p * ld, sp + p * ld, half, D, interleaved,
                     sign);
  }
}

std::tuple<at::Tensor, at::Tensor> rope_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, const at::Tensor& positions, bool interleaved,
                                            bool inverse) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "rope: q and k must be (tokens, heads, head_dim)");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "rope: q and k need a contiguous last dimension");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous(), "rope: cos and sin must be contiguous float32 tables");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "rope: positions must be int64");
  const int64_t N = q.size(0), half = cos.size(1);
  auto qo = empty(q.sizes(), q.options());
  auto ko = empty(k.sizes(), k.options());
  const float* cp = cos.const_data_ptr<float>();
  const float* sp = sin.const_data_ptr<float>();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  const float sign = inverse ? -1.f : 1.f;
  const int64_t max_pos = cos.size(0);
  TRITIUM_DISPATCH_FLOATING(q.scalar_type(), "tritium_rope_fwd", [&] {
    at::parallel_for(0, N, row_grain((q.size(1) + k.size(1)) * q.size(2)), [&](int64_t n0, int64_t n1) {
      rope_tensor<scalar_t>(q, qo, cp, sp, half, pos, max_pos, half, interleaved, sign, n0, n1);
      rope_tensor<scalar_t>(k, ko, cp, sp, half, pos, max_pos, half, interleaved, sign, n0, n1);
    });
  });
  return {qo, ko};
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) { m.impl("rope_fwd", &rope_fwd); }

}  // namespace tritium
