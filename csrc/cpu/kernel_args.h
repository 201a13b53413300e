// Torch-free building blocks of the CPU kernel interfaces (msdc.h, updw.h, lgag.h, multidilation.h, mscam.h,
// mutation_loss.h): tensor views, size limits and the item partition. The storage dtype of a call is its
// EmcadDType code (common/codes.h: float32, float64, bfloat16 = 0, 1, 2), which indexes the per-dtype kernel
// tables (kernels.h).
//
// Work is split into *items* whose partition depends only on the problem shape (never on the thread count):
// every item writes its own slots of the partial-result buffers and the bindings reduce those in a fixed
// order, so all reductions are bitwise reproducible.
#pragma once
#include <cstdint>

#include "common/codes.h"

namespace emcad_cpu {

constexpr int kMaxBranches = 8;
constexpr int kMaxKernel = 9;
constexpr int kCpuDTypes = 3;  // float32, float64, bfloat16: the first three EmcadDType codes

// lanes (channels) per vector block: 64 bytes of the accumulation type
inline int block_lanes(int dtype) { return dtype == EMCAD_DTYPE_F64 ? 8 : 16; }

// Channel blocks per item: as many as keep at least `kMinItems` items (N times groups), so that every pixel
// line of a channels_last tensor is consumed while it is in cache. A function of the shape only.
constexpr int64_t kMinItems = 16;
constexpr int64_t kMaxGroup = 64;
inline int blocks_per_item(int64_t n, int64_t nblocks) {
  if (nblocks <= 1 || n <= 0) return 1;
  int64_t g = (n * nblocks) / kMinItems;
  if (g < 1) g = 1;
  if (g > nblocks) g = nblocks;
  if (g > kMaxGroup) g = kMaxGroup;
  return (int)g;
}

// A 4-D strided tensor (N, C, H, W); strides in elements. Any strides are accepted (also overlapping ones).
struct View4 {
  void* data = nullptr;
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;
};

}  // namespace emcad_cpu
