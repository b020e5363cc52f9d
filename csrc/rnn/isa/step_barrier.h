// Synchronisation of the packed CPU recurrence (packed_cpu.cpp): how many tasks it runs, and the
// barrier they meet at after every step. Compiled into each instruction-set variant's namespace
// (cpu_isa.h), as everything the isa/ sources define.
#pragma once

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <mutex>
#include <thread>
#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "cpu_isa.h"

namespace fastnn {
namespace rnn {
FASTNN_ISA_BEGIN
namespace cpu {

// Whole cores of the cgroup (v2) CPU quota, or 0 without one: containers limit CPU time this way
// and still report every core of the host.
inline int64_t cgroup_cores() {
  static const int64_t cores = [] {
    int64_t n = 0;
    if (FILE* f = std::fopen("/sys/fs/cgroup/cpu.max", "r")) {
      char quota[32] = {0};
      long long period = 0;
      if (std::fscanf(f, "%31s %lld", quota, &period) == 2 && period > 0 && std::string(quota) != "max") {
        n = std::max<int64_t>(1, (std::atoll(quota) + period - 1) / period);
      }
      std::fclose(f);
    }
    return n;
  }();
  return cores;
}

// The cores this process may run on: its affinity mask (taskset, a container's cpuset), within the
// cgroup quota; at least 1.
inline int64_t available_cores() {
  int64_t n = 0;
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
  if (n <= 0) n = (int64_t)std::thread::hardware_concurrency();
  const int64_t quota = cgroup_cores();
  if (quota > 0) n = std::min(n, quota);
  return std::max<int64_t>(1, n);
}

// Tasks of the packed recurrence: one per thread of at::parallel_for, but never more than the
// cores available. The tasks meet at a barrier after every step, so one whose thread is not
// running holds up all the others: with more threads than cores (torch.set_num_threads(8) on a
// 2-core machine, or a container that reports the host's cores) every step would wait for the
// scheduler to run each thread in turn, ten times slower than with one thread per core. Small
// problems (fewer multiply-adds per step than a thread's wake-up costs) run on one task.
inline int64_t packed_tasks(int64_t macs_per_step, int64_t threads, int64_t cores) {
  if (macs_per_step < 32768) return 1;
  return std::max<int64_t>(1, std::min(threads, cores));
}

// at::parallel_for's tasks run at the same time, one per thread of an OpenMP team, so they may
// wait for each other. (ATen's native thread pool may run them one after another.)
constexpr bool kTasksRunConcurrently = AT_PARALLEL_OPENMP;

// A barrier for the tasks of one at::parallel_for over [0, n): a task covering tasks [v0, v1)
// (all n of them when the call runs inline) counts v1 - v0. The count only grows: generation g
// opens when it reaches n * g. A waiter spins for a while (the others are a microsecond away when
// every thread has a core), then sleeps, so that a busy machine, where the thread it waits for may
// not be running, does not lose that thread's core to the spinning.
class StepBarrier {
 public:
  explicit StepBarrier(int64_t n) : n_(n) {}
  void arrive_and_wait(int64_t tasks, int64_t generation) {
    const int64_t target = n_ * generation;
    if (arrived_.fetch_add(tasks) + tasks >= target) {
      if (sleepers_.load() > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        opened_.notify_all();
      }
      return;
    }
    for (int spin = 0; spin < kSpins; ++spin) {
      if (arrived_.load(std::memory_order_acquire) >= target) return;
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#endif
    }
    std::unique_lock<std::mutex> lock(mutex_);
    sleepers_.fetch_add(1);  // before the check in wait(): an arrival after it sees a sleeper
    opened_.wait(lock, [&] { return arrived_.load() >= target; });
    sleepers_.fetch_sub(1);
  }

 private:
  static constexpr int kSpins = 2000;  // some tens of microseconds
  const int64_t n_;
  std::atomic<int64_t> arrived_{0};
  std::atomic<int64_t> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable opened_;
};

}  // namespace cpu
FASTNN_ISA_END
}  // namespace rnn
}  // namespace fastnn
