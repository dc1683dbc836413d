// Fused bottleneck adapter per token's slot (plain CUDA, no torch headers).
//
// Semantics (reference: peftu_kernels/ops/reference.py::adapter), slot s = slots[t / L]:
//   z[j]      = act(h[t, :] . down[s, j, :] + down_bias[s, j])            j < M   (fp32, shared memory)
//   out[t, n] = residual[t, n] + sum_j z[j] * up[s, n, j] + up_bias[s, n]
// Rows with s < 0 (or s >= S: never past the bank) copy the residual. One block per token: down-projection by warps (16-byte loads),
// activation, up-projection by threads, residual add, in one launch. out may alias residual.
#include "common.cuh"
#include "activations.cuh"

template <typename T>
__global__ void adapter_kernel(const T* __restrict__ h, const T* residual, T* out, const T* __restrict__ down,
                               const T* __restrict__ db, const T* __restrict__ up, const T* __restrict__ ub,
                               const int64_t* __restrict__ slots, int64_t S, int64_t L, int64_t D, int64_t M,
                               int act) {
  extern __shared__ float z[];
  const int64_t t = blockIdx.x;
  const int64_t s = slots[t / L];
  if (s < 0 || s >= S) {
    if (out != residual)
      for (int64_t n = threadIdx.x; n < D; n += blockDim.x) out[t * D + n] = residual[t * D + n];
    return;
  }
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t j = warp; j < M; j += nwarps) {
    float v = warp_dot(h + t * D, down + (s * M + j) * D, D);
    if ((threadIdx.x & 31) == 0) z[j] = act_fn(v + to_f32(db[s * M + j]), act);
  }
  __syncthreads();
  for (int64_t n = threadIdx.x; n < D; n += blockDim.x) {
    const T* u = up + (s * D + n) * M;
    float acc = to_f32(ub[s * D + n]);
    for (int64_t j = 0; j < M; ++j) acc += z[j] * to_f32(u[j]);
    out[t * D + n] = from_f32<T>(to_f32(residual[t * D + n]) + acc);
  }
}

extern "C" int peftu_adapter(int dtype, const void* h, const void* residual, void* out, const void* down,
                             const void* db, const void* up, const void* ub, const int64_t* slots, int64_t S,
                             int64_t T_, int64_t L, int64_t D, int64_t M, int act, cudaStream_t stream) {
  if (T_ == 0) return 0;
  PEFTU_DISPATCH(dtype, adapter_kernel<T><<<(unsigned)T_, 256, M * sizeof(float), stream>>>(
      static_cast<const T*>(h), static_cast<const T*>(residual), static_cast<T*>(out), static_cast<const T*>(down),
      static_cast<const T*>(db), static_cast<const T*>(up), static_cast<const T*>(ub), slots, S, L, D, M, act));
  return (int)cudaGetLastError();
}
