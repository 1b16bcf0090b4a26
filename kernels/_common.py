"""Triton helpers shared by the kernel families.

Imported normally (compiled mode) by every kernel module, including the
interpreter copies that :func:`sparsekit.kernels.load` makes: while an
interpreted launch runs, calls to these ``@triton.jit`` helpers are forwarded
to interpreted copies of them (see ``kernels/__init__.py``).
"""
import triton
import triton.language as tl


@triton.jit
def dot_acc(a, b, acc, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr):
    """acc += a @ b with fp32 accumulation.

    IEEE: full-precision fp32 products (no TF32).  INTERP_BF16 (interpreter
    launches with bf16 operands only): the Triton interpreter's bf16
    ``tl.dot`` is wrong, so the operands are widened to fp32 first -- exact
    for bf16 inputs, so the math is unchanged.
    """
    if INTERP_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def cast_out(acc, OUT_DTYPE: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 -> output dtype, round to nearest even.

    The interpreter truncates fp32 -> bf16 casts, so interpreted bf16 launches
    round by hand: add 0x7FFF plus the kept LSB to the bit pattern, then keep
    the high half.  Compiled launches use the hardware conversion.
    """
    if INTERP_BF16:
        bits = acc.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return acc.to(OUT_DTYPE)


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) for a 1-D launch in grouped order: GROUP_M consecutive
    M tiles walk the N tiles together, so each weight tile is reused from L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    return pid_m, pid_n


@triton.jit
def store_tile(acc, Y, B, offs_m, offs_n, M, N, stride_ym, stride_yn, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, INTERP_BF16: tl.constexpr):
    """Epilogue of the linear kernels: ``Y[offs_m, offs_n] = acc (+ bias)``.

    SPLIT_K == 1: bias added in fp32, cast to Y's dtype (:func:`cast_out`) and
    stored.  SPLIT_K > 1: Y is a zeroed fp32 buffer and every K-slice program
    adds its partial sum with fp32 atomics; only slice 0 adds the bias.
    """
    ymask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    yp = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(yp, cast_out(acc, Y.dtype.element_ty, INTERP_BF16), mask=ymask)
    else:
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(yp, acc, mask=ymask)
