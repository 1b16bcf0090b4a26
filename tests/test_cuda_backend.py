"""Tests of the csrc 2:4 GEMV kernel (``sparsekit.ops._cuda``) against dense math.

GPU tests are marked ``gpu`` and skip without CUDA or without the extension;
the CPU test checks that the backend reports itself unavailable cleanly.

On CPU, where nvcc exists, the kernel source itself also runs: csrc/sparse24/sparse24_gemv.cu is
compiled as host C++ against a small emulation of the CUDA execution model (every thread of a
block a fiber, run until it reaches ``__syncthreads`` or a warp shuffle; blocks one after
another; shared memory NaN-filled before each block) and its launcher is called on CPU tensors
laid out to reach each of its paths (16-byte vector staging of x, scalar staging, scalar weight
loads), with NaN around and between the rows of every input so that a read outside the operands
shows up in the result.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import subprocess
import tempfile

import pytest
import torch

from sparsekit.formats import Sparse24Weight
from sparsekit.ops import _cuda
from sparsekit.prune import mask_2to4

_HAS_CUDA = torch.cuda.is_available()


def _cuda_ok() -> bool:
    return _HAS_CUDA and _cuda.available()


needs_cuda_ext = pytest.mark.skipif(
    not _cuda_ok(),
    reason="needs CUDA and the sparsekit._C extension"
    + ("" if not _HAS_CUDA else f" ({_cuda.unavailable_reason()})"),
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _make(n: int, k: int, dtype, seed: int, bias: bool):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    s = Sparse24Weight.from_dense((w * mask_2to4(w)).to(dtype)).to("cuda")
    b = (torch.randn(n, generator=g) * 0.1).to(dtype).cuda() if bias else None
    return s, b


def _ref(x: torch.Tensor, s: Sparse24Weight, b) -> torch.Tensor:
    y = x.double() @ s.to_dense().double().T
    if b is not None:
        y = y + b.double()
    return y


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _check(out, x, s, b, dtype):
    m, n = x.shape[0], s.shape[0]
    assert out.shape == (m, n) and out.dtype == dtype and out.device == x.device
    assert bool(torch.isfinite(out).all()), "kernel left non-finite outputs"
    ref = _ref(x, s, b)
    err = _rel(out, ref)
    assert err < TOL[dtype], f"relative error {err:.3e} >= {TOL[dtype]:.0e}"
    # no worse than ~2x PyTorch doing the same dense math in the same dtype
    # (fp32 is held to its absolute bound: TF32 may be on for the peer; tiny
    # outputs are too few roundings for a ratio to mean anything)
    if dtype != torch.float32 and m * n >= 64:
        peer = x @ s.to_dense().T
        if b is not None:
            peer = peer + b
        assert err <= 2 * _rel(peer, ref) + 1e-6, f"error {err:.3e} vs torch {_rel(peer, ref):.3e}"


SHAPES_NK = [(1, 5), (17, 37), (4096 + 3, 4096 + 8), (17, 11008), (4096 + 3, 5), (1, 11008)]


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("N,K", SHAPES_NK)
@pytest.mark.parametrize("bias", [False, True])
def test_sparse24_gemv_matches_dense(dtype, M, N, K, bias):
    s, b = _make(N, K, dtype, seed=1000 * M + N + K, bias=bias)
    x = torch.randn(M, K, device="cuda").to(dtype)
    out = _cuda.sparse24_linear(x, s.values, s.meta, K, b)
    torch.cuda.synchronize()
    _check(out, x, s, b, dtype)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(2, 33, 64), (5, 17, 37), (16, 300, 4104), (7, 4099, 1000)])
def test_sparse24_gemv_all_M(dtype, M, N, K):
    # every M tile (1, 2, 4, 8, 16) with a partially used tile
    for m in range(1, M + 1):
        s, b = _make(N, K, dtype, seed=m, bias=m % 2 == 0)
        x = torch.randn(m, K, device="cuda").to(dtype)
        _check(_cuda.sparse24_linear(x, s.values, s.meta, K, b), x, s, b, dtype)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse24_gemv_noncontiguous_x(dtype):
    M, N, K = 4, 129, 200
    s, b = _make(N, K, dtype, seed=7, bias=True)
    big = torch.randn(M, 2 * K, device="cuda").to(dtype)
    x = big[:, ::2]                         # column stride 2
    assert not x.is_contiguous()
    _check(_cuda.sparse24_linear(x, s.values, s.meta, K, b), x, s, b, dtype)
    rows = torch.randn(2 * M, K + 3, device="cuda").to(dtype)
    x2 = rows[::2, 1:K + 1]                 # row pitch 2*(K+3), unit column stride, odd offset
    _check(_cuda.sparse24_linear(x2, s.values, s.meta, K, b), x2, s, b, dtype)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sparse24_gemv_unaligned_values(dtype):
    # values that is not 16-byte aligned takes the scalar-load path
    M, N, K = 3, 65, 256
    s, b = _make(N, K, dtype, seed=11, bias=False)
    buf = torch.empty(s.values.numel() + 1, dtype=dtype, device="cuda")
    vals = buf[1:].view_as(s.values)
    vals.copy_(s.values)
    assert vals.data_ptr() % 16 != 0
    x = torch.randn(M, K, device="cuda").to(dtype)
    _check(_cuda.sparse24_linear(x, vals, s.meta, K, b), x, s, b, dtype)


@pytest.mark.gpu
@needs_cuda_ext
def test_sparse24_gemv_bad_inputs():
    K, N = 64, 32
    s, b = _make(N, K, torch.float16, seed=3, bias=True)
    x = torch.randn(_cuda.MAX_M + 1, K, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"M = 17"):
        _cuda.sparse24_linear(x, s.values, s.meta, K, b)
    x = torch.randn(2, K, device="cuda", dtype=torch.float16)
    with pytest.raises((ValueError, RuntimeError), match="CUDA"):
        _cuda.sparse24_linear(x.cpu(), s.values, s.meta, K, b)
    with pytest.raises((ValueError, RuntimeError), match="CUDA"):
        _cuda.sparse24_linear(x, s.values.cpu(), s.meta.cpu(), K, b)
    with pytest.raises((TypeError, RuntimeError), match="dtype"):
        _cuda.sparse24_linear(x.float(), s.values, s.meta, K, b)
    with pytest.raises((ValueError, RuntimeError), match="columns"):
        _cuda.sparse24_linear(x[:, :-1], s.values, s.meta, K, b)
    with pytest.raises((ValueError, RuntimeError), match="meta"):
        _cuda.sparse24_linear(x, s.values, s.meta[:, :-1], K, b)
    with pytest.raises((ValueError, RuntimeError), match="bias"):
        _cuda.sparse24_linear(x, s.values, s.meta, K, b[:-1])
    with pytest.raises((TypeError, RuntimeError), match="meta must be uint8"):
        _cuda.sparse24_linear(x, s.values, s.meta.to(torch.int16), K, b)


@pytest.mark.gpu
@needs_cuda_ext
def test_sparse24_gemv_empty_and_stream():
    s, b = _make(8, 16, torch.float16, seed=5, bias=True)
    out = _cuda.sparse24_linear(torch.empty(0, 16, device="cuda", dtype=torch.float16), s.values, s.meta, 16, b)
    assert out.shape == (0, 8)
    # runs on the current (non-default) stream
    x = torch.randn(3, 16, device="cuda", dtype=torch.float16)
    st = torch.cuda.Stream()
    with torch.cuda.stream(st):
        out = _cuda.sparse24_linear(x, s.values, s.meta, 16, b)
    st.synchronize()
    _check(out, x, s, b, torch.float16)


def test_cuda_backend_unavailable_without_cuda():
    if _HAS_CUDA:
        pytest.skip("CUDA is available here")
    assert _cuda.available() is False
    reason = _cuda.unavailable_reason()
    assert isinstance(reason, str) and reason
    assert _cuda.MAX_M == 16
    with pytest.raises(RuntimeError, match="unavailable"):
        _cuda.sparse24_linear(torch.zeros(1, 8), torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.uint8), 8, None)


def test_mma_sp_unavailable_without_cuda():
    if _HAS_CUDA:
        pytest.skip("CUDA is available here")
    assert _cuda.has_mma_sp() is False
    x = torch.zeros(32, 64, dtype=torch.float16)
    s = Sparse24Weight.from_dense(torch.zeros(16, 64, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="unavailable"):
        _cuda.sparse24_mma_sp(x, s.values, s.meta, 64, None)
    with pytest.raises(RuntimeError, match="unavailable"):
        _cuda.sparse24_mma_sp_int8(x.to(torch.int8), torch.ones(32), s.values.to(torch.int8), s.meta,
                                   torch.ones(16), 64, None, torch.float16)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_backend_routes_by_m_and_dtype():
    from sparsekit.ops import sparse24_linear

    s, b = _make(64, 128, torch.float16, seed=9, bias=True)
    for m in (1, 16, 17, 300):                     # GEMV up to 16 rows, mma.sp GEMM above
        x = torch.randn(m, 128, device="cuda", dtype=torch.float16)
        if m > _cuda.MAX_M and not _cuda.has_mma_sp():
            continue
        _check(sparse24_linear(x, s, b, backend="cuda"), x, s, b, torch.float16)
    s32, b32 = _make(64, 128, torch.float32, seed=9, bias=True)
    with pytest.raises(ValueError, match="float32 only for M <= 16"):
        sparse24_linear(torch.randn(17, 128, device="cuda"), s32, b32, backend="cuda")


# ------------------------------------------------------------------ the GEMV kernel source, emulated on CPU
_EMU_PRELUDE = r"""
// CPU emulation of the CUDA execution model, enough for sparse24_gemv.cu: every CUDA thread
// of a block is a fiber (ucontext) on one OS thread, run round-robin until it reaches
// __syncthreads or a warp shuffle; blocks run one after another; __shared__ arrays live in a
// per-block buffer filled with 0xFF bytes (NaN as floats) before each block.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>
#include <ucontext.h>

#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {
struct Idx { unsigned int x = 0, y = 0, z = 0; };
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  Idx tid;
  bool done = false;
  unsigned int shuffles = 0;
  size_t smem_off = 0;
};

constexpr size_t kSharedBytes = 48 * 1024;  // the static shared memory limit
inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline int current = -1;
inline Idx block;
inline unsigned int nthreads = 0, block_arrived = 0, block_gen = 0;
inline std::vector<unsigned int> warp_arrived, warp_gen;
inline std::vector<float> warp_slots;  // [warp][phase][lane]
inline std::vector<unsigned char> shared;
inline long long stalls = 0;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulation error: %s\n", what);
  std::abort();
}

inline void yield() {
  if (++stalls > 64LL * (nthreads + 1)) fail("deadlock: no barrier completes");
  swapcontext(&fibers[current].ctx, &scheduler);
}

inline void block_sync() {
  const unsigned int g = block_gen;
  if (++block_arrived == nthreads) {
    block_arrived = 0;
    ++block_gen;
    stalls = 0;
    return;
  }
  while (block_gen == g) yield();
}

inline void warp_sync(int w) {
  const unsigned int g = warp_gen[w];
  if (++warp_arrived[w] == 32) {
    warp_arrived[w] = 0;
    ++warp_gen[w];
    stalls = 0;
    return;
  }
  while (warp_gen[w] == g) yield();
}

inline float shfl_xor(unsigned int mask, float v, int off) {
  if (mask != 0xFFFFFFFFu || nthreads % 32 != 0) fail("only full-warp shuffles are emulated");
  Fiber& f = fibers[current];
  const int lane = f.tid.x % 32, w = f.tid.x / 32, phase = f.shuffles++ & 1;
  float* slot = &warp_slots[(w * 2 + phase) * 32];
  slot[lane] = v;
  warp_sync(w);
  return slot[lane ^ off];  // this phase's slots are written again only after the next warp_sync
}

template <typename T>
T* shared_array(size_t n) {
  Fiber& f = fibers[current];
  const size_t off = (f.smem_off + 15) / 16 * 16;
  f.smem_off = off + n * sizeof(T);
  if (f.smem_off > kSharedBytes) fail("__shared__ arrays exceed 48 KiB");
  return reinterpret_cast<T*>(shared.data() + off);
}

inline std::function<void()>& body() { static std::function<void()> f; return f; }
inline void trampoline() {
  body()();
  fibers[current].done = true;
}

inline std::string& last_kernel() { static std::string s; return s; }

// kernel<<<grid, threads, smem, stream>>>(args...) becomes emu::launch<kernel>(grid, threads, smem, stream)(args...)
template <auto Kernel>
auto launch(dim3 grid, dim3 threads, size_t dyn_smem, cudaStream_t) {
  return [=](auto... args) {
    last_kernel() = __PRETTY_FUNCTION__;
    if (dyn_smem != 0 || grid.y != 1 || grid.z != 1 || threads.y != 1 || threads.z != 1) fail("unsupported launch");
    nthreads = threads.x;
    fibers.resize(nthreads);
    warp_arrived.assign((nthreads + 31) / 32, 0);
    warp_gen.assign((nthreads + 31) / 32, 0);
    warp_slots.assign((nthreads + 31) / 32 * 64, 0.f);
    body() = [=]() { Kernel(args...); };
    for (unsigned int b = 0; b < grid.x; ++b) {
      block.x = b;
      shared.assign(kSharedBytes, 0xFF);
      block_arrived = 0;
      stalls = 0;
      for (unsigned int t = 0; t < nthreads; ++t) {
        Fiber& f = fibers[t];
        f.stack.resize(256 * 1024);
        f.tid.x = t;
        f.done = false;
        f.shuffles = 0;
        f.smem_off = 0;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, trampoline, 0);
      }
      for (bool live = true; live;) {
        live = false;
        for (unsigned int t = 0; t < nthreads; ++t) {
          if (fibers[t].done) continue;
          live = true;
          current = static_cast<int>(t);
          swapcontext(&scheduler, &fibers[t].ctx);
        }
      }
      if (block_arrived != 0) fail("a thread finished while others wait at __syncthreads");
    }
  };
}
}  // namespace emu

#define threadIdx (::emu::fibers[::emu::current].tid)
#define blockIdx (::emu::block)

inline void __syncthreads() { emu::block_sync(); }
inline float __shfl_xor_sync(unsigned int mask, float v, int off) { return emu::shfl_xor(mask, v, off); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
using std::max;
using std::min;

extern "C" cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
"""

_EMU_ENTRY = r"""
namespace {
template <typename T>
int emu_run(const void* x, long long ldx, const void* values, const void* meta, const void* bias, void* y,
            long long ldy, int M, int N, int K) {
  return static_cast<int>(sparsekit::sparse24_gemv_launch<T>(
      static_cast<const T*>(x), ldx, static_cast<const T*>(values), static_cast<const uint8_t*>(meta),
      static_cast<const T*>(bias), static_cast<T*>(y), ldy, M, N, K, nullptr));
}
}  // namespace

// dtype: 0 float, 1 half, 2 bfloat16; the launched kernel's name goes to `kernel`
extern "C" int emu_sparse24_gemv(int dtype, const void* x, long long ldx, const void* values, const void* meta,
                                 const void* bias, void* y, long long ldy, int M, int N, int K, char* kernel,
                                 int cap) {
  emu::last_kernel().clear();
  const int rc = dtype == 0   ? emu_run<float>(x, ldx, values, meta, bias, y, ldy, M, N, K)
                 : dtype == 1 ? emu_run<__half>(x, ldx, values, meta, bias, y, ldy, M, N, K)
                              : emu_run<__nv_bfloat16>(x, ldx, values, meta, bias, y, ldy, M, N, K);
  std::snprintf(kernel, cap, "%s", emu::last_kernel().c_str());
  return rc;
}
"""

_GEMV_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "sparse24",
                         "sparse24_gemv.cu")


def _emu_source() -> str:
    """The kernel source as host C++: launches and __shared__ arrays go through the emulation."""
    with open(_GEMV_SRC) as f:
        src = f.read()
    src, n_launch = re.subn(r"(\w+<[^;<>]*>)<<<(.*?)>>>\(", r"::emu::launch<\1>(\2)(", src, flags=re.S)
    src, n_shared = re.subn(r"__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\[([^\]]+)\];",
                            r"\1* \2 = ::emu::shared_array<\1>(\3);", src)
    assert n_launch >= 1 and n_shared >= 1, \
        "the kernel source no longer has the launch / __shared__ forms emulated here"
    return _EMU_PRELUDE + '\n#line 1 "sparse24_gemv.cu"\n' + src + _EMU_ENTRY


@functools.lru_cache(maxsize=1)
def _emu_lib():
    """The emulated kernel as a shared library (built once per source state, cached in the temp dir)."""
    from sparsekit.bench.static_gate import find_nvcc

    nvcc = find_nvcc()
    if nvcc is None or not os.path.exists(_GEMV_SRC):
        return None, "nvcc (for the CUDA headers) or csrc/ sources not found"
    src = _emu_source()
    key = hashlib.sha1((src + nvcc).encode()).hexdigest()[:16]
    d = os.path.join(tempfile.gettempdir(), f"sparsekit_gemv_emu_{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    lib = os.path.join(d, f"{key}.so")
    if not os.path.exists(lib):
        cpp = os.path.join(d, f"{key}.cpp")
        with open(cpp, "w") as f:
            f.write(src)
        tmp = f"{lib}.{os.getpid()}.tmp"
        r = subprocess.run([nvcc, "-x", "c++", "-std=c++20", "-O2", "-shared", "-Xcompiler", "-fPIC",
                            "-I" + os.path.dirname(_GEMV_SRC), cpp, "-o", tmp], capture_output=True, text=True,
                           timeout=1200)
        assert r.returncode == 0, f"building the emulated kernel failed:\n{r.stderr[-4000:]}"
        os.replace(tmp, lib)
    so = ctypes.CDLL(lib)
    so.emu_sparse24_gemv.restype = ctypes.c_int
    return so, None


_EMU_DT = {torch.float32: (0, "float"), torch.float16: (1, "__half"), torch.bfloat16: (2, "__nv_bfloat16")}


def _embedded(t: torch.Tensor, offset: int = 0, pitch: int | None = None) -> torch.Tensor:
    """``t`` (2-D) copied into a larger buffer of NaN (0xFF bytes for uint8): elements before it,
    ``pitch - cols`` after each row, and more after the last row; the view starts ``offset``
    elements into the buffer."""
    rows, cols = t.shape
    pitch = cols if pitch is None else pitch
    fill = 0xFF if t.dtype == torch.uint8 else float("nan")
    buf = torch.full((offset + rows * pitch + 64,), fill, dtype=t.dtype)
    view = buf.as_strided((rows, cols), (pitch, 1), offset)
    view.copy_(t)
    return view


def _emu_gemv(x, values, meta, bias, K):
    """y = x W^T (+ bias) by the emulated kernel; returns y and the launched kernel's template arguments."""
    lib, why = _emu_lib()
    if lib is None:
        pytest.skip(why)
    M, N = x.shape[0], values.shape[0]
    y = torch.full((M, N), float("nan"), dtype=x.dtype)
    name = ctypes.create_string_buffer(1024)
    ldx = x.stride(0) if M > 1 else K
    vp = lambda t: ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)
    rc = lib.emu_sparse24_gemv(_EMU_DT[x.dtype][0], vp(x), ctypes.c_longlong(ldx), vp(values), vp(meta), vp(bias),
                               vp(y), ctypes.c_longlong(N), M, N, K, name, 1024)
    assert rc == 0, f"launcher returned cudaError {rc}"
    m = re.search(r"sparse24_gemv_kernel<([^>]*)>", name.value.decode())
    assert m, name.value.decode()
    return y, m.group(1)


def _expected_kernel(x, values, meta, K) -> str:
    """The instantiation the launcher must pick: <T, MT, FAST, XVEC> (see sparse24_gemv.cu)."""
    esz = x.element_size()
    kp = -(-K // 8) * 8
    fast = (values.data_ptr() % 16 == 0 and (kp // 2 * esz) % 16 == 0
            and meta.data_ptr() % (2 if esz == 2 else 1) == 0)
    xvec = fast and x.data_ptr() % 16 == 0 and (x.shape[0] == 1 or (x.stride(0) * esz) % 16 == 0)
    mt = next(t for t in (1, 2, 4, 8, 16) if x.shape[0] <= t)
    b = lambda f: "true" if f else "false"
    return f"{_EMU_DT[x.dtype][1]}, {mt}, {b(fast)}, {b(xvec)}"


# (M, N, K): every M tile; one and several K chunks (fp16 chunks: 6144 / 3072 / 1536 / 512 / 512
# columns for M tiles 1 / 2 / 4 / 8 / 16); K % 8 != 0 (a 16-byte vector of x straddles K); Kp % 16
# != 0 (16-bit types take the scalar weight path); N not a multiple of the 32 rows of a block, N = 1
EMU_SHAPES = [(1, 17, 37), (1, 45, 6490), (2, 33, 3322), (3, 70, 2042), (5, 129, 64), (8, 40, 1018),
              (16, 33, 1018), (13, 35, 600), (16, 1, 8), (9, 7, 250)]
# x layouts: contiguous; rows padded to a 16-byte pitch; an odd element offset (no vector staging);
# values at an odd element offset and meta at an odd byte offset (scalar weight loads)
EMU_LAYOUTS = ["contiguous", "pitch16", "x_offset", "values_offset", "meta_offset"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", EMU_SHAPES)
def test_gemv_kernel_source_emulated_matches_dense(dtype, M, N, K):
    s, b = _make_cpu(N, K, dtype, seed=100 * M + N + K, bias=M % 2 == 1)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K)).to(dtype)
    pitch = -(-K // 8) * 8 + 8                       # a multiple of 8 elements: 16 bytes for 16-bit types
    layout = EMU_LAYOUTS[(M + K) % len(EMU_LAYOUTS)] if M > 1 else "contiguous"
    xv = _embedded(x, pitch=pitch if layout == "pitch16" else None, offset=1 if layout == "x_offset" else 0)
    vals = _embedded(s.values, offset=1 if layout == "values_offset" else 0)
    meta = _embedded(s.meta, offset=1 if layout == "meta_offset" else 0)
    out, kernel = _emu_gemv(xv, vals, meta, b, K)
    assert kernel == _expected_kernel(xv, vals, meta, K)
    _check(out, x, s, b, dtype)


# layout: (x row pitch: "odd" = K + 3 elements, "16" = a 16-byte multiple; x / values / meta
# offsets in elements) -> the kernel's (FAST, XVEC) for 16-bit types and for fp32
EMU_PATHS = {
    "x_rows_unaligned": ("odd", 0, 0, 0, (True, False), (True, False)),
    "x_rows_aligned": ("16", 0, 0, 0, (True, True), (True, True)),
    "x_offset": ("16", 1, 0, 0, (True, False), (True, False)),
    "values_offset": ("16", 0, 1, 0, (False, False), (False, False)),
    "meta_offset": ("16", 0, 0, 1, (False, False), (True, True)),   # fp32 loads one meta byte per unit
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", sorted(EMU_PATHS))
def test_gemv_kernel_source_emulated_paths(dtype, layout):
    # each staging / weight-load path, several K chunks, a 16-byte x vector straddling K (K % 8 = 2)
    M, N, K = 6, 37, 1530
    pitch, x_off, v_off, m_off, want16, want32 = EMU_PATHS[layout]
    s, b = _make_cpu(N, K, dtype, seed=17, bias=True)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3)).to(dtype)
    xv = _embedded(x, pitch=-(-K // 8) * 8 + 8 if pitch == "16" else K + 3, offset=x_off)
    vals = _embedded(s.values, offset=v_off)
    meta = _embedded(s.meta, offset=m_off)
    out, kernel = _emu_gemv(xv, vals, meta, b, K)
    fast, xvec = want32 if dtype == torch.float32 else want16
    flag = lambda f: "true" if f else "false"
    assert kernel == _expected_kernel(xv, vals, meta, K) == f"{_EMU_DT[dtype][1]}, 8, {flag(fast)}, {flag(xvec)}"
    _check(out, x, s, b, dtype)


def _make_cpu(n: int, k: int, dtype, seed: int, bias: bool):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    s = Sparse24Weight.from_dense((w * mask_2to4(w)).to(dtype))
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    return s, b
