// sparsekit: 2:4 sparse GEMM on sparse tensor cores (mma.sp), sm_80 and later.
//
//   fp16/bf16: y = x W^T (+ bias)                         mma.sp m16n8k32, fp32 accumulate
//   int8:      y = (xq Wq^T) * x_scale[m] * w_scale[n] (+ bias)   mma.sp m16n8k64 s8, s32 accumulate
//
// The sparse operand of mma.sp must be A (the instruction's M side), so the
// kernel computes y^T = W x^T: the 2:4 weight W (N x K) is A, its rows are the
// instruction's rows; x (M x K, row-major) is B in the ".col" layout; the
// accumulator element (row n, column m) is y[m, n].
//
// Operands (prepared once by sparsekit/ops/sparse24.py and cached):
//   values     : N rows of Kpad/2 elements (the format's values, zero-padded in K
//                to Kpad = a multiple of the stage depth when K needs it), row
//                pitch ldv elements, 16-byte aligned rows.
//   meta_words : (ceil(N/16), Kpad/64, 32) uint32 -- sparsekit.formats.sparse24.mma_sp_meta:
//                for 16-row tile T and K window w (dense columns 64w..64w+63),
//                lane l = 4g + t holds H[16T+g, 4w+t] | H[16T+g+8, 4w+t] << 16,
//                H[r, b] = row r's 16-bit metadata of dense columns 16b..16b+15.
//   x          : M rows, pitch ldx elements, 16-byte aligned; columns >= kx (a
//                multiple of 16 bytes' worth) are not read (zero filled).
//
// Pipeline: a block computes a BN x BM tile of y^T.  Each stage holds, for
// KS dense columns (64 for 16-bit types, 128 for int8: 64 bytes of compressed
// weight and 128 bytes of x per row either way), the weight tile, the x tile
// and the metadata words, copied with 16-byte cp.async (zero fill outside the
// operands), STAGES deep.  A stage is two mma k-steps; per step and warp:
// ldmatrix.x4 per 16-row weight tile (A fragments), ldmatrix.x4 per 8-row x
// tile (B fragments), one mma.sp per pair.  fp16/bf16 use one metadata word
// per lane for the two k32 steps of a window (sparsity selector 0, then 1);
// int8 uses one word per k64 step (selector 0).
//
// The index formulas are those of sparsekit/ops/_mma_sp_emulator.py, which
// replays this data flow lane by lane on CPU and is tested against dense math
// (tests/test_sparse24_mma.py); each formula below names its emulator twin.
//
// Hopper: this is Ampere's warp-level mma.sp also in the sm_90a build (SASS
// HMMA.SP / IMMA.SP: the static gate's csrc rows show tc_op HMMA / IMMA, no
// HGMMA), fed by cp.async and ldmatrix.  On H100 / H200 the full sparse
// tensor-core rate needs the warpgroup form, wgmma.mma_async.sp (m64nNk32 for
// 16-bit, k64 for int8), with the operands in shared memory in wgmma's
// core-matrix layout (TMA loads, mbarrier-tracked stages), the metadata in
// registers in wgmma's sparse-metadata layout, and wgmma.wait_group keeping
// the tensor-core work in flight across stages.  That path is a separate
// kernel (sm_90a only) and is not written yet; this one stays the sm_80 path
// and the sm_90 fallback.
//
// No torch headers: this file compiles standalone with `nvcc -c`.
#include "sparse24.h"

#include <cstdint>

namespace sparsekit {
namespace {

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800)
#define SPARSEKIT_NO_MMA_SP 1
#endif

// ---------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;  // src-size 0: the 16 bytes are zero filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

#if defined(__CUDACC_VER_MAJOR__) && ((__CUDACC_VER_MAJOR__ > 12) || \
                                      (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
// the metadata of this format lists each group's indices in increasing order,
// which is what the ordered-metadata form requires
#define SPARSEKIT_MMA_SP "mma.sp::ordered_metadata.sync.aligned."
#else
#define SPARSEKIT_MMA_SP "mma.sp.sync.aligned."
#endif

template <typename T, int SEL>
struct MmaSp;

template <int SEL>
struct MmaSp<__half, SEL> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[4], uint32_t e) {
#ifndef SPARSEKIT_NO_MMA_SP
    asm volatile(SPARSEKIT_MMA_SP "m16n8k32.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                   "r"(b[3]), "r"(e), "n"(SEL));
#endif
  }
};

template <int SEL>
struct MmaSp<__nv_bfloat16, SEL> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[4], uint32_t e) {
#ifndef SPARSEKIT_NO_MMA_SP
    asm volatile(SPARSEKIT_MMA_SP "m16n8k32.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                   "r"(b[3]), "r"(e), "n"(SEL));
#endif
  }
};

template <int SEL>
struct MmaSp<int8_t, SEL> {
  static __device__ __forceinline__ void run(int (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[4], uint32_t e) {
#ifndef SPARSEKIT_NO_MMA_SP
    asm volatile(SPARSEKIT_MMA_SP "m16n8k64.row.col.s32.s8.s8.s32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
                   "r"(b[3]), "r"(e), "n"(SEL));
#endif
  }
};

// ---------------------------------------------------------------- element traits
template <typename T>
struct Kind {  // 16-bit floats: m16n8k32, a window of 64 dense columns is one stage
  using Acc = float;
  static constexpr int kElemBytes = 2;
  static constexpr int kStageK = 64;        // dense K per stage
  static constexpr int kMetaWordsPerTile = 32;  // one window per stage
};
template <>
struct Kind<int8_t> {  // int8: m16n8k64, two windows per stage
  using Acc = int;
  static constexpr int kElemBytes = 1;
  static constexpr int kStageK = 128;
  static constexpr int kMetaWordsPerTile = 64;
};

template <typename T>
__device__ __forceinline__ T out_cast(float v);
template <>
__device__ __forceinline__ float out_cast<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half out_cast<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 out_cast<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ float in_float(const T* p);
template <>
__device__ __forceinline__ float in_float<float>(const float* p) { return __ldg(p); }
template <>
__device__ __forceinline__ float in_float<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float in_float<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

// ---------------------------------------------------------------- tile configuration
template <int BN_, int BM_, int WN_, int WM_, int STAGES_>
struct TileCfg {
  static constexpr int BN = BN_;          // weight rows (output features) per block
  static constexpr int BM = BM_;          // x rows (tokens) per block
  static constexpr int WN = WN_;          // per warp
  static constexpr int WM = WM_;
  static constexpr int STAGES = STAGES_;
  static constexpr int kWarpsN = BN / WN;
  static constexpr int kWarpsM = BM / WM;
  static constexpr int kThreads = kWarpsN * kWarpsM * 32;
  static constexpr int kTilesN = WN / 16;  // 16-row A tiles per warp
  static constexpr int kTilesM = WM / 8;   // 8-row B tiles per warp
  // shared-memory rows: 64 bytes of compressed weight / 128 bytes of x per
  // stage, plus 16 bytes of padding so that the 8 rows of one ldmatrix phase
  // fall in 8 different 16-byte bank groups
  static constexpr int kAPitch = 64 + 16;
  static constexpr int kXPitch = 128 + 16;
  static_assert(BN % WN == 0 && BM % WM == 0 && WN % 16 == 0 && WM % 8 == 0, "bad tile");
};

template <typename T, typename C>
struct Smem {
  static constexpr int kMetaWords = (C::BN / 16) * Kind<T>::kMetaWordsPerTile;
  static constexpr int kABytes = C::BN * C::kAPitch;
  static constexpr int kXBytes = C::BM * C::kXPitch;
  static constexpr int kMBytes = kMetaWords * 4;
  static constexpr int kStageBytes = kABytes + kXBytes + kMBytes;
  static constexpr int kBytes = kStageBytes * C::STAGES;
  static_assert(kABytes % 16 == 0 && kXBytes % 16 == 0 && kMBytes % 16 == 0, "16-byte aligned stages");
};

struct Args {
  const void* x;
  int64_t ldx_bytes;
  const void* values;
  int64_t ldv_bytes;
  const uint32_t* meta;
  const void* bias;
  const float* x_scale;  // int8 only
  const float* w_scale;  // int8 only
  void* y;
  int64_t ldy;
  int M, N, K, Kpad, kx;  // kx: columns of x that may be read (multiple of a 16-byte chunk)
};

// ---------------------------------------------------------------- the kernel
template <typename T, typename TO, typename C>
__global__ void __launch_bounds__(C::kThreads)
sparse24_mma_sp_kernel(const Args args) {
  using K_ = Kind<T>;
  using Acc = typename K_::Acc;
  using S = Smem<T, C>;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_n = warp % C::kWarpsN;
  const int warp_m = warp / C::kWarpsN;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * C::BN;  // first weight row of the block
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * C::BM;  // first x row of the block
  const int n_tiles_total = (args.N + 15) / 16;
  const int windows = args.Kpad / 64;
  const int k_stages = args.Kpad / K_::kStageK;
  const unsigned char* xg = static_cast<const unsigned char*>(args.x);
  const unsigned char* vg = static_cast<const unsigned char*>(args.values);
  const int kx_bytes = args.kx * K_::kElemBytes;

  // ---- global -> shared copy of stage `slot` for K stage `ks`
  auto load_stage = [&](int slot, int ks) {
    unsigned char* st = smem + slot * S::kStageBytes;
    const uint32_t a_s = smem_u32(st);
    const uint32_t x_s = smem_u32(st + S::kABytes);
    const uint32_t m_s = smem_u32(st + S::kABytes + S::kXBytes);
    // weight: BN rows x 4 chunks of 16 bytes (64 bytes = KS/2 compressed elements)
    for (int c = tid; c < C::BN * 4; c += C::kThreads) {
      const int r = c >> 2, ch = c & 3;
      const int64_t n = n0 + r;
      const bool ok = n < args.N;
      const void* src = ok ? static_cast<const void*>(vg + n * args.ldv_bytes + ks * 64 + ch * 16)
                           : static_cast<const void*>(vg);
      cp_async16(a_s + r * C::kAPitch + ch * 16, src, ok);
    }
    // x: BM rows x 8 chunks of 16 bytes (128 bytes = KS elements)
    for (int c = tid; c < C::BM * 8; c += C::kThreads) {
      const int r = c >> 3, ch = c & 7;
      const int64_t m = m0 + r;
      const int kb = ks * 128 + ch * 16;  // byte column
      const bool ok = (m < args.M) && (kb < kx_bytes);
      const void* src = ok ? static_cast<const void*>(xg + m * args.ldx_bytes + kb)
                           : static_cast<const void*>(xg);
      cp_async16(x_s + r * C::kXPitch + ch * 16, src, ok);
    }
    // metadata words: per 16-row tile, the stage's windows are contiguous
    // (mma_sp_meta's (tile, window, lane) order)
    constexpr int kChunksPerTile = K_::kMetaWordsPerTile / 4;
    const int w0 = ks * (K_::kStageK / 64);
    for (int c = tid; c < (C::BN / 16) * kChunksPerTile; c += C::kThreads) {
      const int tl = c / kChunksPerTile, ch = c % kChunksPerTile;
      const int64_t tg = n0 / 16 + tl;
      const bool ok = tg < n_tiles_total;
      const uint32_t* src = ok ? args.meta + (tg * windows + w0) * 32 + ch * 4 : args.meta;
      cp_async16(m_s + (tl * K_::kMetaWordsPerTile + ch * 4) * 4, src, ok);
    }
  };

  Acc acc[C::kTilesN][C::kTilesM][4];
#pragma unroll
  for (int i = 0; i < C::kTilesN; ++i)
#pragma unroll
    for (int j = 0; j < C::kTilesM; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = Acc(0);

  // ---- prologue
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < k_stages) load_stage(s, s);
    cp_async_commit();
  }

  // lane addresses for ldmatrix (emulator: a_ldsm_row / a_ldsm_chunk, b_ldsm_row / b_ldsm_chunk)
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int a_chunk = lane >> 4;
  const int b_row = lane & 7;
  const int b_chunk = lane >> 3;

  // 16-row weight tiles / 8-row x tiles of this warp that hold any real row.
  // Tiles wholly past N or M are skipped (warp-uniform): past N the metadata
  // copy is zero filled, and code 0b0000 is not a valid mma.sp pattern.
  bool n_live[C::kTilesN], m_live[C::kTilesM];
#pragma unroll
  for (int i = 0; i < C::kTilesN; ++i) n_live[i] = n0 + warp_n * C::WN + 16 * i < args.N;
#pragma unroll
  for (int j = 0; j < C::kTilesM; ++j) m_live[j] = m0 + warp_m * C::WM + 8 * j < args.M;

  for (int ks = 0; ks < k_stages; ++ks) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // stage ks landed for every thread; stage ks-1 fully consumed
    {
      const int pf = ks + C::STAGES - 1;
      if (pf < k_stages) load_stage(pf % C::STAGES, pf);
      cp_async_commit();
    }
    const unsigned char* st = smem + (ks % C::STAGES) * S::kStageBytes;
    const uint32_t a_s = smem_u32(st);
    const uint32_t x_s = smem_u32(st + S::kABytes);
    const uint32_t* m_s = reinterpret_cast<const uint32_t*>(st + S::kABytes + S::kXBytes);

#pragma unroll
    for (int step = 0; step < 2; ++step) {
      // A fragments: one ldmatrix.x4 per 16-row weight tile; the step's 32
      // compressed bytes start at byte 32*step of the row
      uint32_t a[C::kTilesN][4];
      uint32_t e[C::kTilesN];
#pragma unroll
      for (int i = 0; i < C::kTilesN; ++i) {
        a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0u;
        e[i] = 0u;
        if (!n_live[i]) continue;
        const int row = warp_n * C::WN + 16 * i + a_row;
        ldmatrix_x4(a[i], a_s + row * C::kAPitch + step * 32 + a_chunk * 16);
        // metadata (emulator: step_selector): 16-bit types read window ks once
        // for both steps; int8 reads window 2ks+step
        const int tl = warp_n * (C::WN / 16) + i;
        if constexpr (K_::kMetaWordsPerTile == 32)
          e[i] = m_s[tl * 32 + lane];
        else
          e[i] = m_s[tl * 64 + step * 32 + lane];
      }
      // B fragments: one ldmatrix.x4 per 8-row x tile; the step's 64 bytes
      // start at byte 64*step of the row
      uint32_t b[C::kTilesM][4];
#pragma unroll
      for (int j = 0; j < C::kTilesM; ++j) {
        b[j][0] = b[j][1] = b[j][2] = b[j][3] = 0u;
        if (!m_live[j]) continue;
        const int row = warp_m * C::WM + 8 * j + b_row;
        ldmatrix_x4(b[j], x_s + row * C::kXPitch + step * 64 + b_chunk * 16);
      }
#pragma unroll
      for (int i = 0; i < C::kTilesN; ++i)
#pragma unroll
        for (int j = 0; j < C::kTilesM; ++j) {
          if (!(n_live[i] && m_live[j])) continue;
          if constexpr (K_::kMetaWordsPerTile == 32) {
            if (step == 0)
              MmaSp<T, 0>::run(acc[i][j], a[i], b[j], e[i]);
            else
              MmaSp<T, 1>::run(acc[i][j], a[i], b[j], e[i]);
          } else {
            MmaSp<T, 0>::run(acc[i][j], a[i], b[j], e[i]);
          }
        }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue (emulator: epilogue_coords): register r of lane (g, t) in
  // tile (i, j) is weight row 16i + g + 8(r>>1), x row 8j + 2t + (r&1)
  const int g = lane >> 2, t = lane & 3;
  TO* y = static_cast<TO*>(args.y);
  const TO* bias = static_cast<const TO*>(args.bias);
#pragma unroll
  for (int i = 0; i < C::kTilesN; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + warp_n * C::WN + 16 * i + g + 8 * h;
      if (n >= args.N) continue;
      float bn = 0.f;
      if (bias != nullptr) bn = in_float<TO>(bias + n);
      float ws = 1.f;
      if constexpr (K_::kElemBytes == 1) ws = __ldg(args.w_scale + n);
#pragma unroll
      for (int j = 0; j < C::kTilesM; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t m = m0 + warp_m * C::WM + 8 * j + 2 * t + c;
          if (m >= args.M) continue;
          float v;
          if constexpr (K_::kElemBytes == 1)
            v = static_cast<float>(acc[i][j][2 * h + c]) * __ldg(args.x_scale + m) * ws + bn;
          else
            v = acc[i][j][2 * h + c] + bn;
          y[m * args.ldy + n] = out_cast<TO>(v);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- host side
// shape classes: skinny (M <= 32), small (M <= 64), large
using CfgSkinny = TileCfg<64, 32, 32, 16, 4>;
using CfgSmall = TileCfg<128, 64, 32, 32, 4>;
using CfgLarge = TileCfg<128, 128, 64, 32, 4>;

template <typename T, typename TO, typename C>
cudaError_t launch_cfg(const Args& a, cudaStream_t stream) {
  using S = Smem<T, C>;
  auto kernel = sparse24_mma_sp_kernel<T, TO, C>;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  // opt in to > 48 KiB of dynamic shared memory once per device
  static bool configured[64] = {false};
  if (dev < 0 || dev >= 64 || !configured[dev]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kBytes);
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < 64) configured[dev] = true;
  }
  const int64_t gx = (static_cast<int64_t>(a.N) + C::BN - 1) / C::BN;
  const int64_t gy = (static_cast<int64_t>(a.M) + C::BM - 1) / C::BM;
  if (gx > 0x7FFFFFFF || gy > 65535) return cudaErrorInvalidValue;
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(C::kThreads), S::kBytes,
           stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename TO>
cudaError_t launch_by_shape(const Args& a, int tile_config, cudaStream_t stream) {
  int cfg = tile_config;
  if (cfg < 0) cfg = (a.M <= 32) ? 0 : (a.M <= 64 ? 1 : 2);
  switch (cfg) {
    case 0: return launch_cfg<T, TO, CfgSkinny>(a, stream);
    case 1: return launch_cfg<T, TO, CfgSmall>(a, stream);
    case 2: return launch_cfg<T, TO, CfgLarge>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

cudaError_t check_common(const Args& a, int stage_k, int elem_bytes) {
  if (a.M < 0 || a.N < 0 || a.K < 0 || a.Kpad < a.K || a.Kpad % stage_k != 0) return cudaErrorInvalidValue;
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.x == nullptr || a.values == nullptr || a.meta == nullptr || a.y == nullptr) return cudaErrorInvalidValue;
  if (!aligned16(a.x) || !aligned16(a.values) || !aligned16(a.meta)) return cudaErrorInvalidValue;
  if (a.ldx_bytes % 16 != 0 || a.ldv_bytes % 16 != 0 || a.ldv_bytes < static_cast<int64_t>(a.Kpad / 2) * elem_bytes)
    return cudaErrorInvalidValue;
  if ((static_cast<int64_t>(a.kx) * elem_bytes) % 16 != 0 || a.kx < 0 || a.kx > a.Kpad) return cudaErrorInvalidValue;
  if (a.ldy < a.N) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

int sparse24_mma_sp_stage_k(bool int8) { return int8 ? Kind<int8_t>::kStageK : Kind<__half>::kStageK; }

template <typename T>
cudaError_t sparse24_mma_sp_launch(const T* x, int64_t ldx, int kx, const T* values, int64_t ldv,
                                   const uint32_t* meta_words, const T* bias, T* y, int64_t ldy, int M,
                                   int N, int K, int Kpad, int tile_config, cudaStream_t stream) {
  Args a{x, ldx * 2, values, ldv * 2, meta_words, bias, nullptr, nullptr, y, ldy, M, N, K, Kpad, kx};
  cudaError_t err = check_common(a, Kind<T>::kStageK, 2);
  if (err != cudaSuccess || M == 0 || N == 0) return err;
  return launch_by_shape<T, T>(a, tile_config, stream);
}

template <typename TO>
cudaError_t sparse24_mma_sp_int8_launch(const int8_t* xq, int64_t ldx, int kx, const float* x_scale,
                                        const int8_t* values, int64_t ldv, const uint32_t* meta_words,
                                        const float* w_scale, const TO* bias, TO* y, int64_t ldy, int M,
                                        int N, int K, int Kpad, int tile_config, cudaStream_t stream) {
  Args a{xq, ldx, values, ldv, meta_words, bias, x_scale, w_scale, y, ldy, M, N, K, Kpad, kx};
  cudaError_t err = check_common(a, Kind<int8_t>::kStageK, 1);
  if (err != cudaSuccess || M == 0 || N == 0) return err;
  if (x_scale == nullptr || w_scale == nullptr) return cudaErrorInvalidValue;
  return launch_by_shape<int8_t, TO>(a, tile_config, stream);
}

template cudaError_t sparse24_mma_sp_launch<__half>(const __half*, int64_t, int, const __half*, int64_t,
                                                    const uint32_t*, const __half*, __half*, int64_t, int,
                                                    int, int, int, int, cudaStream_t);
template cudaError_t sparse24_mma_sp_launch<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int,
                                                           const __nv_bfloat16*, int64_t, const uint32_t*,
                                                           const __nv_bfloat16*, __nv_bfloat16*, int64_t,
                                                           int, int, int, int, int, cudaStream_t);
template cudaError_t sparse24_mma_sp_int8_launch<__half>(const int8_t*, int64_t, int, const float*,
                                                         const int8_t*, int64_t, const uint32_t*, const float*,
                                                         const __half*, __half*, int64_t, int, int, int, int,
                                                         int, cudaStream_t);
template cudaError_t sparse24_mma_sp_int8_launch<__nv_bfloat16>(const int8_t*, int64_t, int, const float*,
                                                                const int8_t*, int64_t, const uint32_t*,
                                                                const float*, const __nv_bfloat16*,
                                                                __nv_bfloat16*, int64_t, int, int, int, int,
                                                                int, cudaStream_t);
template cudaError_t sparse24_mma_sp_int8_launch<float>(const int8_t*, int64_t, int, const float*,
                                                        const int8_t*, int64_t, const uint32_t*, const float*,
                                                        const float*, float*, int64_t, int, int, int, int, int,
                                                        cudaStream_t);

}  // namespace sparsekit
