// sparsekit: 2:4 sparse GEMV / skinny GEMM, y = x @ W^T (+ bias), for M <= 16.
//
// At small M the op is bound by the weight bytes, so the kernel reads only the
// compressed weight (values + meta: 56.25% of dense for 16-bit types) and
// reads each byte once.  Design:
//
//   * A block has kWarps = 8 warps; each warp owns R = 4 consecutive output
//     rows n, so a block covers 32 rows for every M.
//   * K is walked in chunks.  For each chunk the block stages x[0:M, chunk]
//     in shared memory as fp32 (columns >= K read as 0, so the zero padding of
//     the format up to Kp never touches memory outside x).
//   * Within a chunk a lane handles "units": one 16-byte vector of values
//     (8 fp16/bf16 or 4 fp32 values = G groups = 4G dense columns) plus the
//     matching G meta nibbles, for each of its warp's R rows.  A lane's units
//     are u = lane, lane + 32, ... along all of K; the loads of its next unit
//     are issued before the FMAs of the current one (and before the staging
//     of a new chunk), so the weight stream stays in flight across the x
//     staging and its barriers.
//   * Per group of 4 dense columns the lane decompresses the R rows to dense
//     fp32 weights in registers (two selects per weight, independent of M),
//     then for every activation row m reads the 4 x entries once from shared
//     memory (one float4) and uses them for all R rows: dense FMAs, no per-m
//     index decoding.
//   * Shared memory rows are padded by 4 floats per unit, so the 8 lanes of a
//     quarter-warp hit disjoint banks on their 16-byte loads.
//   * After all chunks, each (row, m) accumulator is reduced across the warp
//     with xor-shuffles, bias is added in fp32 and y is written once in T.
//
// Staging x (the cost that grows with M), in bytes and instructions per byte
// of weight (fp16: 16 B of values + 2 B of meta per 16 dense columns of a row
// = 1.125 B per column).  Per chunk of KC columns a block streams 32*KC*1.125
// weight bytes from DRAM (16*KC*1.125 at M = 16 before), and stages M*KC x
// elements: M*2*KC bytes read from L2 plus the instructions to widen and store
// them; the math is M FMAs per column and row, i.e. M/1.125 FMAs per weight
// byte (14.2 at M = 16, 7.1 at M = 8).
//   before: one 2-byte load, conversion, index math with signed divisions and
//     a 4-byte store per element and thread: ~14 SASS instructions per x
//     element, with R = 2 rows per warp (16 per block) at M = 16:
//       M = 16: 16*14/(16*1.125) = 12.4 staging instructions per weight byte
//               (87% on top of the 14.2 FMAs), 1.78 B of x from L2 per byte;
//       M =  8:  8*14/(32*1.125) =  3.1 (44% on top of 7.1 FMAs), 0.44 B/B.
//   now, vectorized: a thread moves 16-byte vectors (8 fp16/bf16 or 4 fp32
//     elements): all its LDG.128 of the chunk first, then per vector the
//     widening in registers (one HADD2.F32 per fp16, one shift / mask per
//     bf16) and two STS.128 into the unit's padded slot; the address is one
//     64-bit add per vector where a row holds a divisor of 256 vectors
//     (M >= 8).  fp32 needs no conversion and goes global -> shared with
//     16-byte cp.async (LDGSTS), whose zero fill also covers the tail past K.
//     Measured in the sm_90a SASS between the chunk's barriers: ~3.8
//     instructions per element at M = 16 and ~4.3 at M = 8 (fp16).
//   now, shared across more weight: R = 4 rows per warp also at M = 16, so
//     each staged element serves 32 weight rows instead of 16:
//       M = 16: 16*3.8/(32*1.125) = 1.7 staging instructions per weight byte
//               (12% of the FMAs), 0.89 B of x from L2 per weight byte;
//       M =  8:  8*4.3/(32*1.125) = 1.0 (14%), 0.44 B/B.
//     R = 4 also halves the shared-memory reads of the FMA loop at M = 16
//     (one float4 of x feeds 4 rows: 28 -> 14 B of shared memory per weight
//     byte).  The FMA loop walks one group at a time (x float4 in the inner m
//     loop) so that R*M accumulators + 4R weights fit in registers, unspilled.
// Designs not taken: (a) more rows per block (R = 8, or 16 warps): 32 rows is
// already what N = 4096 gives each of 132 SMs, so fewer, bigger blocks would
// leave SMs idle; (b) a pre-pass that writes x as fp32 once, read by all
// blocks with 16-byte loads: one more launch (~2-3 us next to a 4-8 us GEMV),
// and every block then reads 4 bytes per x element from L2 instead of 2 (1.78
// B/B at M = 16) to save the ~1 widening instruction per element; (c) an
// sm_90 thread-block cluster sharing the chunk through distributed shared
// memory: it divides the L2 reads of x by the cluster size, but adds two
// cluster barriers per chunk and an sm_90-only path, for a traffic (0.89 B of
// x per weight byte at M = 16, 0.44 at M = 8) that L2 serves at several times
// the DRAM rate.
//
// Fast path (FAST): 16-byte __ldg vectors of values and one 2-byte (fp16/bf16)
// or 1-byte (fp32) meta load per unit; needs a 16-byte aligned `values`, a
// row pitch (Kp/2 * sizeof(T)) that is a multiple of 16 bytes and a meta
// pointer aligned to its load.  Vector staging of x (XVEC) additionally needs
// a 16-byte aligned x and row pitch (ldx * sizeof(T), when M > 1); a vector
// that straddles K is read element by element.  Otherwise the FAST kernel
// stages x one element at a time, and the fallback instantiation (FAST = false)
// also loads one group (two elements) of values at a time, with no alignment
// assumptions beyond the element's own.
//
// No torch headers here: this file compiles standalone with `nvcc -c`.
#include "sparse24.h"

#include <cstdint>

namespace sparsekit {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kSmemBudget = 32 * 1024;  // target bytes of staged x per block

// ----------------------------------------------------------------- dtypes
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Bits = unsigned int;
  static __device__ __forceinline__ float to_float(unsigned int b) { return __uint_as_float(b); }
  static __device__ __forceinline__ float from_bits_ptr(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ float store(float v) { return v; }
  // the 4 elements of a 16-byte vector
  static __device__ __forceinline__ void widen(const uint4& v, float4* f) {
    f[0] = make_float4(__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z), __uint_as_float(v.w));
  }
};

template <>
struct Elem<__half> {
  using Bits = unsigned short;
  static __device__ __forceinline__ float to_float(unsigned int b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b & 0xFFFFu)));
  }
  static __device__ __forceinline__ float from_bits_ptr(const __half* p) {
    return to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
  }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
  // the 8 elements of a 16-byte vector, in order (low half of each word first)
  static __device__ __forceinline__ float2 pair(unsigned int w) {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
  static __device__ __forceinline__ void widen(const uint4& v, float4* f) {
    const float2 a = pair(v.x), b = pair(v.y), c = pair(v.z), d = pair(v.w);
    f[0] = make_float4(a.x, a.y, b.x, b.y);
    f[1] = make_float4(c.x, c.y, d.x, d.y);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  using Bits = unsigned short;
  // bf16 is the high half of an fp32: widening is a shift.
  static __device__ __forceinline__ float to_float(unsigned int b) { return __uint_as_float(b << 16); }
  static __device__ __forceinline__ float from_bits_ptr(const __nv_bfloat16* p) {
    return to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
  }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float lo(unsigned int w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(unsigned int w) { return __uint_as_float(w & 0xFFFF0000u); }
  static __device__ __forceinline__ void widen(const uint4& v, float4* f) {
    f[0] = make_float4(lo(v.x), hi(v.x), lo(v.y), hi(v.y));
    f[1] = make_float4(lo(v.z), hi(v.z), lo(v.w), hi(v.w));
  }
};

// ----------------------------------------------------------------- config
template <typename T, int MT, bool FAST>
struct GemvConfig {
  static constexpr int kElemBytes = static_cast<int>(sizeof(T));
  // groups per unit: a 16-byte vector on the fast path, one group otherwise
  static constexpr int G = FAST ? 16 / (2 * kElemBytes) : 1;
  static constexpr int kVals = 2 * G;                        // values per unit
  static constexpr int kWords = kVals * kElemBytes / 4;      // 32-bit words per unit
  static constexpr int UC = 4 * G;                           // dense columns per unit
  static constexpr int kPad = (UC >= 8) ? 4 : 0;             // bank-conflict padding (floats)
  static constexpr int kUnitStride = UC + kPad;              // floats per unit in smem
  static constexpr int kMetaBytes = FAST ? G / 2 : 1;        // meta bytes loaded per unit (G >= 2: whole bytes)
  // rows per warp: each x float4 read from smem feeds R rows
  static constexpr int R = 4;
  static constexpr int kRowsPerBlock = kWarps * R;
  // resident blocks per SM the register budget must allow (__launch_bounds__):
  // 2 (<= 128 registers, 16 warps) up to M = 8; M = 16 holds 4 x 16
  // accumulators plus two units of weights in flight: one block (8 warps)
  static constexpr int kMinBlocks = (MT <= 8) ? 2 : 1;
  // units per chunk: a multiple of 32 (one per lane), as many as the budget allows
  static constexpr int kBudgetUnits = kSmemBudget / (MT * kUnitStride * 4);
  static constexpr int kUnits = (kBudgetUnits / 32 < 1) ? 32 : (kBudgetUnits / 32) * 32;
  static constexpr int kLaneUnits = kUnits / 32;             // units per lane per chunk
  static constexpr int KC = kUnits * UC;                     // dense columns per chunk
  static constexpr int kRowFloats = kUnits * kUnitStride;    // smem floats per x row
  static constexpr int kSmemFloats = MT * kRowFloats;
  // vector staging: 16-byte vectors of x, kVecIters per thread and chunk
  static constexpr int kVec = 16 / kElemBytes;               // x elements per vector
  static constexpr int kVecPerRow = KC / kVec;
  static constexpr int kVecIters = (MT * kVecPerRow + kThreads - 1) / kThreads;
  static_assert(kSmemFloats * 4 <= 48 * 1024, "x chunk must fit the static shared memory limit");
  static_assert(kWords >= 1 && kWords <= 4, "unit must be 4..16 bytes");
  static_assert(UC % 8 == 0 || UC == 4, "unit must cover whole groups");
  static_assert(!FAST || UC % kVec == 0, "a 16-byte x vector must lie in one unit");
  static_assert(kVecIters >= 1 && kMetaBytes >= 1, "");
};

// ----------------------------------------------------------------- PTX helpers
__device__ __forceinline__ uint4 ldg_u4(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// 16-byte global -> shared copy (cp.async, sm_80+); bytes < 16 read only `bytes`
// bytes and zero-fill the rest.  The host branches below are what the
// instructions do: they never run on a GPU, only in the CPU emulation of this
// kernel (tests/test_cuda_backend.py).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800)
constexpr bool kHasCpAsync = false;
#else
constexpr bool kHasCpAsync = true;
#endif
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  const unsigned int d = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
#elif !defined(__CUDA_ARCH__)
  unsigned char* d = static_cast<unsigned char*>(dst);
  for (int i = 0; i < 16; ++i) d[i] = (i < bytes) ? static_cast<const unsigned char*>(src)[i] : 0;
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::);
#endif
}

// 16-byte shared store (st.shared.v4: the four values in one instruction)
__device__ __forceinline__ void sts128(float* dst, const float4& v) {
#if defined(__CUDA_ARCH__)
  const unsigned int d = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(d), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
#else
  *reinterpret_cast<float4*>(dst) = v;
#endif
}

// Bits of element e from a little-endian packed word array.
template <typename T>
__device__ __forceinline__ unsigned int elem_bits(const unsigned int* w, int e) {
  if constexpr (sizeof(T) == 4) return w[e];
  else
  return (w[e >> 1] >> (16 * (e & 1))) & 0xFFFFu;
}

// ----------------------------------------------------------------- x staging
// Smem float index of chunk column c of x row m (units padded to kUnitStride).
template <typename C>
__device__ __forceinline__ int xs_index(int m, int c) {
  return m * C::kRowFloats + (c / C::UC) * C::kUnitStride + (c % C::UC);
}

// x[0:M, k0:k0+kc] -> xs as fp32, zeros at columns >= K (kc <= KC, k0 < K).
// XVEC: 16-byte vectors (x and its row pitch 16-byte aligned); otherwise one
// element per thread and step.
template <typename T, int MT, bool FAST, bool XVEC>
__device__ __forceinline__ void stage_x(float* xs, const T* __restrict__ x, int64_t ldx, int M, int K, int k0,
                                        int kc) {
  using C = GemvConfig<T, MT, FAST>;
  using E = Elem<T>;
  const int kreal = min(kc, K - k0);  // columns of the chunk inside x
  if constexpr (XVEC) {
    constexpr int V = C::kVec;
    if constexpr (sizeof(T) == 4 && kHasCpAsync) {
      // fp32: no conversion, so global -> shared directly; the tail is zero filled
#pragma unroll
      for (int i = 0; i < C::kVecIters; ++i) {
        const int v = static_cast<int>(threadIdx.x) + i * kThreads;
        const int m = v / C::kVecPerRow;
        const int c = (v % C::kVecPerRow) * V;
        if (m < M && c < kc) {
          const int n = max(0, min(V, kreal - c));
          const T* src = (n > 0) ? x + m * ldx + k0 + c : x;
          cp_async16(xs + xs_index<C>(m, c), src, 4 * n);
        }
      }
      cp_async_wait_all();
    } else {
      // all loads first, then widening and stores; the vector that straddles K
      // (if any) is left to the tail loop below, vectors past K are zeros
      // (when kThreads is a multiple of the vectors per row, a thread keeps its column and steps
      // kThreads / kVecPerRow rows per vector: one 64-bit add per address)
      constexpr bool kSameColumn = kThreads % C::kVecPerRow == 0;
      const int t = static_cast<int>(threadIdx.x);
      const T* xt = x + static_cast<int64_t>(t / C::kVecPerRow) * ldx + k0 + (t % C::kVecPerRow) * V;
      const int64_t row_step = static_cast<int64_t>(kThreads / C::kVecPerRow) * ldx;
      uint4 raw[C::kVecIters];
#pragma unroll
      for (int i = 0; i < C::kVecIters; ++i) {
        const int v = t + i * kThreads;
        const int m = v / C::kVecPerRow;
        const int c = (v % C::kVecPerRow) * V;
        raw[i] = make_uint4(0u, 0u, 0u, 0u);
        if (m < M && c + V <= kreal)
          raw[i] = ldg_u4(kSameColumn ? xt + i * row_step : x + static_cast<int64_t>(m) * ldx + k0 + c);
      }
#pragma unroll
      for (int i = 0; i < C::kVecIters; ++i) {
        const int v = static_cast<int>(threadIdx.x) + i * kThreads;
        const int m = v / C::kVecPerRow;
        const int c = (v % C::kVecPerRow) * V;
        if (m < M && c < kc && (c + V <= kreal || c >= kreal)) {
          float4 f[V / 4];
          E::widen(raw[i], f);  // zeros past K
          float* dst = xs + xs_index<C>(m, c);
#pragma unroll
          for (int e = 0; e < V / 4; ++e) sts128(dst + 4 * e, f[e]);
        }
      }
      // the straddling vector of each row: element by element, zeros past K
      const int c0 = kreal - kreal % V;
      if (c0 < kreal) {
        for (int m = threadIdx.x; m < M; m += kThreads) {
          float* dst = xs + xs_index<C>(m, c0);
#pragma unroll 1
          for (int e = 0; e < V; ++e) dst[e] = (c0 + e < kreal) ? E::from_bits_ptr(x + m * ldx + k0 + c0 + e) : 0.f;
        }
      }
    }
  } else {
    for (int m = 0; m < M; ++m) {
      const T* xr = x + static_cast<int64_t>(m) * ldx + k0;
      for (int c = threadIdx.x; c < kc; c += kThreads)
        xs[xs_index<C>(m, c)] = (c < kreal) ? E::from_bits_ptr(xr + c) : 0.f;
    }
  }
}

// ----------------------------------------------------------------- weights
// One unit of the warp's R rows in registers: values words and meta codes.
template <typename C>
struct UnitRegs {
  unsigned int words[C::R][C::kWords];
  unsigned int codes[C::R];
};

// Loads unit gu (its first group is G*gu) of rows n0 .. n0 + R - 1; rows past
// N read row N - 1 (valid memory; their results are not stored).
template <typename T, typename C, bool FAST>
__device__ __forceinline__ void load_unit(UnitRegs<C>& u, const T* __restrict__ values,
                                          const uint8_t* __restrict__ meta, int64_t n0, int N, int64_t ldv,
                                          int64_t ldm, int gu) {
  using Bits = typename Elem<T>::Bits;
  constexpr int G = C::G;
  const int64_t gabs = static_cast<int64_t>(gu) * G;  // first group of the unit
#pragma unroll
  for (int r = 0; r < C::R; ++r) {
    const int64_t n = min(n0 + r, static_cast<int64_t>(N) - 1);
    const T* vp = values + n * ldv + 2 * gabs;
    const uint8_t* mp = meta + n * ldm + (gabs >> 1);
    if constexpr (FAST) {
      const uint4 v = ldg_u4(vp);
      u.words[r][0] = v.x; u.words[r][1] = v.y; u.words[r][2] = v.z; u.words[r][3] = v.w;
      if constexpr (C::kMetaBytes == 2)
        u.codes[r] = __ldg(reinterpret_cast<const unsigned short*>(mp));
      else
        u.codes[r] = __ldg(mp);
    } else {
      const unsigned int b0 = __ldg(reinterpret_cast<const Bits*>(vp));
      const unsigned int b1 = __ldg(reinterpret_cast<const Bits*>(vp) + 1);
      if constexpr (sizeof(T) == 4) {
        u.words[r][0] = b0;
        u.words[r][C::kWords - 1] = b1;
      } else {
        u.words[r][0] = b0 | (b1 << 16);
      }
      u.codes[r] = (static_cast<unsigned int>(__ldg(mp)) >> (4 * (gabs & 1))) & 0xFu;
    }
  }
}

// acc[r][m] += sum over the unit's 4G columns of W[row r] * x[m] (xu: the unit's smem slot of row 0).
template <typename T, typename C, int MT>
__device__ __forceinline__ void fma_unit(float (&acc)[C::R][MT], const UnitRegs<C>& u, const float* xu, int M) {
  using E = Elem<T>;
#pragma unroll
  for (int q = 0; q < C::G; ++q) {
    // dense fp32 weights of group q for the R rows
    float w[C::R][4];
#pragma unroll
    for (int r = 0; r < C::R; ++r) {
      const unsigned int code = (u.codes[r] >> (4 * q)) & 0xFu;
      const unsigned int i0 = code & 3u;
      const unsigned int i1 = code >> 2;
      const float a = E::to_float(elem_bits<T>(u.words[r], 2 * q));
      const float b = E::to_float(elem_bits<T>(u.words[r], 2 * q + 1));
#pragma unroll
      for (int j = 0; j < 4; ++j)
        w[r][j] = (i0 == static_cast<unsigned int>(j)) ? a : ((i1 == static_cast<unsigned int>(j)) ? b : 0.f);
    }
    // each x float4 of the group feeds the R rows
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        const float4 xv = *reinterpret_cast<const float4*>(xu + m * C::kRowFloats + 4 * q);
#pragma unroll
        for (int r = 0; r < C::R; ++r) {
          float s = acc[r][m];
          s = fmaf(w[r][0], xv.x, s);
          s = fmaf(w[r][1], xv.y, s);
          s = fmaf(w[r][2], xv.z, s);
          s = fmaf(w[r][3], xv.w, s);
          acc[r][m] = s;
        }
      }
    }
  }
}

// ----------------------------------------------------------------- kernel
template <typename T, int MT, bool FAST, bool XVEC>
__global__ void __launch_bounds__(kThreads, (GemvConfig<T, MT, FAST>::kMinBlocks))
sparse24_gemv_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ values,
                     const uint8_t* __restrict__ meta, const T* __restrict__ bias,
                     T* __restrict__ y, int64_t ldy, int M, int N, int K) {
  static_assert(FAST || !XVEC, "vector staging of x comes with the fast weight path");
  using C = GemvConfig<T, MT, FAST>;
  using E = Elem<T>;
  constexpr int R = C::R;

  __shared__ __align__(16) float xs[C::kSmemFloats];

  const int Kp = static_cast<int>((static_cast<int64_t>(K) + 7) / 8 * 8);
  const int64_t ldv = Kp / 2;  // values row pitch (elements)
  const int64_t ldm = Kp / 8;  // meta row pitch (bytes)
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * R;
  const int units_k = Kp / C::UC;  // units along K (Kp is a multiple of UC on every path)

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

  // lane's units gu = lane + 32 j along K; unit gu + 32 is loaded while gu is computed
  // (units past the end load the last unit again and are not computed)
  UnitRegs<C> cur, nxt;
  if (units_k > 0) load_unit<T, C, FAST>(cur, values, meta, n0, N, ldv, ldm, min(lane, units_k - 1));
  int gu = lane;
  for (int k0 = 0; k0 < Kp; k0 += C::KC) {
    const int kc = min(C::KC, Kp - k0);
    __syncthreads();  // previous chunk fully consumed
    stage_x<T, MT, FAST, XVEC>(xs, x, ldx, M, K, k0, kc);
    __syncthreads();
    const float* xu = xs + lane * C::kUnitStride;
#pragma unroll 1
    for (int j = 0; j < C::kLaneUnits; ++j, gu += 32) {
      if (gu - lane >= units_k) break;  // warp-uniform: past the last unit of K
      load_unit<T, C, FAST>(nxt, values, meta, n0, N, ldv, ldm, min(gu + 32, units_k - 1));
      if (gu < units_k) fma_unit<T, C, MT>(acc, cur, xu + j * 32 * C::kUnitStride, M);
      cur = nxt;
    }
  }

  // ---- warp reduction and output: lane (r * MT + m) % 32 writes y[m, n0 + r]
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    const float bn = (bias != nullptr) ? E::from_bits_ptr(bias + min(n, static_cast<int64_t>(N) - 1)) : 0.f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
      if (((r * MT + m) & 31) == lane && n < N && m < M) y[static_cast<int64_t>(m) * ldy + n] = E::store(v + bn);
    }
  }
}

// ----------------------------------------------------------------- host side
template <typename T, int MT, bool FAST, bool XVEC>
cudaError_t launch_cfg(const T* x, int64_t ldx, const T* values, const uint8_t* meta,
                       const T* bias, T* y, int64_t ldy, int M, int N, int K,
                       cudaStream_t stream) {
  using C = GemvConfig<T, MT, FAST>;
  const int64_t blocks = (static_cast<int64_t>(N) + C::kRowsPerBlock - 1) / C::kRowsPerBlock;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  sparse24_gemv_kernel<T, MT, FAST, XVEC><<<dim3(static_cast<unsigned int>(blocks)), dim3(kThreads), 0, stream>>>(
      x, ldx, values, meta, bias, y, ldy, M, N, K);
  return cudaGetLastError();
}

template <typename T, bool FAST, bool XVEC>
cudaError_t dispatch_m(const T* x, int64_t ldx, const T* values, const uint8_t* meta,
                       const T* bias, T* y, int64_t ldy, int M, int N, int K,
                       cudaStream_t stream) {
  if (M <= 1) return launch_cfg<T, 1, FAST, XVEC>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
  if (M <= 2) return launch_cfg<T, 2, FAST, XVEC>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
  if (M <= 4) return launch_cfg<T, 4, FAST, XVEC>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
  if (M <= 8) return launch_cfg<T, 8, FAST, XVEC>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
  return launch_cfg<T, 16, FAST, XVEC>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

template <typename T>
cudaError_t sparse24_gemv_launch(const T* x, int64_t ldx, const T* values, const uint8_t* meta,
                                 const T* bias, T* y, int64_t ldy, int M, int N, int K,
                                 cudaStream_t stream) {
  if (M < 0 || M > kSparse24GemvMaxM || N < 0 || K < 0 || K > 0x7FFFFFF0) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  if (y == nullptr || ldy < N) return cudaErrorInvalidValue;
  if (K > 0 && (x == nullptr || values == nullptr || meta == nullptr)) return cudaErrorInvalidValue;
  if (M > 1 && ldx < 0) return cudaErrorInvalidValue;
  const int64_t Kp = (static_cast<int64_t>(K) + 7) / 8 * 8;
  const bool fast = aligned(values, 16) && ((Kp / 2) * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                    aligned(meta, GemvConfig<T, 1, true>::kMetaBytes);
  const bool xvec = fast && aligned(x, 16) && (M == 1 || (ldx * static_cast<int64_t>(sizeof(T))) % 16 == 0);
  if (xvec) return dispatch_m<T, true, true>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
  if (fast) return dispatch_m<T, true, false>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
  return dispatch_m<T, false, false>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
}

template cudaError_t sparse24_gemv_launch<float>(const float*, int64_t, const float*,
                                                 const uint8_t*, const float*, float*, int64_t,
                                                 int, int, int, cudaStream_t);
template cudaError_t sparse24_gemv_launch<__half>(const __half*, int64_t, const __half*,
                                                  const uint8_t*, const __half*, __half*, int64_t,
                                                  int, int, int, cudaStream_t);
template cudaError_t sparse24_gemv_launch<__nv_bfloat16>(const __nv_bfloat16*, int64_t,
                                                         const __nv_bfloat16*, const uint8_t*,
                                                         const __nv_bfloat16*, __nv_bfloat16*,
                                                         int64_t, int, int, int, cudaStream_t);

}  // namespace sparsekit
