// Batched-gather LoRA for mixed users (plain CUDA, no torch headers).
//
// Semantics (reference: peftu_kernels/ops/reference.py::lora), tokens t of row b = t / L, slot s = slots[b]:
//   shrink:  h[t, j] = x[t, :] . A[s, j, :]                  for j < rank[s]  (fp32 out; 0 elsewhere)
//   expand:  y[t, n] += scale[s] * sum_{j < rank[s]} h[t, j] * B[s, n, j]
// Rows with s < 0 (or s >= S) are skipped and rank[s] is clamped to R, so a bad index can never reach past
// the bank or the shared-memory buffer (the Python side checks slots against the bank once per batch). Per-token gather (BGMV, Punica) for decoding; for the encoder every token of a
// row shares the row's slot, so A[s] and B[s] stay hot in L2 across the row's tokens (segment reuse).
// x (T, K), A (S, R, K), B (S, N, R), y (T, N): contiguous, one dtype (f32 / f16 / bf16); fp32 accumulation.
#include "common.cuh"

template <typename T>
__global__ void lora_shrink_kernel(const T* __restrict__ x, const T* __restrict__ A, float* __restrict__ h,
                                   const int64_t* __restrict__ slots, const int64_t* __restrict__ rank,
                                   int64_t S, int64_t L, int64_t K, int64_t R) {
  const int64_t t = blockIdx.x;
  const int64_t s = slots[t / L];
  if (s < 0 || s >= S) return;
  const int64_t r = min(rank[s], R);
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t j = warp; j < r; j += nwarps) {
    float v = warp_dot(x + t * K, A + (s * R + j) * K, K);
    if ((threadIdx.x & 31) == 0) h[t * R + j] = v;
  }
}

template <typename T>
__global__ void lora_expand_kernel(const float* __restrict__ h, const T* __restrict__ B, T* __restrict__ y,
                                   const int64_t* __restrict__ slots, const int64_t* __restrict__ rank,
                                   const float* __restrict__ scale, int64_t S, int64_t L, int64_t N, int64_t R) {
  extern __shared__ float hs[];
  const int64_t t = blockIdx.x;
  const int64_t s = slots[t / L];
  if (s < 0 || s >= S) return;
  const int64_t r = min(rank[s], R);
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) hs[j] = h[t * R + j];
  __syncthreads();
  const float sc = scale[s];
  for (int64_t n = blockIdx.y * blockDim.x + threadIdx.x; n < N; n += (int64_t)gridDim.y * blockDim.x) {
    const T* b = B + (s * N + n) * R;
    float acc = 0.f;
    for (int64_t j = 0; j < r; ++j) acc += hs[j] * to_f32(b[j]);
    y[t * N + n] = from_f32<T>(to_f32(y[t * N + n]) + sc * acc);
  }
}

extern "C" int peftu_lora_shrink(int dtype, const void* x, const void* A, float* h, const int64_t* slots,
                                 const int64_t* rank, int64_t S, int64_t T_, int64_t L, int64_t K, int64_t R,
                                 cudaStream_t stream) {
  if (T_ == 0) return 0;
  PEFTU_DISPATCH(dtype, lora_shrink_kernel<T><<<(unsigned)T_, 256, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(A), h, slots, rank, S, L, K, R));
  return (int)cudaGetLastError();
}

extern "C" int peftu_lora_expand(int dtype, const float* h, const void* B, void* y, const int64_t* slots,
                                 const int64_t* rank, const float* scale, int64_t S, int64_t T_, int64_t L,
                                 int64_t N, int64_t R, cudaStream_t stream) {
  if (T_ == 0) return 0;
  const int threads = 256;
  dim3 grid((unsigned)T_, (unsigned)((N + threads - 1) / threads));
  PEFTU_DISPATCH(dtype, lora_expand_kernel<T><<<grid, threads, R * sizeof(float), stream>>>(
      h, static_cast<const T*>(B), static_cast<T*>(y), slots, rank, scale, S, L, N, R));
  return (int)cudaGetLastError();
}

extern "C" const char* peftu_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }
