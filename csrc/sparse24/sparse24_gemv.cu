// sparsekit: 2:4 sparse GEMV / skinny GEMM, y = x @ W^T (+ bias), for M <= 16.
//
// At small M the op is bound by the weight bytes, so the kernel reads only the
// compressed weight (values + meta: 56.25% of dense for 16-bit types) and
// reads each byte once.  Design:
//
//   * A block has kWarps warps; each warp owns R consecutive output rows n.
//   * K is walked in chunks.  For each chunk the block stages x[0:M, chunk]
//     in shared memory as fp32 (columns >= K read as 0, so the zero padding of
//     the format up to Kp never touches memory outside x).
//   * Within a chunk a lane handles "units": one 16-byte vector of values
//     (8 fp16/bf16 or 4 fp32 values = G groups = 4G dense columns) plus the
//     matching G meta nibbles, for each of its warp's R rows.  The lane
//     decompresses the units to 4G dense fp32 weights in registers (two
//     selects per weight, independent of M), then for every activation row m
//     reads the 4G x entries once from shared memory (float4 loads) and uses
//     them for all R rows: dense FMAs, no per-m index decoding.
//   * Shared memory rows are padded by 4 floats per unit, so the 8 lanes of a
//     quarter-warp hit disjoint banks on their 16-byte loads.
//   * After all chunks, each (row, m) accumulator is reduced across the warp
//     with xor-shuffles, bias is added in fp32 and y is written once in T.
//
// Fast path: 16-byte __ldg vectors; needs a 16-byte aligned `values` and a
// row pitch (Kp/2 * sizeof(T)) that is a multiple of 16 bytes.  Otherwise a
// fallback instantiation loads one group (two elements) at a time with scalar
// loads, with no alignment assumptions beyond the element's own.
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
  // rows per warp: x values loaded from smem are reused R times
  static constexpr int R = (MT >= 16) ? 2 : 4;
  static constexpr int kRowsPerBlock = kWarps * R;
  // units per chunk: a multiple of 32 (one per lane), as many as the budget allows
  static constexpr int kBudgetUnits = kSmemBudget / (MT * kUnitStride * 4);
  static constexpr int kUnits = (kBudgetUnits / 32 < 1) ? 32 : (kBudgetUnits / 32) * 32;
  static constexpr int KC = kUnits * UC;                     // dense columns per chunk
  static constexpr int kRowFloats = kUnits * kUnitStride;    // smem floats per x row
  static constexpr size_t kSmemBytes = static_cast<size_t>(MT) * kRowFloats * sizeof(float);
  static_assert(kSmemBytes <= 48 * 1024, "x chunk must fit the default dynamic smem limit");
  static_assert(kWords >= 1 && kWords <= 4, "unit must be 4..16 bytes");
  static_assert(UC % 8 == 0 || UC == 4, "unit must cover whole groups");
};

template <int W>
struct VecLoad;

template <>
struct VecLoad<4> {
  static __device__ __forceinline__ void load(const void* p, unsigned int* w) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  }
};

// Bits of element e from a little-endian packed word array.
template <typename T>
__device__ __forceinline__ unsigned int elem_bits(const unsigned int* w, int e) {
  if constexpr (sizeof(T) == 4) return w[e];
  else
  return (w[e >> 1] >> (16 * (e & 1))) & 0xFFFFu;
}

// ----------------------------------------------------------------- kernel
template <typename T, int MT, bool FAST>
__global__ void __launch_bounds__(kThreads)
sparse24_gemv_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ values,
                     const uint8_t* __restrict__ meta, const T* __restrict__ bias,
                     T* __restrict__ y, int64_t ldy, int M, int N, int K) {
  using C = GemvConfig<T, MT, FAST>;
  using E = Elem<T>;
  using Bits = typename E::Bits;
  constexpr int R = C::R;
  constexpr int G = C::G;
  constexpr int UC = C::UC;

  extern __shared__ float4 smem_f4[];
  float* xs = reinterpret_cast<float*>(smem_f4);

  const int Kp = static_cast<int>((static_cast<int64_t>(K) + 7) / 8 * 8);
  const int64_t ldv = Kp / 2;  // values row pitch (elements)
  const int64_t ldm = Kp / 8;  // meta row pitch (bytes)
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * R;

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

  for (int k0 = 0; k0 < Kp; k0 += C::KC) {
    const int kc = min(C::KC, Kp - k0);

    // ---- stage x[0:M, k0:k0+kc] as fp32 (zeros past K)
    __syncthreads();  // previous chunk fully consumed
    for (int m = 0; m < M; ++m) {
      const T* xr = x + static_cast<int64_t>(m) * ldx + k0;
      float* xsr = xs + m * C::kRowFloats;
      const int kreal = min(kc, K - k0);
      for (int c = threadIdx.x; c < kc; c += kThreads) {
        const float v = (c < kreal) ? E::from_bits_ptr(xr + c) : 0.f;
        xsr[(c / UC) * C::kUnitStride + (c % UC)] = v;
      }
    }
    __syncthreads();

    // ---- each lane: units u, u+32, ... of this chunk for the warp's R rows
    const int units = kc / UC;  // Kp and KC are multiples of UC on every path
    const int g0 = k0 / 4;      // first group of the chunk
    for (int u = lane; u < units; u += 32) {
      const int64_t gabs = g0 + static_cast<int64_t>(u) * G;  // first group of the unit
      unsigned int words[R][C::kWords];
      unsigned int codes[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t n = n0 + r;
        if (n < N) {
          const T* vp = values + n * ldv + 2 * gabs;
          const uint8_t* mp = meta + n * ldm;
          if constexpr (FAST) {
            VecLoad<C::kWords>::load(vp, words[r]);
          } else {
            const unsigned int b0 = __ldg(reinterpret_cast<const Bits*>(vp));
            const unsigned int b1 = __ldg(reinterpret_cast<const Bits*>(vp) + 1);
            if constexpr (sizeof(T) == 4) {
              words[r][0] = b0;
              words[r][C::kWords - 1] = b1;
            } else {
              words[r][0] = b0 | (b1 << 16);
            }
          }
          if constexpr (G >= 2) {
            unsigned int cw = 0;
#pragma unroll
            for (int b = 0; b < G / 2; ++b)
              cw |= static_cast<unsigned int>(__ldg(mp + (gabs >> 1) + b)) << (8 * b);
            codes[r] = cw;
          } else {
            codes[r] = (static_cast<unsigned int>(__ldg(mp + (gabs >> 1))) >> (4 * (gabs & 1))) & 0xFu;
          }
        } else {
#pragma unroll
          for (int i = 0; i < C::kWords; ++i) words[r][i] = 0u;
          codes[r] = 0x4u;  // (0, 1): a valid code with zero values
        }
      }

      // decompress to dense fp32 weights: w[r][4q + j]
      float w[R][UC];
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int q = 0; q < G; ++q) {
          const unsigned int code = (codes[r] >> (4 * q)) & 0xFu;
          const unsigned int i0 = code & 3u;
          const unsigned int i1 = code >> 2;
          const float a = E::to_float(elem_bits<T>(words[r], 2 * q));
          const float b = E::to_float(elem_bits<T>(words[r], 2 * q + 1));
#pragma unroll
          for (int j = 0; j < 4; ++j)
            w[r][4 * q + j] = (i0 == static_cast<unsigned int>(j)) ? a
                              : ((i1 == static_cast<unsigned int>(j)) ? b : 0.f);
        }
      }

      // dense FMAs against the staged x, each x load shared by the R rows
      const float* xu = xs + u * C::kUnitStride;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < M) {
#pragma unroll
          for (int q = 0; q < G; ++q) {
            const float4 xv = *reinterpret_cast<const float4*>(xu + m * C::kRowFloats + 4 * q);
#pragma unroll
            for (int r = 0; r < R; ++r) {
              float s = acc[r][m];
              s = fmaf(w[r][4 * q + 0], xv.x, s);
              s = fmaf(w[r][4 * q + 1], xv.y, s);
              s = fmaf(w[r][4 * q + 2], xv.z, s);
              s = fmaf(w[r][4 * q + 3], xv.w, s);
              acc[r][m] = s;
            }
          }
        }
      }
    }
  }

  // ---- warp reduction and output
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
      acc[r][m] = v;
    }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (((r * MT + m) & 31) == lane && n < N && m < M) {
        float v = acc[r][m];
        if (bias != nullptr) v += E::from_bits_ptr(bias + n);
        y[static_cast<int64_t>(m) * ldy + n] = E::store(v);
      }
    }
  }
}

// ----------------------------------------------------------------- host side
template <typename T, int MT, bool FAST>
cudaError_t launch_cfg(const T* x, int64_t ldx, const T* values, const uint8_t* meta,
                       const T* bias, T* y, int64_t ldy, int M, int N, int K,
                       cudaStream_t stream) {
  using C = GemvConfig<T, MT, FAST>;
  const int64_t blocks = (static_cast<int64_t>(N) + C::kRowsPerBlock - 1) / C::kRowsPerBlock;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  sparse24_gemv_kernel<T, MT, FAST><<<dim3(static_cast<unsigned int>(blocks)), dim3(kThreads),
                                      C::kSmemBytes, stream>>>(x, ldx, values, meta, bias, y,
                                                               ldy, M, N, K);
  return cudaGetLastError();
}

template <typename T, bool FAST>
cudaError_t dispatch_m(const T* x, int64_t ldx, const T* values, const uint8_t* meta,
                       const T* bias, T* y, int64_t ldy, int M, int N, int K,
                       cudaStream_t stream) {
  if (M <= 1) return launch_cfg<T, 1, FAST>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
  if (M <= 2) return launch_cfg<T, 2, FAST>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
  if (M <= 4) return launch_cfg<T, 4, FAST>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
  if (M <= 8) return launch_cfg<T, 8, FAST>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
  return launch_cfg<T, 16, FAST>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
}

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
  const bool fast = (reinterpret_cast<uintptr_t>(values) % 16 == 0) &&
                    ((Kp / 2) * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  if (fast) return dispatch_m<T, true>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
  return dispatch_m<T, false>(x, ldx, values, meta, bias, y, ldy, M, N, K, stream);
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
