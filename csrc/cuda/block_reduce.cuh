// Block-wide sums for the CUDA kernels, in a fixed order: warp shuffles, then one warp over the warp
// partials. The order of the additions depends only on blockDim, never on timing, so every result is
// bitwise reproducible run to run (no atomics).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ffk {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;

// Threads for a block that walks one row of `len` elements: about 4 elements per thread, a whole
// number of warps, at most kMaxThreads.
inline int threads_for_row(int64_t len) {
  const int64_t want = (len + 3) / 4;
  const int64_t warps = (want + kWarpSize - 1) / kWarpSize;
  const int64_t t = warps * kWarpSize;
  return static_cast<int>(t < kWarpSize ? kWarpSize : (t > kMaxThreads ? kMaxThreads : t));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // complete in lane 0
}

// The sum of `v` over the block, returned to every thread (all threads get the same bits).
// blockDim.x must be a multiple of kWarpSize; `scratch` is __shared__ storage for kWarpSize values.
// Every thread of the block must call it (it synchronizes the block).
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = lane < num_warps ? scratch[lane] : T(0);
  total = warp_sum(total);                              // every warp reduces the same partials in the same order
  total = __shfl_sync(0xffffffffu, total, 0);
  __syncthreads();                                      // scratch may be reused by the next call
  return total;
}

}  // namespace cuda
}  // namespace ffk
