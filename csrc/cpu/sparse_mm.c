/*
 * sparsekit._cpu_ext: the CPU matmuls over compressed weights -- 2:4 and block-sparse float32 matmuls that read
 * only the stored weights, and fused W8A8 / W4A8 linears over integer codes.  The Python side
 * (sparsekit/ops/_cpu_ext.py) validates, prepares the per-weight arrays once per weight version, allocates and
 * passes raw pointers and sizes; this code trusts them.
 *
 * 2:4 (sp24_mm):  y[m, n] = bias[n] + sum over the stored values w of row n of  w * x[m, column of w]  (float32).
 * Row n stores kh = Kp/2 values; value t belongs to group t/2 (4 columns).  The values are stored chunk-major:
 * K in chunks of SP24_KC = 128 columns (64 values per row), chunk c (values t0 = 64c .. t0+cnt-1) holds the cnt
 * values of row 0, then of row 1, ... at vals + N*t0 + n*cnt, and off (same layout, one byte per value) is the
 * value's column within its chunk.  So each pass over one chunk reads the weights sequentially.  Two loops, by
 * the number of rows M:
 *   - few rows (M <= SP24_PERM_ROWS): 8 values at a time (4 groups, 16 columns): the 16 x values of those
 *     columns are two AVX2 registers; one permute of each by the low 3 bits of off (the column's position in its
 *     8-column half) and a blend give the 8 x values the 8 weights multiply.  x is read with Kp columns (the
 *     caller pads a K < Kp).
 *   - more rows: x is transposed (up to SP24_BLOCK_ROWS rows at a time) into tiles of up to SP24_TILE rows (the
 *     rows of one column contiguous, zeros in the pad); for each tile and each chunk -- the chunk of the tile is
 *     16 KB and stays in L1 -- every output column takes one broadcast per stored value and (rows / 8)
 *     multiply-adds, 16 values per step; the column sums accumulate over the chunks in a (N, SP24_TILE) buffer.
 * Block-sparse (block_mm): the kept (bm, bk) blocks of block row r are j = crow[r] .. crow[r+1]-1 at block column
 * col[j], stored transposed (bT[j] is (bk, bm)); 16 outputs x up to 4 rows at a time, one broadcast of x and
 * two multiply-adds per block column k.  x is read with nbc*bk columns (the caller pads).  Dropped blocks are
 * never read (an Inf/NaN input reaches only the outputs of blocks that read it).
 * Fused quantized linears (qlinear): the per-token activation quantization of token_quant.c, exact int32 sums of
 * activation codes x weight codes (W8A8: int8 x int8 with vpmaddwd; W4A8: unsigned 4-bit x int8 with
 * vpmaddubsw, int16 partial sums over 8 steps), the scales and bias, and the rounding of the result to the
 * compute dtype, in one call; a register tile of 4 rows x 2 output columns over all of K.
 *
 * Everything parallelizes over output columns with OpenMP where the compiler has it (the thread count comes from
 * the caller: torch's), and releases the GIL.  The AVX2 + FMA loops are compiled with function target
 * attributes on x86-64 GCC/Clang and chosen at run time when the CPU has both (simd()); elsewhere plain C loops
 * compute the same sums (slower than a BLAS dense matmul: the Python side uses these kernels only when simd() is
 * true).  Float32 sums run in another order than a dense matmul's (results agree to float32 rounding, not bit
 * for bit); the integer sums are exact.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(_WIN32)
#include <malloc.h>
#endif
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "sparse_mm.h"

#define SP24_PERM_ROWS 3
#define SP24_TILE 32 /* rows per tile of the transposed loop */
#define SP24_KC 128  /* columns per chunk of the stored values (sparsekit/ops/_cpu_ext.py: SP24_CHUNK) */
#define SP24_BLOCK_ROWS 1024 /* rows transposed at a time (the copy: 4 KB per input column) */
#define BLK_COLS 16  /* output columns per block tile */

#if defined(__x86_64__) && defined(__GNUC__)
#define SK_X86 1
#include <immintrin.h>
#define SK_AVX __attribute__((target("avx2,fma")))
#define SK_INLINE static inline __attribute__((always_inline))
#else
#define SK_X86 0
#endif

/* This thread's share [*lo, *hi) of n items (inside a parallel region; everything outside one) */
static void
thread_range(long n, long *lo, long *hi)
{
#ifdef _OPENMP
    const long t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const long t = 0, nt = 1;
#endif
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

/* Scratch buffers aligned to a cache line (the AVX2 loops load 32 bytes at multiples of 32 bytes from their
   start: no load splits across two lines); sk_free releases them; NULL when out of memory. */
static void *
sk_alloc(size_t bytes, int zero)
{
    void *p = NULL;
    bytes = (bytes + 63) / 64 * 64;
#if defined(_WIN32)
    p = _aligned_malloc(bytes ? bytes : 64, 64);
#else
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0)
        p = NULL;
#endif
    if (p != NULL && zero)
        memset(p, 0, bytes);
    return p;
}

static void
sk_free(void *p)
{
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

/* set by force_plain() (tests): the plain C loops even where the AVX2 ones run */
static int plain_forced = 0;

static int
cpu_has_simd(void)
{
#if SK_X86
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return cached;
#else
    return 0;
#endif
}

static int
have_simd(void)
{
    return cpu_has_simd() && !plain_forced;
}

/* ------------------------------------------------------------------------------------------------ plain C */
static void
sp24_plain(long M, long N, long kh, long K, const float *x, long ldx, const float *vals, const uint8_t *off,
           const float *bias, float *y, long ldy, int nthreads)
{
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
    for (long n = 0; n < N; ++n) {
        for (long m = 0; m < M; ++m) {
            const float *xm = x + m * ldx;
            float s = 0.f;
            for (long t0 = 0; t0 < kh; t0 += SP24_KC / 2) {
                const long cnt = kh - t0 < SP24_KC / 2 ? kh - t0 : SP24_KC / 2, k0 = 2 * t0;
                const float *v = vals + N * t0 + n * cnt;
                const uint8_t *o = off + N * t0 + n * cnt;
                for (long t = 0; t < cnt; ++t)
                    if (k0 + o[t] < K) /* x is read with K columns here: the padding columns are zeros */
                        s += v[t] * xm[k0 + o[t]];
            }
            y[m * ldy + n] = s + (bias ? bias[n] : 0.f);
        }
    }
}

static void
block_plain(long M, long N, long bm, long bk, const float *x, long ldx, const float *bT, const int64_t *crow,
            const int64_t *col, const float *bias, float *y, long ldy, int nthreads)
{
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
    for (long n = 0; n < N; ++n) {
        const long r = n / bm, i = n % bm;
        for (long m = 0; m < M; ++m) {
            float s = 0.f;
            for (int64_t j = crow[r]; j < crow[r + 1]; ++j) {
                const float *w = bT + j * bm * bk + i;
                const float *xm = x + m * ldx + col[j] * bk;
                for (long k = 0; k < bk; ++k)
                    s += w[k * bm] * xm[k];
            }
            y[m * ldy + n] = s + (bias ? bias[n] : 0.f);
        }
    }
}

/* int8 activation codes x int8 weight codes (N, kp), exact int32 sums (kp a multiple of 16, zero padded) */
static void
w8_plain(long M, long N, long kp, const int16_t *xi, const int8_t *q, float *y, long ldy, int nthreads)
{
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
    for (long n = 0; n < N; ++n)
        for (long m = 0; m < M; ++m) {
            int32_t s = 0;
            for (long k = 0; k < kp; ++k)
                s += (int32_t)q[n * kp + k] * xi[m * kp + k];
            y[m * ldy + n] = (float)s;
        }
}

/* the code of column k in a row of the 32-column nibble layout (byte i of block b: columns 32b+i, 32b+16+i) */
static inline int
w4_code(const uint8_t *qr, long k)
{
    const uint8_t b = qr[(k >> 5) * 16 + (k & 15)];
    return (k & 16) ? b >> 4 : b & 15;
}

/* int8 activation codes x int4 weight codes: sum_g scale_g * sum_k x * code, exact inner sums (the zero terms are
   the caller's) */
static void
w4_plain(long M, long N, long kp, long gs, const int8_t *xi, const uint8_t *q, const float *sc, float *y, long ldy,
         int nthreads)
{
    const long G = kp / gs;
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
    for (long n = 0; n < N; ++n)
        for (long m = 0; m < M; ++m) {
            float acc = 0.f;
            for (long g = 0; g < G; ++g) {
                int32_t s = 0;
                for (long k = g * gs; k < (g + 1) * gs; ++k)
                    s += w4_code(q + n * (kp / 2), k) * xi[m * kp + k];
                acc += sc[n * G + g] * (float)s;
            }
            y[m * ldy + n] = acc;
        }
}

#if SK_X86
/* ------------------------------------------------------------------------------------------------ AVX2 */
SK_AVX SK_INLINE float
hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the 8 x values that values t .. t+7 multiply: lanes 0-3 from columns 2t .. 2t+7, lanes 4-7 from 2t+8 .. 2t+15 */
SK_AVX SK_INLINE __m256
gather8(const float *xc, __m256i idx)
{
    return _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc), idx),
                           _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 8), idx), 0xF0);
}

/* MB (1..SP24_PERM_ROWS) rows of output column n over one chunk of cnt (a multiple of 4) values: two
   accumulators per row (16 values per step); x points at the chunk's first column */
SK_AVX SK_INLINE void
sp24_perm_chunk(const int MB, const float *v, const uint8_t *o, long cnt, const float *x, long ldx, __m256 *a0,
                __m256 *a1, float *tail)
{
    long t = 0;
    for (; t + 16 <= cnt; t += 16) {
        const __m256 v0 = _mm256_loadu_ps(v + t), v1 = _mm256_loadu_ps(v + t + 8);
        const __m256i i0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(o + t)));
        const __m256i i1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(o + t + 8)));
        for (int m = 0; m < MB; ++m) {
            const float *xc = x + m * ldx + 2 * t;
            a0[m] = _mm256_fmadd_ps(v0, gather8(xc, i0), a0[m]);
            a1[m] = _mm256_fmadd_ps(v1, gather8(xc + 16, i1), a1[m]);
        }
    }
    if (t + 8 <= cnt) {
        const __m256 v0 = _mm256_loadu_ps(v + t);
        const __m256i i0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(o + t)));
        for (int m = 0; m < MB; ++m)
            a0[m] = _mm256_fmadd_ps(v0, gather8(x + m * ldx + 2 * t, i0), a0[m]);
        t += 8;
    }
    for (; t < cnt; ++t) /* cnt % 8 == 4: the last four values */
        for (int m = 0; m < MB; ++m)
            tail[m] += v[t] * x[m * ldx + o[t]];
}

/* MB rows of output column n over one chunk, added to acc[0 .. MB-1] */
SK_AVX SK_INLINE void
sp24_perm_col(const int MB, const float *v, const uint8_t *o, long cnt, const float *x, long ldx, float *acc)
{
    __m256 a0[SP24_PERM_ROWS], a1[SP24_PERM_ROWS];
    float tail[SP24_PERM_ROWS] = {0.f};
    for (int m = 0; m < MB; ++m) {
        a0[m] = _mm256_setzero_ps();
        a1[m] = _mm256_setzero_ps();
    }
    sp24_perm_chunk(MB, v, o, cnt, x, ldx, a0, a1, tail);
    for (int m = 0; m < MB; ++m)
        acc[m] += hsum8(_mm256_add_ps(a0[m], a1[m])) + tail[m];
}

/* chunk by chunk (the weights read sequentially), each thread over its output columns; acc (N, M) */
SK_AVX static int
sp24_perm(long M, long N, long kh, const float *x, long ldx, const float *vals, const uint8_t *off,
          const float *bias, float *y, long ldy, int nthreads)
{
    float *acc = (float *)sk_alloc(sizeof(float) * (size_t)N * (size_t)M, 1);
    if (acc == NULL)
        return -1;
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
    long n0, n1;
    thread_range(N, &n0, &n1);
    for (long t0 = 0; t0 < kh; t0 += SP24_KC / 2) {
        const long cnt = kh - t0 < SP24_KC / 2 ? kh - t0 : SP24_KC / 2;
        const float *xc = x + 2 * t0;
        for (long n = n0; n < n1; ++n) {
            const float *v = vals + N * t0 + n * cnt;
            const uint8_t *o = off + N * t0 + n * cnt;
            switch (M) {
            case 1: sp24_perm_col(1, v, o, cnt, xc, ldx, acc + n); break;
            case 2: sp24_perm_col(2, v, o, cnt, xc, ldx, acc + 2 * n); break;
            default: sp24_perm_col(3, v, o, cnt, xc, ldx, acc + 3 * n); break;
            }
        }
    }
    for (long m = 0; m < M; ++m)
        for (long n = n0; n < n1; ++n)
            y[m * ldy + n] = acc[n * M + m] + (bias ? bias[n] : 0.f);
    }
    sk_free(acc);
    return 0;
}

/* dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block */
SK_AVX SK_INLINE void
transpose8(const float *src, long lds, float *dst, long ldd)
{
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i)
        r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}

/* acc (8*NV floats) = (first) or += the sums of one output column over one chunk of cnt (even) values; xc is the
   chunk of a tile (SP24_KC, 8*NV) */
SK_AVX SK_INLINE void
sp24_t_chunk(const int NV, const float *v, const uint8_t *o, long cnt, const float *xc, float *acc, int first)
{
    const long mt = 8L * NV;
    __m256 a0[SP24_TILE / 8], a1[SP24_TILE / 8];
    for (int j = 0; j < NV; ++j) {
        a0[j] = _mm256_setzero_ps();
        a1[j] = _mm256_setzero_ps();
    }
    long t = 0;
    /* 16 values per step, their column offsets read as two 64-bit words (unrolled: the loop's scalar work, not
       the multiply-adds, bounded the one-value-pair-per-step loop at about half the FMA rate) */
    for (; t + 16 <= cnt; t += 16) {
        uint64_t ow[2];
        memcpy(ow, o + t, 16);
        for (int h = 0; h < 2; ++h)
            for (int u = 0; u < 8; u += 2) {
                const __m256 w0 = _mm256_broadcast_ss(v + t + 8 * h + u);
                const __m256 w1 = _mm256_broadcast_ss(v + t + 8 * h + u + 1);
                const float *x0 = xc + (long)((ow[h] >> (8 * u)) & 255) * mt;
                const float *x1 = xc + (long)((ow[h] >> (8 * u + 8)) & 255) * mt;
                for (int j = 0; j < NV; ++j) {
                    a0[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + 8 * j), a0[j]);
                    a1[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + 8 * j), a1[j]);
                }
            }
    }
    for (; t < cnt; t += 2) {
        const __m256 w0 = _mm256_broadcast_ss(v + t), w1 = _mm256_broadcast_ss(v + t + 1);
        const float *x0 = xc + (long)o[t] * mt, *x1 = xc + (long)o[t + 1] * mt;
        for (int j = 0; j < NV; ++j) {
            a0[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + 8 * j), a0[j]);
            a1[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + 8 * j), a1[j]);
        }
    }
    for (int j = 0; j < NV; ++j) {
        __m256 r = _mm256_add_ps(a0[j], a1[j]);
        if (!first)
            r = _mm256_add_ps(r, _mm256_loadu_ps(acc + 8 * j));
        _mm256_storeu_ps(acc + 8 * j, r);
    }
}

SK_AVX static int
sp24_trans(long M, long N, long kh, long K, const float *x, long ldx, const float *vals, const uint8_t *off,
           const float *bias, float *y, long ldy, int nthreads)
{
    const long kp = 2 * kh;
    /* rows in blocks of at most SP24_BLOCK_ROWS (the transposed copy's size); tile i of a block: its rows
       SP24_TILE*i .. (at most SP24_TILE), transposed (kp, mt) with mt = the rows rounded up to 8 */
    const long mblk = ((M < SP24_BLOCK_ROWS ? M : SP24_BLOCK_ROWS) + SP24_TILE - 1) / SP24_TILE * SP24_TILE;
    float *xT = (float *)sk_alloc(sizeof(float) * (size_t)kp * (size_t)mblk, 0);
    float *acc = (float *)sk_alloc(sizeof(float) * (size_t)N * SP24_TILE, 0);
    if (xT == NULL || acc == NULL) {
        sk_free(xT);
        sk_free(acc);
        return -1;
    }
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
    long lo, hi, n0, n1;
    thread_range(kp / 8, &lo, &hi); /* kp is a multiple of 8: 8-column blocks */
    lo *= 8;
    hi *= 8;
    thread_range(N, &n0, &n1);
    for (long b0 = 0; b0 < M; b0 += SP24_BLOCK_ROWS) {
        const long bm = M - b0 < SP24_BLOCK_ROWS ? M - b0 : SP24_BLOCK_ROWS;
        const long ntiles = (bm + SP24_TILE - 1) / SP24_TILE;
        const float *xb = x + b0 * ldx;
        float *yb = y + b0 * ldy;
        if (b0 > 0) {
#ifdef _OPENMP
#pragma omp barrier /* every thread done with the previous block's copy */
#endif
        }
        for (long i = 0; i < ntiles; ++i) {
            const long r0 = i * SP24_TILE, rr = bm - r0 < SP24_TILE ? bm - r0 : SP24_TILE, mt = (rr + 7) / 8 * 8;
            float *xt = xT + r0 * kp;
            for (long r = 0; r < mt; r += 8) {
                const float *xr = xb + (r0 + r) * ldx;
                long k = lo;
                if (r + 8 <= rr)
                    for (; k + 8 <= hi && k + 8 <= K; k += 8)
                        transpose8(xr + k, ldx, xt + k * mt + r, mt);
                for (; k < hi; ++k)
                    for (long j = r; j < r + 8; ++j)
                        xt[k * mt + j] = j < rr && k < K ? xb[(r0 + j) * ldx + k] : 0.f;
            }
        }
#ifdef _OPENMP
#pragma omp barrier
#endif
        for (long i = 0; i < ntiles; ++i) {
            const long r0 = i * SP24_TILE, rr = bm - r0 < SP24_TILE ? bm - r0 : SP24_TILE, mt = (rr + 7) / 8 * 8;
            const int nv = (int)(mt / 8);
            const float *xt = xT + r0 * kp;
            for (long t0 = 0; t0 < kh; t0 += SP24_KC / 2) {
                const long cnt = kh - t0 < SP24_KC / 2 ? kh - t0 : SP24_KC / 2;
                const float *xc = xt + 2 * t0 * mt;
                const int first = t0 == 0;
                for (long n = n0; n < n1; ++n) {
                    const float *v = vals + N * t0 + n * cnt;
                    const uint8_t *o = off + N * t0 + n * cnt;
                    float *a = acc + n * SP24_TILE;
                    switch (nv) {
                    case 1: sp24_t_chunk(1, v, o, cnt, xc, a, first); break;
                    case 2: sp24_t_chunk(2, v, o, cnt, xc, a, first); break;
                    case 3: sp24_t_chunk(3, v, o, cnt, xc, a, first); break;
                    default: sp24_t_chunk(4, v, o, cnt, xc, a, first); break;
                    }
                }
            }
            for (long r = 0; r < rr; ++r) {
                float *yr = yb + (r0 + r) * ldy;
                for (long n = n0; n < n1; ++n)
                    yr[n] = acc[n * SP24_TILE + r] + (bias ? bias[n] : 0.f);
            }
        }
    }
    }
    sk_free(xT);
    sk_free(acc);
    return 0;
}

/* BLK_COLS outputs (columns c0 .. c0+15 of block row r) for MB (1..4) rows */
SK_AVX SK_INLINE void
block_tile(const int MB, const float *bT, const int64_t *crow, const int64_t *col, long r, long c0, long bm,
           long bk, const float *x, long ldx, float *out)
{
    __m256 a[4][2];
    for (int m = 0; m < MB; ++m) {
        a[m][0] = _mm256_setzero_ps();
        a[m][1] = _mm256_setzero_ps();
    }
    for (int64_t j = crow[r]; j < crow[r + 1]; ++j) {
        const float *w = bT + j * bm * bk + c0;
        const float *xc = x + col[j] * bk;
        for (long k = 0; k < bk; ++k) {
            const __m256 w0 = _mm256_loadu_ps(w + k * bm), w1 = _mm256_loadu_ps(w + k * bm + 8);
            for (int m = 0; m < MB; ++m) {
                const __m256 xb = _mm256_broadcast_ss(xc + m * ldx + k);
                a[m][0] = _mm256_fmadd_ps(w0, xb, a[m][0]);
                a[m][1] = _mm256_fmadd_ps(w1, xb, a[m][1]);
            }
        }
    }
    for (int m = 0; m < MB; ++m) {
        _mm256_storeu_ps(out + BLK_COLS * m, a[m][0]);
        _mm256_storeu_ps(out + BLK_COLS * m + 8, a[m][1]);
    }
}

SK_AVX static void
block_simd(long M, long N, long bm, long bk, const float *x, long ldx, const float *bT, const int64_t *crow,
           const int64_t *col, const float *bias, float *y, long ldy, int nthreads)
{
    const long nbr = (N + bm - 1) / bm, ct = bm / BLK_COLS, tiles = nbr * ct;
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
    for (long tile = 0; tile < tiles; ++tile) {
        const long r = tile / ct, c0 = (tile % ct) * BLK_COLS, n0 = r * bm + c0;
        if (n0 >= N)
            continue;
        const long nc = N - n0 < BLK_COLS ? N - n0 : BLK_COLS;
        float out[4 * BLK_COLS];
        for (long m0 = 0; m0 < M; m0 += 4) {
            const long mr = M - m0 < 4 ? M - m0 : 4;
            const float *xm = x + m0 * ldx;
            switch (mr) {
            case 4: block_tile(4, bT, crow, col, r, c0, bm, bk, xm, ldx, out); break;
            case 3: block_tile(3, bT, crow, col, r, c0, bm, bk, xm, ldx, out); break;
            case 2: block_tile(2, bT, crow, col, r, c0, bm, bk, xm, ldx, out); break;
            default: block_tile(1, bT, crow, col, r, c0, bm, bk, xm, ldx, out); break;
            }
            for (long m = 0; m < mr; ++m)
                for (long c = 0; c < nc; ++c)
                    y[(m0 + m) * ldy + n0 + c] = out[BLK_COLS * m + c] + (bias ? bias[n0 + c] : 0.f);
        }
    }
}
SK_AVX SK_INLINE int32_t
hsum8i(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* The eight sums of a 4 x 2 tile in one vector, in row-major order (a00, a01, a10, ..., a31). */
SK_AVX SK_INLINE __m256i
reduce_4x2i(__m256i a00, __m256i a01, __m256i a10, __m256i a11, __m256i a20, __m256i a21, __m256i a30, __m256i a31)
{
    const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a00, a01), _mm256_hadd_epi32(a10, a11));
    const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a20, a21), _mm256_hadd_epi32(a30, a31));
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

SK_AVX SK_INLINE __m256
reduce_4x2(__m256 a00, __m256 a01, __m256 a10, __m256 a11, __m256 a20, __m256 a21, __m256 a30, __m256 a31)
{
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a00, a01), _mm256_hadd_ps(a10, a11));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a20, a21), _mm256_hadd_ps(a30, a31));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* v = (y00, y01, y10, y11, y20, y21, y30, y31) to rows 0..3 of out (stride ldy), two columns each */
SK_AVX SK_INLINE void
store_4x2(__m256 v, float *out, long ldy)
{
    const __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    _mm_storel_pi((__m64 *)out, lo);
    _mm_storeh_pi((__m64 *)(out + ldy), lo);
    _mm_storel_pi((__m64 *)(out + 2 * ldy), hi);
    _mm_storeh_pi((__m64 *)(out + 3 * ldy), hi);
}

/* Both integer matmuls run a register tile of MB (1..4) rows x NB (1..2) output columns over all of K (the NB
   weight rows stay in L1), for m blocks of mc rows (their codes stay in L1 / L2: qmc()) and all column pairs in
   parallel. */
static long
qmc(long row_bytes)
{
    long mc = 32768 / row_bytes;
    mc = mc < 16 ? 16 : mc > 64 ? 64 : mc;
    return mc / 4 * 4;
}

/* int8 x int8 codes: 16 products per vpmaddwd, exact int32 sums */
SK_AVX SK_INLINE void
w8_tile(const int MB, const int NB, const int8_t *q, long kp, const int16_t *xi, float *out, long ldy)
{
    __m256i a[4][2];
    for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NB; ++j)
            a[m][j] = _mm256_setzero_si256();
    for (long k = 0; k < kp; k += 16) {
        __m256i w[2];
        for (int j = 0; j < NB; ++j)
            w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + j * kp + k)));
        for (int m = 0; m < MB; ++m) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xi + m * kp + k));
            for (int j = 0; j < NB; ++j)
                a[m][j] = _mm256_add_epi32(a[m][j], _mm256_madd_epi16(w[j], xv));
        }
    }
    if (MB == 4 && NB == 2) {
        store_4x2(_mm256_cvtepi32_ps(reduce_4x2i(a[0][0], a[0][1], a[1][0], a[1][1], a[2][0], a[2][1], a[3][0],
                                                 a[3][1])), out, ldy);
        return;
    }
    for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NB; ++j)
            out[m * ldy + j] = (float)hsum8i(a[m][j]);
}

SK_AVX static void
w8_simd(long M, long N, long kp, const int16_t *xi, const int8_t *q, float *y, long ldy, int nthreads)
{
    const long pairs = (N + 1) / 2, mc = qmc(kp * 2);
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
    long p0, p1;
    thread_range(pairs, &p0, &p1);
    for (long m0 = 0; m0 < M; m0 += mc) {
        const long mr = M - m0 < mc ? M - m0 : mc;
        for (long p = p0; p < p1; ++p) {
            const long n = 2 * p;
            const int two = n + 1 < N;
            for (long m = m0; m < m0 + mr; m += 4) {
                const int mb = (int)(m0 + mr - m < 4 ? m0 + mr - m : 4);
                const int16_t *xm = xi + m * kp;
                float *out = y + m * ldy + n;
                const int8_t *qn = q + n * kp;
#define W8_CASE(MB_)                                                                                                   \
    case MB_:                                                                                                          \
        if (two)                                                                                                       \
            w8_tile(MB_, 2, qn, kp, xm, out, ldy);                                                                     \
        else                                                                                                           \
            w8_tile(MB_, 1, qn, kp, xm, out, ldy);                                                                     \
        break;
                switch (mb) {
                    W8_CASE(4)
                    W8_CASE(3)
                    W8_CASE(2)
                    W8_CASE(1)
                }
#undef W8_CASE
            }
        }
    }
    }
}

#define W4_CHUNK 8

/* int8 activation codes x int4 weights: 32 products per vpmaddubsw (codes 0..15 unsigned, activations signed:
   pair sums within int16), exact int32 sums per group, float32 across groups */
SK_AVX SK_INLINE void
w4_tile(const int MB, const int NB, const int PRE, const uint8_t *q, const float *sc, long kp, long gs,
        const int8_t *xi, float *out, long ldy)
{
    const long G = kp / gs;
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i nib = _mm_set1_epi8(15);
    __m256 f[4][2];
    for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NB; ++j)
            f[m][j] = _mm256_setzero_ps();
    for (long g = 0; g < G; ++g) {
        const float *sg = sc + g;
        for (long k0 = g * gs; k0 < (g + 1) * gs; k0 += W4_CHUNK * 32) {
            /* int16 pair sums of vpmaddubsw (|.| <= 15 * 127 * 2 = 3810) added in int16 over W4_CHUNK steps
               (<= 30480: no overflow), widened once per chunk */
            const long k1 = k0 + W4_CHUNK * 32 < (g + 1) * gs ? k0 + W4_CHUNK * 32 : (g + 1) * gs;
            __m256i a[4][2];
            for (int m = 0; m < MB; ++m)
                for (int j = 0; j < NB; ++j)
                    a[m][j] = _mm256_setzero_si256();
            for (long k = k0; k < k1; k += 32) {
                __m256i w[2];
                for (int j = 0; j < NB; ++j) {
                    if (PRE) { /* q: the rows' codes decoded to one byte each (w4_decode), row stride kp */
                        w[j] = _mm256_loadu_si256((const __m256i *)(q + j * kp + k));
                    } else {
                        const __m128i b = _mm_loadu_si128((const __m128i *)(q + j * (kp / 2) + k / 2));
                        w[j] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), nib), _mm_and_si128(b, nib));
                    }
                }
                for (int m = 0; m < MB; ++m) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xi + m * kp + k));
                    for (int j = 0; j < NB; ++j)
                        a[m][j] = _mm256_add_epi16(a[m][j], _mm256_maddubs_epi16(w[j], xv));
                }
            }
            for (int j = 0; j < NB; ++j) {
                const __m256 sv = _mm256_set1_ps(sg[j * G]);
                for (int m = 0; m < MB; ++m)
                    f[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a[m][j], ones)), sv, f[m][j]);
            }
        }
    }
    if (MB == 4 && NB == 2) {
        store_4x2(reduce_4x2(f[0][0], f[0][1], f[1][0], f[1][1], f[2][0], f[2][1], f[3][0], f[3][1]), out, ldy);
        return;
    }
    for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NB; ++j)
            out[m * ldy + j] = hsum8(f[m][j]);
}

/* nrows packed rows of q (32-column nibble blocks) to one byte per code in natural column order */
SK_AVX static void
w4_decode(const uint8_t *q, long nrows, long kp, uint8_t *out)
{
    const __m128i nib = _mm_set1_epi8(15);
    for (long r = 0; r < nrows; ++r)
        for (long k = 0; k < kp; k += 32) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(q + r * (kp / 2) + k / 2));
            _mm_storeu_si128((__m128i *)(out + r * kp + k), _mm_and_si128(b, nib));
            _mm_storeu_si128((__m128i *)(out + r * kp + k + 16), _mm_and_si128(_mm_srli_epi16(b, 4), nib));
        }
}

SK_AVX static int
w4_simd(long M, long N, long kp, long gs, const int8_t *xi, const uint8_t *q, const float *sc, float *y, long ldy,
        int nthreads)
{
    const long G = kp / gs, pairs = (N + 1) / 2, mc = qmc(kp);
    int rc = 0;
    (void)nthreads;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) reduction(| : rc)
#endif
    {
        long p0, p1;
        thread_range(pairs, &p0, &p1);
        /* with more than one tile of rows, a column pair's codes are decoded once per m block (one byte each)
           instead of once per tile */
        uint8_t *wd = M > 4 ? (uint8_t *)sk_alloc((size_t)(2 * kp), 0) : NULL;
        if (M > 4 && wd == NULL)
            rc = 1;
        for (long m0 = 0; m0 < M && !rc; m0 += mc) {
            const long mr = M - m0 < mc ? M - m0 : mc;
            for (long p = p0; p < p1; ++p) {
                const long n = 2 * p;
                const int two = n + 1 < N;
                const float *sn = sc + n * G;
                const int pre = wd != NULL && mr > 4;
                const uint8_t *qn = q + n * (kp / 2);
                if (pre) {
                    w4_decode(qn, two ? 2 : 1, kp, wd);
                    qn = wd;
                }
                for (long m = m0; m < m0 + mr; m += 4) {
                    const int mb = (int)(m0 + mr - m < 4 ? m0 + mr - m : 4);
                    const int8_t *xm = xi + m * kp;
                    float *out = y + m * ldy + n;
#define W4_CALL(MB_, NB_)                                                                                              \
    do {                                                                                                               \
        if (pre)                                                                                                       \
            w4_tile(MB_, NB_, 1, qn, sn, kp, gs, xm, out, ldy);                                                        \
        else                                                                                                           \
            w4_tile(MB_, NB_, 0, qn, sn, kp, gs, xm, out, ldy);                                                        \
    } while (0)
#define W4_CASE(MB_)                                                                                                   \
    case MB_:                                                                                                          \
        if (two)                                                                                                       \
            W4_CALL(MB_, 2);                                                                                           \
        else                                                                                                           \
            W4_CALL(MB_, 1);                                                                                           \
        break;
                    switch (mb) {
                        W4_CASE(4)
                        W4_CASE(3)
                        W4_CASE(2)
                        W4_CASE(1)
                    }
#undef W4_CASE
#undef W4_CALL
                }
            }
        }
        sk_free(wd);
    }
    return rc ? -1 : 0;
}
#endif /* SK_X86 */

/* ------------------------------------------------------------------------------------------------ Python */
/* n integer arguments (addresses or sizes) into out[]; -1 and an exception on failure */
static int
int_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t n, const char *name, Py_ssize_t *out)
{
    if (nargs != n) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, n, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
        out[i] = PyLong_AsSsize_t(args[i]);
        if (out[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

#define PTR(v) ((void *)(uintptr_t)(v))

PyObject *
sk_simd(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(cpu_has_simd());
}

PyObject *
sk_force_plain(PyObject *self, PyObject *flag)
{
    (void)self;
    const int v = PyObject_IsTrue(flag);
    if (v < 0)
        return NULL;
    plain_forced = v;
    Py_RETURN_NONE;
}

PyObject *
sk_openmp(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

PyObject *
sk_sp24_mm(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    /* x, M, K, ldx, vals, off, kh, N, bias (0: none), y, nthreads */
    Py_ssize_t a[11];
    if (int_args(args, nargs, 11, "sp24_mm", a) < 0)
        return NULL;
    const long M = (long)a[1], K = (long)a[2], ldx = (long)a[3], kh = (long)a[6], N = (long)a[7];
    const int nthreads = a[10] < 1 ? 1 : (int)a[10];
    /* the few-rows loop reads x with 2*kh columns (the caller pads), the others with K */
    const int perm = have_simd() && M <= SP24_PERM_ROWS;
    if (M < 0 || N < 0 || kh < 0 || K < 0 || K > 2 * kh || (kh & 3) || ldx < (perm ? 2 * kh : K)) {
        PyErr_Format(PyExc_ValueError, "sp24_mm(): bad sizes M=%ld N=%ld K=%ld kh=%ld ldx=%ld", M, N, K, kh, ldx);
        return NULL;
    }
    if (M == 0 || N == 0)
        Py_RETURN_NONE;
    const float *x = PTR(a[0]), *vals = PTR(a[4]), *bias = PTR(a[8]);
    const uint8_t *off = PTR(a[5]);
    float *y = PTR(a[9]);
    int rc = 0;
    PyThreadState *ts = PyEval_SaveThread();
#if SK_X86
    if (perm)
        rc = sp24_perm(M, N, kh, x, ldx, vals, off, bias, y, N, nthreads);
    else if (have_simd())
        rc = sp24_trans(M, N, kh, K, x, ldx, vals, off, bias, y, N, nthreads);
    else
#endif
        sp24_plain(M, N, kh, K, x, ldx, vals, off, bias, y, N, nthreads);
    PyEval_RestoreThread(ts);
    if (rc < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyObject *
sk_block_mm(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    /* x, M, ldx, bT, crow, col, N, bm, bk, bias (0: none), y, nthreads */
    Py_ssize_t a[12];
    if (int_args(args, nargs, 12, "block_mm", a) < 0)
        return NULL;
    const long M = (long)a[1], ldx = (long)a[2], N = (long)a[6], bm = (long)a[7], bk = (long)a[8];
    const int nthreads = a[11] < 1 ? 1 : (int)a[11];
    if (M < 0 || N < 0 || bm < BLK_COLS || bm % BLK_COLS || bk < 1 || ldx < bk) {
        PyErr_Format(PyExc_ValueError, "block_mm(): bad sizes M=%ld N=%ld bm=%ld bk=%ld ldx=%ld", M, N, bm, bk, ldx);
        return NULL;
    }
    if (M == 0 || N == 0)
        Py_RETURN_NONE;
    const float *x = PTR(a[0]), *bT = PTR(a[3]), *bias = PTR(a[9]);
    const int64_t *crow = PTR(a[4]), *col = PTR(a[5]);
    float *y = PTR(a[10]);
    PyThreadState *ts = PyEval_SaveThread();
#if SK_X86
    if (have_simd())
        block_simd(M, N, bm, bk, x, ldx, bT, crow, col, bias, y, N, nthreads);
    else
#endif
        block_plain(M, N, bm, bk, x, ldx, bT, crow, col, bias, y, N, nthreads);
    PyEval_RestoreThread(ts);
    Py_RETURN_NONE;
}

/*
 * The fused quantized linear: per-token activation quantization (sk_token_quant, bit-identical to the torch
 * chain; the input first rounded to float16 / bfloat16 where round_in says so), the matmul over the codes, the
 * epilogue and the rounding of the result to the compute dtype (round_out), in one call:
 *   kind 0 (W8A8): int8 weight codes q (N, kp), exact int32 sums;  y = sum * (s_tok * col_scale) + bias
 *   kind 1 (W4A8): int4 weights, 32-column nibble blocks (N, kp/2), float32 group scales (N, G) and the products
 *                  scale * zero transposed (G, N), exact int32 sums per group;
 *                  y = s_tok * (sum_g scale_g * sum_g - sum_g (scale_g * zero_g) * sum of the group's codes) + bias
 * (2:4+int8 layers run kind 0 over their codes expanded to a dense int8 matrix.)
 * A row whose input holds Inf/NaN (a non-finite token scale) comes out NaN, as the matmul over its NaN codes
 * gives.  Scratch buffers are allocated per call.  Returns 0, or -1 when out of memory.
 */
static int
qlinear_run(int kind, const float *x, long M, long K, const void *w, const void *aux1, const void *aux2, long gs,
            long N, const float *cs, const float *bias, float *y, float qmax, int rin, int rout, int nthreads)
{
    const long kp = kind == 0 ? (K + 15) / 16 * 16 : (K + gs - 1) / gs * gs; /* padded columns */
    const long G = kind == 1 ? kp / gs : 1;
    const size_t esz = kind == 0 ? sizeof(int16_t) : sizeof(int8_t);
    float *codes = (float *)sk_alloc(sizeof(float) * (size_t)(M * K + M), 0);
    void *xi = sk_alloc((size_t)(M * kp) * esz, 1);
    int32_t *xsum = (int32_t *)sk_alloc(sizeof(int32_t) * (size_t)(M * G), 1);
    if (codes == NULL || xi == NULL || xsum == NULL) {
        sk_free(codes);
        sk_free(xi);
        sk_free(xsum);
        return -1;
    }
    float *scale = codes + M * K;
    /* rows in parallel where there are many (each row's quantization is independent) */
    const int par = M >= 8 && M * K >= 65536 ? nthreads : 1;
    (void)par;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(par)
#endif
    for (long m = 0; m < M; ++m) {
        const float *cm = codes + m * K;
        sk_token_quant(x + m * K, codes + m * K, scale + m, 1, K, qmax, rin);
        /* integer codes, zero padded to kp (a NaN code of a non-finite row becomes 0: that row is NaN below) */
        if (kind == 0) {
            int16_t *xm = (int16_t *)xi + m * kp;
            for (long k = 0; k < K; ++k)
                xm[k] = (int16_t)(cm[k] == cm[k] ? cm[k] : 0.f);
        } else {
            int8_t *xm = (int8_t *)xi + m * kp;
            for (long k = 0; k < K; ++k)
                xm[k] = (int8_t)(cm[k] == cm[k] ? cm[k] : 0.f);
            for (long g = 0; g < G; ++g) {
                int32_t t = 0;
                for (long k = g * gs; k < (g + 1) * gs && k < K; ++k)
                    t += xm[k];
                xsum[m * G + g] = t;
            }
        }
    }
    int rc = 0;
#if SK_X86
    if (have_simd() && kind == 0)
        w8_simd(M, N, kp, (const int16_t *)xi, (const int8_t *)w, y, N, nthreads);
    else if (have_simd())
        rc = w4_simd(M, N, kp, gs, (const int8_t *)xi, (const uint8_t *)w, (const float *)aux1, y, N, nthreads);
    else
#endif
        if (kind == 0)
        w8_plain(M, N, kp, (const int16_t *)xi, (const int8_t *)w, y, N, nthreads);
    else
        w4_plain(M, N, kp, gs, (const int8_t *)xi, (const uint8_t *)w, (const float *)aux1, y, N, nthreads);
    if (rc < 0) {
        sk_free(codes);
        sk_free(xi);
        sk_free(xsum);
        return -1;
    }
    const int parn = M >= 8 && M * N >= 65536 ? nthreads : 1;
    (void)parn;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(parn)
#endif
    for (long m = 0; m < M; ++m) {
        const float s = scale[m];
        float *ym = y + m * N;
        if (!(s - s == 0.f)) { /* Inf or NaN scale: an input row with Inf/NaN */
            for (long n = 0; n < N; ++n)
                ym[n] = NAN;
        } else if (kind == 1) {
            /* the zero terms: sum_g (scale_g * zero_g) * (sum of the group's codes), aux2 = (G, N) products */
            const float *sz = (const float *)aux2;
            for (long g = 0; g < G; ++g) {
                const float xs = (float)xsum[m * G + g];
                for (long n = 0; n < N; ++n)
                    ym[n] -= sz[g * N + n] * xs;
            }
            if (bias)
                for (long n = 0; n < N; ++n)
                    ym[n] = s * ym[n] + bias[n];
            else
                for (long n = 0; n < N; ++n)
                    ym[n] = s * ym[n];
        } else if (bias) {
            for (long n = 0; n < N; ++n)
                ym[n] = ym[n] * (s * cs[n]) + bias[n];
        } else {
            for (long n = 0; n < N; ++n)
                ym[n] = ym[n] * (s * cs[n]);
        }
        if (rout)
            sk_round(ym, N, rout);
    }
    sk_free(codes);
    sk_free(xi);
    sk_free(xsum);
    return 0;
}

PyObject *
sk_qlinear(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    /* kind, x, M, K, w, aux1, aux2, gs, N, col_scale, bias, y, qmax, round_in, round_out, nthreads */
    Py_ssize_t a[16];
    if (int_args(args, nargs, 16, "qlinear", a) < 0)
        return NULL;
    const int kind = (int)a[0];
    const long M = (long)a[2], K = (long)a[3], gs = (long)a[7], N = (long)a[8];
    const int rin = (int)a[13], rout = (int)a[14], nthreads = a[15] < 1 ? 1 : (int)a[15];
    const int sizes_ok = kind == 0   ? K >= 1 && K <= 65536
                         : kind == 1 ? gs >= 32 && gs % 32 == 0 && K >= 1 && K <= 65536 && (K + gs - 1) / gs * gs >= K
                                     : 0;
    if (!sizes_ok || M < 0 || N < 0 || (a[12] != 127 && a[12] != 7) || rin < 0 || rin > 2 || rout < 0 || rout > 2 ||
        (kind == 0 && a[9] == 0)) {
        PyErr_Format(PyExc_ValueError, "qlinear(): bad arguments kind=%d M=%ld K=%ld gs=%ld N=%ld", kind, M, K, gs, N);
        return NULL;
    }
    if (M == 0 || N == 0)
        Py_RETURN_NONE;
    PyThreadState *ts = PyEval_SaveThread();
    const int rc = qlinear_run(kind, PTR(a[1]), M, K, PTR(a[4]), PTR(a[5]), PTR(a[6]), gs, N, PTR(a[9]), PTR(a[10]),
                               PTR(a[11]), (float)a[12], rin, rout, nthreads);
    PyEval_RestoreThread(ts);
    if (rc < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyObject *
sk_all_finite(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    /* x, n: whether the n contiguous float32 values at x are all finite */
    Py_ssize_t a[2];
    if (int_args(args, nargs, 2, "all_finite", a) < 0)
        return NULL;
    const uint32_t *u = PTR(a[0]);
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < a[1]; ++i)
        bad |= (uint32_t)((u[i] & 0x7f800000u) == 0x7f800000u);
    return PyBool_FromLong(!bad);
}
