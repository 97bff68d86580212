// CPU emulation of the CUDA features python/ce_fast/kernels/ce.cu uses, so the real
// kernel source runs on a machine without a GPU (tests/kernel_emulator.py).
//
// One OS thread per CUDA thread; blocks run one after another. __syncthreads is a
// barrier of the block, __syncwarp and the __shfl_xor_sync family exchange through a
// per-warp buffer between two barriers of the warp (so every lane of a warp must take
// part, as on the GPU with a full mask). __shared__ becomes static (one block at a
// time). Arithmetic intrinsics map to libm; the f16 conversions use _Float16.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define CE_EMULATE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
    unsigned x, y, z, w;
};
struct uint2 {
    unsigned x, y;
};
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
static inline uint2 make_uint2(unsigned a, unsigned b) { return uint2{a, b}; }

static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

// ---------------------------------------------------------------- bit casts and maths

static inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
static inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
static inline double __hiloint2double(int hi, int lo) {
    unsigned long long b = ((unsigned long long)(unsigned)hi << 32) | (unsigned)lo;
    double d;
    std::memcpy(&d, &b, 8);
    return d;
}
static inline float ce_emu_expf(float x) { return std::exp(x); }
#define __expf(x) ce_emu_expf(x)  // glibc declares its own __expf
using std::exp;
using std::fabs;
using std::log;
using std::tanh;

static inline float ce_f16_to_f32(unsigned short h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
static inline unsigned short ce_f32_to_f16(float f) {
    _Float16 v = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}
static inline unsigned short ce_f64_to_f16(double d) {
    _Float16 v = (_Float16)d;  // one rounding (libgcc __truncdfhf2)
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}

static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
static inline unsigned atomicXor(unsigned* p, unsigned v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------- block and warp sync

// A barrier of `count` threads: a generation counter the waiting threads poll, yielding
// the CPU. Nothing can be missed (a late poll still sees the new generation), unlike the
// futex waits of libstdc++'s std::barrier (GCC 12), seen to hang under heavy load.
struct EmuBarrier {
    explicit EmuBarrier(std::ptrdiff_t n) : count(n) {}
    void arrive_and_wait() {
        const unsigned long long gen = generation.load(std::memory_order_acquire);
        if (waiting.fetch_add(1, std::memory_order_acq_rel) + 1 == count) {
            waiting.store(0, std::memory_order_relaxed);
            generation.fetch_add(1, std::memory_order_acq_rel);
            return;
        }
        while (generation.load(std::memory_order_acquire) == gen) std::this_thread::yield();
    }
    const std::ptrdiff_t count;
    std::atomic<std::ptrdiff_t> waiting{0};
    std::atomic<unsigned long long> generation{0};
};

struct EmuBlock {
    std::unique_ptr<EmuBarrier> block;
    std::vector<std::unique_ptr<EmuBarrier>> warps;
    std::vector<unsigned long long> slots;  // one 8-byte exchange slot per thread
};
static EmuBlock* emu_block = nullptr;

static inline void __syncthreads() { emu_block->block->arrive_and_wait(); }
static inline void __syncwarp(unsigned = 0xffffffffu) { emu_block->warps[threadIdx.x >> 5]->arrive_and_wait(); }

template <typename T>
static inline T emu_shfl_xor(T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    const unsigned t = threadIdx.x, lane = t & 31u, base = t - lane;
    unsigned long long b = 0;
    std::memcpy(&b, &v, sizeof(T));
    emu_block->slots[t] = b;
    __syncwarp();
    const unsigned long long o = emu_block->slots[base + (lane ^ (unsigned)lane_mask)];
    __syncwarp();
    T r;
    std::memcpy(&r, &o, sizeof(T));
    return r;
}
static inline float __shfl_xor_sync(unsigned, float v, int m) { return emu_shfl_xor(v, m); }
static inline double __shfl_xor_sync(unsigned, double v, int m) { return emu_shfl_xor(v, m); }
static inline int __shfl_xor_sync(unsigned, int v, int m) { return emu_shfl_xor(v, m); }
static inline unsigned __shfl_xor_sync(unsigned, unsigned v, int m) { return emu_shfl_xor(v, m); }
static inline long long __shfl_xor_sync(unsigned, long long v, int m) { return emu_shfl_xor(v, m); }

// Runs grid x block threads of `body`, one block at a time.
static inline void emu_launch(unsigned grid, unsigned block, const std::function<void()>& body) {
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    const unsigned nwarps = (block + 31) / 32;
    for (unsigned b = 0; b < grid; ++b) {
        EmuBlock eb;
        eb.block = std::make_unique<EmuBarrier>((std::ptrdiff_t)block);
        for (unsigned w = 0; w < nwarps; ++w) {
            const unsigned n = (w + 1) * 32 <= block ? 32 : block - w * 32;
            eb.warps.push_back(std::make_unique<EmuBarrier>((std::ptrdiff_t)n));
        }
        eb.slots.assign(block, 0);
        emu_block = &eb;
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&, b, t] {
                blockIdx = dim3{b, 1, 1};
                threadIdx = dim3{t, 1, 1};
                body();
            });
        }
        for (auto& th : threads) th.join();
        emu_block = nullptr;
    }
}

// Calls a kernel with arguments given as cuLaunchKernel does: args[i] points at the
// value of parameter i, of exactly the parameter's size.
template <typename... A, std::size_t... I>
static inline void emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*reinterpret_cast<A*>(args[I])...);
}
template <typename... A>
static inline void emu_kernel(void (*k)(A...), unsigned grid, unsigned block, void** args) {
    emu_launch(grid, block, [&] { emu_call(k, args, std::index_sequence_for<A...>{}); });
}
template <typename... A>
static constexpr int emu_arity(void (*)(A...)) {
    return (int)sizeof...(A);
}
