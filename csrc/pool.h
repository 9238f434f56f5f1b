// tritium::empty, the allocation every kernel uses for its outputs (the pool itself is csrc/pool.cpp).
#pragma once
#include <ATen/ATen.h>

namespace tritium {

// at::empty for kernel outputs. Outputs of 2 MiB or more come from tritium's output pool (csrc/pool.cpp): freed
// blocks on transparent huge pages are reused instead of fresh pages, which the OS zeroes on first touch at a
// cost as large as a memory-bound kernel's. Smaller outputs, and everything when TRITIUM_CPU_POOL_MB=0, use
// at::empty.
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace tritium
