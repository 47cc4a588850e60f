// The emulated device's launches: the device's launch limits, the blocks of
// a grid in a changing order, each run by its warps, and the error report.
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <unordered_map>

#include "emulation/device_state.h"

namespace lmm_fast {
namespace emu {
namespace {

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
    if (!run_warps(jobs, std::chrono::duration<double>(2 * timeout + 1))) {
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

}  // namespace emu
}  // namespace lmm_fast
