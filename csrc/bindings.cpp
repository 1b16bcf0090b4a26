// sparsekit._C: torch bindings for the CUDA kernels in csrc/.
//
// Only torch's light CUDA headers are used (c10/cuda/CUDAStream.h and
// c10/cuda/CUDAGuard.h: they need the CUDA runtime headers, not cuBLAS or
// cuSPARSE), so this file also passes a syntax-only compile against the CPU
// torch wheel plus the CUDA toolkit headers (scripts/compile_csrc.sh).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>

#include "sparse24/sparse24.h"

namespace {

int64_t padded_k(int64_t k) { return (k + 7) / 8 * 8; }

void check_cuda(const torch::Tensor& t, const char* name, const torch::Device& dev) {
  TORCH_CHECK_VALUE(t.is_cuda(), "sparse24_linear (cuda backend): ", name,
                    " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == dev, "sparse24_linear (cuda backend): ", name, " is on ",
                    t.device(), " but x is on ", dev);
}

torch::Tensor sparse24_linear(torch::Tensor x, torch::Tensor values, torch::Tensor meta,
                              int64_t K, std::optional<torch::Tensor> bias) {
  const torch::Device dev = x.device();
  check_cuda(x, "x", dev);
  check_cuda(values, "values", dev);
  check_cuda(meta, "meta", dev);

  TORCH_CHECK_VALUE(x.dim() == 2, "sparse24_linear (cuda backend): x must be 2-D (M, K), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(values.dim() == 2 && meta.dim() == 2,
                    "sparse24_linear (cuda backend): values and meta must be 2-D, got shapes ",
                    values.sizes(), " and ", meta.sizes());
  const auto st = values.scalar_type();
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat,
                   "sparse24_linear (cuda backend): values must be float16, bfloat16 or float32, got ",
                   st);
  TORCH_CHECK_TYPE(x.scalar_type() == st, "sparse24_linear (cuda backend): x dtype ",
                   x.scalar_type(), " must match the weight dtype ", st);
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kByte,
                   "sparse24_linear (cuda backend): meta must be uint8, got ", meta.scalar_type());

  TORCH_CHECK_VALUE(K >= 0 && K <= 0x7FFFFFF0, "sparse24_linear (cuda backend): bad K = ", K);
  const int64_t M = x.size(0);
  const int64_t N = values.size(0);
  const int64_t Kp = padded_k(K);
  TORCH_CHECK_VALUE(x.size(1) == K, "sparse24_linear (cuda backend): x has ", x.size(1),
                    " columns but the weight has in_features K = ", K);
  TORCH_CHECK_VALUE(values.size(1) == Kp / 2, "sparse24_linear (cuda backend): values must have shape (",
                    N, ", ", Kp / 2, ") for K = ", K, ", got ", values.sizes());
  TORCH_CHECK_VALUE(meta.size(0) == N && meta.size(1) == Kp / 8,
                    "sparse24_linear (cuda backend): meta must have shape (", N, ", ", Kp / 8,
                    ") for K = ", K, ", got ", meta.sizes());
  TORCH_CHECK_VALUE(N <= 0x7FFFFFFF, "sparse24_linear (cuda backend): N = ", N, " is too large");
  TORCH_CHECK(M <= sparsekit::kSparse24GemvMaxM, "sparse24_linear (cuda backend): M = ", M,
              " rows exceeds the GEMV kernel's limit of ", sparsekit::kSparse24GemvMaxM,
              "; use the triton backend for larger batches");

  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    check_cuda(b, "bias", dev);
    TORCH_CHECK_TYPE(b.scalar_type() == st, "sparse24_linear (cuda backend): bias dtype ",
                     b.scalar_type(), " must match the weight dtype ", st);
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N,
                      "sparse24_linear (cuda backend): bias must have shape (", N, "), got ",
                      b.sizes());
    b = b.contiguous();
  }

  // the kernel needs unit column stride on x; rows may have any pitch
  if (x.size(1) > 1 && x.stride(1) != 1) x = x.contiguous();
  values = values.contiguous();
  meta = meta.contiguous();

  const c10::cuda::CUDAGuard device_guard(dev);
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const int64_t ldx = (M > 1) ? x.stride(0) : K;
  const int64_t ldy = N;
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);

  cudaError_t err = cudaSuccess;
  const void* bp = b.defined() ? b.data_ptr() : nullptr;
  switch (st) {
    case at::kFloat:
      err = sparsekit::sparse24_gemv_launch<float>(
          x.data_ptr<float>(), ldx, values.data_ptr<float>(), meta.data_ptr<uint8_t>(),
          static_cast<const float*>(bp), y.data_ptr<float>(), ldy, m, n, k, stream);
      break;
    case at::kHalf:
      err = sparsekit::sparse24_gemv_launch<__half>(
          reinterpret_cast<const __half*>(x.data_ptr()), ldx,
          reinterpret_cast<const __half*>(values.data_ptr()), meta.data_ptr<uint8_t>(),
          static_cast<const __half*>(bp), reinterpret_cast<__half*>(y.data_ptr()), ldy, m, n, k,
          stream);
      break;
    case at::kBFloat16:
      err = sparsekit::sparse24_gemv_launch<__nv_bfloat16>(
          reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), ldx,
          reinterpret_cast<const __nv_bfloat16*>(values.data_ptr()), meta.data_ptr<uint8_t>(),
          static_cast<const __nv_bfloat16*>(bp), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()),
          ldy, m, n, k, stream);
      break;
    default:
      TORCH_CHECK_TYPE(false, "sparse24_linear (cuda backend): unsupported dtype ", st);
  }
  TORCH_CHECK(err == cudaSuccess, "sparse24_linear (cuda backend): kernel launch failed: ",
              cudaGetErrorString(err));
  return y;
}


// ---------------------------------------------------------------- mma.sp GEMM
bool aligned16(const torch::Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0;
}

void check_mma_common(const char* op, const torch::Tensor& x, const torch::Tensor& values,
                      const torch::Tensor& meta_words, int64_t K, int64_t Kpad, int64_t stage_k,
                      int64_t elem_bytes) {
  const torch::Device dev = x.device();
  check_cuda(x, "x", dev);
  check_cuda(values, "values", dev);
  check_cuda(meta_words, "meta_words", dev);
  TORCH_CHECK_VALUE(x.dim() == 2 && values.dim() == 2, op, ": x and values must be 2-D, got ",
                    x.sizes(), " and ", values.sizes());
  TORCH_CHECK_VALUE(K >= 0 && Kpad >= K && Kpad % stage_k == 0 && Kpad <= 0x7FFFFFF0, op,
                    ": Kpad = ", Kpad, " must be a multiple of ", stage_k, " and >= K = ", K);
  const int64_t N = values.size(0);
  TORCH_CHECK_VALUE(N <= 0x7FFFFFFF && x.size(0) <= 0x7FFFFFFF, op, ": too many rows");
  TORCH_CHECK_VALUE(values.size(1) == Kpad / 2 && values.stride(1) == 1, op,
                    ": values must have Kpad/2 = ", Kpad / 2, " unit-stride columns, got ", values.sizes());
  TORCH_CHECK_VALUE((values.stride(0) * elem_bytes) % 16 == 0 && aligned16(values), op,
                    ": values rows must be 16-byte aligned");
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.stride(1) == 1 && (x.stride(0) * elem_bytes) % 16 == 0 &&
                        aligned16(x),
                    op, ": x must have unit column stride and 16-byte aligned rows");
  TORCH_CHECK_TYPE(meta_words.scalar_type() == at::kInt, op, ": meta_words must be int32, got ",
                   meta_words.scalar_type());
  TORCH_CHECK_VALUE(meta_words.dim() == 3 && meta_words.size(0) == (N + 15) / 16 &&
                        meta_words.size(1) == Kpad / 64 && meta_words.size(2) == 32 &&
                        meta_words.is_contiguous(),
                    op, ": meta_words must be contiguous of shape (", (N + 15) / 16, ", ", Kpad / 64,
                    ", 32) (sparsekit.formats.sparse24.mma_sp_meta), got ", meta_words.sizes());
}

torch::Tensor sparse24_mma_sp(torch::Tensor x, int64_t kx, torch::Tensor values, torch::Tensor meta_words,
                              int64_t K, int64_t Kpad, std::optional<torch::Tensor> bias,
                              int64_t tile_config) {
  const char* op = "sparse24_mma_sp (cuda backend)";
  const auto st = values.scalar_type();
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16, op,
                   ": values must be float16 or bfloat16 (mma.sp has no 2:4 fp32 form), got ", st);
  TORCH_CHECK_TYPE(x.scalar_type() == st, op, ": x dtype ", x.scalar_type(), " must match ", st);
  check_mma_common(op, x, values, meta_words, K, Kpad, sparsekit::sparse24_mma_sp_stage_k(false), 2);
  TORCH_CHECK_VALUE(kx >= 0 && kx <= Kpad && kx <= x.size(1) && kx % 8 == 0, op, ": bad kx = ", kx);
  const torch::Device dev = x.device();
  const int64_t M = x.size(0), N = values.size(0);
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    check_cuda(b, "bias", dev);
    TORCH_CHECK_TYPE(b.scalar_type() == st, op, ": bias dtype ", b.scalar_type(), " must match ", st);
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, op, ": bias must have shape (", N, ")");
    b = b.contiguous();
  }
  const c10::cuda::CUDAGuard device_guard(dev);
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta_words.data_ptr<int32_t>());
  cudaError_t err = cudaSuccess;
  const void* bp = b.defined() ? b.data_ptr() : nullptr;
  if (st == at::kHalf) {
    err = sparsekit::sparse24_mma_sp_launch<__half>(
        reinterpret_cast<const __half*>(x.data_ptr()), x.stride(0), static_cast<int>(kx),
        reinterpret_cast<const __half*>(values.data_ptr()), values.stride(0), mw,
        static_cast<const __half*>(bp), reinterpret_cast<__half*>(y.data_ptr()), N, static_cast<int>(M),
        static_cast<int>(N), static_cast<int>(K), static_cast<int>(Kpad), static_cast<int>(tile_config), stream);
  } else {
    err = sparsekit::sparse24_mma_sp_launch<__nv_bfloat16>(
        reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), x.stride(0), static_cast<int>(kx),
        reinterpret_cast<const __nv_bfloat16*>(values.data_ptr()), values.stride(0), mw,
        static_cast<const __nv_bfloat16*>(bp), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), N,
        static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(Kpad),
        static_cast<int>(tile_config), stream);
  }
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

torch::Tensor sparse24_mma_sp_int8(torch::Tensor xq, int64_t kx, torch::Tensor x_scale, torch::Tensor values,
                                   torch::Tensor meta_words, torch::Tensor w_scale, int64_t K, int64_t Kpad,
                                   std::optional<torch::Tensor> bias, const std::string& out_dtype_name,
                                   int64_t tile_config) {
  const char* op = "sparse24_mma_sp_int8 (cuda backend)";
  at::ScalarType out_dtype = at::kFloat;
  if (out_dtype_name == "float16") out_dtype = at::kHalf;
  else if (out_dtype_name == "bfloat16") out_dtype = at::kBFloat16;
  else TORCH_CHECK_VALUE(out_dtype_name == "float32", op, ": out_dtype must be 'float16', 'bfloat16' or "
                         "'float32', got '", out_dtype_name, "'");
  TORCH_CHECK_TYPE(values.scalar_type() == at::kChar && xq.scalar_type() == at::kChar, op,
                   ": xq and values must be int8, got ", xq.scalar_type(), " and ", values.scalar_type());
  check_mma_common(op, xq, values, meta_words, K, Kpad, sparsekit::sparse24_mma_sp_stage_k(true), 1);
  TORCH_CHECK_VALUE(kx >= 0 && kx <= Kpad && kx <= xq.size(1) && kx % 16 == 0, op, ": bad kx = ", kx);
  const torch::Device dev = xq.device();
  const int64_t M = xq.size(0), N = values.size(0);
  check_cuda(x_scale, "x_scale", dev);
  check_cuda(w_scale, "w_scale", dev);
  TORCH_CHECK_TYPE(x_scale.scalar_type() == at::kFloat && w_scale.scalar_type() == at::kFloat, op,
                   ": x_scale and w_scale must be float32");
  TORCH_CHECK_VALUE(x_scale.numel() == M && w_scale.numel() == N, op, ": x_scale must have ", M,
                    " and w_scale ", N, " elements");
  x_scale = x_scale.reshape({M}).contiguous();
  w_scale = w_scale.reshape({N}).contiguous();
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    check_cuda(b, "bias", dev);
    TORCH_CHECK_TYPE(b.scalar_type() == out_dtype, op, ": bias dtype ", b.scalar_type(), " must be ",
                     out_dtype);
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, op, ": bias must have shape (", N, ")");
    b = b.contiguous();
  }
  const c10::cuda::CUDAGuard device_guard(dev);
  torch::Tensor y = torch::empty({M, N}, xq.options().dtype(out_dtype));
  if (M == 0 || N == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const uint32_t* mw = reinterpret_cast<const uint32_t*>(meta_words.data_ptr<int32_t>());
  const void* bp = b.defined() ? b.data_ptr() : nullptr;
  const int8_t* xp = xq.data_ptr<int8_t>();
  const int8_t* vp = values.data_ptr<int8_t>();
  const float* xs = x_scale.data_ptr<float>();
  const float* wsp = w_scale.data_ptr<float>();
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K), kp = static_cast<int>(Kpad);
  const int kxi = static_cast<int>(kx), tc = static_cast<int>(tile_config);
  cudaError_t err = cudaSuccess;
  switch (out_dtype) {
    case at::kHalf:
      err = sparsekit::sparse24_mma_sp_int8_launch<__half>(
          xp, xq.stride(0), kxi, xs, vp, values.stride(0), mw, wsp, static_cast<const __half*>(bp),
          reinterpret_cast<__half*>(y.data_ptr()), N, m, n, k, kp, tc, stream);
      break;
    case at::kBFloat16:
      err = sparsekit::sparse24_mma_sp_int8_launch<__nv_bfloat16>(
          xp, xq.stride(0), kxi, xs, vp, values.stride(0), mw, wsp, static_cast<const __nv_bfloat16*>(bp),
          reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), N, m, n, k, kp, tc, stream);
      break;
    default:
      err = sparsekit::sparse24_mma_sp_int8_launch<float>(
          xp, xq.stride(0), kxi, xs, vp, values.stride(0), mw, wsp, static_cast<const float*>(bp),
          y.data_ptr<float>(), N, m, n, k, kp, tc, stream);
  }
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsekit CUDA kernels";
  m.def("sparse24_linear", &sparse24_linear,
        "y = x @ W^T (+ bias) for a compressed 2:4 weight (values, meta) with in_features K; "
        "x is (M, K) with M <= max_m()",
        py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("K"),
        py::arg("bias") = py::none());
  m.def("max_m", []() { return static_cast<int64_t>(sparsekit::kSparse24GemvMaxM); },
        "largest M accepted by sparse24_linear");
  m.def("sparse24_mma_sp", &sparse24_mma_sp,
        "y = x @ W^T (+ bias) on sparse tensor cores (mma.sp m16n8k32, fp16/bf16, any M); values padded "
        "to Kpad/2 columns, meta_words = mma_sp_meta(meta, K, 64); reads x columns < kx",
        py::arg("x"), py::arg("kx"), py::arg("values"), py::arg("meta_words"), py::arg("K"), py::arg("Kpad"),
        py::arg("bias") = py::none(), py::arg("tile_config") = -1);
  m.def("sparse24_mma_sp_int8", &sparse24_mma_sp_int8,
        "y = (xq @ Wq^T) * x_scale[:, None] * w_scale[None, :] (+ bias) on sparse tensor cores "
        "(mma.sp m16n8k64 s8, s32 accumulate); meta_words = mma_sp_meta(meta, K, 128)",
        py::arg("xq"), py::arg("kx"), py::arg("x_scale"), py::arg("values"), py::arg("meta_words"),
        py::arg("w_scale"), py::arg("K"), py::arg("Kpad"), py::arg("bias") = py::none(),
        py::arg("out_dtype") = "float16", py::arg("tile_config") = -1);
  m.def("mma_sp_stage_k", [](bool int8) { return static_cast<int64_t>(sparsekit::sparse24_mma_sp_stage_k(int8)); },
        "K padding multiple of the mma.sp kernel (64 for fp16/bf16, 128 for int8)", py::arg("int8") = false);
}
