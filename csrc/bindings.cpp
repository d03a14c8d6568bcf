// Torch op bindings of the topk_logprobs core: the extension module selfreplay_fast._C.
//
// Importing the module registers the op torch.ops.selfreplay_fast.topk_logprobs(Tensor logits, int k)
// -> (Tensor ids, Tensor logprobs, Tensor tail) with CPU, Meta (shapes only, for tracing) and, when
// built with CUDA (SELFREPLAY_WITH_CUDA, set by setup.py), CUDA kernels. The pybind11 module itself
// only reports how it was built; selfreplay_fast/topk.py is the public entry point.
//
// Bad input raises ValueError / TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) naming the argument.
#include <pybind11/pybind11.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <tuple>

#ifdef SELFREPLAY_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "topk_logprobs.h"

namespace {

using selfreplay_fast::LogitsDType;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

LogitsDType logits_dtype(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return LogitsDType::kFloat32;
    case at::kBFloat16:
      return LogitsDType::kBFloat16;
    case at::kHalf:
      return LogitsDType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "topk_logprobs: logits must be float32, bfloat16 or float16, got ",
                       logits.scalar_type());
  }
  return LogitsDType::kFloat32;  // unreachable
}

// Checks shared by every backend; returns the dtype code.
LogitsDType check_inputs(const at::Tensor& logits, int64_t k) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "topk_logprobs: logits must be 2-D [N, V], got shape ", logits.sizes());
  const LogitsDType dtype = logits_dtype(logits);
  TORCH_CHECK_VALUE(logits.is_contiguous(),
                    "topk_logprobs: logits must be contiguous (call .contiguous() first; the op does not copy "
                    "an [N, V] tensor behind your back), got strides ",
                    logits.strides());
  const int64_t vocab = logits.size(1);
  TORCH_CHECK_VALUE(vocab >= 1, "topk_logprobs: logits must have a non-empty vocabulary dimension, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(vocab <= std::numeric_limits<int32_t>::max(), "topk_logprobs: vocabulary size ", vocab,
                    " does not fit the int32 ids");
  TORCH_CHECK_VALUE(k >= 1, "topk_logprobs: k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(k <= vocab, "topk_logprobs: k (", k, ") must be <= the vocabulary size V (", vocab, ")");
  return dtype;
}

Outputs allocate_outputs(const at::Tensor& logits, int64_t k) {
  const int64_t n_rows = logits.size(0);
  const auto options = logits.options();
  return {at::empty({n_rows, k}, options.dtype(at::kInt)), at::empty({n_rows, k}, options.dtype(at::kFloat)),
          at::empty({n_rows}, options.dtype(at::kFloat))};
}

// The core reports bad arguments with std::invalid_argument; surface them as ValueError too.
template <typename Fn>
void call_core(Fn&& fn) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

Outputs topk_logprobs_cpu_op(const at::Tensor& logits, int64_t k) {
  const LogitsDType dtype = check_inputs(logits, k);
  Outputs out = allocate_outputs(logits, k);
  const at::Tensor& ids = std::get<0>(out);
  const at::Tensor& logprobs = std::get<1>(out);
  const at::Tensor& tail = std::get<2>(out);
  call_core([&] {
    // Same thread count as torch's own CPU ops (torch.set_num_threads).
    selfreplay_fast::topk_logprobs_cpu(logits.data_ptr(), dtype, logits.size(0), logits.size(1), k,
                                       ids.data_ptr<int32_t>(), logprobs.data_ptr<float>(), tail.data_ptr<float>(),
                                       at::get_num_threads());
  });
  return out;
}

Outputs topk_logprobs_meta_op(const at::Tensor& logits, int64_t k) {
  check_inputs(logits, k);
  return allocate_outputs(logits, k);
}

#ifdef SELFREPLAY_WITH_CUDA
Outputs topk_logprobs_cuda_op(const at::Tensor& logits, int64_t k) {
  const LogitsDType dtype = check_inputs(logits, k);
  TORCH_CHECK_VALUE(k <= selfreplay_fast::topk_logprobs_cuda_max_k(), "topk_logprobs: the CUDA kernel supports k <= ",
                    selfreplay_fast::topk_logprobs_cuda_max_k(), ", got ", k,
                    " (selfreplay_fast.topk_logprobs uses torch ops for larger k)");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  Outputs out = allocate_outputs(logits, k);
  const at::Tensor& ids = std::get<0>(out);
  const at::Tensor& logprobs = std::get<1>(out);
  const at::Tensor& tail = std::get<2>(out);
  call_core([&] {
    selfreplay_fast::topk_logprobs_cuda(logits.data_ptr(), dtype, logits.size(0), logits.size(1), k,
                                        ids.data_ptr<int32_t>(), logprobs.data_ptr<float>(), tail.data_ptr<float>(),
                                        c10::cuda::getCurrentCUDAStream(logits.device().index()).stream());
  });
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY(selfreplay_fast, m) {
  m.def("topk_logprobs(Tensor logits, int k) -> (Tensor ids, Tensor logprobs, Tensor tail)");
}

TORCH_LIBRARY_IMPL(selfreplay_fast, CPU, m) { m.impl("topk_logprobs", &topk_logprobs_cpu_op); }

TORCH_LIBRARY_IMPL(selfreplay_fast, Meta, m) { m.impl("topk_logprobs", &topk_logprobs_meta_op); }

#ifdef SELFREPLAY_WITH_CUDA
TORCH_LIBRARY_IMPL(selfreplay_fast, CUDA, m) { m.impl("topk_logprobs", &topk_logprobs_cuda_op); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of selfreplay_fast; importing it registers torch.ops.selfreplay_fast.topk_logprobs.";
  m.def(
      "has_cuda",
      [] {
#ifdef SELFREPLAY_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernel of topk_logprobs was compiled in.");
  m.def(
      "cuda_max_k",
      [] {
#ifdef SELFREPLAY_WITH_CUDA
        return selfreplay_fast::topk_logprobs_cuda_max_k();
#else
        return int64_t{0};
#endif
      },
      "Largest k the CUDA kernel handles (0 without CUDA).");
}
