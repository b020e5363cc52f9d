// Synchronisation of the CPU recurrences (packed_cpu.cpp, quantized/isa/int8_cpu.cpp): how many
// tasks they run, the barrier the tasks meet at after every step, and the loop that runs them in
// lockstep. Compiled into each instruction-set variant's namespace (cpu_isa.h), as everything the
// isa/ sources define.
#pragma once

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <limits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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
  using Clock = std::chrono::steady_clock;

  explicit StepBarrier(int64_t n) : n_(n) {}

  // `worked`: how long this task's own share of the step took. A waiter that had to sleep and
  // waited more than twice that (and over 100 us) proposes that one task finish the sequence alone
  // from generation + 1 on (solo_from): see run_in_lockstep.
  void arrive_and_wait(int64_t tasks, int64_t generation, Clock::duration worked = {}) {
    const int64_t target = n_ * generation;
    if (arrived_.fetch_add(tasks) + tasks >= target) {
      if (sleepers_.load() > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        opened_.notify_all();
      }
      return;
    }
    const Clock::time_point start = Clock::now();
    for (int spin = 0; spin < kSpins; ++spin) {
      if (arrived_.load(std::memory_order_acquire) >= target) return;
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#endif
    }
    {
      std::unique_lock<std::mutex> lock(mutex_);
      sleepers_.fetch_add(1);  // before the check in wait(): an arrival after it sees a sleeper
      opened_.wait(lock, [&] { return arrived_.load() >= target; });
      sleepers_.fetch_sub(1);
    }
    const Clock::duration waited = Clock::now() - start;
    if (waited > 2 * worked && waited > std::chrono::microseconds(100)) propose_solo(generation + 1);
  }

  // Whether generation g runs on one task. Every proposal for g is made before the barrier that
  // opens g (generation g's tasks all passed it), so every task gives the same answer.
  bool solo(int64_t g) const { return solo_from_.load() <= g; }

  void propose_solo(int64_t g) {
    int64_t cur = solo_from_.load();
    while (g < cur && !solo_from_.compare_exchange_weak(cur, g)) {
    }
  }

 private:
  static constexpr int kSpins = 2000;  // some tens of microseconds
  const int64_t n_;
  std::atomic<int64_t> arrived_{0};
  std::atomic<int64_t> sleepers_{0};
  std::atomic<int64_t> solo_from_{std::numeric_limits<int64_t>::max()};
  std::mutex mutex_;
  std::condition_variable opened_;
};

// Test knob: FASTNN_LOCKSTEP_SOLO_FROM=g makes run_in_lockstep go solo from generation g, so that
// tests can run that path deterministically (a busy machine triggers it only by chance).
// Anything but a plain non-negative decimal number leaves it unset.
inline int64_t forced_solo_from() {
  const char* v = std::getenv("FASTNN_LOCKSTEP_SOLO_FROM");
  if (v == nullptr || *v == '\0' || std::strlen(v) > 18) return std::numeric_limits<int64_t>::max();
  for (const char* c = v; *c; ++c)
    if (*c < '0' || *c > '9') return std::numeric_limits<int64_t>::max();
  return std::strtoll(v, nullptr, 10);
}

// Runs work(v0, v1, g) for g = 0 .. generations - 1, g + 1 after every task's g, on `tasks` tasks
// (work(v0, v1, g) does the share of tasks [v0, v1); (0, tasks) is all of it). With OpenMP, one
// parallel region for the whole sequence, the tasks meeting at a StepBarrier: a fork and join per
// step would cost about a tenth of a batch-1 step. On a busy machine a task's thread may not be
// running (another process has its core), and every step would then wait for the scheduler, each
// costing milliseconds instead of microseconds. So when a waiter finds the others much slower than
// itself (StepBarrier::arrive_and_wait), the tasks agree at the next barrier that task 0 does the
// rest of the sequence alone, and the others leave.
template <typename Work>
void run_in_lockstep(int64_t tasks, int64_t generations, const Work& work) {
  if (tasks == 1) {
    for (int64_t g = 0; g < generations; ++g) work(0, 1, g);
    return;
  }
  if (!kTasksRunConcurrently) {  // ATen's own pool may run the tasks one after another: a fork per step
    for (int64_t g = 0; g < generations; ++g)
      at::parallel_for(0, tasks, 1, [&](int64_t v0, int64_t v1) { work(v0, v1, g); });
    return;
  }
  StepBarrier barrier(tasks);
  barrier.propose_solo(forced_solo_from());
  at::parallel_for(0, tasks, 1, [&](int64_t v0, int64_t v1) {
    for (int64_t g = 0; g < generations; ++g) {
      if (barrier.solo(g)) {
        if (v0 == 0)
          for (; g < generations; ++g) work(0, tasks, g);
        return;
      }
      const StepBarrier::Clock::time_point start = StepBarrier::Clock::now();
      work(v0, v1, g);
      barrier.arrive_and_wait(v1 - v0, g + 1, StepBarrier::Clock::now() - start);
    }
  });
}

}  // namespace cpu
FASTNN_ISA_END
}  // namespace rnn
}  // namespace fastnn
