// cuemu: the CUDA built-ins used by minipeft's kernels, emulated on the CPU (host C++17).
//
// Included by minipeft/kernels/cuda/emulate.py in front of a .cu source that it has
// rewritten in two mechanical ways (shared-memory declarations, see below); the whole is
// compiled by g++ into a shared library (in-process, ctypes) or, under a sanitizer, into
// an executable (CUEMU_MAIN) that runs one launch per process.
//
// Execution model (faithful where it matters for correctness):
//   * every CUDA thread of a block is a real OS thread (a reusable pool, blockDim threads);
//     blocks run one after another, x fastest, then y, then z;
//   * __syncthreads is a barrier every thread of the block must reach, at the same call
//     site: a thread that exits while others wait (or that others reach after it exited),
//     threads waiting at different barriers, and every state where all live threads wait
//     and none can be released (deadlock) are reported as errors -- never a hang;
//   * warp shuffles are exchanged in lockstep: every lane named in the mask must arrive at
//     the same shuffle (same call site, same mask) before any lane gets a value; a caller
//     outside its mask, a named lane that exited or does not exist, and a read from a lane
//     outside the mask (undefined on hardware) are errors;
//   * static __shared__ arrays and the dynamic (extern) __shared__ buffer are allocated per
//     block with their exact size (heap: AddressSanitizer sees overruns) and filled with
//     0xFF bytes (NaN as float/double, -1 as int) at block start, as hardware gives garbage;
//   * barrier and shuffle are built from one mutex and condition variables, so that
//     ThreadSanitizer sees exactly the happens-before that CUDA guarantees: a missing
//     __syncthreads is a data race on shared memory;
//   * float arithmetic: host IEEE binary32/64, no contraction (-ffp-contract=off, no
//     -ffast-math): __fmul_rn & co. are exact round-to-nearest operations.
// Not emulated: timing, memory coalescing and bank conflicts, the order in which warps and
// blocks are scheduled (blocks never run concurrently here), warp lockstep outside shuffles,
// FMA contraction that nvcc applies to plain a*b+c (the host never contracts).
#pragma once

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------ qualifiers (no-ops)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// emulate.py rewrites every __shared__ declaration; one it could not parse fails here.
#define __shared__ __shared___declaration_form_not_supported_by_the_emulation
// __restrict__ is a g++ keyword already; `#pragma unroll` is ignored (-Wno-unknown-pragmas).

// ------------------------------------------------------------------ vector types
struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(16))) double2 { double x, y; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ------------------------------------------------------------------ rounding intrinsics
// One IEEE operation each, rounded to nearest even (the host's default mode, no contraction).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
// fmaxf, fminf, fabsf, sqrtf...: <cmath>; CUDA's fmaxf(NaN, x) = x as C's.

// ------------------------------------------------------------------ thread coordinates
static thread_local uint3 threadIdx, blockIdx;
static thread_local dim3 blockDim, gridDim;

namespace cuemu {

// Under ThreadSanitizer the emulator's own locking must not order the CUDA threads (a lock
// that every thread takes would hide every race): its bookkeeping runs `Quiet` (no sync, no
// memory accesses seen) and the orderings CUDA guarantees are stated explicitly:
// barrier arrival -> release(sync of that barrier), departure -> acquire(it); launch ->
// every thread; every thread -> end of launch. Shuffles order nothing.
#if defined(__SANITIZE_THREAD__)
extern "C" void __tsan_acquire(void*);
extern "C" void __tsan_release(void*);
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
extern "C" void AnnotateIgnoreSyncBegin(const char*, int);
extern "C" void AnnotateIgnoreSyncEnd(const char*, int);
struct Quiet {
    Quiet() { __tsan_ignore_thread_begin(), AnnotateIgnoreSyncBegin(__FILE__, __LINE__); }
    ~Quiet() { AnnotateIgnoreSyncEnd(__FILE__, __LINE__), __tsan_ignore_thread_end(); }
};
inline void hb_release(void* p) { __tsan_release(p); }
inline void hb_acquire(void* p) { __tsan_acquire(p); }
#else
struct Quiet {
    Quiet() {}  // user-provided: no unused-variable warning
};
inline void hb_release(void*) {}
inline void hb_acquire(void*) {}
#endif

struct Abort {};  // unwinds a thread of a block in which an error was detected

enum class St { Running, Barrier, Shuffle, Exited };

struct Warp {
    unsigned arrived = 0, mask = 0;  // lanes at the pending shuffle; its mask
    int line = 0;
    const char* op = "";
    unsigned long gen = 0;
    uint64_t val[32] = {}, res[32] = {};
    int src[32] = {};
};

// The state of the block being executed; every field is guarded by `m`.
struct Block {
    std::mutex m;
    std::condition_variable cv_bar;
    std::vector<std::condition_variable> cv_warp;
    std::vector<Warp> warps;
    std::vector<St> st;
    std::vector<int> line;  // where a waiting thread waits
    unsigned n = 0, live = 0, blocked = 0, exited = 0;
    unsigned bar_arrived = 0;
    int bar_line = 0;
    unsigned long bar_gen = 0;
    bool aborted = false;
    std::string error;
    std::vector<std::pair<const void*, void*>> statics;  // declaration tag -> storage
    void* dyn = nullptr;
    char bar_sync[2] = {};  // happens-before objects of even and odd barriers (TSan)

    explicit Block(unsigned n_threads)
        : cv_warp((n_threads + 31) / 32), warps((n_threads + 31) / 32),
          st(n_threads, St::Running), line(n_threads, 0), n(n_threads), live(n_threads) {}
    ~Block() {
        for (auto& s : statics) std::free(s.second);
    }
};

static thread_local Block* tl_block = nullptr;
static thread_local unsigned tl_tid = 0;
static thread_local unsigned long tl_barriers = 0;  // barriers this thread passed in its block

inline std::string fmt_thread(unsigned t) {
    const dim3 d = blockDim;
    return "(" + std::to_string(t % d.x) + "," + std::to_string(t / d.x % d.y) + "," +
           std::to_string(t / (d.x * d.y)) + ")";
}

// "0-15 at __syncthreads (line 27); 16-31 exited": every thread's state, grouped in runs.
inline std::string describe(const Block& b) {
    auto what = [&](unsigned t) {
        switch (b.st[t]) {
            case St::Running: return std::string("running");
            case St::Exited: return std::string("exited");
            case St::Barrier: return "at __syncthreads (line " + std::to_string(b.line[t]) + ")";
            default: return "at a shuffle (line " + std::to_string(b.line[t]) + ")";
        }
    };
    std::string out;
    for (unsigned t = 0; t < b.n;) {
        unsigned u = t;
        while (u + 1 < b.n && what(u + 1) == what(t)) ++u;
        out += (out.empty() ? "" : "; ") + std::string("threads ") + std::to_string(t) +
               (u > t ? "-" + std::to_string(u) : "") + " " + what(t);
        t = u + 1;
    }
    return out;
}

// Record the first error of the block, wake every waiting thread, unwind this one.
[[noreturn]] inline void fail(std::unique_lock<std::mutex>& lk, const std::string& msg) {
    Block& b = *tl_block;
    if (!b.aborted) {
        b.aborted = true;
        b.error = "thread " + fmt_thread(tl_tid) + ": " + msg + " [" + describe(b) + "]";
    }
    b.cv_bar.notify_all();
    for (auto& cv : b.cv_warp) cv.notify_all();
    lk.unlock();
    throw Abort{};
}

// Called with the lock held after this thread started waiting: if every live thread now
// waits, no arrival can ever release any of them.
inline void check_deadlock(std::unique_lock<std::mutex>& lk) {
    Block& b = *tl_block;
    if (b.live > 0 && b.blocked == b.live) fail(lk, "deadlock: every live thread waits");
}

inline void syncthreads_locked(Block& b, int line) {
    std::unique_lock<std::mutex> lk(b.m);
    if (b.aborted) throw Abort{};
    if (b.exited > 0)
        fail(lk, "reached __syncthreads (line " + std::to_string(line) +
                     ") after other threads of its block exited");
    if (b.bar_arrived > 0 && line != b.bar_line)
        fail(lk, "divergent barrier: __syncthreads at line " + std::to_string(line) +
                     " while others wait at line " + std::to_string(b.bar_line));
    if (b.bar_arrived == 0) b.bar_line = line;
    if (++b.bar_arrived == b.n) {  // the last one releases the block
        b.bar_arrived = 0;
        ++b.bar_gen;
        b.blocked -= b.n - 1;
        for (auto& s : b.st) s = St::Running;
        b.cv_bar.notify_all();
        return;
    }
    b.st[tl_tid] = St::Barrier;
    b.line[tl_tid] = line;
    ++b.blocked;
    check_deadlock(lk);
    const unsigned long gen = b.bar_gen;
    b.cv_bar.wait(lk, [&] { return b.aborted || b.bar_gen != gen; });
    if (b.bar_gen == gen) throw Abort{};
}

inline void syncthreads(int line) {
    Block& b = *tl_block;
    char* sync = &b.bar_sync[tl_barriers++ % 2];
    hb_release(sync);  // everything before the barrier ...
    {
        Quiet q;
        syncthreads_locked(b, line);
    }
    hb_acquire(sync);  // ... happens before everything after it, in every thread
}

// Lockstep exchange among the lanes of `mask`; `src` is the lane this lane reads (itself
// when the source falls outside its width segment, as CUDA defines).
template <class T>
T shuffle(int line, const char* op, unsigned mask, T value, int src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle type");
    Block& b = *tl_block;
    const unsigned w = tl_tid / 32, lane = tl_tid % 32;
    const unsigned lanes_here = std::min(32u, b.n - 32 * w);
    Warp& W = b.warps[w];
    Quiet q;
    std::unique_lock<std::mutex> lk(b.m);
    if (b.aborted) throw Abort{};
    const std::string where = std::string(op) + " (line " + std::to_string(line) + ")";
    if (!((mask >> lane) & 1u)) fail(lk, "lane " + std::to_string(lane) + " calls " + where +
                                             " with a mask that does not name it");
    for (unsigned l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        if (l >= lanes_here)
            fail(lk, where + ": mask names lane " + std::to_string(l) + ", absent from the block");
        if (b.st[32 * w + l] == St::Exited)
            fail(lk, where + ": mask names lane " + std::to_string(l) + ", which has exited");
    }
    if (W.arrived == 0) {
        W.mask = mask;
        W.line = line;
        W.op = op;
    } else if (W.mask != mask || W.line != line || std::strcmp(W.op, op) != 0) {
        fail(lk, "lanes of one warp at different shuffles: " + where + " mask " +
                     std::to_string(mask) + " while others wait at " + W.op + " (line " +
                     std::to_string(W.line) + ") mask " + std::to_string(W.mask));
    }
    std::memcpy(&W.val[lane], &value, sizeof(T));
    W.src[lane] = src;
    W.arrived |= 1u << lane;
    if (W.arrived == W.mask) {  // the last lane exchanges for all
        for (unsigned l = 0; l < 32; ++l) {
            if (!((mask >> l) & 1u)) continue;
            const int s = W.src[l];
            if (!((mask >> s) & 1u))
                fail(lk, where + ": lane " + std::to_string(l) + " reads lane " +
                             std::to_string(s) + ", which is not in the mask (undefined)");
            W.res[l] = W.val[s];
        }
        W.arrived = 0;
        ++W.gen;
        const unsigned k = static_cast<unsigned>(__builtin_popcount(mask));
        b.blocked -= k - 1;
        for (unsigned l = 0; l < 32; ++l)
            if ((mask >> l) & 1u) b.st[32 * w + l] = St::Running;
        b.cv_warp[w].notify_all();
    } else {
        b.st[tl_tid] = St::Shuffle;
        b.line[tl_tid] = line;
        ++b.blocked;
        check_deadlock(lk);
        const unsigned long gen = W.gen;
        b.cv_warp[w].wait(lk, [&] { return b.aborted || W.gen != gen; });
        if (W.gen == gen) throw Abort{};
    }
    T out;
    std::memcpy(&out, &W.res[lane], sizeof(T));
    return out;
}

inline int segment(int width) { return static_cast<int>(tl_tid % 32) & ~(width - 1); }

template <class T>
T shfl(int line, unsigned mask, T v, int src_lane, int width = 32) {
    return shuffle(line, "__shfl_sync", mask, v, segment(width) + (src_lane & (width - 1)));
}
template <class T>
T shfl_down(int line, unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = static_cast<int>(tl_tid % 32), src = lane + static_cast<int>(delta);
    return shuffle(line, "__shfl_down_sync", mask, v, src < segment(width) + width ? src : lane);
}
template <class T>
T shfl_up(int line, unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = static_cast<int>(tl_tid % 32), src = lane - static_cast<int>(delta);
    return shuffle(line, "__shfl_up_sync", mask, v, src >= segment(width) ? src : lane);
}
template <class T>
T shfl_xor(int line, unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = static_cast<int>(tl_tid % 32), src = lane ^ lane_mask;
    return shuffle(line, "__shfl_xor_sync", mask, v, src < segment(width) + width ? src : lane);
}

// Storage of one static __shared__ declaration for the current block: allocated by the
// first thread that reaches it, exact size, poisoned. `A` is the declared (array) type.
template <class A, int Line>
A& shared_static() {
    static const char tag = 0;  // one per declaration (and per template instantiation)
    Block& b = *tl_block;
    Quiet q;  // the poison is no write of any CUDA thread
    std::lock_guard<std::mutex> lk(b.m);
    for (auto& s : b.statics)
        if (s.first == &tag) return *static_cast<A*>(s.second);
    void* p = nullptr;
    if (posix_memalign(&p, 256, sizeof(A)) != 0) throw std::bad_alloc();
    std::memset(p, 0xFF, sizeof(A));
    b.statics.emplace_back(&tag, p);
    return *static_cast<A*>(p);
}

inline void* dynamic_shared() { return tl_block->dyn; }

// ------------------------------------------------------------------ the thread pool
class Pool {
  public:
    // Run fn(t) for t < n, each on its own OS thread; returns when all returned.
    void run(unsigned n, const std::function<void(unsigned)>& fn) {
        hb_release(&job_sync_);
        {
            Quiet q;
            run_locked(n, fn);
        }
        hb_acquire(&done_sync_);
    }

  private:
    void run_locked(unsigned n, const std::function<void(unsigned)>& fn) {
        std::unique_lock<std::mutex> lk(m_);
        while (threads_ < n) {
            std::thread(&Pool::loop, this, threads_++).detach();
        }
        fn_ = &fn;
        n_ = n;
        done_ = 0;
        ++job_;
        cv_work_.notify_all();
        cv_done_.wait(lk, [&] { return done_ == n_; });
    }

    void loop(unsigned t) {
        unsigned long seen = 0;
        for (;;) {
            const std::function<void(unsigned)>* fn;
            {
                Quiet q;
                std::unique_lock<std::mutex> lk(m_);
                cv_work_.wait(lk, [&] { return job_ != seen && t < n_ && done_ < n_; });
                seen = job_;
                fn = fn_;
            }
            hb_acquire(&job_sync_);
            (*fn)(t);
            hb_release(&done_sync_);
            Quiet q;
            std::lock_guard<std::mutex> lk(m_);
            if (++done_ == n_) cv_done_.notify_one();
        }
    }
    char job_sync_ = 0, done_sync_ = 0;
    std::mutex m_;
    std::condition_variable cv_work_, cv_done_;
    unsigned threads_ = 0, n_ = 0, done_ = 0;
    unsigned long job_ = 0;
    const std::function<void(unsigned)>* fn_ = nullptr;
};

// ------------------------------------------------------------------ launching a kernel
template <class T>
const char* type_code() {
    if (std::is_pointer<T>::value) return "p";
    if (std::is_same<T, bool>::value) return "b1";
    if (std::is_floating_point<T>::value) return sizeof(T) == 4 ? "f4" : "f8";
    if (std::is_integral<T>::value) {
        static const char* s[] = {"i1", "i2", "?", "i4", "?", "?", "?", "i8"};
        static const char* u[] = {"u1", "u2", "?", "u4", "?", "?", "?", "u8"};
        return (std::is_signed<T>::value ? s : u)[sizeof(T) - 1];
    }
    return "?";
}

// What cuLaunchKernel does with `void** kernelParams`: each entry points at one parameter,
// read as the kernel's parameter type.
template <class... P, size_t... I>
void call(void (*f)(P...), void* const* args, std::index_sequence<I...>) {
    f(*static_cast<const std::decay_t<P>*>(args[I])...);
}

struct Entry {
    const char* name;
    std::function<void(void* const*)> call;
    std::string signature;  // comma-separated type codes: p, i4, i8, u1, f4, f8, ...
};

template <class... P>
Entry entry(const char* name, void (*f)(P...)) {
    std::string sig;
    for (const char* c : {static_cast<const char*>(nullptr), type_code<std::decay_t<P>>()...})
        if (c) sig += (sig.empty() ? "" : ",") + std::string(c);
    return {name, [f](void* const* a) { call(f, a, std::index_sequence_for<P...>{}); }, sig};
}

inline std::mutex& launch_mutex() {  // one launch at a time, as on one stream
    static std::mutex m;
    return m;
}

// Every block in turn; 0 on success, else 1 with the first error in `err`.
inline int launch(const Entry& e, const unsigned* grid, const unsigned* block, size_t shmem,
                  void* const* args, char* err, size_t errlen) {
    std::lock_guard<std::mutex> guard(launch_mutex());
    static Pool* pool = new Pool;  // never destroyed: its threads outlive the launch
    const dim3 g{grid[0], grid[1], grid[2]}, d{block[0], block[1], block[2]};
    const unsigned n = d.x * d.y * d.z;
    for (unsigned bz = 0; bz < g.z; ++bz)
        for (unsigned by = 0; by < g.y; ++by)
            for (unsigned bx = 0; bx < g.x; ++bx) {
                Block blk(n);
                blk.dyn = std::malloc(shmem);
                if (shmem) std::memset(blk.dyn, 0xFF, shmem);
                pool->run(n, [&](unsigned t) {
                    tl_block = &blk;
                    tl_tid = t;
                    tl_barriers = 0;
                    threadIdx = {t % d.x, t / d.x % d.y, t / (d.x * d.y)};
                    blockIdx = {bx, by, bz};
                    blockDim = d;
                    gridDim = g;
                    try {
                        e.call(args);
                    } catch (const Abort&) {
                    }
                    Quiet q;  // exit orders nothing
                    std::unique_lock<std::mutex> lk(blk.m);
                    blk.st[t] = St::Exited;
                    --blk.live;
                    ++blk.exited;
                    if (blk.aborted) return;
                    try {  // did others wait for this thread?
                        if (blk.bar_arrived > 0)
                            fail(lk, "exited while other threads wait at __syncthreads (line " +
                                         std::to_string(blk.bar_line) + ")");
                        const Warp& W = blk.warps[t / 32];
                        if (W.arrived && ((W.mask >> (t % 32)) & 1u))
                            fail(lk, std::string("exited while lanes of its warp wait at ") +
                                         W.op + " (line " + std::to_string(W.line) +
                                         ") with a mask naming it");
                        check_deadlock(lk);
                    } catch (const Abort&) {
                    }
                });
                std::free(blk.dyn);
                if (blk.aborted) {
                    std::snprintf(err, errlen, "block (%u,%u,%u), %s", bx, by, bz,
                                  blk.error.c_str());
                    return 1;
                }
            }
    return 0;
}

}  // namespace cuemu

#define __syncthreads() ::cuemu::syncthreads(__LINE__)
#define __shfl_sync(...) ::cuemu::shfl(__LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuemu::shfl_down(__LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuemu::shfl_up(__LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuemu::shfl_xor(__LINE__, __VA_ARGS__)

// ------------------------------------------------------------------ sanitizer runner
// Built with -DCUEMU_MAIN: one launch per process, read from a request file written by
// emulate.py (every "device" buffer gets its own exact-size heap block, so AddressSanitizer
// sees an overrun of any argument), the buffers written back to a second file.
#ifdef CUEMU_MAIN
extern "C" int cuemu_launch(int, const unsigned*, const unsigned*, unsigned long long,
                            void* const*, char*, unsigned long long);
namespace cuemu {
inline int run_request(const char* in_path, const char* out_path) {
    FILE* f = std::fopen(in_path, "rb");
    auto rd = [&](void* p, size_t k) {
        if (!f || std::fread(p, 1, k, f) != k) {
            std::fprintf(stderr, "cuemu error: short request file %s\n", in_path);
            std::exit(2);
        }
    };
    uint32_t k, grid[3], block[3], nbuf, nargs;
    uint64_t shmem;
    rd(&k, 4), rd(grid, 12), rd(block, 12), rd(&shmem, 8), rd(&nbuf, 4);
    std::vector<void*> bufs(nbuf);
    std::vector<uint64_t> sizes(nbuf);
    for (uint32_t i = 0; i < nbuf; ++i) {
        rd(&sizes[i], 8);
        if (posix_memalign(&bufs[i], 256, sizes[i]) != 0) return 2;  // as CuPy: 256-aligned
        rd(bufs[i], sizes[i]);
    }
    rd(&nargs, 4);
    std::vector<std::vector<unsigned char>> values(nargs);
    std::vector<void*> ptrs(nargs), args(nargs);
    for (uint32_t i = 0; i < nargs; ++i) {
        uint8_t kind;
        rd(&kind, 1);
        if (kind == 0) {  // pointer: buffer index and byte offset
            uint32_t b;
            uint64_t off;
            rd(&b, 4), rd(&off, 8);
            ptrs[i] = static_cast<char*>(bufs[b]) + off;
            args[i] = &ptrs[i];
        } else {  // value: its bytes
            uint32_t size;
            rd(&size, 4);
            values[i].resize(size);
            rd(values[i].data(), size);
            args[i] = values[i].data();
        }
    }
    std::fclose(f);
    char err[8192];
    if (cuemu_launch(static_cast<int>(k), grid, block, shmem, args.data(), err, sizeof err)) {
        std::fprintf(stderr, "cuemu error: %s\n", err);
        return 3;
    }
    FILE* o = std::fopen(out_path, "wb");
    for (uint32_t i = 0; i < nbuf; ++i) {
        std::fwrite(bufs[i], 1, sizes[i], o);
        std::free(bufs[i]);
    }
    std::fclose(o);
    return 0;
}
}  // namespace cuemu
#endif
