// What every kernel header includes first: the CUDA runtime and c10's
// macros under nvcc, or the emulated device (csrc/emulation) when the same
// header is compiled as host C++ for the tests; the shared-memory
// declarations both understand; the launch description.
#pragma once

#if defined(LMM_FAST_CUDA_EMULATION)
#include "emulation/cuda_emulation.h"
#else
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

// `LMM_FAST_SHARED(float, buf, [4][32]);` is `__shared__ float buf[4][32];`
// (the emulation checks its indices and races on it).
#define LMM_FAST_SHARED(type, name, extents) __shared__ type name extents
// `LMM_FAST_DYNAMIC_SHARED(float, buf);` is `extern __shared__ float buf[];`.
#define LMM_FAST_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

#include "cuda/launch_spec.h"
