// Single-pass top-k log-probabilities over rows of logits.
//
// For every row x[0..V) of a row-major [n_rows, vocab] logits matrix this computes
//
//   ids[r, j]      = the j-th largest logit's vocabulary id (j = 0 is the largest),
//   logprobs[r, j] = x[ids[r, j]] - logsumexp(x),
//   tail[r]        = log(sum of softmax(x) outside the top k)
//                  = logsumexp(x outside the top k) - logsumexp(x)   (-inf when k == vocab),
//
// reading each logit once and writing only n_rows * (2k + 1) values. The [N, V] log-softmax is never
// materialized. The tail is accumulated as its own log-sum-exp over the logits that do not make the
// top k (never as log(1 - sum of top-k probabilities)), so it stays accurate when the top k hold
// almost all of the mass.
//
// Semantics shared by the CPU and CUDA implementations:
//   * Ties: among equal logits the lower vocabulary id ranks first, so the selected set and its order
//     are deterministic (torch.topk leaves the order of ties unspecified).
//   * A row whose logits are all -inf has no distribution: its log-probs and tail are NaN (as
//     torch.log_softmax gives NaN). -inf entries in an otherwise finite row are ordinary entries with
//     probability 0.
//   * A row containing a NaN or +inf logit yields NaN log-probs and tail; its ids are still valid ids.
//
// This header has no dependency on torch, pybind11 or CUDA, so the core builds and is tested
// standalone (CMakeLists.txt); csrc/bindings.cpp wraps it as a torch op.
#pragma once

#include <cstdint>

namespace selfreplay_fast {

// Element type of the logits. 16-bit types are passed as their raw bit patterns.
enum class LogitsDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// CPU implementation (OpenMP over rows when compiled with OpenMP).
//   logits:      n_rows * vocab elements of `dtype`, row-major, rows contiguous.
//   ids:         n_rows * k int32 outputs; logprobs: n_rows * k floats; tail: n_rows floats.
//   num_threads: OpenMP threads to use; <= 0 means omp_get_max_threads().
// Throws std::invalid_argument as check_topk_logprobs_args does.
void topk_logprobs_cpu(const void* logits, LogitsDType dtype, int64_t n_rows, int64_t vocab, int64_t k,
                       int32_t* ids, float* logprobs, float* tail, int num_threads = 0);

// Argument checks shared by both implementations: throws std::invalid_argument naming the bad
// argument (k < 1, k > vocab, vocab >= 2^31 since ids are int32, n_rows < 0, or a null pointer while
// n_rows > 0).
void check_topk_logprobs_args(const void* logits, int64_t n_rows, int64_t vocab, int64_t k, const void* ids,
                              const void* logprobs, const void* tail);

// Largest k the CUDA kernel handles (its candidate buffer lives in shared memory). Larger k must be
// served by another implementation (the Python wrapper falls back to composed torch ops).
int64_t topk_logprobs_cuda_max_k();

// CUDA implementation: all pointers are device pointers, `stream` is a cudaStream_t (void* keeps this
// header free of CUDA includes). Launches asynchronously on `stream`; throws std::invalid_argument as
// check_topk_logprobs_args does and for k > topk_logprobs_cuda_max_k(), std::runtime_error if the
// launch fails. Defined in topk_logprobs_cuda.cu, which is only compiled when CUDA is available.
void topk_logprobs_cuda(const void* logits, LogitsDType dtype, int64_t n_rows, int64_t vocab, int64_t k,
                        int32_t* ids, float* logprobs, float* tail, void* stream);

// Exact conversions of 16-bit float bit patterns (used by the CPU path and by the tests).
float bf16_bits_to_float(uint16_t bits);
float fp16_bits_to_float(uint16_t bits);

}  // namespace selfreplay_fast
