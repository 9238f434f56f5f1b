// WaveNet's gated activation, CPU kernels registered for the tritium ops python/tritium/ops/wavenet.py defines.
//
// h (B, 2C, T) is a dilated convolution's output, channels first: per batch row its first C channels are the
// filter half a, the last C the gate half g (one contiguous run of n = C T elements each). With the optional
// conditioning c of h's shape added to both halves:
//   z = tanh(a + c_a) * sigmoid(g + c_g)                                   (B, C, T)
//   backward: da = dz s (1 - t^2), dg = dz t s (1 - s), dh = [da | dg] (B, 2C, T) (also the conditioning's
//   gradient), t and s recomputed from h: the forward saves nothing but its inputs.
// One pass over h (and c) and z each way; float accumulation for 16-bit, double for double.
#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

template <typename A>
inline void gate_scalar(A a, A g, A& t, A& s) {
  t = std::tanh(a);
  s = A(1) / (A(1) + std::exp(-g));
}

// Calls f(b, off, len) over [s0, s1) of the (B, n) index space, one call per batch row's stretch.
template <typename F>
inline void for_rows(int64_t s0, int64_t s1, int64_t n, F&& f) {
  for (int64_t p = s0; p < s1;) {
    const int64_t b = p / n, off = p % n, len = std::min(s1 - p, n - off);
    f(b, off, len);
    p += len;
  }
}

void check(const at::Tensor& h, const c10::optional<at::Tensor>& cond) {
  TORCH_CHECK(h.dim() == 3 && h.size(1) % 2 == 0, "wavenet_gate: h must be (batch, 2 C, time), got ", h.sizes());
  TORCH_CHECK(h.is_contiguous(), "wavenet_gate: h must be contiguous");
  if (cond.has_value()) {
    TORCH_CHECK(cond->sizes() == h.sizes() && cond->is_contiguous() && cond->scalar_type() == h.scalar_type(),
                "wavenet_gate: cond must be a contiguous tensor of h's shape and dtype");
  }
}

at::Tensor wavenet_gate_fwd(const at::Tensor& h, const c10::optional<at::Tensor>& cond) {
  check(h, cond);
  const int64_t B = h.size(0), C = h.size(1) / 2, T = h.size(2), n = C * T;
  auto z = empty({B, C, T}, h.options());
  if (z.numel() == 0) return z;
  TRITIUM_DISPATCH_FLOATING(h.scalar_type(), "tritium_wavenet_gate_fwd", [&] {
    using IO = VecIO<scalar_t>;
    using A = typename IO::acc_t;
    using V = typename IO::Vec;
    constexpr int64_t K = IO::kSize;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* cp = cond.has_value() ? cond->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * n, 4096, [&](int64_t s0, int64_t s1) {
      for_rows(s0, s1, n, [&](int64_t b, int64_t off, int64_t len) {
        const scalar_t* a = hp + b * 2 * n + off;
        const scalar_t* g = a + n;
        const scalar_t* ca = cp ? cp + b * 2 * n + off : nullptr;
        scalar_t* o = zp + b * n + off;
        int64_t i = 0;
        for (; i + K <= len; i += K) {
          V va = IO::load(a + i), vg = IO::load(g + i);
          if (ca) {
            va = va + IO::load(ca + i);
            vg = vg + IO::load(ca + n + i);
          }
          IO::store(o + i, ftanh(va) * fsigmoid(vg));
        }
        for (; i < len; ++i) {
          A av = static_cast<A>(a[i]), gv = static_cast<A>(g[i]), t, s;
          if (ca) {
            av += static_cast<A>(ca[i]);
            gv += static_cast<A>(ca[n + i]);
          }
          gate_scalar(av, gv, t, s);
          o[i] = static_cast<scalar_t>(t * s);
        }
      });
    });
  });
  return z;
}

at::Tensor wavenet_gate_bwd(const at::Tensor& dz, const at::Tensor& h, const c10::optional<at::Tensor>& cond) {
  check(h, cond);
  const int64_t B = h.size(0), C = h.size(1) / 2, T = h.size(2), n = C * T;
  TORCH_CHECK(dz.sizes() == at::IntArrayRef({B, C, T}) && dz.is_contiguous() && dz.scalar_type() == h.scalar_type(),
              "wavenet_gate_bwd: dz must be a contiguous (batch, C, time) tensor of h's dtype");
  auto dh = empty(h.sizes(), h.options());
  if (dh.numel() == 0) return dh;
  TRITIUM_DISPATCH_FLOATING(h.scalar_type(), "tritium_wavenet_gate_bwd", [&] {
    using IO = VecIO<scalar_t>;
    using A = typename IO::acc_t;
    using V = typename IO::Vec;
    constexpr int64_t K = IO::kSize;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* cp = cond.has_value() ? cond->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* dzp = dz.const_data_ptr<scalar_t>();
    scalar_t* dhp = dh.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * n, 4096, [&](int64_t s0, int64_t s1) {
      for_rows(s0, s1, n, [&](int64_t b, int64_t off, int64_t len) {
        const scalar_t* a = hp + b * 2 * n + off;
        const scalar_t* g = a + n;
        const scalar_t* ca = cp ? cp + b * 2 * n + off : nullptr;
        const scalar_t* d = dzp + b * n + off;
        scalar_t* da = dhp + b * 2 * n + off;
        scalar_t* dg = da + n;
        int64_t i = 0;
        for (; i + K <= len; i += K) {
          V va = IO::load(a + i), vg = IO::load(g + i);
          if (ca) {
            va = va + IO::load(ca + i);
            vg = vg + IO::load(ca + n + i);
          }
          const V t = ftanh(va), s = fsigmoid(vg), vd = IO::load(d + i);
          IO::store(da + i, vd * s * (V(1) - t * t));
          IO::store(dg + i, vd * t * s * (V(1) - s));
        }
        for (; i < len; ++i) {
          A av = static_cast<A>(a[i]), gv = static_cast<A>(g[i]), t, s;
          if (ca) {
            av += static_cast<A>(ca[i]);
            gv += static_cast<A>(ca[n + i]);
          }
          gate_scalar(av, gv, t, s);
          const A dv = static_cast<A>(d[i]);
          da[i] = static_cast<scalar_t>(dv * s * (A(1) - t * t));
          dg[i] = static_cast<scalar_t>(dv * t * s * (A(1) - s));
        }
      });
    });
  });
  return dh;
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("wavenet_gate_fwd", &wavenet_gate_fwd);
  m.impl("wavenet_gate_bwd", &wavenet_gate_bwd);
}

}  // namespace tritium
