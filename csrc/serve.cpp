// serve_decode: a Llama decoder's layers for one decode step (one token per sequence over the paged KV cache), as
// one call. The CPU kernel of the op python/tritium/ops/serve.py defines.
//
// It runs exactly the ops Block.serve (python/tritium/models/llama.py) runs, in the same order, through the
// dispatcher: per layer the QKV projection, rope, append_kv, paged_attention_decode, the output projection,
// fused_add_rms_norm, the gate/up projection with SwiGLU, the down projection and fused_add_rms_norm. Its output
// is therefore bit-identical to that loop's; what it saves is the loop's Python: at one token per sequence a
// layer's ops are a few microseconds each, and calling ~300 of them from Python costs a decode step as much as a
// third of its weight stream.
//
// A projection is described by a kind (tritium.ops.serve's KIND_* table, which PackedLinear / QuantizedLinear
// choose for the step's row count), three tensors and five ints:
//   QUANT          qdata, scales, mins (empty: none); bits, group, n, k, int8_act  -> quant_linear
//   PANELS         packed; n                                                      -> linear_packed
//   PANELS_SWIGLU  packed; n (SwiGLU in the product's epilogue)                   -> linear_packed_swiglu
//   SMALL          weight                                                         -> linear_small
//   MATMUL         weight                                                         -> x @ weight^T
//   ONEDNN         packed (oneDNN's blocked layout)                               -> mkldnn::_linear_pointwise
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace tritium {
namespace {

using c10::optional;
using Tensor = at::Tensor;

enum Kind : int64_t { QUANT = 0, PANELS = 1, PANELS_SWIGLU = 2, SMALL = 3, MATMUL = 4, ONEDNN = 5, N_KINDS = 6 };
constexpr int64_t kTensorsPerLinear = 3, kIntsPerLinear = 6;  // [kind, 5 ints]
constexpr int64_t kLinears = 4;                               // wqkv, wo, w_gate_up, w_down
constexpr int64_t kTensorsPerLayer = 2 + kLinears * kTensorsPerLinear;  // attn_norm, mlp_norm, the projections
constexpr int64_t kLayoutGateUp = 1;                                    // tritium.ops.activations.LAYOUT_GATE_UP

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<Sig>();
}

struct Ops {
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, int64_t,
                                  int64_t, int64_t, int64_t, int64_t)>
      quant_linear = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, int64_t, int64_t,
                               int64_t, int64_t, int64_t)>("tritium::quant_linear");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, int64_t, const optional<Tensor>&)> linear_packed =
      op<Tensor(const Tensor&, const Tensor&, int64_t, const optional<Tensor>&)>("tritium::linear_packed");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, int64_t)> linear_packed_swiglu =
      op<Tensor(const Tensor&, const Tensor&, int64_t)>("tritium::linear_packed_swiglu");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&)> linear_small =
      op<Tensor(const Tensor&, const Tensor&)>("tritium::linear_small");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, c10::string_view,
                                  c10::List<optional<c10::Scalar>>, optional<c10::string_view>)>
      onednn = op<Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, c10::string_view,
                         c10::List<optional<c10::Scalar>>, optional<c10::string_view>)>("mkldnn::_linear_pointwise");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const optional<Tensor>&, int64_t)> swiglu =
      op<Tensor(const Tensor&, const optional<Tensor>&, int64_t)>("tritium::swiglu_fwd");
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(const Tensor&, const optional<Tensor>&, double)> rms_norm =
      op<std::tuple<Tensor, Tensor>(const Tensor&, const optional<Tensor>&, double)>("tritium::rms_norm_fwd");
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const optional<Tensor>&,
                                                               double)>
      add_rms_norm = op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const optional<Tensor>&,
                                                           double)>("tritium::fused_add_rms_norm_fwd");
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                       const Tensor&, bool, bool)>
      rope = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           bool, bool)>("tritium::rope_fwd");
  c10::TypedOperatorHandle<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>
      append_kv = op<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
          "tritium::append_kv");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                                  optional<double>, optional<int64_t>)>
      paged_decode = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                               optional<double>, optional<int64_t>)>("tritium::paged_attention_decode");
};

const Ops& ops() {
  static const Ops o;  // looked up on first use: the schemas are defined when tritium's Python imports
  return o;
}

// x (T, in) through projection j of the flat descriptions; swiglu: the weight is a fused [gate | up] projection
Tensor project(const Ops& o, const Tensor& x, at::TensorList t, at::IntArrayRef d, bool swiglu) {
  Tensor y;
  switch (d[0]) {
    case QUANT:
      y = o.quant_linear.call(x, t[0], t[1], t[2].numel() ? optional<Tensor>(t[2]) : c10::nullopt, d[1], d[2], d[3],
                              d[4], d[5]);
      break;
    case PANELS:
      y = o.linear_packed.call(x, t[0], d[1], c10::nullopt);
      break;
    case PANELS_SWIGLU:
      return o.linear_packed_swiglu.call(x, t[0], d[1]);
    case SMALL:
      y = o.linear_small.call(x, t[0]);
      break;
    case MATMUL:
      y = at::matmul(x, t[0].t());
      break;
    case ONEDNN:
      y = o.onednn.call(x, t[0], c10::nullopt, "none", c10::List<optional<c10::Scalar>>(), c10::nullopt);
      break;
    default:
      TORCH_CHECK(false, "serve_decode: unknown projection kind ", d[0]);
  }
  return swiglu ? o.swiglu.call(y, c10::nullopt, kLayoutGateUp) : y;
}

Tensor serve_decode(const Tensor& x, at::TensorList weights, at::IntArrayRef linears, at::TensorList pools,
                    const Tensor& final_norm, const Tensor& cos, const Tensor& sin, const Tensor& positions,
                    const Tensor& slot_mapping, const Tensor& block_tables, const Tensor& seq_lens, int64_t n_heads,
                    double eps, double scale) {
  const int64_t L = static_cast<int64_t>(pools.size()) / 2;
  TORCH_CHECK(L > 0 && static_cast<int64_t>(pools.size()) == 2 * L, "serve_decode: pools must be [k_pool, v_pool] "
              "per layer, got ", pools.size(), " tensors");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * kTensorsPerLayer, "serve_decode: weights must hold ",
              kTensorsPerLayer, " tensors per layer (", L * kTensorsPerLayer, "), got ", weights.size());
  TORCH_CHECK(static_cast<int64_t>(linears.size()) == L * kLinears * kIntsPerLinear, "serve_decode: linears must "
              "hold ", kLinears * kIntsPerLinear, " ints per layer (", L * kLinears * kIntsPerLinear, "), got ",
              linears.size());
  TORCH_CHECK(x.dim() == 2, "serve_decode: x must be (tokens, dim), got ", x.sizes());
  for (int64_t i = 0; i < L * kLinears; ++i) {
    const int64_t kind = linears[i * kIntsPerLinear];
    TORCH_CHECK(kind >= 0 && kind < N_KINDS, "serve_decode: projection ", i, " has unknown kind ", kind);
  }
  const Ops& o = ops();
  const int64_t T = x.size(0), hkv = pools[0].size(2), hd = pools[0].size(3);
  const int64_t qw = n_heads * hd, kvw = hkv * hd;
  Tensor y = std::get<0>(o.rms_norm.call(x, weights[0], eps)), h = x;
  for (int64_t l = 0; l < L; ++l) {
    at::TensorList w = weights.slice(l * kTensorsPerLayer, kTensorsPerLayer);
    at::IntArrayRef d = linears.slice(l * kLinears * kIntsPerLinear, kLinears * kIntsPerLinear);
    auto lin = [&](int64_t j) { return std::make_pair(w.slice(2 + j * kTensorsPerLinear, kTensorsPerLinear),
                                                      d.slice(j * kIntsPerLinear, kIntsPerLinear)); };
    const Tensor& next_norm = l + 1 < L ? weights[(l + 1) * kTensorsPerLayer] : final_norm;
    const Tensor &k_pool = pools[2 * l], &v_pool = pools[2 * l + 1];
    // attention
    auto [tq, dq] = lin(0);
    const Tensor qkv = project(o, y, tq, dq, false);
    TORCH_CHECK(qkv.size(1) == qw + 2 * kvw, "serve_decode: layer ", l, "'s QKV projection gives ", qkv.size(1),
                " columns, expected ", qw + 2 * kvw);
    auto [q, k] = o.rope.call(qkv.narrow(1, 0, qw).view({T, n_heads, hd}), qkv.narrow(1, qw, kvw).view({T, hkv, hd}),
                              cos, sin, positions, false, false);
    o.append_kv.call(k, qkv.narrow(1, qw + kvw, kvw).view({T, hkv, hd}), k_pool, v_pool, slot_mapping);
    const Tensor att = o.paged_decode.call(q, k_pool, v_pool, block_tables, seq_lens, scale, c10::nullopt,
                                           c10::nullopt);
    auto [to, d_o] = lin(1);
    const Tensor a = project(o, att.view({T, qw}), to, d_o, false);
    std::tie(y, h, std::ignore) = o.add_rms_norm.call(a, h, w[1], eps);
    // MLP
    auto [tg, dg] = lin(2);
    auto [tdn, ddn] = lin(3);
    const Tensor m = project(o, project(o, y, tg, dg, true), tdn, ddn, false);
    std::tie(y, h, std::ignore) = o.add_rms_norm.call(m, h, next_norm, eps);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(tritium, CPU, m) { m.impl("serve_decode", &serve_decode); }
// a 16-bit model's oneDNN-packed weights (ONEDNN) are MkldnnCPU tensors, which select this key
TORCH_LIBRARY_IMPL(tritium, MkldnnCPU, m) { m.impl("serve_decode", &serve_decode); }

}  // namespace tritium
