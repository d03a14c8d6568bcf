// CUDA implementation of topk_logprobs (contract in topk_logprobs.h; same results as the CPU version,
// up to float rounding of the log-sum-exp).
//
// One block per row, one streaming pass over the row in tiles of kTile logits (kItems coalesced,
// evict-first loads per thread, all issued before use):
//   * A shared-memory candidate buffer holds the best k so far plus recent candidates; `threshold` is
//     the k-th best value as of the last selection. Until the first selection every logit is a candidate
//     (so rows with fewer than k finite logits still fill their top k with -inf entries).
//   * A logit that beats the threshold is appended to the buffer (one shared atomic per warp, ballot +
//     popc for the slots). Every other logit goes into its thread's running log-sum-exp of the tail (one
//     rescale per tile, one __expf per logit).
//   * When the buffer could overflow on the next tile, the block selects the exact k-th largest
//     (value, id) key with an 8-pass MSB radix select over 64-bit keys (256-bin shared histograms, the
//     bin search done by one warp with a shuffle scan), keeps the entries at or above it and folds the
//     evicted ones into the tail. Keys are unique (the id breaks ties: the lower id ranks first), so the
//     selection is exact and deterministic.
//   * At the end: a last selection, block reductions of the tail and top-k log-sum-exps, and a rank
//     count among the k survivors to write them sorted.
// Each logit lands exactly once in the top k or the tail, so the tail log-mass is a log-sum-exp of its
// own, accurate however small. k is limited to kMaxK by the shared buffer; the Python wrapper serves
// larger k with torch ops.
#include "topk_logprobs.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace selfreplay_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocksPerSm = 4;
constexpr int kItems = 8;                                  // logits per thread per tile
constexpr int kTile = kThreads * kItems;                   // 2048 logits per tile
constexpr int kCapacity = 4096;                            // candidate buffer entries (32 KiB of shared)
constexpr int kMaxK = kCapacity - kTile;                   // after a selection one more tile always fits
constexpr int kEntriesPerThread = kCapacity / kThreads;    // for the register copy during compaction
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr int kBinsPerLane = kBins / 32;
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kCapacity % kThreads == 0, "compaction copies whole rounds of the buffer");
static_assert(kBins % 32 == 0, "one warp scans the histogram");

// (std::numeric_limits is host-only without --expt-relaxed-constexpr.)
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ double neg_inf_d() { return __longlong_as_double(0xfff0000000000000ll); }

// Logits are read exactly once: evict-first loads keep them from displacing anything useful in L2.
__device__ __forceinline__ float load_logit(const float* p) { return __ldcs(p); }
__device__ __forceinline__ float load_logit(const __nv_bfloat16* p) { return __bfloat162float(__ldcs(p)); }
__device__ __forceinline__ float load_logit(const __half* p) { return __half2float(__ldcs(p)); }

// A 64-bit key whose unsigned order is the output order: larger logit first, then lower id. The float
// bits are mapped to an order-preserving unsigned (negatives flipped, positives offset); -0 is folded
// into +0 so that equal logits tie exactly as on the CPU.
__device__ __forceinline__ unsigned long long order_key(float value, int32_t id) {
  if (value == 0.0f) value = 0.0f;
  unsigned u = __float_as_uint(value);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(u) << 32) | static_cast<unsigned>(0xffffffffu - static_cast<unsigned>(id));
}

__device__ __forceinline__ float key_value(unsigned long long key) {
  unsigned u = static_cast<unsigned>(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  return __uint_as_float(u);
}

// Running log-sum-exp m + log(s). m only ever comes from ordered compares and fmaxf, so it is never
// NaN; a NaN logit turns s into NaN (and the row is flagged separately anyway). s is a double: a
// thread sums ~V/256 terms (1000 at V = 256k), which float would round visibly; the tile loop adds
// float partial sums of kItems terms, so this costs one double add per kItems logits.
struct LogSumExp {
  float m;
  double s;
};

__device__ __forceinline__ void lse_add(LogSumExp& a, float x) {
  if (x == neg_inf()) return;  // probability 0; also avoids (-inf) - (-inf)
  if (x > a.m) {
    a.s = a.s * __expf(a.m - x) + 1.0;
    a.m = x;
  } else {
    a.s += __expf(x - a.m);
  }
}

__device__ __forceinline__ void lse_merge(LogSumExp& a, const LogSumExp& b) {
  if (b.m == neg_inf()) {
    a.s += b.s;  // b.s is 0 (or NaN, which must propagate)
    return;
  }
  if (a.m == neg_inf()) {
    a.m = b.m;
    a.s = b.s + a.s;
    return;
  }
  const float m = fmaxf(a.m, b.m);
  a.s = a.s * __expf(a.m - m) + b.s * __expf(b.m - m);
  a.m = m;
}

// Block-wide log-sum-exp reduction; every thread gets the result. `scratch` holds kWarps entries.
__device__ LogSumExp block_reduce(LogSumExp v, LogSumExp* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    LogSumExp other;
    other.m = __shfl_down_sync(kFullMask, v.m, offset);
    other.s = __shfl_down_sync(kFullMask, v.s, offset);
    lse_merge(v, other);
  }
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  LogSumExp total = scratch[0];
  for (int w = 1; w < kWarps; ++w) lse_merge(total, scratch[w]);
  __syncthreads();  // scratch may be reused right after
  return total;
}

__device__ __forceinline__ double lse_value(const LogSumExp& a) {
  return a.s == 0.0 ? neg_inf_d() : static_cast<double>(a.m) + log(a.s);
}

struct SharedState {
  float value[kCapacity];
  int32_t id[kCapacity];
  unsigned hist[kBins];
  LogSumExp reduce_scratch[kWarps];
  unsigned long long prefix;
  unsigned remaining;
  int count;
  double full_lse;
};

// Appends the logits with `take` set to the buffer: one shared atomic per warp. Must be called by all
// lanes of every warp (it uses full-mask warp intrinsics).
__device__ __forceinline__ void warp_append(SharedState& sh, bool take, float value, int32_t id) {
  const unsigned mask = __ballot_sync(kFullMask, take);
  if (mask == 0) return;
  const int lane = threadIdx.x & 31;
  int base = 0;
  if (lane == 0) base = atomicAdd(&sh.count, __popc(mask));
  base = __shfl_sync(kFullMask, base, 0);
  if (take) {
    const int slot = base + __popc(mask & ((1u << lane) - 1u));
    sh.value[slot] = value;
    sh.id[slot] = id;
  }
}

// Keeps the k best of the `count` buffered entries (count > k), moves the others into this thread's
// tail, and returns the new threshold (the k-th best value). Called by the whole block.
__device__ float select_top_k(SharedState& sh, int count, int k, LogSumExp& tail) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // 1. MSB radix select of the k-th largest key, 8 bits per pass.
  unsigned long long prefix = 0, prefix_mask = 0;
  unsigned remaining = static_cast<unsigned>(k);
  for (int shift = 64 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int b = tid; b < kBins; b += kThreads) sh.hist[b] = 0u;
    __syncthreads();
    for (int e = tid; e < count; e += kThreads) {
      const unsigned long long key = order_key(sh.value[e], sh.id[e]);
      if ((key & prefix_mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & (kBins - 1)], 1u);
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns bins kBins-1-l*kBinsPerLane downwards; an inclusive scan over lanes counts the
      // matching keys in higher bins. The lane whose range holds the remaining-th largest finds its bin.
      unsigned c[kBinsPerLane];
      unsigned local = 0;
#pragma unroll
      for (int t = 0; t < kBinsPerLane; ++t) {
        c[t] = sh.hist[kBins - 1 - (lane * kBinsPerLane + t)];
        local += c[t];
      }
      unsigned inclusive = local;
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const unsigned up = __shfl_up_sync(kFullMask, inclusive, offset);
        if (lane >= offset) inclusive += up;
      }
      unsigned above = inclusive - local;
      if (above < remaining && remaining <= inclusive) {
        for (int t = 0; t < kBinsPerLane; ++t) {
          if (above + c[t] >= remaining) {
            const unsigned long long digit = static_cast<unsigned long long>(kBins - 1 - (lane * kBinsPerLane + t));
            sh.prefix = prefix | (digit << shift);
            sh.remaining = remaining - above;
            break;
          }
          above += c[t];
        }
      }
    }
    __syncthreads();
    prefix = sh.prefix;
    remaining = sh.remaining;
    prefix_mask |= static_cast<unsigned long long>(kBins - 1) << shift;
  }
  const unsigned long long kth_key = prefix;  // every bit fixed: the key of the k-th best entry

  // 2. Compaction through registers (the buffer is rewritten in place).
  float value[kEntriesPerThread];
  int32_t id[kEntriesPerThread];
#pragma unroll
  for (int r = 0; r < kEntriesPerThread; ++r) {
    const int e = tid + r * kThreads;
    value[r] = e < count ? sh.value[e] : neg_inf();
    id[r] = e < count ? sh.id[e] : 0;
  }
  __syncthreads();
  if (tid == 0) sh.count = 0;
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kEntriesPerThread; ++r) {
    const int e = tid + r * kThreads;
    const bool present = e < count;
    const bool keep = present && order_key(value[r], id[r]) >= kth_key;
    warp_append(sh, keep, value[r], id[r]);
    if (present && !keep) lse_add(tail, value[r]);
  }
  __syncthreads();
  return key_value(kth_key);
}

// At least kMinBlocksPerSm resident blocks (1024 threads per SM) keep enough loads in flight to stream
// at memory bandwidth; it caps registers at 64, which only the rare selection path would use more of.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) topk_logprobs_kernel(const T* __restrict__ logits, int64_t vocab, int k,
                                                                 int32_t* __restrict__ ids,
                                                                 float* __restrict__ logprobs,
                                                                 float* __restrict__ tail_out) {
  __shared__ SharedState sh;
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;

  if (tid == 0) sh.count = 0;
  __syncthreads();

  float threshold = neg_inf();
  bool selected = false;  // until the first selection every logit is a candidate
  bool has_nan = false;
  LogSumExp tail{neg_inf(), 0.0};

  for (int64_t base = 0; base < vocab; base += kTile) {
    float v[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = base + i * kThreads + tid;
      v[i] = j < vocab ? load_logit(x + j) : neg_inf();
    }
    float tile_max = neg_inf();
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = base + i * kThreads + tid;
      has_nan |= v[i] != v[i];
      // A later logit equal to the threshold loses the tie to the earlier id holding it: strict >.
      const bool candidate = j < vocab && (!selected || v[i] > threshold);
      warp_append(sh, candidate, v[i], static_cast<int32_t>(j));
      if (candidate) {
        v[i] = neg_inf();  // consumed: contributes e^-inf = 0 below
      } else {
        tile_max = fmaxf(tile_max, v[i]);
      }
    }
    if (tile_max > tail.m) {
      tail.s *= __expf(tail.m - tile_max);
      tail.m = tile_max;
    }
    if (tail.m != neg_inf()) {
      float tile_sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) tile_sum += __expf(v[i] - tail.m);
      tail.s += tile_sum;
    }

    __syncthreads();  // all appends of this tile are in
    const int count = sh.count;
    // The barrier also keeps the next tile's appends from racing with this read of the count.
    if (__syncthreads_or(count > kCapacity - kTile)) {
      threshold = select_top_k(sh, count, k, tail);
      selected = true;
    }
  }

  __syncthreads();
  const int count = sh.count;
  __syncthreads();
  if (count > k) select_top_k(sh, count, k, tail);

  const bool row_has_nan = __syncthreads_or(has_nan);
  const LogSumExp tail_total = block_reduce(tail, sh.reduce_scratch);
  LogSumExp top{neg_inf(), 0.0};
  for (int e = tid; e < k; e += kThreads) lse_add(top, sh.value[e]);
  const LogSumExp top_total = block_reduce(top, sh.reduce_scratch);

  if (tid == 0) {
    const double tail_lse = lse_value(tail_total);
    const double top_lse = lse_value(top_total);
    // A NaN part (a +inf logit: inf - inf in a merge) must reach `full`; fmax would drop it.
    const bool nan_part = isnan(tail_lse) || isnan(top_lse);
    const double shift = fmax(tail_lse, top_lse);
    double full = shift;  // all logits -inf: outputs come out (-inf) - (-inf) = NaN, as in torch
    if (shift != neg_inf_d()) {
      full = shift + log(exp(tail_lse - shift) + exp(top_lse - shift));  // NaN with a +inf logit
    }
    if (row_has_nan || nan_part) full = nan("");
    sh.full_lse = full;
    tail_out[row] = static_cast<float>(tail_lse - full);
  }
  __syncthreads();
  const double full = sh.full_lse;

  // Survivors are unordered: each one's output slot is the number of survivors ranked above it.
  for (int e = tid; e < k; e += kThreads) {
    const unsigned long long key = order_key(sh.value[e], sh.id[e]);
    int rank = 0;
    for (int q = 0; q < k; ++q) rank += order_key(sh.value[q], sh.id[q]) > key;
    ids[row * k + rank] = sh.id[e];
    logprobs[row * k + rank] = static_cast<float>(static_cast<double>(sh.value[e]) - full);
  }
}

template <typename T>
void launch(const void* logits, int64_t n_rows, int64_t vocab, int64_t k, int32_t* ids, float* logprobs, float* tail,
            cudaStream_t stream) {
  topk_logprobs_kernel<T><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), vocab, static_cast<int>(k), ids, logprobs, tail);
}

}  // namespace

int64_t topk_logprobs_cuda_max_k() { return kMaxK; }

void topk_logprobs_cuda(const void* logits, LogitsDType dtype, int64_t n_rows, int64_t vocab, int64_t k,
                        int32_t* ids, float* logprobs, float* tail, void* stream) {
  check_topk_logprobs_args(logits, n_rows, vocab, k, ids, logprobs, tail);
  if (k > kMaxK) {
    throw std::invalid_argument("topk_logprobs (CUDA): k (" + std::to_string(k) + ") must be <= " +
                                std::to_string(kMaxK));
  }
  if (n_rows > static_cast<int64_t>(std::numeric_limits<int>::max())) {
    throw std::invalid_argument("topk_logprobs (CUDA): at most 2^31 - 1 rows per call, got " + std::to_string(n_rows));
  }
  if (n_rows == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case LogitsDType::kFloat32:
      launch<float>(logits, n_rows, vocab, k, ids, logprobs, tail, s);
      break;
    case LogitsDType::kBFloat16:
      launch<__nv_bfloat16>(logits, n_rows, vocab, k, ids, logprobs, tail, s);
      break;
    case LogitsDType::kFloat16:
      launch<__half>(logits, n_rows, vocab, k, ids, logprobs, tail, s);
      break;
    default:
      throw std::invalid_argument("topk_logprobs (CUDA): unknown logits dtype code " +
                                  std::to_string(static_cast<int>(dtype)));
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("topk_logprobs (CUDA): kernel launch failed: ") + cudaGetErrorString(err));
  }
}

}  // namespace selfreplay_fast
