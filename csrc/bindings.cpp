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
}
