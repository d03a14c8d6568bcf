// CPU implementation of topk_logprobs (see topk_logprobs.h for the contract).
//
// One streaming pass per row, rows spread over OpenMP threads:
//   * A candidate buffer holds the best k logits seen so far plus recent candidates; `threshold` is the
//     k-th best value as of the last compaction. The first k logits go in unconditionally.
//   * The rest of the row is scanned in blocks of kBlock logits with explicit SIMD. Every logit costs
//     one compare against the threshold; logits that do not beat it are folded into the running
//     log-sum-exp of the *tail* (one max and one exp per logit; a rescale only when the tail's max
//     rises, which after the first blocks is rare). The few that beat it (about k * ln(V / k) per row
//     on random data) are appended to the buffer. When it holds more than 2k, nth_element keeps the
//     best k, the threshold rises to the k-th, and the evicted logits join the tail through the same
//     vector code: amortized O(1) per candidate, and no branchy heap.
//   * Each logit therefore lands exactly once in either the final top k or the tail sum, so the tail
//     log-mass is a log-sum-exp of its own (accurate even when it is e^-100 of the total) and the full
//     log-sum-exp is the log-add of the tail and the k selected logits, computed once per row.
#include "topk_logprobs.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace selfreplay_fast {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Logits per streaming block: the unit of the vectorized fast path (one threshold and one tail max per
// block). 64 floats are four cache lines, held in registers between the max and the exp loops; the
// candidate positions of a block fit one 64-bit mask.
constexpr int kBlock = 64;

#if defined(__GNUC__)
#define SRF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SRF_ALWAYS_INLINE inline
#endif

// The per-row kernels are compiled for AVX2+FMA and AVX-512 next to the baseline and picked at load time
// (GCC function multiversioning), so a wheel built for generic x86-64 still runs the wide
// exp/compare loops on current CPUs. Everything they call is always_inline so it is compiled for the
// clone's target too. The dispatch needs ifunc support: GCC with glibc on x86-64.
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(SELFREPLAY_NO_MULTIVERSION)
#define SRF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SRF_MULTIVERSION
#endif

SRF_ALWAYS_INLINE float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

SRF_ALWAYS_INLINE uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// IEEE half -> float without branches (so block conversions vectorize) and exact for every input,
// subnormals included, without relying on the FPU's subnormal handling (DAZ/FTZ may be on).
SRF_ALWAYS_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t shifted = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent+mantissa, float position
  const uint32_t exponent = shifted & 0x0f800000u;                     // the half exponent field, shifted
  const uint32_t rebiased = shifted + ((127u - 15u) << 23);
  const float normal = bits_to_float(rebiased);
  // Inf/NaN: an all-ones half exponent must become an all-ones float exponent (mantissa kept).
  const float inf_or_nan = bits_to_float(rebiased + ((128u - 16u) << 23));
  // Zero/subnormal (value = mantissa * 2^-24): 2^-14 * (1 + mantissa/1024) - 2^-14, exact in floats.
  const float subnormal = bits_to_float(rebiased + (1u << 23)) - bits_to_float(113u << 23);
  const float magnitude = exponent == 0x0f800000u ? inf_or_nan : (exponent == 0u ? subnormal : normal);
  return bits_to_float(float_to_bits(magnitude) | sign);
}

// Portable SIMD for the two hot loops: GCC/Clang vector extensions, which lower to whatever the
// (multiversioned) target has -- 2 SSE, 1 AVX2 or 1 AVX-512VL register per vector -- with no reliance
// on the auto-vectorizer (which gives up on these loops under -ftrapping-math, GCC's default, because
// the selects look like branches around possibly trapping compares). Other compilers get width 1, as
// does a build with -DSELFREPLAY_SCALAR (which exists to test that path).
#if defined(__GNUC__) && !defined(SELFREPLAY_SCALAR)
// Vector values only pass between always_inline functions, so the note that their ABI differs between
// SSE and AVX builds does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
constexpr int kWidth = 8;
typedef float VecF __attribute__((vector_size(32)));
typedef int32_t VecI __attribute__((vector_size(32)));
typedef VecI Mask;  // lanes of all ones (true) or zeros (false), the result of a vector compare
SRF_ALWAYS_INLINE VecF vec_load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
SRF_ALWAYS_INLINE VecF vec_select(const Mask& m, const VecF& a, const VecF& b) { return m ? a : b; }
SRF_ALWAYS_INLINE VecI vec_truncate(const VecF& v) { return __builtin_convertvector(v, VecI); }
SRF_ALWAYS_INLINE VecF vec_to_float(const VecI& v) { return __builtin_convertvector(v, VecF); }
SRF_ALWAYS_INLINE VecF vec_from_bits(const VecI& v) { return reinterpret_cast<VecF>(v); }
SRF_ALWAYS_INLINE VecF vec_splat(float x) { return VecF{} + x; }
SRF_ALWAYS_INLINE Mask mask_splat(bool b) { return VecI{} + (b ? -1 : 0); }
// Lane i of the mask -> bit i.
SRF_ALWAYS_INLINE uint64_t mask_bits(const Mask& m) {
  int32_t lanes[kWidth];
  std::memcpy(lanes, &m, sizeof lanes);
  uint64_t bits = 0;
  for (int i = 0; i < kWidth; ++i) bits |= static_cast<uint64_t>(lanes[i] & 1) << i;
  return bits;
}
SRF_ALWAYS_INLINE bool mask_any(const Mask& m) {
  int32_t lanes[kWidth];
  std::memcpy(lanes, &m, sizeof lanes);
  bool any = false;
  for (int i = 0; i < kWidth; ++i) any |= lanes[i] != 0;
  return any;
}
#else
constexpr int kWidth = 1;
typedef float VecF;
typedef int32_t VecI;
typedef bool Mask;
SRF_ALWAYS_INLINE VecF vec_load(const float* p) { return *p; }
SRF_ALWAYS_INLINE VecF vec_select(const Mask& m, const VecF& a, const VecF& b) { return m ? a : b; }
SRF_ALWAYS_INLINE VecI vec_truncate(VecF v) { return static_cast<VecI>(v); }
SRF_ALWAYS_INLINE VecF vec_to_float(VecI v) { return static_cast<VecF>(v); }
SRF_ALWAYS_INLINE VecF vec_from_bits(VecI v) { return bits_to_float(static_cast<uint32_t>(v)); }
SRF_ALWAYS_INLINE VecF vec_splat(float x) { return x; }
SRF_ALWAYS_INLINE Mask mask_splat(bool b) { return b; }
SRF_ALWAYS_INLINE uint64_t mask_bits(Mask m) { return m ? 1u : 0u; }
SRF_ALWAYS_INLINE bool mask_any(Mask m) { return m; }
#endif
static_assert(kBlock % kWidth == 0, "a block must be a whole number of vectors");

SRF_ALWAYS_INLINE float lane(const VecF& v, int i) {
  float lanes[kWidth];
  std::memcpy(lanes, &v, sizeof lanes);
  return lanes[i];
}

// e^x for x <= 0, lane-wise, in plain arithmetic (std::exp is an opaque libm call). Cephes expf:
// x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2 so n*C1 is exact), a degree-6 polynomial
// for e^r (about 1 ulp), times 2^n assembled in the exponent bits. Arguments below -87 (and NaN) give
// 0: every caller sums terms relative to a maximum whose own term is e^0 = 1, next to which e^-87 ~
// 1.6e-38 cannot change a float sum; stopping there keeps 2^n a normal float. NaN logits are detected
// separately, per row.
SRF_ALWAYS_INLINE VecF exp_nonpositive(const VecF& x) {
  const Mask in_range = x >= -87.0f;  // false for NaN
  VecF xr = vec_select(in_range, x, vec_splat(-87.0f));
  xr = vec_select(xr > 0.0f, vec_splat(0.0f), xr);  // keeps the int conversion in range whatever comes in
  const VecI n = vec_truncate(xr * 1.44269504088896341f - 0.5f);  // round to nearest: the value is <= 0
  const VecF nf = vec_to_float(n);
  const VecF r = (xr - nf * 0.693359375f) - nf * -2.12194440e-4f;
  VecF p = vec_splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const VecF scale = vec_from_bits((n + 127) << 23);  // n in [-126, 0]: a normal power of two
  return vec_select(in_range, p * scale, vec_splat(0.0f));
}

struct Fp32Input {
  using Element = float;
  static SRF_ALWAYS_INLINE float load(float v) { return v; }
};
struct Bf16Input {
  using Element = uint16_t;
  static SRF_ALWAYS_INLINE float load(uint16_t bits) { return bits_to_float(static_cast<uint32_t>(bits) << 16); }
};
struct Fp16Input {
  using Element = uint16_t;
  static SRF_ALWAYS_INLINE float load(uint16_t bits) { return half_to_float(bits); }
};

struct Candidate {
  float value;
  int32_t id;
};

// The output order: larger logit first, and among equal logits the lower id first.
SRF_ALWAYS_INLINE bool ranks_above(const Candidate& a, const Candidate& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

// Running log-sum-exp of the tail: max + log(sum). Blocks add their terms (each relative to `max`, so in
// [0, 1]) into a vector of float lane sums; these are folded into the double `sum` every
// kBlocksPerFlush blocks (so no float lane sums more than a few hundred terms) and whenever `max`
// rises, which after the first blocks of a row is rare. That keeps the horizontal reduction and the
// double arithmetic out of the per-block path.
struct TailLogSumExp {
  static constexpr int kBlocksPerFlush = 16;
  float max = kNegInf;
  double sum = 0.0;
  VecF pending = vec_splat(0.0f);
  int pending_blocks = 0;

  SRF_ALWAYS_INLINE void flush() {
    float lanes_total = 0.0f;
    for (int i = 0; i < kWidth; ++i) lanes_total += lane(pending, i);
    sum += lanes_total;
    pending = vec_splat(0.0f);
    pending_blocks = 0;
  }

  SRF_ALWAYS_INLINE void raise_max(float new_max) {
    if (new_max > max) {
      flush();
      sum *= std::exp(static_cast<double>(max) - static_cast<double>(new_max));  // 0 while max is -inf
      max = new_max;
    }
  }

  SRF_ALWAYS_INLINE void add_block(const VecF& block_terms) {
    pending += block_terms;
    if (++pending_blocks == kBlocksPerFlush) flush();
  }

  double finish_log_value() {
    flush();
    return sum == 0.0 ? -std::numeric_limits<double>::infinity() : max + std::log(sum);
  }
};

static_assert(kBlock <= 64, "candidate positions of a block are reported in one 64-bit mask");

// One block of kBlock logits against a fixed threshold: every logit that does not beat it is added to
// the tail. Returns the positions of those that do beat it (candidates for the top k) as a bit mask,
// and flags any NaN (NaN never beats the threshold and adds e^NaN -> 0 here; the caller poisons the row).
SRF_ALWAYS_INLINE uint64_t scan_block(const float* x, float threshold, TailLogSumExp& tail, bool& has_nan) {
  constexpr int kVectors = kBlock / kWidth;
  VecF v[kVectors];
  Mask candidate[kVectors];
  for (int j = 0; j < kVectors; ++j) v[j] = vec_load(x + j * kWidth);

  VecF max_kept = vec_splat(kNegInf);
  Mask any_candidate = mask_splat(false);
  Mask any_nan = mask_splat(false);
  for (int j = 0; j < kVectors; ++j) {
    candidate[j] = v[j] > threshold;
    any_candidate = any_candidate | candidate[j];
    any_nan = any_nan | (v[j] != v[j]);
    const VecF kept = vec_select(candidate[j], vec_splat(kNegInf), v[j]);
    max_kept = vec_select(kept > max_kept, kept, max_kept);
  }
  has_nan |= mask_any(any_nan);
  if (mask_any(max_kept > tail.max)) {
    float block_max = kNegInf;
    for (int i = 0; i < kWidth; ++i) block_max = std::max(block_max, lane(max_kept, i));
    tail.raise_max(block_max);
  }
  // With the tail max still -inf every non-candidate so far is -inf: nothing to add.
  if (tail.max != kNegInf) {
    const float m = tail.max;
    VecF sum = vec_splat(0.0f);
    for (int j = 0; j < kVectors; ++j) {
      // Candidates contribute e^-inf = 0; everything else is <= m, so the argument is <= 0.
      sum += exp_nonpositive(vec_select(candidate[j], vec_splat(kNegInf), v[j] - m));
    }
    tail.add_block(sum);
  }

  if (!mask_any(any_candidate)) return 0;
  uint64_t bits = 0;
  for (int j = 0; j < kVectors; ++j) bits |= mask_bits(candidate[j]) << (j * kWidth);
  return bits;
}

SRF_ALWAYS_INLINE int lowest_set_bit(uint64_t bits) {
#if defined(__GNUC__)
  return __builtin_ctzll(bits);
#else
  int i = 0;
  while (!(bits & 1u)) {
    bits >>= 1;
    ++i;
  }
  return i;
#endif
}

// Adds arbitrary logits (evicted candidates) to the tail through the vector path, kBlock at a time.
SRF_ALWAYS_INLINE void add_to_tail(const Candidate* entries, int64_t n, TailLogSumExp& tail) {
  float staged[kBlock];
  bool unused_nan = false;  // evicted values were checked for NaN when they were first scanned
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t count = std::min<int64_t>(kBlock, n - start);
    for (int64_t j = 0; j < count; ++j) staged[j] = entries[start + j].value;
    for (int64_t j = count; j < kBlock; ++j) staged[j] = kNegInf;  // e^-inf = 0
    // +inf as threshold: nothing is a candidate, everything goes to the tail.
    scan_block(staged, std::numeric_limits<float>::infinity(), tail, unused_nan);
  }
}

// Keeps the best k of buffer[0..count) in buffer[0..k) (unordered, buffer[k-1] the k-th best) and moves
// the rest into the tail.
SRF_ALWAYS_INLINE void compact(Candidate* buffer, int64_t count, int64_t k, TailLogSumExp& tail) {
  std::nth_element(buffer, buffer + (k - 1), buffer + count, ranks_above);
  add_to_tail(buffer + k, count - k, tail);
}

template <typename Input>
SRF_ALWAYS_INLINE void process_row(const typename Input::Element* row, int64_t vocab, int64_t k, Candidate* buffer,
                                   int32_t* ids, float* logprobs, float* tail_out) {
  bool has_nan = false;
  // The first k logits go in unconditionally: a threshold test would turn away -inf entries that a row
  // with fewer than k finite logits needs in its top k. NaN is kept out of the buffer (it would break
  // the ordering); the row is flagged instead and its outputs become NaN.
  float threshold = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < k; ++i) {
    float v = Input::load(row[i]);
    if (v != v) {
      has_nan = true;
      v = kNegInf;
    }
    buffer[i] = Candidate{v, static_cast<int32_t>(i)};
    threshold = std::min(threshold, v);
  }
  int64_t count = k;

  // Later logits equal to the threshold lose the tie to the earlier id holding it, so "beats" is a
  // strict >; a logit that fails it is in the tail for good, since the threshold only rises.
  TailLogSumExp tail;
  float staged[kBlock];  // converted 16-bit logits, or the last partial block padded with -inf
  for (int64_t start = k; start < vocab; start += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, vocab - start));
    const float* block;
    if (std::is_same<typename Input::Element, float>::value && n == kBlock) {
      block = reinterpret_cast<const float*>(row + start);
    } else {
      for (int j = 0; j < n; ++j) staged[j] = Input::load(row[start + j]);
      for (int j = n; j < kBlock; ++j) staged[j] = kNegInf;  // never a candidate, adds e^-inf = 0
      block = staged;
    }
    uint64_t bits = scan_block(block, threshold, tail, has_nan);
    if (bits == 0) continue;
    do {
      const int j = lowest_set_bit(bits);
      bits &= bits - 1;
      buffer[count++] = Candidate{block[j], static_cast<int32_t>(start + j)};
    } while (bits != 0);
    // The buffer has room for 2k + kBlock entries, so one more block always fits after this check.
    if (count > 2 * k) {
      compact(buffer, count, k, tail);
      count = k;
      threshold = buffer[k - 1].value;
    }
  }
  if (count > k) compact(buffer, count, k, tail);
  std::sort(buffer, buffer + k, ranks_above);

  // Full log-sum-exp = log-add of the tail and the k selected logits, in double, once per row.
  const double tail_lse = tail.finish_log_value();
  const double shift = std::max(static_cast<double>(buffer[0].value), static_cast<double>(tail.max));
  double full_lse;
  if (shift == -std::numeric_limits<double>::infinity()) {
    full_lse = shift;  // all logits -inf: log-probs and tail come out (-inf) - (-inf) = NaN, as in torch
  } else {
    double total = tail.sum * std::exp(static_cast<double>(tail.max) - shift);
    for (int64_t j = 0; j < k; ++j) total += std::exp(static_cast<double>(buffer[j].value) - shift);
    full_lse = shift + std::log(total);  // NaN when the row holds +inf (inf - inf)
  }
  if (has_nan) full_lse = std::numeric_limits<double>::quiet_NaN();

  for (int64_t j = 0; j < k; ++j) {
    ids[j] = buffer[j].id;
    logprobs[j] = static_cast<float>(static_cast<double>(buffer[j].value) - full_lse);
  }
  *tail_out = static_cast<float>(tail_lse - full_lse);
}

// Entries a row's candidate buffer needs (see process_row).
int64_t buffer_capacity(int64_t k) { return 2 * k + kBlock; }

// One non-inline entry point per input type: the unit of function multiversioning (an OpenMP region
// is outlined into a separate function, so the clones must sit below it).
SRF_MULTIVERSION void process_row_fp32(const float* row, int64_t vocab, int64_t k, Candidate* buffer, int32_t* ids,
                                       float* logprobs, float* tail) {
  process_row<Fp32Input>(row, vocab, k, buffer, ids, logprobs, tail);
}
SRF_MULTIVERSION void process_row_bf16(const uint16_t* row, int64_t vocab, int64_t k, Candidate* buffer,
                                       int32_t* ids, float* logprobs, float* tail) {
  process_row<Bf16Input>(row, vocab, k, buffer, ids, logprobs, tail);
}
SRF_MULTIVERSION void process_row_fp16(const uint16_t* row, int64_t vocab, int64_t k, Candidate* buffer,
                                       int32_t* ids, float* logprobs, float* tail) {
  process_row<Fp16Input>(row, vocab, k, buffer, ids, logprobs, tail);
}

template <typename Element, typename RowFn>
void process_rows(const Element* logits, int64_t n_rows, int64_t vocab, int64_t k, int32_t* ids, float* logprobs,
                  float* tail, int num_threads, RowFn row_fn) {
  // Buffers are allocated up front: nothing may throw inside the parallel region.
  const size_t per_thread = static_cast<size_t>(buffer_capacity(k));
  std::vector<Candidate> buffers(static_cast<size_t>(num_threads) * per_thread);
  // Rows cost about the same, but the cores may be shared: hand them out dynamically, in chunks of
  // roughly 64k logits so that short rows do not pay a scheduling step each.
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 16) / vocab);
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
#endif
  {
#ifdef _OPENMP
    Candidate* buffer = buffers.data() + static_cast<size_t>(omp_get_thread_num()) * per_thread;
#pragma omp for schedule(dynamic, chunk)
#else
    Candidate* buffer = buffers.data();
    (void)chunk;
#endif
    for (int64_t r = 0; r < n_rows; ++r) {
      row_fn(logits + r * vocab, vocab, k, buffer, ids + r * k, logprobs + r * k, tail + r);
    }
  }
}

}  // namespace

void check_topk_logprobs_args(const void* logits, int64_t n_rows, int64_t vocab, int64_t k, const void* ids,
                              const void* logprobs, const void* tail) {
  if (n_rows < 0) throw std::invalid_argument("topk_logprobs: n_rows must be >= 0, got " + std::to_string(n_rows));
  if (vocab < 1) throw std::invalid_argument("topk_logprobs: vocab must be >= 1, got " + std::to_string(vocab));
  if (vocab > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("topk_logprobs: vocab (" + std::to_string(vocab) +
                                ") must fit the int32 ids, i.e. be < 2^31");
  }
  if (k < 1) throw std::invalid_argument("topk_logprobs: k must be >= 1, got " + std::to_string(k));
  if (k > vocab) {
    throw std::invalid_argument("topk_logprobs: k (" + std::to_string(k) + ") must be <= vocab (" +
                                std::to_string(vocab) + ")");
  }
  if (n_rows > 0 && (logits == nullptr || ids == nullptr || logprobs == nullptr || tail == nullptr)) {
    throw std::invalid_argument("topk_logprobs: null logits or output pointer");
  }
}

void topk_logprobs_cpu(const void* logits, LogitsDType dtype, int64_t n_rows, int64_t vocab, int64_t k,
                       int32_t* ids, float* logprobs, float* tail, int num_threads) {
  check_topk_logprobs_args(logits, n_rows, vocab, k, ids, logprobs, tail);
  if (n_rows == 0) return;
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#else
  num_threads = 1;
#endif
  num_threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), n_rows));

  switch (dtype) {
    case LogitsDType::kFloat32:
      process_rows(static_cast<const float*>(logits), n_rows, vocab, k, ids, logprobs, tail, num_threads,
                   process_row_fp32);
      return;
    case LogitsDType::kBFloat16:
      process_rows(static_cast<const uint16_t*>(logits), n_rows, vocab, k, ids, logprobs, tail, num_threads,
                   process_row_bf16);
      return;
    case LogitsDType::kFloat16:
      process_rows(static_cast<const uint16_t*>(logits), n_rows, vocab, k, ids, logprobs, tail, num_threads,
                   process_row_fp16);
      return;
  }
  throw std::invalid_argument("topk_logprobs: unknown logits dtype code " + std::to_string(static_cast<int>(dtype)));
}

float bf16_bits_to_float(uint16_t bits) { return Bf16Input::load(bits); }
float fp16_bits_to_float(uint16_t bits) { return half_to_float(bits); }

}  // namespace selfreplay_fast
