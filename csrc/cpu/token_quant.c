/*
 * sparsekit._cpu_ext: fused per-token symmetric activation quantization on CPU.
 *
 * Pure C against the CPython C API (no torch, no numpy headers): the Python
 * wrapper (sparsekit/ops/_cpu_ext.py) validates the tensors, allocates the
 * outputs and passes raw data pointers and sizes; this module trusts them.
 *
 * For every row r of a contiguous float32 (rows, k) matrix x, bit-identical to
 *
 *     amax  = amax(|x[r]|)                       NaN anywhere -> NaN, Inf -> Inf
 *     s[r]  = amax == 0 ? 1 : amax / qmax        IEEE float32 division
 *     c[r]  = clamp(round_half_even(x[r] / s[r]), -qmax, qmax)   NaN stays NaN
 *
 * in one fused loop per row (the row stays in L1/L2 between the amax and the
 * codes).  Built with plain -O3 and no -ffast-math: the loops auto-vectorize
 * for the baseline ISA (SSE2 on x86-64, NEON on aarch64) without changing a
 * bit of the IEEE results.  On x86-64 (glibc) an AVX2 clone of the loop is picked at load time where the
 * CPU has AVX2 (about 2x faster on many rows).
 *
 *   amax: |x| is the bit pattern with the sign cleared; for non-NaN floats the
 *         integer order of those patterns is the float order, and every NaN
 *         pattern is above +Inf's, so an integer max gives amax and makes a
 *         row with a NaN come out NaN (an integer max vectorizes; a float max
 *         with NaN propagation does not without -ffast-math).
 *   code: v = x / s (a true division, never a reciprocal multiply); clamp to
 *         [-qmax, qmax] first (qmax is an integer, and rounding is monotone,
 *         so clamp-then-round equals round-then-clamp; a NaN fails both
 *         comparisons and passes through); then round half to even with
 *         (|v| + 2^23) - 2^23, exact for |v| < 2^23 in the current (default
 *         round-to-nearest-even) mode, and the sign copied back (so -0.3 gives
 *         -0.0, as torch.round does).
 *
 * Optionally the row is first rounded to float16 or bfloat16 and back to float32
 * (bit-identical to x.to(dt).float() in torch, round to nearest even) in the
 * same row loop; round_ does that rounding alone, in place.  Both roundings are
 * integer operations on the float32 bit pattern (no _Float16, no F16C), written
 * as branch-free selects so that they vectorize:
 *
 *   bfloat16: keep the top 16 bits, rounded to nearest even on the 16 dropped
 *         bits: (u + 0x7fff + bit16(u)) & 0xffff0000.  A carry runs into the
 *         exponent (and from the largest finite values to Inf) exactly as in a
 *         float rounding; bfloat16 has float32's exponent range, so float32
 *         subnormals round the same way.
 *   float16: (|x| + M) - M with M = 1.5 * 2^(e + 13), e = max(exponent of
 *         |x|, -14), M built from |x|'s exponent bits: the sum lies in M's
 *         binade, where the float32 ulp is 2^(e - 10), float16's spacing at |x|
 *         (2^-24 for float16 subnormals), so the float32 addition itself rounds
 *         |x| to nearest even at float16's precision (exact float32 arithmetic,
 *         the default rounding mode, no fast-math); a carry into the next binade
 *         comes out right.  |x| >= 65520 (the midpoint from 65504, float16's
 *         largest finite value, to 2^16: ties to even, up) is Inf, as torch
 *         gives; the sign is put back (-1e-9 gives -0.0, as torch gives).
 *   NaN stays NaN (quieted; for bfloat16 its payload truncated to 7 bits, the
 *         sign kept), Inf stays Inf.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "sparse_mm.h"

#if defined(_MSC_VER) && !defined(restrict)
#define restrict __restrict
#endif

/*
 * On x86-64 with glibc, GCC and Clang build the row loop twice (target_clones): for the baseline (SSE2) and for
 * AVX2, chosen once at load time by the CPU's features (an ifunc).  AVX2 alone does not enable FMA, and the loop
 * has no multiply-add to contract anyway, so both clones compute the same IEEE results.
 */
#ifndef SPARSEKIT_CLONES /* -DSPARSEKIT_CLONES= builds the baseline loop only */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define SPARSEKIT_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#endif
#ifndef SPARSEKIT_CLONES
#define SPARSEKIT_CLONES
#endif

/* Above this many elements the GIL is released around the loop. */
#define RELEASE_GIL_ELEMS 16384

/* Rounding modes (the round_to argument of token_quant, the mode of round_). */
#define ROUND_NONE 0
#define ROUND_F16 1
#define ROUND_BF16 2

static inline uint32_t
round_f16_bits(uint32_t u)
{
    const uint32_t a = u & 0x7fffffffu;
    /* the rounding magic 1.5 * 2^(e + 13), e = max(exponent of |x|, -14): its ulp is 2^(e - 10), float16's ulp at
       |x| (2^-24 for float16 subnormals); the exponents of the largest floats, Inf and NaN wrap around into a
       tiny negative magic, which leaves them unchanged (Inf and NaN) or is overridden below (the rest) */
    const int32_t e = (int32_t)(a & 0x7f800000u);
    const uint32_t mb = (uint32_t)(e > 0x38800000 ? e : 0x38800000) + 0x06c00000u;
    float f, m;
    memcpy(&f, &a, sizeof f);
    memcpy(&m, &mb, sizeof m);
    f = (f + m) - m; /* |x| rounded to nearest even at float16's precision; a NaN comes out quiet */
    uint32_t r;
    memcpy(&r, &f, sizeof r);
    /* 65520 <= |x| <= Inf: float16 overflow (65520, the midpoint from 65504 to 2^16, rounds to even, up) */
    const uint32_t big = 0u - (uint32_t)(((int32_t)a >= 0x477ff000) & ((int32_t)a <= 0x7f800000));
    return (u & 0x80000000u) | (r & ~big) | (0x7f800000u & big);
}

static inline uint32_t
round_bf16_bits(uint32_t u)
{
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    /* NaN: quiet, payload cut to 7 bits, the sign kept (the rounding above could carry out of a NaN) */
    return (u & 0x7fffffffu) > 0x7f800000u ? ((u | 0x00400000u) & 0xffff0000u) : r;
}

SPARSEKIT_CLONES static void
round_f16_inplace(float *restrict y, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; ++i) {
        uint32_t u;
        memcpy(&u, y + i, sizeof u);
        u = round_f16_bits(u);
        memcpy(y + i, &u, sizeof u);
    }
}

SPARSEKIT_CLONES static void
round_bf16_inplace(float *restrict y, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; ++i) {
        uint32_t u;
        memcpy(&u, y + i, sizeof u);
        u = round_bf16_bits(u);
        memcpy(y + i, &u, sizeof u);
    }
}

/* The codes of one row (the second half of quant_rows), from xr (which may be cr itself) given amax's bits m. */
static inline float
quant_row_codes(const float *xr, float *cr, Py_ssize_t k, uint32_t m, float qmax)
{
    const float nq = -qmax;
    const float magic = 8388608.0f; /* 2^23 */
    float amax;
    memcpy(&amax, &m, sizeof amax);
    const float s = (m == 0) ? 1.0f : amax / qmax;
    for (Py_ssize_t i = 0; i < k; ++i) {
        float v = xr[i] / s;
        v = v > qmax ? qmax : v;
        v = v < nq ? nq : v;
        float t = (fabsf(v) + magic) - magic;
        cr[i] = copysignf(t, v);
    }
    return s;
}

/*
 * quant_rows with the row first rounded to float16 (mode ROUND_F16) or bfloat16 (ROUND_BF16): the rounded row is
 * written to the codes row (it stays in L1), its amax taken on the way, then the codes overwrite it.
 */
SPARSEKIT_CLONES static void
quant_rows_rounded(const float *restrict x, float *restrict codes, float *restrict scale,
                   Py_ssize_t rows, Py_ssize_t k, float qmax, int mode)
{
    for (Py_ssize_t r = 0; r < rows; ++r) {
        const float *restrict xr = x + r * k;
        float *restrict cr = codes + r * k;
        uint32_t m = 0;
        if (mode == ROUND_F16) {
            for (Py_ssize_t i = 0; i < k; ++i) {
                uint32_t u;
                memcpy(&u, xr + i, sizeof u);
                u = round_f16_bits(u);
                memcpy(cr + i, &u, sizeof u);
                u &= 0x7fffffffu;
                m = u > m ? u : m;
            }
        } else {
            for (Py_ssize_t i = 0; i < k; ++i) {
                uint32_t u;
                memcpy(&u, xr + i, sizeof u);
                u = round_bf16_bits(u);
                memcpy(cr + i, &u, sizeof u);
                u &= 0x7fffffffu;
                m = u > m ? u : m;
            }
        }
        scale[r] = quant_row_codes(cr, cr, k, m, qmax);
    }
}

SPARSEKIT_CLONES static void
quant_rows(const float *restrict x, float *restrict codes, float *restrict scale,
           Py_ssize_t rows, Py_ssize_t k, float qmax)
{
    const float nq = -qmax;
    const float magic = 8388608.0f; /* 2^23 */
    for (Py_ssize_t r = 0; r < rows; ++r) {
        const float *restrict xr = x + r * k;
        float *restrict cr = codes + r * k;

        uint32_t m = 0;
        for (Py_ssize_t i = 0; i < k; ++i) {
            uint32_t a;
            memcpy(&a, xr + i, sizeof a); /* the bits, without breaking aliasing rules */
            a &= 0x7fffffffu;
            m = a > m ? a : m;
        }
        float amax;
        memcpy(&amax, &m, sizeof amax);
        const float s = (m == 0) ? 1.0f : amax / qmax;
        scale[r] = s;

        for (Py_ssize_t i = 0; i < k; ++i) {
            float v = xr[i] / s;
            v = v > qmax ? qmax : v;
            v = v < nq ? nq : v;
            float t = (fabsf(v) + magic) - magic;
            cr[i] = copysignf(t, v);
        }
    }
}

PyDoc_STRVAR(token_quant_doc,
"token_quant(x_ptr, codes_ptr, scale_ptr, rows, k, qmax, mode=0) -> None\n"
"\n"
"Per-token symmetric quantization of a contiguous float32 (rows, k) matrix at\n"
"address x_ptr: writes the float32 codes (rows, k) at codes_ptr and the float32\n"
"scales (rows,) at scale_ptr.  qmax is the integer code bound (127 for 8 bits,\n"
"7 for 4 bits).  mode 1 (2) first rounds x to float16 (bfloat16) values, 0 does\n"
"not.  The arguments are trusted: use sparsekit.ops._cpu_ext.token_quant.");

static PyObject *
token_quant(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6 && nargs != 7) {
        PyErr_Format(PyExc_TypeError, "token_quant() takes 6 or 7 arguments (%zd given)", nargs);
        return NULL;
    }
    void *xp = PyLong_AsVoidPtr(args[0]);
    if (xp == NULL && PyErr_Occurred())
        return NULL;
    void *cp = PyLong_AsVoidPtr(args[1]);
    if (cp == NULL && PyErr_Occurred())
        return NULL;
    void *sp = PyLong_AsVoidPtr(args[2]);
    if (sp == NULL && PyErr_Occurred())
        return NULL;
    Py_ssize_t rows = PyLong_AsSsize_t(args[3]);
    if (rows == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t k = PyLong_AsSsize_t(args[4]);
    if (k == -1 && PyErr_Occurred())
        return NULL;
    long qmax = PyLong_AsLong(args[5]);
    if (qmax == -1 && PyErr_Occurred())
        return NULL;
    long mode = ROUND_NONE;
    if (nargs == 7) {
        mode = PyLong_AsLong(args[6]);
        if (mode == -1 && PyErr_Occurred())
            return NULL;
        if (mode != ROUND_NONE && mode != ROUND_F16 && mode != ROUND_BF16) {
            PyErr_Format(PyExc_ValueError, "token_quant(): mode must be 0 (none), 1 (float16) or 2 (bfloat16), got %ld",
                         mode);
            return NULL;
        }
    }
    if (rows < 0 || k < 1 || qmax < 1 || qmax > 8388607) {
        PyErr_Format(PyExc_ValueError,
                     "token_quant(): need rows >= 0, k >= 1, 1 <= qmax < 2**23; got rows=%zd, k=%zd, qmax=%ld",
                     rows, k, qmax);
        return NULL;
    }
    if (rows > 0 && (xp == NULL || cp == NULL || sp == NULL)) {
        PyErr_SetString(PyExc_ValueError, "token_quant(): null data pointer");
        return NULL;
    }
    if (rows > 0) {
        const int release = rows * k >= RELEASE_GIL_ELEMS;
        PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
        if (mode == ROUND_NONE)
            quant_rows((const float *)xp, (float *)cp, (float *)sp, rows, k, (float)qmax);
        else
            quant_rows_rounded((const float *)xp, (float *)cp, (float *)sp, rows, k, (float)qmax, (int)mode);
        if (release)
            PyEval_RestoreThread(ts);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(round_doc,
"round_(y_ptr, n, mode) -> None\n"
"\n"
"Rounds the n contiguous float32 values at address y_ptr in place to float16\n"
"(mode 1) or bfloat16 (mode 2) values, round to nearest even, as torch's\n"
"y.copy_(y.to(dt).float()).  The arguments are trusted: use\n"
"sparsekit.ops._cpu_ext.round_.");

static PyObject *
round_(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "round_() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    void *yp = PyLong_AsVoidPtr(args[0]);
    if (yp == NULL && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    long mode = PyLong_AsLong(args[2]);
    if (mode == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || (mode != ROUND_F16 && mode != ROUND_BF16)) {
        PyErr_Format(PyExc_ValueError, "round_(): need n >= 0 and mode 1 (float16) or 2 (bfloat16); got n=%zd, mode=%ld",
                     n, mode);
        return NULL;
    }
    if (n > 0 && yp == NULL) {
        PyErr_SetString(PyExc_ValueError, "round_(): null data pointer");
        return NULL;
    }
    if (n > 0) {
        const int release = n >= RELEASE_GIL_ELEMS;
        PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
        if (mode == ROUND_F16)
            round_f16_inplace((float *)yp, n);
        else
            round_bf16_inplace((float *)yp, n);
        if (release)
            PyEval_RestoreThread(ts);
    }
    Py_RETURN_NONE;
}

/* For sparse_mm.c (the fused quantized linears): the row loops above, without the Python layer. */
void
sk_token_quant(const float *x, float *codes, float *scale, Py_ssize_t rows, Py_ssize_t k, float qmax, int mode)
{
    if (mode == ROUND_NONE)
        quant_rows(x, codes, scale, rows, k, qmax);
    else
        quant_rows_rounded(x, codes, scale, rows, k, qmax, mode);
}

void
sk_round(float *y, Py_ssize_t n, int mode)
{
    if (mode == ROUND_F16)
        round_f16_inplace(y, n);
    else if (mode == ROUND_BF16)
        round_bf16_inplace(y, n);
}

static PyMethodDef methods[] = {
    {"token_quant", (PyCFunction)(void (*)(void))token_quant, METH_FASTCALL, token_quant_doc},
    {"round_", (PyCFunction)(void (*)(void))round_, METH_FASTCALL, round_doc},
    SPARSEKIT_SPARSE_MM_METHODS
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "sparsekit._cpu_ext",
    "Fused per-token activation quantization, float16/bfloat16 rounding and 2:4 / block-sparse float32 matmuls on CPU (see sparsekit.ops._cpu_ext).",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__cpu_ext(void)
{
    return PyModule_Create(&module);
}
