// tritium::linear_small's CPU kernel (python/tritium/ops/linear.py): y = x @ w^T through rowgemm (rowgemm.h),
// which explains why it beats BLAS on the serving path's shapes.
#include <cstdlib>
#include <map>
#include <mutex>

#include "blas.h"
#include "cpu.h"
#include "panel.h"
#include "pool.h"
#include "rowgemm.h"

namespace tritium {

namespace {

// The cache of packed frozen weights. A frozen weight (LoRA's base layer) is read by two products per training
// step, the forward (its panels of w^T) and the input gradient (its panels of w), and packing it for each call
// allocates and writes a copy as large as the weight. The cache keeps each packing until the weight changes:
// an entry is keyed on the storage (held weakly: a freed weight's entry is dropped, never matched by a new tensor
// at the same address), its data pointer, sizes, strides, dtype and layout, and holds the version counter the
// weight had when packed; any in-place change through the tensor or a view of it (merge(), unmerge(),
// load_state_dict's copy_, an optimizer's step) bumps that counter and the next call repacks. Like autograd's
// saved tensors, a write through .data (a fresh version counter) is not seen: write frozen weights in place
// under torch.no_grad() instead. Inference tensors (no version counter) are never cached. Least recently used
// entries go first past the limit (TRITIUM_PACK_CACHE_MB, default 1024; 0 turns the cache off).
class PackCache {
 public:
  static PackCache& get() {
    static PackCache* cache = new PackCache();  // leaked: no destruction-order trouble at exit
    return *cache;
  }

  // b's panels (panel::pack of b's columns when rows_of_b, else pack_cols), cached; undefined if b can't be
  template <typename A>
  at::Tensor panels(const at::Tensor& b, bool rows_of_b) {
    if (limit_ == 0 || b.is_inference() || !b.has_storage()) return at::Tensor();
    const int64_t K = b.size(0), N = b.size(1);
    const auto* storage = b.storage().unsafeGetStorageImpl();
    const uint32_t version = b.unsafeGetTensorImpl()->version_counter().current_version();
    const Key key{b.const_data_ptr(), rows_of_b};
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) {
        Entry& e = it->second;
        const auto alive = e.storage.lock();
        if (alive.get() == storage && e.version == version && e.dtype == b.scalar_type() &&
            e.sizes == b.sizes().vec() && e.strides == b.strides().vec()) {
          e.tick = ++tick_;
          ++hits_;
          return e.packed;
        }
        drop(it);
      }
      ++misses_;
    }
    at::Tensor packed = at::empty({panel::packed_size<A>(N, K)}, b.options().requires_grad(false));
    if (rows_of_b)
      panel::pack<A>(b.const_data_ptr<A>(), K, N, K, packed.mutable_data_ptr<A>());
    else
      panel::pack_cols<A>(b.const_data_ptr<A>(), N, K, N, packed.mutable_data_ptr<A>());
    const size_t nbytes = packed.nbytes();
    std::lock_guard<std::mutex> lock(mu_);
    if (nbytes > limit_) return packed;  // larger than the whole cache: used once
    for (auto it = map_.begin(); it != map_.end();) {  // the entries of freed weights
      auto next = std::next(it);
      if (it->second.storage.expired()) drop(it);
      it = next;
    }
    while (bytes_ + nbytes > limit_ && !map_.empty()) {
      auto lru = map_.begin();
      for (auto it = map_.begin(); it != map_.end(); ++it)
        if (it->second.tick < lru->second.tick) lru = it;
      drop(lru);
    }
    auto found = map_.find(key);  // another thread's packing of the same weight: keep the newer
    if (found != map_.end()) drop(found);
    map_.emplace(key, Entry{c10::weak_intrusive_ptr<c10::StorageImpl>(b.storage().getWeakStorageImpl()), version,
                            b.scalar_type(), b.sizes().vec(), b.strides().vec(), packed, ++tick_});
    bytes_ += nbytes;
    return packed;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {int64_t(map_.size()), int64_t(bytes_), int64_t(limit_), hits_, misses_};
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    map_.clear();
    bytes_ = 0;
  }
  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = bytes;
    while (bytes_ > limit_ && !map_.empty()) drop(map_.begin());
  }

 private:
  PackCache() {
    const char* env = std::getenv("TRITIUM_PACK_CACHE_MB");
    limit_ = size_t(env ? std::max(0L, std::atol(env)) : 1024L) << 20;
  }
  using Key = std::pair<const void*, bool>;
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    uint32_t version;
    at::ScalarType dtype;
    std::vector<int64_t> sizes, strides;
    at::Tensor packed;
    uint64_t tick;
  };
  void drop(std::map<Key, Entry>::iterator it) {
    bytes_ -= it->second.packed.nbytes();
    map_.erase(it);
  }

  std::mutex mu_;
  std::map<Key, Entry> map_;
  size_t bytes_ = 0, limit_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  uint64_t tick_ = 0;
};

}  // namespace

bool panel_mm_out(const at::Tensor& a, const at::Tensor& b, at::Tensor& y, const void* c, int64_t ldc, bool frozen,
                  const at::Tensor* a2, const at::Tensor* b2) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  // float/double with many rows: pack b once (a few MB, amortised over the rows) and run panel_gemm, whose
  // register-tiled outer products keep every accumulator in registers; b is the weight as torch stores it, either
  // transposed (w.t(), the forward) or as it is (w, the input gradient)
  const bool rows_of_b = b.stride(0) == 1 && b.stride(1) == K;   // b = w.t() for a contiguous w (N, K)
  const bool cols_of_b = b.stride(1) == 1 && b.stride(0) == N;   // b contiguous (K, N)
  if (!((a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble) && M >= kPanelRows && K > 0 && N > 0 &&
        (rows_of_b || cols_of_b)))
    return false;
  // the second product's b2 (R, N), packed per call (R is small): the same two layouts
  const int64_t R = b2 ? b2->size(0) : 0;
  const bool rows_of_b2 = b2 && b2->stride(0) == 1 && b2->stride(1) == R;
  if (b2 && !(a2 && a2->size(0) == M && a2->size(1) == R && b2->size(1) == N &&
              a2->scalar_type() == a.scalar_type() && b2->scalar_type() == a.scalar_type() &&
              (rows_of_b2 || (b2->stride(1) == 1 && b2->stride(0) == N))))
    return false;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tritium_panel_mm_out", [&] {
    const at::Tensor cached = frozen ? PackCache::get().panels<scalar_t>(b, rows_of_b) : at::Tensor();
    std::vector<scalar_t> own;
    if (!cached.defined()) {
      own.resize(panel::packed_size<scalar_t>(N, K));
      if (rows_of_b)
        panel::pack<scalar_t>(b.const_data_ptr<scalar_t>(), K, N, K, own.data());
      else
        panel::pack_cols<scalar_t>(b.const_data_ptr<scalar_t>(), N, K, N, own.data());
    }
    const scalar_t* packed = cached.defined() ? cached.const_data_ptr<scalar_t>() : own.data();
    const auto ac = a.stride(1) == 1 ? a : a.contiguous();
    std::vector<scalar_t> packed2;
    at::Tensor a2c;
    if (R > 0) {
      packed2.resize(panel::packed_size<scalar_t>(N, R));
      if (rows_of_b2)
        panel::pack<scalar_t>(b2->const_data_ptr<scalar_t>(), R, N, R, packed2.data());
      else
        panel::pack_cols<scalar_t>(b2->const_data_ptr<scalar_t>(), N, R, N, packed2.data());
      a2c = a2->stride(1) == 1 ? *a2 : a2->contiguous();
    }
    panel_gemm<scalar_t, scalar_t>(ac.const_data_ptr<scalar_t>(), ac.stride(0), M, K, packed, N,
                         y.mutable_data_ptr<scalar_t>(), y.stride(0), static_cast<const scalar_t*>(c), ldc, -1,
                         nullptr, 0, R > 0 ? a2c.const_data_ptr<scalar_t>() : nullptr, R > 0 ? a2c.stride(0) : 0,
                         R > 0 ? packed2.data() : nullptr, R);
  });
  return true;
}

namespace {

at::Tensor linear_small(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear_small: x must be (M, K) and weight (N, K), got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "linear_small: x (M, K) and weight (N, K) must agree on K, got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear_small: weight must have x's dtype ", x.scalar_type(),
              ", got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), "linear_small: weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  TRITIUM_DISPATCH_FLOATING(x.scalar_type(), "tritium_linear_small", [&] {
    using A = acc_type<scalar_t>;
    // x contiguous in the accumulation type (read in place for float/double, converted once otherwise)
    const auto xc = x.contiguous();
    std::vector<A> buf;
    const A* xa = as_acc(xc.const_data_ptr<scalar_t>(), M * K, buf);
    rowgemm<scalar_t>(xa, K, M, K, w.const_data_ptr<scalar_t>(), N, y.mutable_data_ptr<scalar_t>(), N);
  });
  return y;
}

// a (M, K) @ b (K, N) [+ bias (N)] (panel_gemm or BLAS) into an output from tritium's pool (tritium::empty, csrc/pool.cpp):
// torch's allocator hands a large result fresh pages on every call, and the OS zeroes each page on its first
// touch: a cost proportional to the output's size, paid again on every call, that a reused block does not have.
at::Tensor mm_pooled(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "mm_pooled: a must be (M, K) and b (K, N), got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "mm_pooled: b must have a's dtype ", a.scalar_type(), ", got ",
              b.scalar_type());
  auto y = empty({a.size(0), b.size(1)}, a.options());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == b.size(1) && bias->scalar_type() == a.scalar_type(),
                "mm_pooled: bias must be (", b.size(1), ",) of dtype ", a.scalar_type(), ", got ", bias->sizes(), " ",
                bias->scalar_type());
  }
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (panel_mm_out(a, b, y, bias.has_value() ? bc.const_data_ptr() : nullptr, 0)) return y;
  if (bias.has_value()) {
    at::addmm_out(y, *bias, a, b);
  } else {
    at::mm_out(y, a, b);
  }
  return y;
}

// The weight and bias gradients of y = x w^T + b: dw (N, K) = dy^T x and db (N) = dy's column sums (empty when
// not bias), into pooled outputs. CPU float/double with many rows: panel_gemm_tn (panel.h; the bias gradient
// from its transposed blocks of dy); otherwise BLAS and a sum.
std::tuple<at::Tensor, at::Tensor> linear_wgrad(const at::Tensor& dy, const at::Tensor& x, bool bias) {
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0),
              "linear_wgrad: dy must be (M, N) and x (M, K), got ", dy.sizes(), " and ", x.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "linear_wgrad: x must have dy's dtype ", dy.scalar_type(),
              ", got ", x.scalar_type());
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1);
  auto dw = empty({N, K}, x.options());
  auto db = bias ? at::empty({N}, dy.options()) : at::empty({0}, dy.options());
  if (N == 0 || K == 0) {
    if (bias) db.copy_(dy.sum(0));
    return {dw, db};
  }
  if ((x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && M >= 2 * kTnChunk) {
    const auto dyc = dy.stride(1) == 1 ? dy : dy.contiguous();
    const auto xc = x.stride(1) == 1 ? x : x.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tritium_linear_wgrad", [&] {
      panel_gemm_tn<scalar_t>(dyc.const_data_ptr<scalar_t>(), dyc.stride(0), xc.const_data_ptr<scalar_t>(),
                              xc.stride(0), M, N, K, dw.mutable_data_ptr<scalar_t>(), K,
                              bias ? db.mutable_data_ptr<scalar_t>() : nullptr);
    });
    return {dw, db};
  }
  at::mm_out(dw, dy.t(), x);
  if (bias) at::sum_out(db, dy, {0});
  return {dw, db};
}

// Whether mm_acc_'s bfloat16 product goes to MKL's bf16 x bf16 -> f32 GEMM with beta = 1 (adding in place): on a
// CPU with AMX-BF16, where MKL runs it on the tiles; elsewhere oneDNN's 16-bit matmul and an add pass are faster.
bool bf16_blas_accumulates() { return cpu::features().amx_bf16 && blas().bf16 != nullptr; }

const bool kPathsReported = cpu::register_paths([] {
  return std::vector<std::pair<std::string, std::string>>{
      {"mm_acc_.bfloat16", bf16_blas_accumulates() ? "MKL bf16 GEMM, beta = 1 (AMX)" : "oneDNN matmul + add"}};
});

// c (M, N) float32, contiguous += a (M, K) @ b (K, N) for 16-bit a and b: the chunked cross-entropy's weight
// gradient. torch's mixed-dtype add would first copy the whole (V, H) product into a float tensor and then add it:
// two extra passes over a vocabulary-sized matrix per chunk, instead of the one pass here.
// Float/double a, b: the panels (a transposed a through panel_gemm_tn_rows, else panel_mm_out), else c.addmm_(a, b).
void mm_acc_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "mm_acc_: a must be (M, K) and b (K, N), got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(c.dim() == 2 && c.size(0) == a.size(0) && c.size(1) == b.size(1) && c.is_contiguous(),
              "mm_acc_: c must be a contiguous (", a.size(0), ", ", b.size(1), ") tensor, got ", c.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "mm_acc_: b must have a's dtype ", a.scalar_type(), ", got ",
              b.scalar_type());
  const bool k16 = a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
  if (!k16) {
    TORCH_CHECK(c.scalar_type() == a.scalar_type(), "mm_acc_: c must have a's dtype ", a.scalar_type(), ", got ",
                c.scalar_type());
    const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
    const bool fp = a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble;
    if (fp && M >= kPanelRows && K > 0 && N > 0 && a.stride(0) == 1 && a.stride(1) == M && b.stride(1) == 1) {
      // a = d.t() for a contiguous d (K, M): a weight-gradient-shaped product (info_nce's key gradient ds^T q),
      // on the panels with the threads splitting c's rows and adding into it (BLAS's addmm_ took 1.9x as long)
      AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tritium_mm_acc_tn", [&] {
        panel_gemm_tn_rows<scalar_t>(a.const_data_ptr<scalar_t>(), M, b.const_data_ptr<scalar_t>(), b.stride(0), K, M,
                                     N, c.mutable_data_ptr<scalar_t>(), N, true);
      });
      return;
    }
    if (!(fp && panel_mm_out(a, b, c, c.const_data_ptr(), c.stride(0)))) c.addmm_(a, b);
    return;
  }
  TORCH_CHECK(c.scalar_type() == at::kFloat, "mm_acc_: c must be float32 for 16-bit a and b, got ", c.scalar_type());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0 || K == 0) return;
  if (bf16_blas_accumulates() && a.scalar_type() == at::kBFloat16) {
    // MKL's bfloat16 GEMM on AMX tiles adds into c in place (beta = 1), products summed in float
    const auto ac = a.stride(0) == 1 || a.stride(1) == 1 ? a : a.contiguous();
    const auto bc = b.stride(0) == 1 || b.stride(1) == 1 ? b : b.contiguous();
    const bool ta = ac.stride(1) != 1, tb = bc.stride(1) != 1;
    gemm<c10::BFloat16>(ta, tb, M, N, K, 1.f, ac.const_data_ptr<c10::BFloat16>(), ta ? ac.stride(1) : ac.stride(0),
                        bc.const_data_ptr<c10::BFloat16>(), tb ? bc.stride(1) : bc.stride(0), 1.f,
                        c.mutable_data_ptr<float>(), N);
    return;
  }
  // the product by oneDNN's 16-bit GEMM into a pooled 16-bit buffer (as eager's matmul rounds it), then one
  // vectorised pass adds it into c (oneDNN's 16-bit matmul uses the CPU's bfloat16 dot-product instructions; MKL's
  // bf16 x bf16 -> f32 GEMM with beta = 1, which would add in place, is the slower kernel without AMX)
  auto prod = empty({M, N}, a.options());
  at::mm_out(prod, a, b);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(a.scalar_type(), "tritium_mm_acc_", [&] {
    const scalar_t* pp = prod.const_data_ptr<scalar_t>();
    float* cp = c.mutable_data_ptr<float>();
    at::parallel_for(0, M * N, 1 << 16, [&](int64_t i0, int64_t i1) {
      constexpr int64_t K2 = 2 * Vectorized<float>::size();
      int64_t i = i0;
      for (; i + K2 <= i1; i += K2) {
        auto [p0, p1] = load2(pp + i);
        (Vectorized<float>::loadu(cp + i) + p0).store(cp + i);
        (Vectorized<float>::loadu(cp + i + K2 / 2) + p1).store(cp + i + K2 / 2);
      }
      for (; i < i1; ++i) cp[i] += static_cast<float>(pp[i]);
    });
  });
}

// w (N, K) -> its column panels for linear_packed (panel.h): (ceil(N / P), K, P), P = panel::width (64 floats or
// 32 doubles with AVX-512), rows past N zero. w may also be the transpose of a contiguous (K, N) matrix v (for
// products x @ v, the cross-entropy's input gradient g @ W): its panels are v's rows copied, read in place.
at::Tensor pack_linear(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "pack_linear: weight must be (N, K), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
              "pack_linear: weight must be float32 or float64, got ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1);
  const bool transposed = N > 1 && K > 1 && w.stride(0) == 1 && w.stride(1) == N;
  const auto wc = transposed ? w : w.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "tritium_pack_linear", [&] {
    constexpr int64_t P = panel::width<scalar_t>();
    out = empty({(N + P - 1) / P, K, P}, w.options());  // pooled: a per-call packing (FLCE's) reuses warm pages
    if (transposed)
      panel::pack_cols<scalar_t>(wc.const_data_ptr<scalar_t>(), N, K, N, out.mutable_data_ptr<scalar_t>());
    else
      panel::pack<scalar_t>(wc.const_data_ptr<scalar_t>(), K, N, K, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// w (2F, K) = [gate; up] rows -> pack_linear's panels of the rows interleaved so each panel holds F's gate rows
// [p H, (p + 1) H) then the same up rows, H = panel width / 2 (linear_packed_swiglu's layout). F % H == 0.
at::Tensor pack_linear_glu(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) % 2 == 0, "pack_linear_glu: weight must be (2F, K), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
              "pack_linear_glu: weight must be float32 or float64, got ", w.scalar_type());
  int64_t H = 0;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "tritium_pack_linear_glu", [&] { H = panel::width<scalar_t>() / 2; });
  const int64_t F = w.size(0) / 2, K = w.size(1);
  TORCH_CHECK(F % H == 0, "pack_linear_glu: F = ", F, " (half the weight's rows) must be a multiple of ", H);
  return pack_linear(w.view({2, F / H, H, K}).transpose(0, 1).reshape({2 * F, K}));
}

// x (M, K) @ w^T for w packed by pack_linear (n = w's row count N) [+ bias (N)]; GLU: w packed by pack_linear_glu
// (n = 2F), the result silu(x @ gate^T) * (x @ up^T) (M, F) from the tiles' epilogue, no bias
template <bool GLU>
at::Tensor linear_packed_impl(const char* name, const at::Tensor& x, const at::Tensor& packed, int64_t n,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, name, ": x must be (M, K), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), name, ": packed weight must have x's dtype ", x.scalar_type(),
              ", got ", packed.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(!GLU || n % 2 == 0, name, ": n must be even (gate and up rows), got ", n);
  const int64_t M = x.size(0), K = x.size(1);
  auto y = empty({M, GLU ? n / 2 : n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tritium_linear_packed", [&] {
    constexpr int64_t P = panel::width<scalar_t>();
    TORCH_CHECK(packed.dim() == 3 && packed.size(0) == (n + P - 1) / P && packed.size(1) == K && packed.size(2) == P &&
                    packed.is_contiguous(),
                name, ": packed weight must be pack_linear's (", (n + P - 1) / P, ", ", K, ", ", P, ") for n = ", n,
                " and x's K = ", K, ", got ", packed.sizes());
    const scalar_t* bp = nullptr;
    at::Tensor bc;
    if (bias.has_value()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == x.scalar_type(), name,
                  ": bias must be (", n, ",) of x's dtype, got ", bias->sizes(), " ", bias->scalar_type());
      bc = bias->contiguous();
      bp = bc.const_data_ptr<scalar_t>();
    }
    if (M == 0 || n == 0) return;
    const auto xc = x.stride(1) == 1 ? x : x.contiguous();
    panel_gemm<scalar_t, scalar_t, GLU>(xc.const_data_ptr<scalar_t>(), xc.stride(0), M, K,
                                        packed.const_data_ptr<scalar_t>(), n, y.mutable_data_ptr<scalar_t>(),
                                        y.stride(0), bp, 0);
  });
  return y;
}

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias) {
  return linear_packed_impl<false>("linear_packed", x, packed, n, bias);
}

at::Tensor linear_packed_swiglu(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return linear_packed_impl<true>("linear_packed_swiglu", x, packed, n, c10::nullopt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tritium_runtime, m) {
  m.def("pack_cache_stats() -> int[]", [] { return PackCache::get().stats(); });
  m.def("pack_cache_clear() -> ()", [] { PackCache::get().clear(); });
  m.def("set_pack_cache_limit(int bytes) -> ()", [](int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "set_pack_cache_limit: bytes must be >= 0, got ", bytes);
    PackCache::get().set_limit(size_t(bytes));
  });
}

TORCH_LIBRARY_IMPL(tritium, CPU, m) {
  m.impl("pack_linear", &pack_linear);
  m.impl("linear_packed", &linear_packed);
  m.impl("pack_linear_glu", &pack_linear_glu);
  m.impl("linear_packed_swiglu", &linear_packed_swiglu);
  m.impl("mm_pooled", &mm_pooled);
  m.impl("linear_wgrad", &linear_wgrad);
  m.impl("mm_acc_", &mm_acc_);
  m.impl("linear_small", &linear_small);
}

}  // namespace tritium
