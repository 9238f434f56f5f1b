// 2-D max pooling over non-overlapping windows, CPU kernels registered for the tritium ops
// python/tritium/ops/pooling.py defines.
//
// x (P, H, W) contiguous (P = batch x channels planes), windows of kh x kw with stride (kh, kw), no padding:
//   y[p, i, j] = max over the window at (i kh, j kw) of x (Ho = H / kh, Wo = W / kw, floor; trailing rows and
//   columns belong to no window), and idx[p, i, j] = the window offset r kw + c (uint8) of the first maximum,
//   a NaN winning as in torch's max_pool2d (the last NaN of the window).
//   backward: dx is dy at each window's idx and zero elsewhere (the windows do not overlap).
// Forward reads x once and writes y and idx (1 byte each); backward reads dy and idx and writes dx once.
// Comparisons are in the input's dtype widened to float (exact): 16-bit values are never rounded.
#include <cmath>
#include <limits>

#include "pool.h"
#include "vec.h"

namespace tritium {
namespace {

void check_x(const at::Tensor& x, int64_t kh, int64_t kw) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "max_pool2d: x must be a contiguous (planes, H, W) tensor, got ",
              x.sizes());
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh * kw <= 256, "max_pool2d: the window must have 1 to 256 elements, got ", kh,
              " x ", kw);
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_fwd(const at::Tensor& x, int64_t kh, int64_t kw) {
  check_x(x, kh, kw);
  const int64_t P = x.size(0), H = x.size(1), W = x.size(2), Ho = H / kh, Wo = W / kw;
  auto y = empty({P, Ho, Wo}, x.options());
  auto idx = empty({P, Ho, Wo}, x.options().dtype(at::kByte));
  if (y.numel() == 0) return {y, idx};
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_max_pool2d_fwd", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    uint8_t* ip = idx.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, P * Ho, row_grain(kh * W), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // r: one output row (plane r / Ho, row r % Ho)
        const scalar_t* row = xp + (r / Ho) * H * W + (r % Ho) * kh * W;
        scalar_t* yo = yp + r * Wo;
        uint8_t* io = ip + r * Wo;
        for (int64_t j = 0; j < Wo; ++j) {
          const scalar_t* win = row + j * kw;
          A m = -std::numeric_limits<A>::infinity();
          int64_t best = 0;
          for (int64_t a = 0; a < kh; ++a) {
            for (int64_t b = 0; b < kw; ++b) {
              const A v = static_cast<A>(win[a * W + b]);
              if (v > m || std::isnan(v)) {
                m = v;
                best = a * kw + b;
              }
            }
          }
          yo[j] = static_cast<scalar_t>(m);
          io[j] = static_cast<uint8_t>(best);
        }
      }
    });
  });
  return {y, idx};
}

at::Tensor max_pool2d_bwd(const at::Tensor& dy, const at::Tensor& idx, int64_t kh, int64_t kw, int64_t H,
                          int64_t W) {
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh * kw <= 256, "max_pool2d_bwd: the window must have 1 to 256 elements");
  TORCH_CHECK(dy.dim() == 3 && dy.is_contiguous() && dy.size(1) == H / kh && dy.size(2) == W / kw,
              "max_pool2d_bwd: dy must be a contiguous (planes, H / kh, W / kw) tensor, got ", dy.sizes());
  TORCH_CHECK(idx.sizes() == dy.sizes() && idx.is_contiguous() && idx.scalar_type() == at::kByte,
              "max_pool2d_bwd: idx must be a contiguous uint8 tensor of dy's shape");
  const int64_t P = dy.size(0), Ho = dy.size(1), Wo = dy.size(2);
  auto dx = empty({P, H, W}, dy.options());
  if (dx.numel() == 0) return dx;
  TRITIUM_DISPATCH_FLOATING(dy.scalar_type(), "tritium_max_pool2d_bwd", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const uint8_t* ip = idx.const_data_ptr<uint8_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, P, row_grain(H * W), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        scalar_t* plane = dxp + p * H * W;
        std::memset(static_cast<void*>(plane), 0, sizeof(scalar_t) * H * W);  // all-zero bits: +0.0 in every dtype
        for (int64_t i = 0; i < Ho; ++i) {
          const scalar_t* d = dyp + (p * Ho + i) * Wo;
          const uint8_t* id = ip + (p * Ho + i) * Wo;
          scalar_t* row = plane + i * kh * W;
          for (int64_t j = 0; j < Wo; ++j) {
            const int64_t o = id[j];
            row[(o / kw) * W + j * kw + o % kw] = d[j];
          }
        }
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("max_pool2d_fwd", &max_pool2d_fwd);
  m.impl("max_pool2d_bwd", &max_pool2d_bwd);
}

}  // namespace tritium
