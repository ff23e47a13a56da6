// The tests' probe fastvae_native::_parallel_threads. The kernels' at::parallel_for is inline in
// ATen's headers, so whether it runs on torch.set_num_threads threads depends on how these
// translation units were compiled and linked (CMakeLists.txt: OpenMP), which this file shares
// with the kernels. Without the probe a serial build would pass every "1 vs 2 threads" test.
#include <ATen/Parallel.h>

#include <mutex>
#include <set>
#include <thread>

#include "kernels.h"

FASTVAE_NAMESPACE_BEGIN

int64_t parallel_threads_cpu() {
  // Far more items than threads at a grain of 1: every thread the loop is given gets a task.
  constexpr int64_t kItems = 1 << 16;
  std::mutex mutex;
  std::set<std::thread::id> threads;
  at::parallel_for(0, kItems, 1, [&](int64_t, int64_t) {
    const std::lock_guard<std::mutex> lock(mutex);
    threads.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(threads.size());
}

FASTVAE_NAMESPACE_END
