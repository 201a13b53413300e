// CPU emulation of the small CUDA subset used by the kernels in this directory.
//
// Only compiled when EMCAD_CUDA_EMULATE is defined (never by nvcc, never in the extension). The test suite compiles
// every csrc/cuda/*.cu with g++ and this header into a shared library and calls the launchers on CPU memory
// through ctypes, so the kernels' index math, halo tiles, block reductions and launch sequences are checked
// against the reference on machines without a GPU (tests/test_cuda_backend.py).
//
// Semantics emulated:
// * one OS thread per CUDA thread of a block; the blocks of a grid run one after another (each thread of the
//   launch walks the grid in the same order), so a block's dynamic shared memory can be a single buffer;
// * __syncthreads() is a barrier over the threads of the block that have not returned from the kernel (threads
//   that return early leave the barrier, as on the GPU); a barrier that is not reached by every live thread
//   deadlocks here, where on a GPU it would be undefined behaviour;
// * dynamic shared memory is poisoned with 0xFF bytes (NaN) before every block, so reads of shared memory that
//   was never written show up as NaN results; a guard zone after it is checked after every block;
// * kernels may use: threadIdx/blockIdx/blockDim/gridDim (x, y, z), __syncthreads, dynamic shared memory through
//   EMCAD_DYNAMIC_SMEM, uint4 vector loads/stores, __half/__nv_bfloat16 and their float conversions, the math
//   functions wrapped in common.cuh. No warp intrinsics, no atomics, no static __shared__ arrays.
#pragma once

#ifndef EMCAD_CUDA_EMULATE
#error "cuda_emulation.cuh is for CPU emulation builds only"
#endif

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

typedef int cudaError_t;
enum : int {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

inline const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error (emulated)";
        case cudaErrorInvalidValue: return "invalid argument (emulated)";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
        case cudaErrorLaunchFailure: return "unspecified launch failure (emulated)";
        default: return "unknown error (emulated)";
    }
}

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---- half / bfloat16 storage types with round-to-nearest-even conversions ----
struct __half {
    unsigned short x;
};
struct __nv_bfloat16 {
    unsigned short x;
};

inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h, 2);
    return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
    _Float16 f = static_cast<_Float16>(v);
    __half h;
    std::memcpy(&h, &f, 2);
    return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = static_cast<uint32_t>(b.x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    __nv_bfloat16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN
        b.x = 0x7fc0;
        return b;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    b.x = static_cast<unsigned short>(u >> 16);
    return b;
}

namespace emcad_emu {

class BlockBarrier {
  public:
    void reset(int n) {
        std::lock_guard<std::mutex> lock(m_);
        expected_ = n;
        arrived_ = 0;
    }
    void sync() {
        std::unique_lock<std::mutex> lock(m_);
        const uint64_t gen = gen_;
        if (++arrived_ == expected_) {
            release_locked();
        } else {
            cv_.wait(lock, [&] { return gen_ != gen; });
        }
    }
    // a thread finished the kernel for this block: later barriers no longer wait for it
    void drop() {
        std::lock_guard<std::mutex> lock(m_);
        --expected_;
        if (arrived_ > 0 && arrived_ == expected_) release_locked();
    }

  private:
    void release_locked() {
        arrived_ = 0;
        ++gen_;
        cv_.notify_all();
    }
    std::mutex m_;
    std::condition_variable cv_;
    int expected_ = 0;
    int arrived_ = 0;
    uint64_t gen_ = 0;
};

// A reusable barrier over all threads of a launch (used between blocks).
class LaunchBarrier {
  public:
    explicit LaunchBarrier(int n) : n_(n) {}
    template <class F>
    void arrive_and_wait(F&& on_complete) {
        std::unique_lock<std::mutex> lock(m_);
        const uint64_t gen = gen_;
        if (++arrived_ == n_) {
            on_complete();
            arrived_ = 0;
            ++gen_;
            cv_.notify_all();
        } else {
            cv_.wait(lock, [&] { return gen_ != gen; });
        }
    }

  private:
    std::mutex m_;
    std::condition_variable cv_;
    int n_;
    int arrived_ = 0;
    uint64_t gen_ = 0;
};

struct LaunchState {
    BlockBarrier block_barrier;
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;
};

inline LaunchState*& current_launch() {
    static LaunchState* state = nullptr;  // launches are serialised by launch_mutex()
    return state;
}

inline std::mutex& launch_mutex() {
    static std::mutex m;
    return m;
}

constexpr size_t kGuardBytes = 64;
constexpr unsigned char kGuardByte = 0xA5;

inline void syncthreads() { current_launch()->block_barrier.sync(); }

inline void* dynamic_smem() { return current_launch()->smem; }

// number of 128-bit vector loads/stores executed (tests check that the channels-last vector path is taken)
inline std::atomic<long long>& vector_accesses() {
    static std::atomic<long long> n{0};
    return n;
}

inline int& guard_failures() {
    static int n = 0;
    return n;
}

template <class P>
cudaError_t launch(void (*kernel)(P), dim3 grid, dim3 block, size_t smem_bytes, const P& params) {
    const long long nthreads = static_cast<long long>(block.x) * block.y * block.z;
    if (nthreads <= 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535 || smem_bytes > 48 * 1024) {
        return cudaErrorInvalidConfiguration;
    }
    std::lock_guard<std::mutex> serial(launch_mutex());
    LaunchState state;
    std::vector<unsigned char> smem(smem_bytes + kGuardBytes + 16);
    // 16-byte aligned start, like CUDA's dynamic shared memory
    unsigned char* base = smem.data();
    base += (16 - reinterpret_cast<uintptr_t>(base) % 16) % 16;
    state.smem = base;
    state.smem_bytes = smem_bytes;
    current_launch() = &state;
    LaunchBarrier between_blocks(static_cast<int>(nthreads));
    const P local = params;
    int failures = 0;
    auto on_block_start = [&] {
        state.block_barrier.reset(static_cast<int>(nthreads));
        std::memset(base, 0xFF, smem_bytes);
        std::memset(base + smem_bytes, kGuardByte, kGuardBytes);
    };
    auto check_guard = [&] {
        for (size_t i = 0; i < kGuardBytes; ++i) {
            if (base[smem_bytes + i] != kGuardByte) {
                ++failures;
                break;
            }
        }
    };
    auto worker = [&](unsigned tid) {
        blockDim = block;
        gridDim = grid;
        threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
        for (unsigned bz = 0; bz < grid.z; ++bz) {
            for (unsigned by = 0; by < grid.y; ++by) {
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    between_blocks.arrive_and_wait(on_block_start);
                    blockIdx = dim3(bx, by, bz);
                    kernel(local);
                    state.block_barrier.drop();
                    between_blocks.arrive_and_wait(check_guard);
                }
            }
        }
    };
    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(nthreads));
    for (long long t = 0; t < nthreads; ++t) threads.emplace_back(worker, static_cast<unsigned>(t));
    for (auto& t : threads) t.join();
    current_launch() = nullptr;
    if (failures) {
        guard_failures() += failures;
        std::fprintf(stderr, "emcad_emu: shared-memory guard overwritten in %d block(s)\n", failures);
        return cudaErrorLaunchFailure;
    }
    return cudaSuccess;
}

}  // namespace emcad_emu

inline void __syncthreads() { emcad_emu::syncthreads(); }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
