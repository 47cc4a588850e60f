// The emulated device's scheduler: fiber stacks, the pool of warp threads,
// lanes as fibers, warp collectives, the block barrier and deadlock reports.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <sstream>
#include <thread>

#include "emulation/device_state.h"

namespace lmm_fast {
namespace emu {

thread_local Lane* tls_lane = nullptr;
thread_local Block* tls_block = nullptr;

namespace {

// ------------------------------------------------------------ fiber stacks
constexpr size_t kStackBytes = 256 * 1024;

std::mutex g_stack_mutex;

std::vector<void*> g_free_stacks;

size_t page_size() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

}  // namespace

// A stack with a guard page below it, so that an overflow faults instead of
// overwriting a neighbour.
void* take_stack() {
  {
    std::lock_guard<std::mutex> lock(g_stack_mutex);
    if (!g_free_stacks.empty()) {
      void* s = g_free_stacks.back();
      g_free_stacks.pop_back();
      return s;
    }
  }
  const size_t page = page_size();
  void* base = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(base != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
  mprotect(base, page, PROT_NONE);
  return static_cast<char*>(base) + page;
}

void give_stack(void* s) {
  std::lock_guard<std::mutex> lock(g_stack_mutex);
  g_free_stacks.push_back(s);
}

namespace {

// ------------------------------------------------------------ warp threads
// Host threads that run the warps of a block: jobs[0] on the caller, the
// others on pooled threads (created once, kept for the process).
class WorkerPool {
 public:
  // Waits at most `patience` for the pooled jobs after the caller's; false if
  // some did not finish (their threads are then given up on).
  bool run(std::vector<std::function<void()>>& jobs, std::chrono::duration<double> patience) {
    auto done = std::make_shared<Completion>();
    const size_t pooled = jobs.size() - 1;
    while (workers_.size() < pooled) workers_.push_back(start_worker());
    for (size_t k = 0; k < pooled; ++k) {
      Worker* w = workers_[k];
      {
        std::lock_guard<std::mutex> lock(w->mutex);
        w->job = std::move(jobs[k + 1]);
        w->done = done;
      }
      w->cv.notify_one();
    }
    jobs[0]();
    std::unique_lock<std::mutex> lock(done->mutex);
    if (done->cv.wait_for(lock, patience, [&] { return done->finished == pooled; })) return true;
    // The stuck workers keep their objects; later launches get new ones.
    workers_.erase(workers_.begin(), workers_.begin() + static_cast<std::ptrdiff_t>(pooled));
    return false;
  }

 private:
  struct Completion {
    std::mutex mutex;
    std::condition_variable cv;
    size_t finished = 0;
  };
  struct Worker {
    std::mutex mutex;
    std::condition_variable cv;
    std::function<void()> job;
    std::shared_ptr<Completion> done;
  };

  static Worker* start_worker() {
    Worker* w = new Worker();  // lives as long as its thread
    std::thread([w] {
      for (;;) {
        std::function<void()> job;
        std::shared_ptr<Completion> done;
        {
          std::unique_lock<std::mutex> lock(w->mutex);
          w->cv.wait(lock, [&] { return static_cast<bool>(w->job); });
          job = std::move(w->job);
          w->job = nullptr;
          done = std::move(w->done);
        }
        job();
        {
          std::lock_guard<std::mutex> lock(done->mutex);
          ++done->finished;
        }
        done->cv.notify_all();
      }
    }).detach();
    return w;
  }

  std::vector<Worker*> workers_;
};

WorkerPool& pool() {
  static WorkerPool* p = new WorkerPool();  // never destroyed: its threads are detached
  return *p;
}

}  // namespace

// ------------------------------------------------------------ errors
std::string thread_name(const Lane& l) {
  std::ostringstream s;
  s << "thread (" << l.index.x << ", " << l.index.y << ", " << l.index.z << ")";
  return s.str();
}

std::string thread_name(const Block& b, int64_t linear) {
  std::ostringstream s;
  s << "thread (" << linear % b.dims.x << ", " << (linear / b.dims.x) % b.dims.y << ", "
    << linear / (static_cast<int64_t>(b.dims.x) * b.dims.y) << ")";
  return s.str();
}

namespace {

void notify_all(Block& b) {
  {
    std::lock_guard<std::mutex> lock(b.barrier_mutex);
  }
  b.barrier_cv.notify_all();
}

}  // namespace

// The first error of a block is the one reported; it aborts the block.
void record_error(Block& b, const std::string& what) {
  {
    std::lock_guard<std::mutex> lock(b.mutex);
    if (b.error.empty()) b.error = what;
  }
  b.aborted = true;
  notify_all(b);
}

Lane& current_lane(const char* what) {
  if (tls_lane == nullptr) {
    TORCH_CHECK(false, "CUDA emulation: ", what, " called outside an emulated kernel");
  }
  return *tls_lane;
}

namespace {

// ------------------------------------------------------------ lanes
void yield(Lane& l) {
  swapcontext(&l.context, &l.warp->scheduler);
  tls_lane = &l;
  if (l.abort) throw Aborted{};
}

void lane_entry(unsigned hi, unsigned lo) {
  Lane* l = reinterpret_cast<Lane*>((static_cast<uintptr_t>(hi) << 32) | static_cast<uintptr_t>(lo));
  Block& b = *l->warp->block;
  try {
    (*b.body)();
  } catch (const Aborted&) {
  } catch (const c10::Error& e) {
    record_error(b, std::string(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    record_error(b, e.what());
  } catch (...) {
    record_error(b, thread_name(*l) + ": unknown exception");
  }
  l->state = LaneState::kDone;
  swapcontext(&l->context, &l->warp->scheduler);
  std::abort();  // a finished lane is never resumed
}

void start_lane(Lane& l) {
  getcontext(&l.context);
  l.context.uc_stack.ss_sp = l.warp->stacks[l.lane];
  l.context.uc_stack.ss_size = kStackBytes;
  l.context.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&l);
  makecontext(&l.context, reinterpret_cast<void (*)()>(&lane_entry), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p & 0xffffffffu));
}

void run_lane(Lane& l) {
  tls_lane = &l;
  threadIdx = l.index;
  swapcontext(&l.warp->scheduler, &l.context);
  tls_lane = nullptr;
}

// ------------------------------------------------------------ collectives
const char* state_name(LaneState s) {
  switch (s) {
    case LaneState::kRunnable: return "running";
    case LaneState::kAtWarp: return "in a warp collective";
    case LaneState::kAtBlock: return "at __syncthreads";
    case LaneState::kDone: return "exited";
  }
  return "?";
}

// Completes every collective whose lanes have all arrived; returns whether
// one did. When none can, throws KernelFault with the reason of the first.
bool complete_collectives(Warp& w) {
  bool progress = false;
  std::string blocked;
  for (int i = 0; i < w.count; ++i) {
    Lane& first = w.lanes[i];
    if (first.state != LaneState::kAtWarp) continue;
    const unsigned mask = first.mask;
    std::ostringstream where;
    where << thread_name(first) << " in " << first.op_name << "(mask 0x" << std::hex << mask << std::dec << ")";
    if (!((mask >> i) & 1u)) throw KernelFault(where.str() + ": the calling lane is not in the mask");
    std::string reason;
    for (int j = 0; j < 32 && reason.empty(); ++j) {
      if (!((mask >> j) & 1u)) continue;
      if (j >= w.count) {
        throw KernelFault(where.str() + ": the mask names lane " + std::to_string(j) +
                          ", which the block does not have");
      }
      const Lane& other = w.lanes[j];
      if (other.state == LaneState::kRunnable) {
        reason = "lane " + std::to_string(j) + " has not arrived";
      } else if (other.state != LaneState::kAtWarp) {
        reason = where.str() + ": lane " + std::to_string(j) + " of the mask " + state_name(other.state) +
                 " (deadlock or divergent collective)";
        if (other.state == LaneState::kDone) throw KernelFault(reason);
      } else if (other.op != first.op || other.mask != mask || other.width != first.width) {
        std::ostringstream s;
        s << where.str() << ": lane " << j << " is in " << other.op_name << "(mask 0x" << std::hex
          << other.mask << std::dec << ") (divergent collectives)";
        reason = s.str();
      }
    }
    if (!reason.empty()) {
      if (blocked.empty()) blocked = reason;
      continue;
    }
    const int width = first.width;
    uint64_t ballot = 0;
    for (int j = 0; j < 32; ++j) {
      if ((mask >> j) & 1u) ballot |= (w.lanes[j].value != 0 ? 1ull : 0ull) << j;
    }
    for (int j = 0; j < 32; ++j) {
      if (!((mask >> j) & 1u)) continue;
      Lane& l = w.lanes[j];
      const int base = j & ~(width - 1);
      const int last = base + width - 1;
      int src = j;
      switch (first.op) {
        case WarpOp::kShflIdx: src = base + (l.param & (width - 1)); break;
        case WarpOp::kShflUp: src = j - l.param < base ? j : j - l.param; break;
        case WarpOp::kShflDown: src = j + l.param > last ? j : j + l.param; break;
        case WarpOp::kShflXor: src = (j ^ l.param) > last ? j : (j ^ l.param); break;
        default: break;
      }
      switch (first.op) {
        case WarpOp::kSyncWarp:
          l.result = 0;
          ++l.warp_epoch;
          break;
        case WarpOp::kBallot: l.result = ballot; break;
        case WarpOp::kAny: l.result = (ballot & mask) != 0; break;
        case WarpOp::kAll: l.result = (ballot & mask) == mask; break;
        default:
          if (src != j && (src >= w.count || !((mask >> src) & 1u))) {
            throw KernelFault(thread_name(l) + " in " + l.op_name + " reads lane " + std::to_string(src) +
                              ", which is not in the mask (its value is undefined)");
          }
          l.result = w.lanes[src].value;
      }
    }
    for (int j = 0; j < 32; ++j) {
      if ((mask >> j) & 1u) w.lanes[j].state = LaneState::kRunnable;
    }
    progress = true;
  }
  if (!progress) throw KernelFault(blocked);
  return progress;
}

// ------------------------------------------------------------ block barrier
// The warp's lanes all wait at __syncthreads: waits for the other warps.
// Returns false if the block was aborted.
bool arrive_at_barrier(Block& b, Warp& w) {
  std::unique_lock<std::mutex> lock(b.barrier_mutex);
  if (b.aborted) return false;
  const uint64_t generation = b.generation;
  if (++b.arrived == b.num_warps) {
    b.arrived = 0;
    ++b.generation;
    lock.unlock();
    b.barrier_cv.notify_all();
    return true;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(b.timeout);
  while (b.generation == generation && !b.aborted) {
    if (b.exited_warps > 0 && b.arrived + b.exited_warps == b.num_warps) {
      std::ostringstream s;
      s << "__syncthreads is never reached by the " << b.exited_warps << " warp(s) that exited (deadlock)";
      lock.unlock();
      record_error(b, s.str());
      return false;
    }
    if (b.barrier_cv.wait_until(lock, deadline) == std::cv_status::timeout && b.generation == generation &&
        !b.aborted) {
      std::ostringstream s;
      s << "deadlock: warp " << w.index << " waited " << b.timeout << " s at __syncthreads; " << b.arrived
        << " of " << b.num_warps << " warps arrived";
      lock.unlock();
      record_error(b, s.str());
      return false;
    }
  }
  return b.generation != generation;
}

void warp_exited(Block& b) {
  {
    std::lock_guard<std::mutex> lock(b.barrier_mutex);
    ++b.exited_warps;
  }
  b.barrier_cv.notify_all();
}

}  // namespace

void run_warp(Block& b, Warp& w, const dim3& grid) {
  tls_block = &b;
  blockIdx = b.index;
  blockDim = b.dims;
  gridDim = grid;
  for (int i = 0; i < w.count; ++i) start_lane(w.lanes[i]);
  // Lanes start in a rotated order, different from block to block.
  const int rotate = static_cast<int>((b.index.x * 7u + b.index.y * 3u + b.index.z) % static_cast<unsigned>(w.count));
  for (;;) {
    for (int k = 0; k < w.count; ++k) {
      Lane& l = w.lanes[(k + rotate) % w.count];
      if (l.state == LaneState::kRunnable) run_lane(l);
    }
    int done = 0, at_block = 0, at_warp = 0;
    for (int i = 0; i < w.count; ++i) {
      done += w.lanes[i].state == LaneState::kDone;
      at_block += w.lanes[i].state == LaneState::kAtBlock;
      at_warp += w.lanes[i].state == LaneState::kAtWarp;
    }
    if (done == w.count) break;
    if (b.aborted) {
      for (int i = 0; i < w.count; ++i) {
        if (w.lanes[i].state != LaneState::kDone) {
          w.lanes[i].abort = true;
          w.lanes[i].state = LaneState::kRunnable;
        }
      }
      continue;
    }
    try {
      if (at_warp > 0) {
        complete_collectives(w);
        continue;
      }
      if (done > 0) {
        std::ostringstream s;
        s << "__syncthreads: " << at_block << " thread(s) of warp " << w.index << " wait there while " << done
          << " of the warp exited (deadlock)";
        throw KernelFault(s.str());
      }
    } catch (const KernelFault& e) {
      record_error(b, e.what());
      continue;
    }
    if (!arrive_at_barrier(b, w)) continue;
    for (int i = 0; i < w.count; ++i) {
      Lane& l = w.lanes[i];
      l.state = LaneState::kRunnable;
      ++l.block_epoch;
      ++l.warp_epoch;
    }
  }
  warp_exited(b);
  tls_block = nullptr;
}

bool run_warps(std::vector<std::function<void()>>& jobs, std::chrono::duration<double> patience) {
  return pool().run(jobs, patience);
}

void fault(const std::string& what) {
  const Lane* l = tls_lane;
  throw KernelFault(l == nullptr ? what : thread_name(*l) + ": " + what);
}

void kernel_assert_failed(const char* cond, const char* file, int line) {
  fault(std::string("CUDA_KERNEL_ASSERT(") + cond + ") failed at " + file + ":" + std::to_string(line));
}

void check_abort() {
  if (tls_block != nullptr && tls_lane != nullptr && tls_block->aborted) throw Aborted{};
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int param, int width, const char* name) {
  Lane& l = current_lane(name);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fault(std::string(name) + ": width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
  }
  l.state = LaneState::kAtWarp;
  l.op = op;
  l.mask = mask;
  l.value = value;
  l.param = param;
  l.width = width;
  l.op_name = name;
  yield(l);
  return l.result;
}

void block_barrier() {
  Lane& l = current_lane("__syncthreads");
  l.state = LaneState::kAtBlock;
  yield(l);
}

unsigned active_mask() {
  Lane& l = current_lane("__activemask");
  unsigned mask = 0;
  for (int i = 0; i < l.warp->count; ++i) {
    if (l.warp->lanes[i].state != LaneState::kDone) mask |= 1u << i;
  }
  return mask;
}

}  // namespace emu
}  // namespace lmm_fast
