// BLAS on row-major matrices: the BLAS libtorch ships with (MKL's sgemm_, dgemm_ and gemm_bf16bf16f32_ /
// gemm_f16f16f32_, found at run time in libtorch_cpu), falling back to at::matmul on views when a symbol is
// missing. Used by the attention's per-tile products (csrc/attention.cpp) and mm_acc_ (csrc/linear.cpp).
//
// Environment: TRITIUM_NO_BLAS=1 skips the BLAS symbols, so every BLAS product takes the at::matmul fallback
// (the path of a libtorch without them, testable on one that has them). It is read once, at the first call.
#pragma once
#include <ATen/ATen.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "vec.h"

namespace tritium {

using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                         const double*, const int*, const double*, const int*, const double*, double*, const int*);
using hgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*, const int*);

struct Blas {
  sgemm_t s = nullptr;
  dgemm_t d = nullptr;
  hgemm_t bf16 = nullptr;
  hgemm_t f16 = nullptr;
};

inline const Blas& blas() {
  static const Blas b = [] {
    Blas r;
    if (std::getenv("TRITIUM_NO_BLAS")) return r;  // the at::matmul fallback
    void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (!h) return r;
    r.s = reinterpret_cast<sgemm_t>(dlsym(h, "sgemm_"));
    r.d = reinterpret_cast<dgemm_t>(dlsym(h, "dgemm_"));
    r.bf16 = reinterpret_cast<hgemm_t>(dlsym(h, "gemm_bf16bf16f32_"));
    r.f16 = reinterpret_cast<hgemm_t>(dlsym(h, "gemm_f16f16f32_"));
    return r;
  }();
  return b;
}

// C (M x N, ldc) = alpha * op(A) op(B) + beta * C, all row-major. op(A) is M x K: A stored M x K (lda), or
// K x M when ta. op(B) is K x N: B stored K x N (ldb), or N x K when tb. C is in the accumulation type.
// Column-major BLAS computes the transpose: C^T = op(B)^T op(A)^T, i.e. the operands swap.
template <typename T>
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, acc_type<T> alpha, const T* A, int64_t lda,
                 const T* B, int64_t ldb, acc_type<T> beta, acc_type<T>* C, int64_t ldc) {
  using acc_t = acc_type<T>;
  if (M == 0 || N == 0) return;
  const char* tA = ta ? "T" : "N";
  const char* tB = tb ? "T" : "N";
  const int m = M, n = N, k = K, la = lda, lb = ldb, lc = ldc;
  const Blas& bl = blas();
  if constexpr (std::is_same_v<T, float>) {
    if (bl.s) return bl.s(tB, tA, &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
  } else if constexpr (std::is_same_v<T, double>) {
    if (bl.d) return bl.d(tB, tA, &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
  } else {
    hgemm_t f = std::is_same_v<T, c10::BFloat16> ? bl.bf16 : bl.f16;
    if (f)
      return f(tB, tA, &n, &m, &k, &alpha, reinterpret_cast<const uint16_t*>(B), &lb,
               reinterpret_cast<const uint16_t*>(A), &la, &beta, C, &lc);
  }
  // fallback: the same product through ATen on views of the tiles
  auto st = c10::CppTypeToScalarType<T>::value;
  auto at_ = c10::CppTypeToScalarType<acc_t>::value;
  auto opts = at::TensorOptions().dtype(st);
  at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                    : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, at::TensorOptions().dtype(at_));
  at::Tensor prod = at::matmul(a.to(at_), b.to(at_)).mul_(alpha);
  if (beta == acc_t(0)) {
    c.copy_(prod);
  } else {
    c.mul_(beta).add_(prod);
  }
}

}  // namespace tritium
