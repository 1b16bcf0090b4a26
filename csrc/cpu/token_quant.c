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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

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
"token_quant(x_ptr, codes_ptr, scale_ptr, rows, k, qmax) -> None\n"
"\n"
"Per-token symmetric quantization of a contiguous float32 (rows, k) matrix at\n"
"address x_ptr: writes the float32 codes (rows, k) at codes_ptr and the float32\n"
"scales (rows,) at scale_ptr.  qmax is the integer code bound (127 for 8 bits,\n"
"7 for 4 bits).  The arguments are trusted: use sparsekit.ops._cpu_ext.token_quant.");

static PyObject *
token_quant(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "token_quant() takes 6 arguments (%zd given)", nargs);
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
        if (rows * k >= RELEASE_GIL_ELEMS) {
            Py_BEGIN_ALLOW_THREADS
            quant_rows((const float *)xp, (float *)cp, (float *)sp, rows, k, (float)qmax);
            Py_END_ALLOW_THREADS
        } else {
            quant_rows((const float *)xp, (float *)cp, (float *)sp, rows, k, (float)qmax);
        }
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"token_quant", (PyCFunction)(void (*)(void))token_quant, METH_FASTCALL, token_quant_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "sparsekit._cpu_ext",
    "Fused per-token activation quantization on CPU (see sparsekit.ops._cpu_ext).",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__cpu_ext(void)
{
    return PyModule_Create(&module);
}
