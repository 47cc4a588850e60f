// Internal state of the emulated device, shared by its sources
// (scheduler.cpp: lanes, warps, collectives, barriers; launch.cpp: launch
// checks and the grid; shared_memory.cpp: the shared-memory checker).
#pragma once

#include <ucontext.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "emulation/cuda_emulation.h"

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
  bool atomic = false;   // the last write was an atomic
  bool several = false;  // atomics of several threads since the last barrier that orders them
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

// The running lane and its block (null outside an emulated kernel).
extern thread_local Lane* tls_lane;
extern thread_local Block* tls_block;

// A fiber stack of the pool (with a guard page below it), and its return.
void* take_stack();
void give_stack(void* stack);

// Runs jobs[0] on the caller and the others on pooled host threads; waits
// at most `patience` for those; false if some did not finish (their threads
// are then given up on).
bool run_warps(std::vector<std::function<void()>>& jobs, std::chrono::duration<double> patience);

// Runs one warp of the block to the end on the calling thread.
void run_warp(Block& b, Warp& w, const dim3& grid);

std::string thread_name(const Lane& l);
std::string thread_name(const Block& b, int64_t linear);
// The first error of a block is the one reported; it aborts the block.
void record_error(Block& b, const std::string& what);
Lane& current_lane(const char* what);

}  // namespace emu
}  // namespace lmm_fast
