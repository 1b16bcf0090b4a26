/* sparsekit._cpu_ext: the sparse matmul entry points (csrc/cpu/sparse_mm.c), registered by token_quant.c. */
#ifndef SPARSEKIT_SPARSE_MM_H
#define SPARSEKIT_SPARSE_MM_H
#include <Python.h>

/* token_quant.c: per-token quantization (mode 0 / 1 float16 / 2 bfloat16 input rounding) and in-place rounding */
void sk_token_quant(const float *x, float *codes, float *scale, Py_ssize_t rows, Py_ssize_t k, float qmax, int mode);
void sk_round(float *y, Py_ssize_t n, int mode);

PyObject *sk_qlinear(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *sk_simd(PyObject *self, PyObject *unused);
PyObject *sk_force_plain(PyObject *self, PyObject *flag);
PyObject *sk_openmp(PyObject *self, PyObject *unused);
PyObject *sk_sp24_mm(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *sk_block_mm(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *sk_all_finite(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

#define SPARSEKIT_SPARSE_MM_METHODS                                                                                  \
    {"simd", sk_simd, METH_NOARGS, "simd() -> bool: whether the AVX2 + FMA sparse matmul loops run on this CPU"},    \
    {"force_plain", sk_force_plain, METH_O,                                                                        \
     "force_plain(flag): run the plain C loops instead of the AVX2 ones (tests)"},                                \
    {"openmp", sk_openmp, METH_NOARGS, "openmp() -> bool: whether the sparse matmuls were built with OpenMP"},       \
    {"sp24_mm", (PyCFunction)(void (*)(void))sk_sp24_mm, METH_FASTCALL,                                            \
     "sp24_mm(x, M, K, ldx, vals, off, kh, N, bias, y, nthreads): y = x @ W^T + bias over 2:4 values "             \
     "(trusted pointers: use sparsekit.ops._cpu_ext)"},                                                             \
    {"block_mm", (PyCFunction)(void (*)(void))sk_block_mm, METH_FASTCALL,                                          \
     "block_mm(x, M, ldx, bT, crow, col, N, bm, bk, bias, y, nthreads): y = x @ W^T + bias over kept blocks "     \
     "(trusted pointers: use sparsekit.ops._cpu_ext)"},                                                             \
    {"qlinear", (PyCFunction)(void (*)(void))sk_qlinear, METH_FASTCALL,                                            \
     "qlinear(kind, x, M, K, w, aux1, aux2, gs, N, col_scale, bias, y, qmax, round_in, round_out, nthreads): "      \
     "per-token activation quantization, the matmul and the epilogue in one call (trusted pointers)"},            \
    {"all_finite", (PyCFunction)(void (*)(void))sk_all_finite, METH_FASTCALL,                                      \
     "all_finite(x, n) -> bool: whether n contiguous float32 values are all finite"},

#endif
