// The emulated device's shared memory: per-block allocations of the
// declarations, bounds, and the race and initialisation checks of every
// access.
#include <algorithm>
#include <string>

#include "emulation/device_state.h"

namespace lmm_fast {
namespace emu {

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
    if ((s.writer != l.thread || s.several) &&
        !ordered(s.writer_warp, s.write_block_epoch, s.write_warp_epoch, l)) {
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
    if (s.writer >= 0 && (s.writer != l.thread || s.several) &&
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
    s.atomic = false;
    s.several = false;
  }
  std::memcpy(b.arena.data() + at, in, size);
}

void shared_atomic(const SharedRegion* r, size_t byte, const void* operand, void* old, size_t size,
                   void (*update)(void* word, const void* operand)) {
  Lane& l = current_lane("a shared-memory atomic");
  Block& b = *r->block;
  std::lock_guard<std::mutex> lock(b.mutex);
  const size_t at = r->offset + byte;
  for (size_t k = at; k < at + size; ++k) {
    ByteShadow& s = b.shadow[k];
    if (s.writer < 0) {
      fault("atomically updates " + where(r, k) + ", which no thread of the block has written " +
            "(uninitialised shared memory)");
    }
    const bool unordered = !ordered(s.writer_warp, s.write_block_epoch, s.write_warp_epoch, l);
    if (!s.atomic && s.writer != l.thread && unordered) {
      fault("atomically updates " + where(r, k) + ", written by " + thread_name(b, s.writer) +
            " with no barrier between them (a plain write races the atomic)");
    }
    if (s.reader != -1 && s.reader != l.thread &&
        !(s.read_block_epoch < l.block_epoch ||
          (s.reader_warp == l.warp->index && s.read_warp_epoch < l.warp_epoch))) {
      fault("atomically updates " + where(r, k) + ", which " +
            (s.reader == -2 ? std::string("other threads") : thread_name(b, s.reader)) +
            " read with no barrier since (a plain read races the atomic)");
    }
    // Unordered atomics of other threads: only a block barrier orders the
    // byte's writes for a later plain access.
    const bool several = s.atomic && unordered && (s.several || s.writer != l.thread);
    const bool other_warp = s.writer_warp != l.warp->index;
    s.several = several;
    s.writer = static_cast<int32_t>(l.thread);
    s.writer_warp = several && other_warp ? -1 : l.warp->index;
    s.write_block_epoch = l.block_epoch;
    s.write_warp_epoch = l.warp_epoch;
    s.reader = -1;
    s.atomic = true;
  }
  std::memcpy(old, b.arena.data() + at, size);
  update(b.arena.data() + at, operand);
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
