// SGMV for mixed-adapter LoRA batches (derivations/lora_serving.md, lora.serving_mixed_batch).
//
// Row i of the batch uses adapter a(i) (-1: none). With the adapters stacked and zero-padded
//   A (n, r_max, in), B (n, out, r_max), scaling (n,), ranks (n,)
// the LoRA branch is computed in two passes, as in Punica:
//   shrink:  v[i, k]  = s_a * sum_j x[i, j] * A[a, k, j]        k < ranks[a]
//   expand:  y[i, o] += sum_k v[i, k] * B[a, o, k]
// y holds the base output x W0^T on entry; rows with a(i) = -1 are left untouched.
//
// shrink: one block per row; each warp takes ranks k = warp, warp + n_warps, ... and reduces
//         its dot product over `in` with shuffles (lanes read x and A[a, k, :] coalesced).
// expand: grid (rows, ceil(out / blockDim.x)); the row's v is staged in shared memory,
//         each thread owns one output o.
// Loaded by minipeft/kernels/cuda/sgmv.py through cupy.RawModule; entry points are the
// extern "C" wrappers at the end (f32 and f64).

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    return value;
}

template <typename T>
__device__ void sgmv_shrink(const T* __restrict__ x, const T* __restrict__ A,
                            const T* __restrict__ scaling, const long long* __restrict__ ranks,
                            const long long* __restrict__ ids, T* __restrict__ v,
                            int n_rows, int d_in, int r_max) {
    const int row = blockIdx.x;
    if (row >= n_rows) {
        return;
    }
    const long long a = ids[row];
    if (a < 0) {
        return;
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    const int rank = static_cast<int>(ranks[a]);
    const T s = scaling[a];
    const T* xr = x + static_cast<long long>(row) * d_in;
    for (int k = warp; k < rank; k += n_warps) {
        const T* ak = A + (a * r_max + k) * static_cast<long long>(d_in);
        T acc = T(0);
        for (int j = lane; j < d_in; j += 32) {
            acc += xr[j] * ak[j];
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            v[static_cast<long long>(row) * r_max + k] = s * acc;  // v = s * A x
        }
    }
}

template <typename T>
__device__ void sgmv_expand(const T* __restrict__ v, const T* __restrict__ B,
                            const long long* __restrict__ ranks,
                            const long long* __restrict__ ids, T* __restrict__ y,
                            int n_rows, int d_out, int r_max) {
    extern __shared__ unsigned char smem_raw[];
    T* vs = reinterpret_cast<T*>(smem_raw);  // r_max values of this row's v
    const int row = blockIdx.x;
    if (row >= n_rows) {
        return;
    }
    const long long a = ids[row];
    if (a < 0) {
        return;
    }
    const int rank = static_cast<int>(ranks[a]);
    for (int k = threadIdx.x; k < rank; k += blockDim.x) {
        vs[k] = v[static_cast<long long>(row) * r_max + k];
    }
    __syncthreads();
    const int o = blockIdx.y * blockDim.x + threadIdx.x;
    if (o >= d_out) {
        return;
    }
    const T* bo = B + (a * d_out + o) * static_cast<long long>(r_max);
    T acc = T(0);
    for (int k = 0; k < rank; ++k) {
        acc += bo[k] * vs[k];  // sum_k B[a, o, k] v[i, k]
    }
    y[static_cast<long long>(row) * d_out + o] += acc;
}

extern "C" __global__ void sgmv_shrink_f32(const float* x, const float* A, const float* scaling,
                                           const long long* ranks, const long long* ids, float* v,
                                           int n_rows, int d_in, int r_max) {
    sgmv_shrink<float>(x, A, scaling, ranks, ids, v, n_rows, d_in, r_max);
}

extern "C" __global__ void sgmv_shrink_f64(const double* x, const double* A,
                                           const double* scaling, const long long* ranks,
                                           const long long* ids, double* v, int n_rows, int d_in,
                                           int r_max) {
    sgmv_shrink<double>(x, A, scaling, ranks, ids, v, n_rows, d_in, r_max);
}

extern "C" __global__ void sgmv_expand_f32(const float* v, const float* B, const long long* ranks,
                                           const long long* ids, float* y, int n_rows, int d_out,
                                           int r_max) {
    sgmv_expand<float>(v, B, ranks, ids, y, n_rows, d_out, r_max);
}

extern "C" __global__ void sgmv_expand_f64(const double* v, const double* B,
                                           const long long* ranks, const long long* ids, double* y,
                                           int n_rows, int d_out, int r_max) {
    sgmv_expand<double>(v, B, ranks, ids, y, n_rows, d_out, r_max);
}
