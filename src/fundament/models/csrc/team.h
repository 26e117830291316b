// Parallel loops that end when their work is done, not when every thread has checked in.
//
// Inside one OpenMP region (run()), every thread walks the same program: a sequence of loops
// ("phases") over items. A phase's items start split evenly, a queue per thread; a thread takes
// its own queue's items from the front, then the others' from the back; the phase is over when its
// items are done, whoever did them, and a thread that was taken off its core (by the server's
// event loop, by a client on the same cores) skips, when it is back, the phases finished without
// it. It holds the others up only for the items it had already taken. With at::parallel_for's
// barrier at the end of each of a decode step's ~300 loops, any other runnable thread on two cores
// stalls both: in process, a busy loop taking 30% of one core cut 64-stream decode by two thirds.
//
// Which thread runs an item, or how many threads there are, must not change what the item
// computes (the decode kernel's items are output columns, rows and (row, head) pairs: each is the
// same instructions whoever runs it). Code between loops runs in every thread and must only read
// what the loops wrote; allocations and other ATen calls go before run().

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace team {

inline void relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

constexpr int kMaxThreads = 64;
constexpr int64_t kSpinUs = 50;  // how long a wait spins before it also yields its core
constexpr int kIndexBits = 22;  // items per loop: under 4M
constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;

// A queue word: the phase it belongs to, then its first and its end item.
inline uint64_t queue_word(uint64_t phase, uint64_t front, uint64_t back) {
  return phase << (2 * kIndexBits) | front << kIndexBits | back;
}
inline uint64_t phase_of(uint64_t w) { return w >> (2 * kIndexBits); }
inline int64_t front_of(uint64_t w) { return static_cast<int64_t>((w >> kIndexBits) & kIndexMask); }
inline int64_t back_of(uint64_t w) { return static_cast<int64_t>(w & kIndexMask); }

struct alignas(64) Slot {
  std::atomic<uint64_t> queue{0};  // queue_word: this thread's share of the phase not yet taken
  std::atomic<uint64_t> done{0};   // phase << 32 | items this thread has finished in it
};

// What a program's threads share; one per program.
struct Shared {
  explicit Shared(int threads) : threads(std::max(1, std::min(threads, kMaxThreads))) {}
  const int threads;  // queues a phase is split into (the threads asked for; fewer may come)
  alignas(64) std::atomic<uint64_t> phase{0};   // the latest phase opened
  alignas(64) std::atomic<uint64_t> opened{0};  // the latest phase whose queues are written
  std::atomic<bool> failed{false};              // a thread threw: the others stop waiting
  std::exception_ptr error;                     // what the first thread to fail threw
  Slot slots[kMaxThreads];
};

// One thread's view of the program: loop() is a phase.
class Member {
 public:
  Member(Shared& shared, int id) : s_(shared), id_(id % shared.threads) {}

  // fn(begin, end, hint) for every item in [0, n), in runs of at most `chunk` items that do not
  // cross a multiple of `align` (a run from a thread's own queue: `hint` is that queue's end, the
  // items the same thread will likely take next; a stolen run: `hint` == end).
  template <typename F>
  void loop(int64_t n, int64_t chunk, int64_t align, const F& fn) {
    TORCH_CHECK(n >= 0 && static_cast<uint64_t>(n) <= kIndexMask, "team: too many items in one loop");
    const uint64_t i = ++phase_;
    TORCH_CHECK(i < (uint64_t{1} << (64 - 2 * kIndexBits)), "team: too many loops in one program");
    if (!open(i, n)) return;  // done without this thread
    chunk = std::max<int64_t>(1, chunk);
    align = std::max<int64_t>(1, align);
    int64_t did = 0;
    Slot& mine = s_.slots[id_];
    mine.done.store(i << 32, std::memory_order_relaxed);
    auto finished = [&](int64_t count) {
      did += count;
      mine.done.store(i << 32 | static_cast<uint64_t>(did), std::memory_order_release);
    };
    // Own queue, from the front.
    for (uint64_t w = mine.queue.load(std::memory_order_relaxed);;) {
      const int64_t f = front_of(w), b = back_of(w);
      if (phase_of(w) != i || f >= b) break;
      int64_t e = (f + chunk) / align * align;  // a run ends on a multiple of align, or at the queue's end
      if (e <= f) e = (f / align + 1) * align;
      e = std::min(b, e);
      if (mine.queue.compare_exchange_weak(w, queue_word(i, e, b), std::memory_order_acquire,
                                           std::memory_order_relaxed)) {
        fn(f, e, b);
        finished(e - f);
        w = mine.queue.load(std::memory_order_relaxed);
      }
    }
    // Others' queues, from the back, a run at a time, until none is left.
    for (bool took = true; took;) {
      took = false;
      for (int k = 1; k < s_.threads; ++k) {
        Slot& other = s_.slots[(id_ + k) % s_.threads];
        for (uint64_t w = other.queue.load(std::memory_order_relaxed);;) {
          const int64_t f = front_of(w), b = back_of(w);
          if (phase_of(w) != i || f >= b) break;
          int64_t start = (b - chunk + align - 1) / align * align;  // a run that starts on a multiple of align
          if (start >= b) start = (b - 1) / align * align;
          start = std::max(f, start);
          if (other.queue.compare_exchange_weak(w, queue_word(i, f, start), std::memory_order_acquire,
                                                std::memory_order_relaxed)) {
            fn(start, b, b);
            finished(b - start);
            took = true;
            w = other.queue.load(std::memory_order_relaxed);
          }
        }
      }
    }
    // The phase ends when every item is done (or a later phase has opened: then it has).
    Backoff backoff;
    while (s_.phase.load(std::memory_order_acquire) == i) {
      int64_t total = 0;
      for (int t = 0; t < s_.threads; ++t) {
        const uint64_t d = s_.slots[t].done.load(std::memory_order_acquire);
        if ((d >> 32) == i) total += static_cast<int64_t>(d & 0xffffffffu);
      }
      if (total == n) break;
      wait(backoff);
    }
  }

 private:
  // Phase i open with its queues written; false if it is already over. The previous phase is
  // over whenever a thread gets here (each thread leaves a phase only once it is).
  bool open(uint64_t i, int64_t n) {
    uint64_t cur = s_.phase.load(std::memory_order_acquire);
    if (cur == i - 1 && s_.phase.compare_exchange_strong(cur, i, std::memory_order_acq_rel)) {
      for (int t = 0; t < s_.threads; ++t)
        s_.slots[t].queue.store(queue_word(i, n * t / s_.threads, n * (t + 1) / s_.threads), std::memory_order_relaxed);
      s_.opened.store(i, std::memory_order_release);
      return true;
    }
    if (cur > i) return false;
    uint64_t o;
    Backoff backoff;
    while ((o = s_.opened.load(std::memory_order_acquire)) < i) wait(backoff);
    return o == i;
  }

  // A thread waiting on another's items spins; past kSpinUs it also yields its core each time it
  // looks, in case the thread it waits for is queued behind it (more threads than cores: a CPU
  // quota the affinity mask does not show).
  struct Backoff {
    int64_t spins = 0;
    std::chrono::steady_clock::time_point since{};
  };
  void wait(Backoff& b) const {
    TORCH_CHECK(!s_.failed.load(std::memory_order_relaxed), "team: another thread of the loop failed");
    relax();
    if ((++b.spins & 63) != 0) return;
    const auto now = std::chrono::steady_clock::now();
    if (b.spins == 64) b.since = now;
    else if (now - b.since > std::chrono::microseconds(kSpinUs)) std::this_thread::yield();
  }

  Shared& s_;
  const int id_;
  uint64_t phase_ = 0;
};

// A kernel's parallel loops, either way: items(n, grain, fn) calls fn(begin, end) over items
// [0, n), split across threads in runs of `grain` or more. OmpLoops: at::parallel_for, a barrier at
// each loop's end (for loops that call ATen's kernels, which must not run inside run()).
// TeamLoops: a Member's loops, inside run().
struct OmpLoops {
  template <typename F>
  void items(int64_t n, int64_t grain, const F& fn) const {
    at::parallel_for(0, n, grain, fn);
  }
};
struct TeamLoops {
  Member& member;
  template <typename F>
  void items(int64_t n, int64_t grain, const F& fn) const {
    member.loop(n, grain, 1, [&](int64_t begin, int64_t end, int64_t) { fn(begin, end); });
  }
};

// program(member) on each of the threads at::parallel_for would use, in one OpenMP region. If a
// thread throws, the others stop where they wait and the first thread's exception is rethrown.
template <typename F>
void run(const F& program) {
  Shared shared(at::get_num_threads());
  try {
    at::parallel_for(0, shared.threads, 1, [&](int64_t begin, int64_t end) {
      // One region's thread gets one index; if the region has fewer threads than asked, one thread
      // gets several and runs the program once (the queues of threads that did not come are stolen).
      Member member(shared, static_cast<int>(begin));
      (void)end;
      try {
        program(member);
      } catch (...) {
        if (!shared.failed.exchange(true)) shared.error = std::current_exception();
        throw;
      }
    });
  } catch (...) {
    if (shared.error) std::rethrow_exception(shared.error);
    throw;
  }
}

}  // namespace team
