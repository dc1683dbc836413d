// Shared helpers for peftu's CUDA kernels: dtype dispatch, 16-byte vector loads, warp reduction.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

enum PeftuDtype { PEFTU_F32 = 0, PEFTU_F16 = 1, PEFTU_BF16 = 2 };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// dot(a[0:K], b[0:K]) by one warp, fp32 accumulation; 16-byte loads when both rows are 16-byte aligned.
template <typename T>
__device__ __forceinline__ float warp_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t K) {
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte vector
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
  int64_t head = 0;
  if ((reinterpret_cast<uintptr_t>(a) % 16 == 0) && (reinterpret_cast<uintptr_t>(b) % 16 == 0)) {
    const int64_t nvec = K / V;
    const uint4* av = reinterpret_cast<const uint4*>(a);
    const uint4* bv = reinterpret_cast<const uint4*>(b);
    for (int64_t i = lane; i < nvec; i += 32) {
      uint4 ua = av[i], ub = bv[i];
      const T* ea = reinterpret_cast<const T*>(&ua);
      const T* eb = reinterpret_cast<const T*>(&ub);
#pragma unroll
      for (int e = 0; e < V; ++e) acc += to_f32(ea[e]) * to_f32(eb[e]);
    }
    head = nvec * V;
  }
  for (int64_t i = head + lane; i < K; i += 32) acc += to_f32(a[i]) * to_f32(b[i]);
  return warp_sum(acc);
}

#define PEFTU_DISPATCH(dtype, ...)                                   \
  switch (dtype) {                                                   \
    case PEFTU_F32: { using T = float; __VA_ARGS__; break; }         \
    case PEFTU_F16: { using T = __half; __VA_ARGS__; break; }        \
    case PEFTU_BF16: { using T = __nv_bfloat16; __VA_ARGS__; break; }\
    default: return (int)cudaErrorInvalidValue;                      \
  }
