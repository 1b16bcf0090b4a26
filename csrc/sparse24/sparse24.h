// sparsekit: CUDA kernels for the compressed 2:4 weight format.
//
// Plain C++ launcher API (no torch headers), so that the .cu files compile
// standalone with `nvcc -c` and the torch binding (csrc/bindings.cpp) only
// needs this header.
//
// Weight format (see sparsekit/formats/sparse24.py), for W of shape (N, K):
//   Kp     = ceil(K / 8) * 8  (zero-padded K)
//   values : (N, Kp/2) elements of T, contiguous rows.  Group g (dense
//            columns 4g..4g+3) keeps its two entries at values[:, 2g] and
//            values[:, 2g+1], in increasing column order.
//   meta   : (N, Kp/8) uint8, contiguous rows.  Group g has the 4-bit code
//            i0 | (i1 << 2) (i0 < i1 its kept positions); byte j holds group
//            2j in its low nibble and group 2j+1 in its high nibble.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace sparsekit {

// Largest number of activation rows (M) the GEMV kernel accepts.
constexpr int kSparse24GemvMaxM = 16;

// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for 0 <= m < M <= 16.
//
//   x      : M rows of K elements, row stride ldx (elements), unit column stride
//   values : N x (Kp/2) contiguous
//   meta   : N x (Kp/8) contiguous
//   bias   : N elements or nullptr
//   y      : M rows of N elements, row stride ldy (elements), unit column stride
//
// Accumulates in fp32 and rounds once to T.  Every y[m, n] with m < M and
// n < N is written.  M == 0 or N == 0 launches nothing.  Returns
// cudaErrorInvalidValue for bad arguments (M outside 0..16, negative sizes,
// null pointers) and otherwise the launch status.
template <typename T>
cudaError_t sparse24_gemv_launch(const T* x, int64_t ldx, const T* values, const uint8_t* meta,
                                 const T* bias, T* y, int64_t ldy, int M, int N, int K,
                                 cudaStream_t stream);

extern template cudaError_t sparse24_gemv_launch<float>(const float*, int64_t, const float*,
                                                        const uint8_t*, const float*, float*,
                                                        int64_t, int, int, int, cudaStream_t);
extern template cudaError_t sparse24_gemv_launch<__half>(const __half*, int64_t, const __half*,
                                                         const uint8_t*, const __half*, __half*,
                                                         int64_t, int, int, int, cudaStream_t);
extern template cudaError_t sparse24_gemv_launch<__nv_bfloat16>(
    const __nv_bfloat16*, int64_t, const __nv_bfloat16*, const uint8_t*, const __nv_bfloat16*,
    __nv_bfloat16*, int64_t, int, int, int, cudaStream_t);

// ---------------------------------------------------------------------------
// 2:4 GEMM on sparse tensor cores (sparse24_mma_sp.cu), sm_80 and later.
//
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) with mma.sp m16n8k32 (fp16 /
// bf16, fp32 accumulate), for any M.  Operands (see the .cu file's header):
//   x          : M rows, row pitch ldx elements, 16-byte aligned base and pitch;
//                only columns < kx are read (kx * 2 bytes a multiple of 16, kx <= Kpad)
//   values     : N rows of Kpad/2 elements, pitch ldv (16-byte multiple), 16-byte aligned
//   meta_words : sparsekit.formats.sparse24.mma_sp_meta(meta, K, 64): (ceil(N/16), Kpad/64, 32)
//   Kpad       : a multiple of sparse24_mma_sp_stage_k(false) (64), >= K
//   tile_config: -1 picks by M (M <= 32, <= 64, larger); 0, 1, 2 force one
// Returns cudaErrorInvalidValue for bad arguments, else the launch status.
int sparse24_mma_sp_stage_k(bool int8);

template <typename T>
cudaError_t sparse24_mma_sp_launch(const T* x, int64_t ldx, int kx, const T* values, int64_t ldv,
                                   const uint32_t* meta_words, const T* bias, T* y, int64_t ldy, int M,
                                   int N, int K, int Kpad, int tile_config, cudaStream_t stream);

// int8 2:4: y[m, n] = (sum_k xq[m, k] * Wq[n, k]) * x_scale[m] * w_scale[n] (+ bias[n]),
// mma.sp m16n8k64 s8 with s32 accumulate; output TO (fp16, bf16 or fp32).
// Kpad a multiple of sparse24_mma_sp_stage_k(true) (128); meta_words from
// mma_sp_meta(meta, K, 128); xq rows 16-byte aligned, kx a multiple of 16.
template <typename TO>
cudaError_t sparse24_mma_sp_int8_launch(const int8_t* xq, int64_t ldx, int kx, const float* x_scale,
                                        const int8_t* values, int64_t ldv, const uint32_t* meta_words,
                                        const float* w_scale, const TO* bias, TO* y, int64_t ldy, int M,
                                        int N, int K, int Kpad, int tile_config, cudaStream_t stream);

extern template cudaError_t sparse24_mma_sp_launch<__half>(const __half*, int64_t, int, const __half*,
                                                           int64_t, const uint32_t*, const __half*, __half*,
                                                           int64_t, int, int, int, int, int, cudaStream_t);
extern template cudaError_t sparse24_mma_sp_launch<__nv_bfloat16>(
    const __nv_bfloat16*, int64_t, int, const __nv_bfloat16*, int64_t, const uint32_t*, const __nv_bfloat16*,
    __nv_bfloat16*, int64_t, int, int, int, int, int, cudaStream_t);
extern template cudaError_t sparse24_mma_sp_int8_launch<__half>(const int8_t*, int64_t, int, const float*,
                                                                const int8_t*, int64_t, const uint32_t*,
                                                                const float*, const __half*, __half*, int64_t,
                                                                int, int, int, int, int, cudaStream_t);
extern template cudaError_t sparse24_mma_sp_int8_launch<__nv_bfloat16>(
    const int8_t*, int64_t, int, const float*, const int8_t*, int64_t, const uint32_t*, const float*,
    const __nv_bfloat16*, __nv_bfloat16*, int64_t, int, int, int, int, int, cudaStream_t);
extern template cudaError_t sparse24_mma_sp_int8_launch<float>(const int8_t*, int64_t, int, const float*,
                                                               const int8_t*, int64_t, const uint32_t*,
                                                               const float*, const float*, float*, int64_t,
                                                               int, int, int, int, int, cudaStream_t);

}  // namespace sparsekit
