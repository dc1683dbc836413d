// The activation switch of the adapter kernel: case <code> computes the activation that code names in
// peftu_kernels/activations.py. __host__ __device__ so that tests/test_activations.py can compile it for the host
// and compare its values with the table's torch functions (behaviour, not comments).
#pragma once
#include <math.h>

#ifdef __CUDA_ARCH__
#define PEFTU_EXP(x) __expf(x)
#else
#define PEFTU_EXP(x) expf(x)
#endif

__host__ __device__ __forceinline__ float act_fn(float z, int act) {
  switch (act) {
    case 1: return fmaxf(z, 0.f);                                             // relu
    case 2: return z / (1.f + PEFTU_EXP(-z));                                 // silu / swish
    case 3: return 0.5f * z * (1.f + erff(z * 0.70710678f));                  // gelu (erf)
    case 4: return 0.5f * z * (1.f + tanhf(0.7978845608f * (z + 0.044715f * z * z * z)));  // gelu_new
    case 5: return tanhf(z);                                                  // tanh
    case 6: return 1.f / (1.f + PEFTU_EXP(-z));                               // sigmoid
    default: return z;                                                        // identity (0)
  }
}
