// Fused multi-tensor AdamW, with 32-bit states and with bitsandbytes-compatible 8-bit blockwise states.
// Torch-free: a device array of per-tensor descriptors and a stream in, cudaError_t out.
//
// One launch updates every tensor of the array. The work is a flat sequence of units (2048-element chunks
// for 32-bit states, 256-element quantization blocks for 8-bit states) numbered across the tensors in
// order; each descriptor stores the first unit of its tensor. CTAs stride over the units in increasing
// order, so a CTA finds the tensor of its next unit by moving forward through the array, never searching.
// The element arithmetic is qlora/adamw.h, shared with the CPU implementation bit for bit.
#pragma once

#include <cuda_runtime.h>

#include "qlora/adamw.h"
#include "qlora/vec_io.cuh"

namespace qlora {

// One parameter tensor with 32-bit states. All pointers address `n` contiguous elements.
struct AdamW32Tensor {
  void* p;             // parameter, element type T of the launch
  const void* g;       // gradient, type T
  float* exp_avg;      // first moment
  float* exp_avg_sq;   // second moment
  const float* step;   // this tensor's step count, already incremented for this update
  int64_t n;
  int64_t first_unit;  // index of this tensor's first chunk in the launch's flat unit sequence
  int64_t end_unit;    // one past its last chunk
  int64_t vectorized;  // every pointer is 16-byte aligned, so full chunks take 16-byte loads
};

// One parameter tensor with 8-bit blockwise states (bitsandbytes' state1/state2/absmax1/absmax2).
struct AdamW8Tensor {
  void* p;
  const void* g;
  uint8_t* state1;     // codes of the first moment in the signed dynamic code
  uint8_t* state2;     // codes of the second moment in the unsigned dynamic code
  float* absmax1;      // one per block of kOptimizerBlocksize elements
  float* absmax2;
  const float* step;
  int64_t n;
  int64_t first_unit;  // index of this tensor's first 256-element block in the launch
  int64_t end_unit;    // one past its last block
  int64_t vectorized;  // p and g 16-byte aligned, state codes 8-byte aligned
};

// The hyperparameters of one launch. lr comes from lr_device when it is not null (a learning-rate
// tensor updated on the device by a scheduler), else from lr.
struct AdamWHyper {
  double lr;
  const double* lr_device;
  double beta1, beta2, eps, weight_decay;
};

constexpr int kAdamWThreads = 256;
constexpr int kAdamWElems = 8;                                   // per thread: 32 B of float state, 16 B of bf16
constexpr int64_t kAdamWChunk = kAdamWThreads * kAdamWElems;     // elements per 32-bit work unit
constexpr int kAdamW8Warps = kAdamWThreads / 32;                 // one warp per 256-element block
static_assert(kOptimizerBlocksize == 32 * kAdamWElems, "a warp covers exactly one quantization block");

__device__ __forceinline__ AdamWScalars scalars_for(const AdamWHyper& h, const float* step) {
  const double lr = h.lr_device != nullptr ? *h.lr_device : h.lr;
  return adamw_scalars(lr, static_cast<double>(*step), h.beta1, h.beta2, h.eps, h.weight_decay);
}

template <typename T>
__global__ void __launch_bounds__(kAdamWThreads) adamw_32bit_kernel(const AdamW32Tensor* __restrict__ tensors,
                                                                    int64_t total_units, AdamWHyper h) {
  int t = -1;
  AdamW32Tensor d;
  d.end_unit = 0;
  AdamWScalars s;
  for (int64_t u = blockIdx.x; u < total_units; u += gridDim.x) {
    if (u >= d.end_unit) {
      do ++t; while (u >= tensors[t].end_unit);
      d = tensors[t];
      s = scalars_for(h, d.step);
    }
    const int64_t e0 = (u - d.first_unit) * kAdamWChunk + static_cast<int64_t>(threadIdx.x) * kAdamWElems;
    if (e0 >= d.n) continue;
    T* p = static_cast<T*>(d.p) + e0;
    const T* g = static_cast<const T*>(d.g) + e0;
    float* m = d.exp_avg + e0;
    float* v = d.exp_avg_sq + e0;
    if (d.vectorized && e0 + kAdamWElems <= d.n) {
      // All four loads are issued before any arithmetic: 4 x 32 B in flight per thread for float params.
      float gv[kAdamWElems], pv[kAdamWElems], mv[kAdamWElems], vv[kAdamWElems];
      VecIO<T>::load8(g, gv);
      VecIO<T>::load8(p, pv);
      VecIO<float>::load8(m, mv);
      VecIO<float>::load8(v, vv);
#pragma unroll
      for (int i = 0; i < kAdamWElems; ++i) adamw_element(pv[i], gv[i], mv[i], vv[i], s);
      VecIO<T>::store8(p, pv);
      VecIO<float>::store8(m, mv);
      VecIO<float>::store8(v, vv);
    } else {
      const int64_t count = d.n - e0 < kAdamWElems ? d.n - e0 : kAdamWElems;
      for (int64_t i = 0; i < count; ++i) {
        float pv = VecIO<T>::to_float(p[i]), mv = m[i], vv = v[i];
        if (adamw_element(pv, VecIO<T>::to_float(g[i]), mv, vv, s)) {
          p[i] = VecIO<T>::from_float(pv);
          m[i] = mv;
          v[i] = vv;
        }
      }
    }
  }
}

__device__ __forceinline__ uint32_t warp_max_u32(uint32_t m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, offset));
  return m;
}

// What every CTA of the 8-bit kernel keeps in shared memory: the two codes (for decoding) and their search
// tables, built from the codes at the start (the threshold keys serve only the building).
struct AdamW8Codes {
  float code1[256];
  float code2[256];
  int32_t keys1[256];
  int32_t keys2[256];
  uint32_t table1[kCodeTableSize];
  uint32_t table2[kCodeTableSize];
};
static_assert(kAdamWThreads == 256, "one thread per code entry builds the threshold keys");

// Code i (0..7) of a lane's eight 8-bit codes, held four to a word as they are stored.
__device__ __forceinline__ uint32_t get_code(const uint2& w, int i) {
  return ((i < 4 ? w.x : w.y) >> (8 * (i % 4))) & 0xffu;
}
__device__ __forceinline__ void add_code(uint2& w, int i, uint32_t c) { (i < 4 ? w.x : w.y) |= c << (8 * (i % 4)); }

// One warp's update of one 256-element block: lane l holds elements 8l .. 8l+7, so the block's new absmax is
// a 5-step shuffle reduction with no shared memory and no __syncthreads. kFull: the block is whole and its
// pointers aligned for vector loads (the same for every lane, as the shuffles need). kTable: the codes fit
// their tables (always, for the dynamic codes); otherwise the binary search.
template <typename T, bool kFull, bool kTable>
__device__ __forceinline__ void adamw_8bit_block(const AdamW8Tensor& d, int64_t block, int lane, const AdamWScalars& s,
                                                 const AdamW8Codes& codes, uint32_t negative_codes1) {
  const int64_t e0 = block * kOptimizerBlocksize + lane * kAdamWElems;
  const int64_t count = kFull ? kAdamWElems : (e0 >= d.n ? 0 : (d.n - e0 < kAdamWElems ? d.n - e0 : kAdamWElems));
  T* p = static_cast<T*>(d.p) + e0;
  const T* g = static_cast<const T*>(d.g) + e0;
  uint8_t* state1 = d.state1 + e0;
  uint8_t* state2 = d.state2 + e0;
  float gv[kAdamWElems], pv[kAdamWElems], mv[kAdamWElems], vv[kAdamWElems];
  uint2 w1 = make_uint2(0, 0), w2 = make_uint2(0, 0);  // the lane's codes of each state
  if constexpr (kFull) {
    VecIO<T>::load8(g, gv);
    VecIO<T>::load8(p, pv);
    w1 = *reinterpret_cast<const uint2*>(state1);
    w2 = *reinterpret_cast<const uint2*>(state2);
  } else {
#pragma unroll
    for (int i = 0; i < kAdamWElems; ++i) {
      const bool in = i < count;
      gv[i] = in ? VecIO<T>::to_float(g[i]) : 0.0f;
      pv[i] = in ? VecIO<T>::to_float(p[i]) : 0.0f;
      add_code(w1, i, in ? state1[i] : 0u);
      add_code(w2, i, in ? state2[i] : 0u);
    }
  }
  const float scale1 = d.absmax1[block];
  const float scale2 = d.absmax2[block];
  uint32_t max1 = 0, max2 = 0;
#pragma unroll
  for (int i = 0; i < kAdamWElems; ++i) {
    mv[i] = rn_mul(codes.code1[get_code(w1, i)], scale1);
    vv[i] = rn_mul(codes.code2[get_code(w2, i)], scale2);
    // Computed for every element and kept only for a finite gradient (as adamw_element decides): without a
    // branch the eight elements interleave. Past count: harmless, and neither counted nor stored.
    float p1 = pv[i], m1 = mv[i], v1 = vv[i];
    adamw_update(p1, gv[i], m1, v1, s);
    const bool finite = is_finite_bits(gv[i]);
    pv[i] = finite ? p1 : pv[i];
    mv[i] = finite ? m1 : mv[i];
    vv[i] = finite ? v1 : vv[i];
    if (i < count) {
      max1 = max(max1, abs_bits(mv[i]));
      max2 = max(max2, abs_bits(vv[i]));
    }
  }
  if constexpr (kFull) {
    VecIO<T>::store8(p, pv);
  } else {
#pragma unroll
    for (int i = 0; i < kAdamWElems; ++i)  // constant indices keep pv in registers
      if (i < count) p[i] = VecIO<T>::from_float(pv[i]);
  }

  const float absmax1 = bits_float(warp_max_u32(max1));
  const float absmax2 = bits_float(warp_max_u32(max2));
  if (lane == 0) {
    d.absmax1[block] = absmax1;
    d.absmax2[block] = absmax2;
  }
  const float inv1 = inverse_scale(absmax1);
  const float inv2 = inverse_scale(absmax2);
  w1 = w2 = make_uint2(0, 0);
#pragma unroll
  for (int i = 0; i < kAdamWElems; ++i) {
    uint32_t c1, c2;
    if constexpr (kTable) {
      c1 = code_state1_table(codes.table1, negative_codes1, rn_mul(mv[i], inv1), mv[i]);
      c2 = code_8bit_table(codes.table2, rn_mul(vv[i], inv2));
    } else {
      c1 = code_state1(codes.code1, rn_mul(mv[i], inv1), mv[i]);
      c2 = code_8bit(codes.code2, rn_mul(vv[i], inv2));
    }
    add_code(w1, i, c1);
    add_code(w2, i, c2);
  }
  if constexpr (kFull) {
    *reinterpret_cast<uint2*>(state1) = w1;
    *reinterpret_cast<uint2*>(state2) = w2;
  } else {
#pragma unroll
    for (int i = 0; i < kAdamWElems; ++i) {
      if (i < count) {
        state1[i] = static_cast<uint8_t>(get_code(w1, i));
        state2[i] = static_cast<uint8_t>(get_code(w2, i));
      }
    }
  }
}

// Three CTAs per SM (at most 80 registers, about what the eight interleaved elements of a lane need): the
// update is bound by instruction issue, which 24 warps keep busy.
template <typename T>
__global__ void __launch_bounds__(kAdamWThreads, 3)
    adamw_8bit_blockwise_kernel(const AdamW8Tensor* __restrict__ tensors, int64_t total_units,
                                const float* __restrict__ qmap1, const float* __restrict__ qmap2, AdamWHyper h) {
  __shared__ AdamW8Codes codes;
  const int tid = threadIdx.x;
  codes.code1[tid] = qmap1[tid];
  codes.code2[tid] = qmap2[tid];
  __syncthreads();
  bool fits = code_key(codes.code1, tid, codes.keys1) && code_key(codes.code2, tid, codes.keys2);
  const uint32_t negative_codes1 = __syncthreads_count(float_bits(codes.code1[tid]) >> 31);
  for (int j = tid; j < kCodeTableSize; j += kAdamWThreads) {
    codes.table1[j] = code_table_entry(codes.keys1, j, &fits);
    codes.table2[j] = code_table_entry(codes.keys2, j, &fits);
  }
  const bool tables_fit = __syncthreads_and(fits) != 0;

  const int lane = tid % 32;
  // Only the tensor's index, unit range and scalars stay in registers from block to block; the rest of its
  // descriptor is read again for each block (an L1 hit), which keeps the registers for the elements.
  int t = -1;
  int64_t end_unit = 0;
  AdamWScalars s;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kAdamW8Warps;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kAdamW8Warps + tid / 32; u < total_units; u += stride) {
    if (u >= end_unit) {
      do ++t; while (u >= tensors[t].end_unit);
      end_unit = tensors[t].end_unit;
      s = scalars_for(h, tensors[t].step);
    }
    const AdamW8Tensor& d = tensors[t];
    const int64_t block = u - d.first_unit;
    const bool full = d.vectorized && (block + 1) * kOptimizerBlocksize <= d.n;
    if (full && tables_fit) {
      adamw_8bit_block<T, true, true>(d, block, lane, s, codes, negative_codes1);
    } else if (tables_fit) {
      adamw_8bit_block<T, false, true>(d, block, lane, s, codes, negative_codes1);
    } else if (full) {
      adamw_8bit_block<T, true, false>(d, block, lane, s, codes, negative_codes1);
    } else {
      adamw_8bit_block<T, false, false>(d, block, lane, s, codes, negative_codes1);
    }
  }
}

// ---- launchers -----------------------------------------------------------------------------------------

// CTAs per launch: enough to fill every SM at the kernel's occupancy, and no more than there are units,
// so each CTA strides over many units and pays for its setup (code tables, descriptor loads) once.
template <typename Kernel>
cudaError_t adamw_grid(Kernel kernel, int64_t units_per_cta, int64_t total_units, unsigned* grid) {
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kAdamWThreads, 0);
  if (err != cudaSuccess) return err;
  const int64_t needed = (total_units + units_per_cta - 1) / units_per_cta;
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  *grid = static_cast<unsigned>(needed < resident ? needed : resident);
  return cudaSuccess;
}

// tensors: a device array of descriptors whose [first_unit, end_unit) ranges tile [0, total_units) in
// order, tensor i taking ceil(n_i / kAdamWChunk) units.
template <typename T>
cudaError_t launch_adamw_32bit(const AdamW32Tensor* tensors, int64_t total_units, const AdamWHyper& h,
                               cudaStream_t stream) {
  if (total_units == 0) return cudaSuccess;
  unsigned grid = 0;
  cudaError_t err = adamw_grid(adamw_32bit_kernel<T>, 1, total_units, &grid);
  if (err != cudaSuccess) return err;
  adamw_32bit_kernel<T><<<grid, kAdamWThreads, 0, stream>>>(tensors, total_units, h);
  return cudaGetLastError();
}

// As launch_adamw_32bit, with units of kOptimizerBlocksize elements; qmap1/qmap2: the 256-entry signed and
// unsigned dynamic codes on the device.
template <typename T>
cudaError_t launch_adamw_8bit_blockwise(const AdamW8Tensor* tensors, int64_t total_units, const float* qmap1,
                                        const float* qmap2, const AdamWHyper& h, cudaStream_t stream) {
  if (total_units == 0) return cudaSuccess;
  unsigned grid = 0;
  cudaError_t err = adamw_grid(adamw_8bit_blockwise_kernel<T>, kAdamW8Warps, total_units, &grid);
  if (err != cudaSuccess) return err;
  adamw_8bit_blockwise_kernel<T><<<grid, kAdamWThreads, 0, stream>>>(tensors, total_units, qmap1, qmap2, h);
  return cudaGetLastError();
}

}  // namespace qlora
