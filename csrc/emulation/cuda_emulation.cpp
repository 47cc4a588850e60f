// The emulated device of cuda_emulation.h: launch checks, the block and warp
// schedulers, barriers, warp collectives and the shared-memory checker.
#include "emulation/cuda_emulation.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <vector>

namespace lmm_fast {
namespace emu {

struct SharedRegion {
  struct Block* block;
  size_t offset;
  size_t bytes;
  const char* name;
};

// Thrown into the lanes of an aborted block so that they unwind.
struct Aborted {};

struct KernelFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class LaneState { kRunnable, kAtWarp, kAtBlock, kDone };

struct Warp;

struct Lane {
  ucontext_t context;
  Warp* warp = nullptr;
  int lane = 0;        // index in the warp
  int64_t thread = 0;  // linear index in the block
  uint3 index{0, 0, 0};
  LaneState state = LaneState::kRunnable;
  // the collective it waits in
  WarpOp op = WarpOp::kSyncWarp;
  unsigned mask = 0;
  uint64_t value = 0;
  int param = 0;
  int width = 32;
  const char* op_name = "";
  uint64_t result = 0;
  bool abort = false;
  // barriers passed (all threads of the block pass them together) and
  // barriers or __syncwarp passed (the lanes of a warp together)
  uint32_t block_epoch = 0;
  uint32_t warp_epoch = 0;
};

struct Warp {
  Block* block = nullptr;
  int index = 0;
  int count = 0;  // lanes (the last warp of a block may be partial)
  Lane lanes[32];
  void* stacks[32] = {};
  ucontext_t scheduler;
};

// What the checker remembers of one byte of shared memory in this block.
struct ByteShadow {
  int32_t writer = -1;  // thread of the last write (-1: never written)
  int32_t writer_warp = 0;
  uint32_t write_block_epoch = 0, write_warp_epoch = 0;
  int32_t reader = -1;  // thread of the reads since that write (-2: several)
  int32_t reader_warp = 0;  // -1: readers in several warps
  uint32_t read_block_epoch = 0, read_warp_epoch = 0;
};

struct Block {
  std::string kernel;
  uint3 index{0, 0, 0};
  dim3 dims;
  int64_t threads = 0;
  int num_warps = 0;
  double timeout = 60.0;
  const std::function<void()>* body = nullptr;

  std::mutex mutex;  // shared memory and the error
  std::vector<unsigned char> arena;
  std::vector<ByteShadow> shadow;
  size_t limit = 0;
  size_t used = 0;
  std::vector<std::unique_ptr<SharedRegion>> regions;
  std::vector<std::pair<SharedSlot*, SharedRegion*>> slots;
  SharedRegion* dynamic = nullptr;
  std::string error;
  std::atomic<bool> aborted{false};

  std::mutex barrier_mutex;
  std::condition_variable barrier_cv;
  int arrived = 0;
  int exited_warps = 0;
  uint64_t generation = 0;

  std::vector<Warp*> warps;
};

namespace {

thread_local Lane* tls_lane = nullptr;
thread_local Block* tls_block = nullptr;

std::mutex g_launch_mutex;  // one grid at a time
std::mutex g_config_mutex;
std::unordered_map<const void*, size_t> g_max_dynamic_shared;
std::atomic<int64_t> g_launches{0};
std::unordered_map<std::string, int64_t> g_launches_by_name;  // under g_launch_mutex

double initial_timeout() {
  const char* env = std::getenv("LMM_FAST_EMULATION_TIMEOUT");
  if (env == nullptr) return 60.0;
  const double v = std::atof(env);
  return v > 0 ? v : 60.0;
}
std::atomic<double> g_timeout{initial_timeout()};

// ------------------------------------------------------------ fiber stacks
constexpr size_t kStackBytes = 256 * 1024;

std::mutex g_stack_mutex;
std::vector<void*> g_free_stacks;

size_t page_size() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

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

void notify_all(Block& b) {
  {
    std::lock_guard<std::mutex> lock(b.barrier_mutex);
  }
  b.barrier_cv.notify_all();
}

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

// ------------------------------------------------------------ launch checks
std::string dims_text(const dim3& d) {
  std::ostringstream s;
  s << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return s.str();
}

void check_launch(const LaunchSpec& spec, const void* kernel) {
  const unsigned block[3] = {spec.block.x, spec.block.y, spec.block.z};
  const unsigned grid[3] = {spec.grid.x, spec.grid.y, spec.grid.z};
  const uint64_t threads = static_cast<uint64_t>(block[0]) * block[1] * block[2];
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(block[d] >= 1 && block[d] <= kMaxBlockDim[d], "CUDA emulation: invalid configuration argument: ",
                spec.name, " launched with block ", dims_text(spec.block), " (dimension ", d, " must be in [1, ",
                kMaxBlockDim[d], "])");
    TORCH_CHECK(grid[d] >= 1 && grid[d] <= kMaxGridDim[d], "CUDA emulation: invalid configuration argument: ",
                spec.name, " launched with grid ", dims_text(spec.grid), " (dimension ", d, " must be in [1, ",
                kMaxGridDim[d], "])");
  }
  TORCH_CHECK(threads <= kMaxThreadsPerBlock, "CUDA emulation: invalid configuration argument: ", spec.name,
              " launched with ", threads, " threads per block ", dims_text(spec.block), ", at most ",
              kMaxThreadsPerBlock);
  TORCH_CHECK(spec.launch_bound <= 0 || threads <= static_cast<uint64_t>(spec.launch_bound),
              "CUDA emulation: too many resources requested for launch: ", spec.name, " has __launch_bounds__(",
              spec.launch_bound, ") and was launched with ", threads, " threads per block");
  const size_t limit = std::max(kDefaultSharedBytes, max_dynamic_shared(kernel));
  TORCH_CHECK(spec.shared_bytes <= limit, "CUDA emulation: invalid argument: ", spec.name, " requests ",
              spec.shared_bytes, " bytes of dynamic shared memory, above its limit of ", limit,
              " (cudaFuncSetAttribute raises it up to ", kMaxOptInSharedBytes, ")");
}

// A permutation of the blocks that changes from launch to launch (a stride
// coprime with their number, alternately reversed), so that a result that
// depends on the order of the blocks shows it.
std::vector<int64_t> block_order(int64_t count, int64_t launch) {
  std::vector<int64_t> order(count);
  int64_t stride = 1;
  for (const int64_t s : {7, 5, 3, 11, 13}) {
    if (std::gcd(s, count) == 1) {
      stride = s;
      break;
    }
  }
  for (int64_t k = 0; k < count; ++k) order[k] = (k * stride) % count;
  if (launch % 2 == 1) std::reverse(order.begin(), order.end());
  return order;
}

}  // namespace

// ------------------------------------------------------------ public entry points
void set_max_dynamic_shared(const void* kernel, size_t bytes) {
  TORCH_CHECK(bytes <= kMaxOptInSharedBytes, "CUDA emulation: invalid argument: at most ", kMaxOptInSharedBytes,
              " bytes of dynamic shared memory per block can be requested, got ", bytes);
  std::lock_guard<std::mutex> lock(g_config_mutex);
  g_max_dynamic_shared[kernel] = bytes;
}

size_t max_dynamic_shared(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_config_mutex);
  const auto it = g_max_dynamic_shared.find(kernel);
  return it == g_max_dynamic_shared.end() ? 0 : it->second;
}

double set_deadlock_timeout(double seconds) {
  TORCH_CHECK(seconds > 0, "CUDA emulation: the deadlock timeout must be positive, got ", seconds);
  return g_timeout.exchange(seconds);
}

int64_t launch_count() { return g_launches.load(); }

int64_t launch_count(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const auto it = g_launches_by_name.find(name);
  return it == g_launches_by_name.end() ? 0 : it->second;
}

void run_grid(const LaunchSpec& spec, const void* kernel, const std::function<void()>& thread_body) {
  TORCH_CHECK(tls_lane == nullptr, "CUDA emulation: a kernel launched another kernel (not supported)");
  check_launch(spec, kernel);
  std::lock_guard<std::mutex> launch_lock(g_launch_mutex);
  const int64_t launch = g_launches++;
  ++g_launches_by_name[spec.name];
  const int64_t blocks = static_cast<int64_t>(spec.grid.x) * spec.grid.y * spec.grid.z;
  const int64_t threads = static_cast<int64_t>(spec.block.x) * spec.block.y * spec.block.z;
  const int num_warps = static_cast<int>((threads + 31) / 32);
  const double timeout = g_timeout.load();
  const size_t limit = std::max(kDefaultSharedBytes, max_dynamic_shared(kernel));
  // The warps and their lanes' stacks serve every block of the launch; the
  // stacks go back to the pool however the launch ends (but with a warp
  // that hangs, which keeps them).
  std::vector<std::unique_ptr<Warp>> warps;
  struct StackReturn {
    std::vector<std::unique_ptr<Warp>>& warps;
    ~StackReturn() {
      for (auto& warp : warps) {
        if (warp == nullptr) continue;
        for (int i = 0; i < warp->count; ++i) give_stack(warp->stacks[i]);
      }
    }
  } stack_return{warps};
  for (int w = 0; w < num_warps; ++w) {
    auto warp = std::make_unique<Warp>();
    warp->index = w;
    warp->count = static_cast<int>(std::min<int64_t>(32, threads - 32 * w));
    for (int i = 0; i < warp->count; ++i) warp->stacks[i] = take_stack();
    warps.push_back(std::move(warp));
  }
  for (const int64_t linear : block_order(blocks, launch)) {
    // Shared with the warp threads, which may outlive a block that hangs.
    auto block = std::make_shared<Block>();
    Block& b = *block;
    b.kernel = spec.name;
    b.index = uint3{static_cast<unsigned>(linear % spec.grid.x),
                    static_cast<unsigned>((linear / spec.grid.x) % spec.grid.y),
                    static_cast<unsigned>(linear / (static_cast<int64_t>(spec.grid.x) * spec.grid.y))};
    b.dims = spec.block;
    b.threads = threads;
    b.num_warps = num_warps;
    b.timeout = timeout;
    b.body = &thread_body;
    b.limit = limit;
    b.arena.assign(limit, 0xff);
    if (spec.shared_bytes > 0) {
      b.regions.push_back(std::make_unique<SharedRegion>(SharedRegion{&b, 0, spec.shared_bytes, "dynamic"}));
      b.dynamic = b.regions.back().get();
      b.used = spec.shared_bytes;
      b.shadow.resize(b.used);
    }
    for (auto& warp : warps) {
      warp->block = &b;
      for (int i = 0; i < warp->count; ++i) {
        Lane& l = warp->lanes[i];
        l = Lane{};
        l.warp = warp.get();
        l.lane = i;
        l.thread = 32 * warp->index + i;
        l.index = uint3{static_cast<unsigned>(l.thread % spec.block.x),
                        static_cast<unsigned>((l.thread / spec.block.x) % spec.block.y),
                        static_cast<unsigned>(l.thread / (static_cast<int64_t>(spec.block.x) * spec.block.y))};
      }
      b.warps.push_back(warp.get());
    }
    std::vector<std::function<void()>> jobs;
    for (int w = 0; w < num_warps; ++w) {
      jobs.emplace_back([block, w, grid = spec.grid] { run_warp(*block, *block->warps[w], grid); });
    }
    if (!pool().run(jobs, std::chrono::duration<double>(2 * timeout + 1))) {
      // A warp that neither finishes nor reaches a collective or an atomic
      // cannot be stopped: its thread, warp and stacks are left behind.
      record_error(b, "a warp neither finished nor waited within the deadlock timeout (an endless loop?)");
      for (auto& warp : warps) static_cast<void>(warp.release());
    }
    std::string error;
    {
      std::lock_guard<std::mutex> lock(b.mutex);
      error = b.error;
    }
    TORCH_CHECK(error.empty(), "CUDA emulation: kernel ", spec.name, ", block ",
                dims_text(dim3(b.index.x, b.index.y, b.index.z)), ": ", error);
  }
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

// ------------------------------------------------------------ shared memory
namespace {

std::string where(const SharedRegion* r, size_t byte) {
  return std::string(r->name) + " (byte " + std::to_string(byte - r->offset) + " of " + std::to_string(r->bytes) +
         ")";
}

bool ordered(int32_t warp, uint32_t block_epoch, uint32_t warp_epoch, const Lane& l) {
  return block_epoch < l.block_epoch || (warp == l.warp->index && warp_epoch < l.warp_epoch);
}

}  // namespace

void shared_read(const SharedRegion* r, size_t byte, void* out, size_t size) {
  Lane& l = current_lane("a shared-memory read");
  Block& b = *r->block;
  std::lock_guard<std::mutex> lock(b.mutex);
  const size_t at = r->offset + byte;
  for (size_t k = at; k < at + size; ++k) {
    ByteShadow& s = b.shadow[k];
    if (s.writer < 0) {
      fault("reads " + where(r, k) + ", which no thread of the block has written (uninitialised shared memory, " +
            "or a read before the write it waits for)");
    }
    if (s.writer != l.thread && !ordered(s.writer_warp, s.write_block_epoch, s.write_warp_epoch, l)) {
      fault("reads " + where(r, k) + ", written by " + thread_name(b, s.writer) +
            " with no barrier between them (missing __syncthreads or __syncwarp)");
    }
    if (s.reader == -1 || s.read_block_epoch < l.block_epoch) {
      s.reader = static_cast<int32_t>(l.thread);
      s.reader_warp = l.warp->index;
      s.read_block_epoch = l.block_epoch;
      s.read_warp_epoch = l.warp_epoch;
    } else {
      if (s.reader != l.thread) s.reader = -2;
      if (s.reader_warp != l.warp->index) s.reader_warp = -1;
      s.read_warp_epoch = std::max(s.read_warp_epoch, l.warp_epoch);
    }
  }
  std::memcpy(out, b.arena.data() + at, size);
}

void shared_write(const SharedRegion* r, size_t byte, const void* in, size_t size) {
  Lane& l = current_lane("a shared-memory write");
  Block& b = *r->block;
  std::lock_guard<std::mutex> lock(b.mutex);
  const size_t at = r->offset + byte;
  for (size_t k = at; k < at + size; ++k) {
    ByteShadow& s = b.shadow[k];
    if (s.writer >= 0 && s.writer != l.thread &&
        !ordered(s.writer_warp, s.write_block_epoch, s.write_warp_epoch, l)) {
      fault("writes " + where(r, k) + ", also written by " + thread_name(b, s.writer) +
            " with no barrier between them (write-write race)");
    }
    if (s.reader != -1 && s.reader != l.thread &&
        !(s.read_block_epoch < l.block_epoch ||
          (s.reader_warp == l.warp->index && s.read_warp_epoch < l.warp_epoch))) {
      fault("writes " + where(r, k) + ", which " +
            (s.reader == -2 ? std::string("other threads") : thread_name(b, s.reader)) +
            " read with no barrier since (missing __syncthreads before the buffer is reused)");
    }
    s.writer = static_cast<int32_t>(l.thread);
    s.writer_warp = l.warp->index;
    s.write_block_epoch = l.block_epoch;
    s.write_warp_epoch = l.warp_epoch;
    s.reader = -1;
  }
  std::memcpy(b.arena.data() + at, in, size);
}

void shared_out_of_bounds(const SharedRegion* r, int64_t index, size_t extent) {
  fault("index " + std::to_string(index) + " is out of bounds of shared " + r->name + " (extent " +
        std::to_string(extent) + ")");
}

const SharedRegion* static_shared_region(SharedSlot* slot, size_t bytes, size_t align, const char* name) {
  current_lane("LMM_FAST_SHARED");
  Block& b = *tls_block;
  std::lock_guard<std::mutex> lock(b.mutex);
  for (const auto& [key, region] : b.slots) {
    if (key == slot) return region;
  }
  align = std::max<size_t>(align, 16);
  const size_t offset = (b.used + align - 1) / align * align;
  if (offset + bytes > b.limit) {
    fault("shared " + std::string(name) + " needs " + std::to_string(bytes) + " bytes at offset " +
          std::to_string(offset) + ", beyond the block's " + std::to_string(b.limit) +
          " bytes of shared memory (too many resources requested for launch)");
  }
  b.regions.push_back(std::make_unique<SharedRegion>(SharedRegion{&b, offset, bytes, name}));
  b.slots.emplace_back(slot, b.regions.back().get());
  b.used = offset + bytes;
  b.shadow.resize(b.used);
  return b.regions.back().get();
}

const SharedRegion* dynamic_shared_region(size_t elem_size, size_t align, const char* name, size_t* extent) {
  current_lane("LMM_FAST_DYNAMIC_SHARED");
  Block& b = *tls_block;
  std::lock_guard<std::mutex> lock(b.mutex);
  if (b.dynamic == nullptr) {
    // No dynamic shared memory was requested: a zero-length array.
    b.regions.push_back(std::make_unique<SharedRegion>(SharedRegion{&b, 0, 0, name}));
    b.dynamic = b.regions.back().get();
  }
  b.dynamic->name = name;
  (void)align;
  *extent = b.dynamic->bytes / elem_size;
  return b.dynamic;
}

}  // namespace emu
}  // namespace lmm_fast
