// Blockwise 4-bit quantization (NF4 / FP4 / int4) — the same float32 operations as the
// NumPy reference minipeft.quant.blockwise, so the bytes are identical:
//
//   c_b   = max |x_i| over block b            (a short last block stores max(c_b, 1e-38))
//   s_i   = x_i * fl(1 / max(c_b, 1e-38))     (short last block: x_i / max(c_b, 1e-38))
//   s_i   = clamp(s_i, -1, 1)
//   k_i   = #{ m in midpoints : m < s_i }     (ties stay with the lower level)
//   q_i   = order[k_i] = order[0] + sum_j [s_i > m_j] (order[j+1] - order[j])
//   byte  = q_{2j} << 4 | q_{2j+1}            (first element in the high nibble)
//   xhat  = code[q] * c_b                     (dequantization)
//
// Explicit round-to-nearest intrinsics (__fmul_rn, __fdiv_rn, __frcp_rn) keep the compiler
// from fusing or approximating. Compiled by NVRTC via cupy.RawModule: no host headers.

#define QUANT4_THREADS 256

// One thread block per quantization block: c_b = max |x_i| (a max is exact in any order).
extern "C" __global__ void quant4_absmax(const float* __restrict__ x, long long n, int blocksize,
                                         float* __restrict__ absmax) {
    __shared__ float partial[QUANT4_THREADS];
    const long long b = blockIdx.x;
    const long long start = b * blocksize;
    long long end = start + blocksize;
    if (end > n) end = n;
    float m = 0.0f;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) m = fmaxf(m, fabsf(x[i]));
    partial[threadIdx.x] = m;
    __syncthreads();
    for (unsigned int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride)
            partial[threadIdx.x] = fmaxf(partial[threadIdx.x], partial[threadIdx.x + stride]);
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const bool is_short = (end - start) < blocksize;
        absmax[b] = is_short ? fmaxf(partial[0], 1e-38f) : partial[0];
    }
}

// q = order[k], k = #{m_j < s}, without a branch: with the steps d_j = order[j+1] - order[j],
// order[k] = order[0] + sum_j [s > m_j] * d_j (the comparisons are monotone in j, so the sum
// telescopes) -- the same algorithm as the Numba kernel; ties stay with the lower level.
__device__ __forceinline__ unsigned char quant4_code(float x, bool is_short, float safe,
                                                     float recip, const float* mids,
                                                     const int* steps, int base) {
    const float s = is_short ? __fdiv_rn(x, safe) : __fmul_rn(x, recip);  // s = x / c_b
    // clamp(s, -1, 1) changes no count: every midpoint lies inside (-1, 1)
    int q = base;
#pragma unroll
    for (int j = 0; j < 15; ++j) q += (s > mids[j]) ? steps[j] : 0;
    return (unsigned char)q;
}

// One thread per output byte j (elements 2j and 2j+1; an even blocksize keeps both in one block).
// mids: the 15 sorted midpoints; order: the 16 codes in level order.
extern "C" __global__ void quant4_quantize(const float* __restrict__ x, long long n, int blocksize,
                                           const float* __restrict__ absmax,
                                           const float* __restrict__ mids,
                                           const unsigned char* __restrict__ order,
                                           unsigned char pad_code,
                                           unsigned char* __restrict__ packed) {
    __shared__ float s_mids[15];
    __shared__ int s_steps[15];
    if (threadIdx.x < 15) {
        s_mids[threadIdx.x] = mids[threadIdx.x];
        s_steps[threadIdx.x] = (int)order[threadIdx.x + 1] - (int)order[threadIdx.x];
    }
    __syncthreads();
    const int base = order[0];
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long n_bytes = (n + 1) / 2;
    if (j >= n_bytes) return;
    const long long i = 2 * j;
    const long long b = i / blocksize;
    const bool is_short = (b + 1) * (long long)blocksize > n;
    const float safe = fmaxf(absmax[b], 1e-38f);  // a zero block: 1e-38, no NaN
    const float recip = __frcp_rn(safe);           // fl(1 / c_b)
    const unsigned char hi = quant4_code(x[i], is_short, safe, recip, s_mids, s_steps, base);
    unsigned char lo = pad_code;                   // odd count: pad with the code of 0
    if (i + 1 < n) lo = quant4_code(x[i + 1], is_short, safe, recip, s_mids, s_steps, base);
    packed[j] = (unsigned char)((hi << 4) | lo);
}

// One thread per byte j: both elements, xhat = code[q] * c_b, as one 8-byte store when the
// pair is whole (out is 256-byte aligned by CuPy, 2j is even). The 16 codes sit in shared memory.
extern "C" __global__ void quant4_dequantize(const unsigned char* __restrict__ packed,
                                             const float* __restrict__ absmax,
                                             const float* __restrict__ code, int blocksize,
                                             long long n, float* __restrict__ out) {
    __shared__ float s_code[16];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long i = 2 * j;
    if (i >= n) return;
    const unsigned char byte = packed[j];
    const float c = absmax[i / blocksize];  // 2j and 2j+1 share a block (even blocksize)
    const float hi = __fmul_rn(s_code[byte >> 4], c);  // first element: high nibble
    if (i + 1 < n) {
        *reinterpret_cast<float2*>(out + i) = make_float2(hi, __fmul_rn(s_code[byte & 15], c));
    } else {
        out[i] = hi;  // odd n: the last byte's high nibble only
    }
}
