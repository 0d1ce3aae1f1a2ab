// Fused 4-bit GEMV: y = What x from packed codes, What (out, in) never formed.
//
//   element (r, i) is flat item f = r*in + i; its code is the high nibble of byte f/2 when f
//   is even, the low nibble when odd; its scale is c_{f / B}
//   y_r = sum_b c_b * sum_{i in b} code[q_i] * x_i                     (float32)
//   double quantization: c_b = fl(fl(code2[q_b] * absmax2[b / 256]) + mu), rebuilt on the fly
//                        (explicit _rn intrinsics: the same rounding as double_dequantize)
//
// gemv4_rows: rows of whole blocks (in % B == 0, so in % 32 == 0) and 16-byte aligned codes.
//   One warp per row; each lane reads 16 packed bytes (one uint4 = 32 weights, all in one
//   block since B >= 32) and the matching 32 x values as eight float4, so a warp streams
//   512 contiguous bytes of codes per step (coalesced); the 16 levels sit in shared memory
//   (16 distinct words in 16 banks: no conflicts); a shuffle reduction ends the row.
// gemv4_generic: any shape; one warp per row, one element per lane and step.
// Batch: blockIdx.y selects the row of x (B, in) and of y (B, out).
// Compiled by NVRTC via cupy.RawModule: no host headers.

#define GEMV4_WARPS 4

__device__ __forceinline__ float gemv4_scale(long long b, const float* __restrict__ absmax,
                                             const unsigned char* __restrict__ qabs,
                                             const float* __restrict__ absmax2,
                                             const float* __restrict__ code2, float offset,
                                             int dq_bs, int nested) {
    if (nested) return __fadd_rn(__fmul_rn(code2[qabs[b]], absmax2[b / dq_bs]), offset);
    return absmax[b];
}

__device__ __forceinline__ float gemv4_warp_sum(float v) {
    for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
    return v;
}

extern "C" __global__ void gemv4_rows(const unsigned char* __restrict__ packed,
                                      const float* __restrict__ absmax,
                                      const unsigned char* __restrict__ qabs,
                                      const float* __restrict__ absmax2,
                                      const float* __restrict__ code2, float offset, int dq_bs,
                                      int nested, const float* __restrict__ code, int blocksize,
                                      long long out_f, long long in_f,
                                      const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float s_code[16];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * GEMV4_WARPS + (threadIdx.x >> 5);
    if (r >= out_f) return;
    const float* __restrict__ xb = x + (long long)blockIdx.y * in_f;
    const long long chunks = in_f / 32;  // 16 bytes = 32 weights each
    const uint4* __restrict__ row = reinterpret_cast<const uint4*>(packed + r * (in_f / 2));
    float acc = 0.0f;
    for (long long c = lane; c < chunks; c += 32) {
        const uint4 w = row[c];
        const unsigned int words[4] = {w.x, w.y, w.z, w.w};
        const float4* __restrict__ xv = reinterpret_cast<const float4*>(xb + 32 * c);
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // 4 bytes = 8 weights per word, byte 0 first
            const float4 xa = xv[2 * k];
            const float4 xc = xv[2 * k + 1];
            const unsigned int v = words[k];
            s += s_code[(v >> 4) & 15] * xa.x + s_code[v & 15] * xa.y;  // high nibble first
            s += s_code[(v >> 12) & 15] * xa.z + s_code[(v >> 8) & 15] * xa.w;
            s += s_code[(v >> 20) & 15] * xc.x + s_code[(v >> 16) & 15] * xc.y;
            s += s_code[(v >> 28) & 15] * xc.z + s_code[(v >> 24) & 15] * xc.w;
        }
        const long long b = (r * in_f + 32 * c) / blocksize;
        acc += s * gemv4_scale(b, absmax, qabs, absmax2, code2, offset, dq_bs, nested);
    }
    acc = gemv4_warp_sum(acc);
    if (lane == 0) y[(long long)blockIdx.y * out_f + r] = acc;
}

extern "C" __global__ void gemv4_generic(const unsigned char* __restrict__ packed,
                                         const float* __restrict__ absmax,
                                         const unsigned char* __restrict__ qabs,
                                         const float* __restrict__ absmax2,
                                         const float* __restrict__ code2, float offset,
                                         int dq_bs, int nested, const float* __restrict__ code,
                                         int blocksize, long long out_f, long long in_f,
                                         const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float s_code[16];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * GEMV4_WARPS + (threadIdx.x >> 5);
    if (r >= out_f) return;
    const float* __restrict__ xb = x + (long long)blockIdx.y * in_f;
    float acc = 0.0f;
    for (long long i = lane; i < in_f; i += 32) {
        const long long f = r * in_f + i;
        const unsigned char byte = packed[f >> 1];
        const int q = (f & 1) ? (byte & 15) : (byte >> 4);  // even flat index: high nibble
        const float c = gemv4_scale(f / blocksize, absmax, qabs, absmax2, code2, offset, dq_bs,
                                    nested);
        acc += __fmul_rn(s_code[q], c) * xb[i];  // (code[q] * c_b) * x_i
    }
    acc = gemv4_warp_sum(acc);
    if (lane == 0) y[(long long)blockIdx.y * out_f + r] = acc;
}
