// Shared helpers for the CPU kernels: load/store any floating dtype as vectors of its accumulation type
// (float for float/bfloat16/half, double for double), and the row-parallel loop every row kernel uses.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <sys/mman.h>

namespace tritium {

using at::vec::Vectorized;

template <typename T>
struct VecIO {
  using acc_t = at::opmath_type<T>;  // float for 16-bit inputs, the type itself otherwise
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kSize = Vec::size();
  static inline Vec load(const T* p) { return Vec::loadu(p); }
  static inline void store(T* p, const Vec& v) { v.store(p); }
};

template <typename T16>
struct VecIO16 {
  using acc_t = float;
  using Vec = Vectorized<float>;
  static constexpr int64_t kSize = Vec::size();
  static inline Vec load(const T16* p) {
    Vec out;
    at::vec::load_to_float<T16>(p, out);
    return out;
  }
  static inline void store(T16* p, const Vec& v) {
    at::vec::convert_from_float<T16>(v, v).store(p, kSize);
  }
};
template <>
struct VecIO<c10::BFloat16> : VecIO16<c10::BFloat16> {};
template <>
struct VecIO<c10::Half> : VecIO16<c10::Half> {};

template <typename T>
using acc_type = typename VecIO<T>::acc_t;

// Store 2 * kSize elements from two accumulation-type vectors (one full-width conversion for 16-bit types).
template <typename T>
inline void store2(T* p, const Vectorized<acc_type<T>>& a, const Vectorized<acc_type<T>>& b) {
  if constexpr (std::is_same_v<T, acc_type<T>>) {
    a.store(p);
    b.store(p + Vectorized<T>::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// Load 2 * kSize elements as two accumulation-type vectors.
template <typename T>
inline std::pair<Vectorized<acc_type<T>>, Vectorized<acc_type<T>>> load2(const T* p) {
  if constexpr (std::is_same_v<T, acc_type<T>>) {
    return {Vectorized<T>::loadu(p), Vectorized<T>::loadu(p + Vectorized<T>::size())};
  } else {
    auto [a, b] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    return {a, b};
  }
}

// A row in the accumulation type: the row itself for float/double, else converted into buf (once, so that
// kernels making several passes over a row convert it a single time).
template <typename T>
inline const acc_type<T>* as_acc(const T* src, int64_t n, std::vector<acc_type<T>>& buf) {
  if constexpr (std::is_same_v<T, acc_type<T>>) {
    return src;
  } else {
    buf.resize(n);
    float* dst = buf.data();
    constexpr int64_t K = Vectorized<T>::size();  // 16-bit lanes = 2 float vectors
    int64_t i = 0;
    for (; i + K <= n; i += K) {
      auto [a, b] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(src + i));
      a.store(dst + i);
      b.store(dst + i + K / 2);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
    return dst;
  }
}

// at::empty for kernel outputs. Outputs of 2 MiB or more are asked to live on transparent huge pages
// (madvise; the machine's THP policy decides): a fresh large allocation is otherwise first-touched 4 KiB
// page by page, and at LLM shapes those page faults cost as much as the kernel itself. Nothing global
// changes: only this tensor's pages are advised (torch does the same for all allocations under
// THP_MEM_ALLOC_ENABLE=1).
inline at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (t.device().is_cpu() && last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

// Rows per task so that one task touches at least ~16K elements (keeps parallel_for overhead small for narrow
// rows while still splitting 2 rows across 2 cores when rows are wide).
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// The dispatch every kernel uses: float32, float64, bfloat16, float16.
#define TRITIUM_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, cols), got ", t.dim(), "-D");
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, name, " must have a contiguous last dimension");
}

}  // namespace tritium
