// The output pool behind tritium::empty (csrc/pool.h): large kernel outputs (2 MiB and up) come from a small
// cache of freed blocks instead of fresh pages.
//
// Why: torch's CPU allocator hands every large tensor fresh mmap'd pages, which the kernel zeroes on first
// touch. At LLM/activation shapes (8192 x 4096 float32 = 128 MiB) that first touch costs as much as a
// memory-bound kernel's own pass over the data, and it interleaves page faults with the math. CUDA has a caching
// allocator for the same reason; this is the CPU counterpart, limited to tritium's own outputs:
//   - blocks are rounded to 2 MiB and placed on transparent huge pages (madvise) on first allocation;
//   - a freed block goes back to a free list for its size; the pool holds at most `limit` bytes of free
//     blocks (default 2 GiB, TRITIUM_CPU_POOL_MB overrides, 0 turns the pool off): to keep a block past it,
//     the cached blocks of the least recently used other sizes are returned to the system (a workload's
//     sizes replace the last one's: otherwise a pool filled with an earlier workload's sizes would hand a new
//     workload's outputs fresh pages on every call);
//   - tensors are ordinary resizable CPU tensors (the pool is their storage's allocator).
// torch.ops.tritium_runtime.empty_cache() frees every cached block; pool_stats() reports
// [cached bytes, limit, hits, misses]; set_pool_limit(bytes) changes the limit (and trims).
//
// Test mode (TRITIUM_CPU_POOL_POISON=1, or set_pool_poison(True)): every output tritium::empty returns, pooled or
// not, is filled with 0xFF bytes (NaN in every float dtype, -1 in integers) before the kernel writes it, so a
// kernel that leaves an element unwritten fails its test whatever the block held before (a reused block holds
// the last tensor's values, a fresh page zeros: either can hide the bug depending on test order).
#include "pool.h"

#include <sys/mman.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace tritium {
namespace {

constexpr size_t kHuge = size_t(2) << 20;

struct Block {
  void* ptr;
  size_t bytes;
};

class Pool final : public c10::Allocator {
 public:
  Pool() {
    const char* env = std::getenv("TRITIUM_CPU_POOL_MB");
    limit_ = env ? size_t(std::max(0L, std::strtol(env, nullptr, 10))) << 20 : size_t(2) << 30;
    const char* poison = std::getenv("TRITIUM_CPU_POOL_POISON");
    poison_ = poison && poison[0] && std::string(poison) != "0";
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = std::max(kHuge, (n + kHuge - 1) & ~(kHuge - 1));
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      last_use_[bytes] = ++tick_;
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (!p) {
      p = std::aligned_alloc(kHuge, bytes);
      TORCH_CHECK(p, "tritium: out of memory allocating ", bytes, " bytes");
#ifdef MADV_HUGEPAGE
      madvise(p, bytes, MADV_HUGEPAGE);
#endif
    }
    return {p, new Block{p, bytes}, &Pool::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: tensors may die after static destructors run
    return *pool;
  }

  bool enabled() const { return limit_ > 0; }

  bool poison() const { return poison_.load(std::memory_order_relaxed); }
  void set_poison(bool on) { poison_.store(on, std::memory_order_relaxed); }

  void set_limit(size_t limit) {
    std::lock_guard<std::mutex> g(mu_);
    limit_ = limit;
    trim_locked(limit_);
  }

  void empty_cache() {
    std::lock_guard<std::mutex> g(mu_);
    trim_locked(0);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {int64_t(cached_), int64_t(limit_), int64_t(hits_), int64_t(misses_)};
  }

 private:
  // Free cached blocks until at most `target` bytes stay cached (caller holds mu_).
  void trim_locked(size_t target) { evict_locked(0, target); }

  // Free cached blocks of sizes other than `keep` (0: any size, no block is that small), least recently used
  // size first, until at most `target` bytes stay cached (caller holds mu_).
  void evict_locked(size_t keep, size_t target) {
    while (cached_ > target) {
      auto victim = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->first != keep && !it->second.empty() &&
            (victim == free_.end() || last_use_[it->first] < last_use_[victim->first]))
          victim = it;
      if (victim == free_.end()) return;
      std::free(victim->second.back());
      victim->second.pop_back();
      cached_ -= victim->first;
    }
  }

  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    Pool& pool = get();
    bool keep = false;
    {
      std::lock_guard<std::mutex> g(pool.mu_);
      pool.last_use_[b->bytes] = ++pool.tick_;
      if (b->bytes <= pool.limit_) pool.evict_locked(b->bytes, pool.limit_ - b->bytes);
      if (pool.cached_ + b->bytes <= pool.limit_) {
        pool.free_[b->bytes].push_back(b->ptr);
        pool.cached_ += b->bytes;
        keep = true;
      }
    }
    if (!keep) std::free(b->ptr);
    delete b;
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  std::unordered_map<size_t, uint64_t> last_use_;  // size -> tick of its last allocation or release
  size_t cached_ = 0, limit_ = 0, hits_ = 0, misses_ = 0;
  uint64_t tick_ = 0;
  std::atomic<bool> poison_{false};
};

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Pool& pool = Pool::get();
  const int64_t numel = c10::multiply_integers(sizes);
  const size_t bytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  at::Tensor out;
  if (!pool.enabled() || !options.device().is_cpu() || bytes < kHuge || options.layout() != c10::kStrided) {
    out = at::empty(sizes, options);
  } else {
    out = at::detail::empty_generic(sizes, &pool, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                    c10::typeMetaToScalarType(options.dtype()), std::nullopt);
  }
  if (pool.poison() && bytes > 0 && options.device().is_cpu()) std::memset(out.data_ptr(), 0xFF, bytes);
  return out;
}

TORCH_LIBRARY(tritium_runtime, m) {
  m.def("empty_cache() -> ()", [] { Pool::get().empty_cache(); });
  m.def("pool_stats() -> int[]", [] { return Pool::get().stats(); });
  m.def("set_pool_limit(int bytes) -> ()", [](int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "set_pool_limit: bytes must be >= 0, got ", bytes);
    Pool::get().set_limit(size_t(bytes));
  });
  m.def("set_pool_poison(bool on) -> ()", [](bool on) { Pool::get().set_poison(on); });
  m.def("pool_poison() -> bool", [] { return Pool::get().poison(); });
}

}  // namespace tritium
