// Unit tests of the C++ core (no Python, no torch): run by ctest, see CMakeLists.txt.
//
// Every result is checked against a brute-force reference in double precision written here
// independently of the library: full sort of the row by (logit desc, id asc), log-sum-exp over
// everything and over the non-selected logits. The library's 16-bit decoders are checked against this
// file's own decoders for all 65536 bit patterns, and the reference decodes 16-bit inputs with its own.
#include "topk_logprobs.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using selfreplay_fast::LogitsDType;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kInfF = std::numeric_limits<float>::infinity();

int g_failures = 0;
int g_checks = 0;

void fail(const std::string& what) {
  ++g_failures;
  if (g_failures <= 30) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

#define CHECK(cond, msg)                                                      \
  do {                                                                        \
    ++g_checks;                                                               \
    if (!(cond)) fail(std::string(msg) + "  [" #cond "] line " + std::to_string(__LINE__)); \
  } while (0)

// ---- 16-bit formats, written independently of the library -------------------------------------

double decode_fp16(uint16_t h) {
  const int sign = (h >> 15) & 1;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  double value;
  if (exponent == 0) {
    value = std::ldexp(static_cast<double>(mantissa), -24);
  } else if (exponent == 31) {
    value = mantissa == 0 ? kInf : std::numeric_limits<double>::quiet_NaN();
  } else {
    value = std::ldexp(1.0 + mantissa / 1024.0, exponent - 15);
  }
  return sign ? -value : value;
}

double decode_bf16(uint16_t b) {
  const int sign = (b >> 15) & 1;
  const int exponent = (b >> 7) & 0xff;
  const int mantissa = b & 0x7f;
  double value;
  if (exponent == 0) {
    value = std::ldexp(static_cast<double>(mantissa), -133);  // 2^-126 * m / 128
  } else if (exponent == 255) {
    value = mantissa == 0 ? kInf : std::numeric_limits<double>::quiet_NaN();
  } else {
    value = std::ldexp(1.0 + mantissa / 128.0, exponent - 127);
  }
  return sign ? -value : value;
}

// Nearest representable value, by search over the (monotone) non-negative codes: slow but obviously
// right, and the tests only encode a few thousand values per format.
uint16_t encode_nearest(double x, double (*decode)(uint16_t), uint16_t max_finite_code, uint16_t inf_code) {
  if (std::isnan(x)) return static_cast<uint16_t>(inf_code | 1u);
  const uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  const double a = std::fabs(x);
  if (a == kInf || a > decode(max_finite_code)) return static_cast<uint16_t>(sign | inf_code);
  uint16_t lo = 0, hi = max_finite_code;  // decode(lo) <= a <= decode(hi)
  while (hi - lo > 1) {
    const uint16_t mid = static_cast<uint16_t>((lo + hi) / 2);
    (decode(mid) <= a ? lo : hi) = mid;
  }
  const uint16_t best = (a - decode(lo) <= decode(hi) - a) ? lo : hi;
  return static_cast<uint16_t>(sign | best);
}

uint16_t encode_fp16(double x) { return encode_nearest(x, decode_fp16, 0x7bff, 0x7c00); }
uint16_t encode_bf16(double x) { return encode_nearest(x, decode_bf16, 0x7f7f, 0x7f80); }

bool same_double(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

void test_decoders() {
  int bad_fp16 = 0, bad_bf16 = 0;
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const uint16_t b = static_cast<uint16_t>(bits);
    if (!same_double(selfreplay_fast::fp16_bits_to_float(b), decode_fp16(b))) ++bad_fp16;
    if (!same_double(selfreplay_fast::bf16_bits_to_float(b), decode_bf16(b))) ++bad_bf16;
    // Signed zeros must keep their sign.
  }
  CHECK(bad_fp16 == 0, "fp16 decoder disagrees on " + std::to_string(bad_fp16) + " bit patterns");
  CHECK(bad_bf16 == 0, "bf16 decoder disagrees on " + std::to_string(bad_bf16) + " bit patterns");
  CHECK(std::signbit(selfreplay_fast::fp16_bits_to_float(0x8000)), "fp16 -0 keeps its sign");
}

// ---- reference ----------------------------------------------------------------------------------

struct RowResult {
  std::vector<int32_t> ids;
  std::vector<double> logprobs;
  double tail;
};

double log_sum_exp(const std::vector<double>& values) {
  double m = -kInf;
  for (double v : values) {
    if (std::isnan(v)) return v;
    m = std::max(m, v);
  }
  if (m == -kInf) return -kInf;
  if (m == kInf) return std::numeric_limits<double>::quiet_NaN();
  double s = 0.0;
  for (double v : values) s += std::exp(v - m);
  return m + std::log(s);
}

RowResult reference_row(const std::vector<double>& x, int64_t k) {
  const int64_t vocab = static_cast<int64_t>(x.size());
  std::vector<int32_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  // NaN sorts last here; rows with NaN only check that outputs are NaN.
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    if (std::isnan(x[a]) || std::isnan(x[b])) return !std::isnan(x[a]) && std::isnan(x[b]);
    return x[a] > x[b];
  });
  const double lse = log_sum_exp(x);
  RowResult r;
  std::vector<double> rest;
  for (int64_t j = 0; j < vocab; ++j) {
    if (j < k) {
      r.ids.push_back(order[j]);
      r.logprobs.push_back(x[order[j]] - lse);
    } else {
      rest.push_back(x[order[j]]);
    }
  }
  r.tail = log_sum_exp(rest) - lse;
  return r;
}

// ---- harness ------------------------------------------------------------------------------------

struct Matrix {
  LogitsDType dtype;
  int64_t rows, vocab;
  std::vector<float> f32;
  std::vector<uint16_t> u16;
  std::vector<double> exact;  // the values the kernel actually sees

  const void* data() const {
    return dtype == LogitsDType::kFloat32 ? static_cast<const void*>(f32.data()) : static_cast<const void*>(u16.data());
  }
};

Matrix make_matrix(const std::vector<double>& values, int64_t rows, int64_t vocab, LogitsDType dtype) {
  Matrix m{dtype, rows, vocab, {}, {}, {}};
  m.exact.resize(values.size());
  if (dtype == LogitsDType::kFloat32) {
    m.f32.resize(values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      m.f32[i] = static_cast<float>(values[i]);
      m.exact[i] = m.f32[i];
    }
  } else {
    m.u16.resize(values.size());
    const bool half = dtype == LogitsDType::kFloat16;
    for (size_t i = 0; i < values.size(); ++i) {
      m.u16[i] = half ? encode_fp16(values[i]) : encode_bf16(values[i]);
      m.exact[i] = half ? decode_fp16(m.u16[i]) : decode_bf16(m.u16[i]);
    }
  }
  return m;
}

const char* dtype_name(LogitsDType d) {
  return d == LogitsDType::kFloat32 ? "fp32" : (d == LogitsDType::kBFloat16 ? "bf16" : "fp16");
}

// `want` is rounded to float first: the outputs are floats, so e.g. a log-prob of -6e38 is -inf.
bool close(double got, double want_exact, double atol, double rtol) {
  const double want = static_cast<float>(want_exact);
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

// Runs the kernel and compares every row with the reference. The outputs are float, so log-probs get
// an absolute tolerance plus float rounding of their magnitude.
void check_matrix(const Matrix& m, int64_t k, const std::string& label, int threads = 0) {
  std::vector<int32_t> ids(m.rows * k, -7);
  std::vector<float> logprobs(m.rows * k), tail(m.rows);
  selfreplay_fast::topk_logprobs_cpu(m.data(), m.dtype, m.rows, m.vocab, k, ids.data(), logprobs.data(), tail.data(),
                                     threads);
  for (int64_t r = 0; r < m.rows; ++r) {
    std::vector<double> row(m.exact.begin() + r * m.vocab, m.exact.begin() + (r + 1) * m.vocab);
    const RowResult want = reference_row(row, k);
    const std::string where = label + " " + dtype_name(m.dtype) + " V=" + std::to_string(m.vocab) +
                              " k=" + std::to_string(k) + " row " + std::to_string(r);
    const bool has_nan = std::any_of(row.begin(), row.end(), [](double v) { return std::isnan(v); });
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = ids[r * k + j];
      ++g_checks;
      if (id < 0 || id >= m.vocab) {
        fail(where + ": id out of range at slot " + std::to_string(j));
        return;
      }
      if (has_nan) {
        CHECK(std::isnan(logprobs[r * k + j]), where + ": NaN row must give NaN log-probs");
        continue;
      }
      CHECK(id == want.ids[j], where + ": id at slot " + std::to_string(j) + " is " + std::to_string(id) +
                                   ", want " + std::to_string(want.ids[j]));
      CHECK(close(logprobs[r * k + j], want.logprobs[j], 2e-6, 2e-6),
            where + ": logprob at slot " + std::to_string(j) + " is " + std::to_string(logprobs[r * k + j]) +
                ", want " + std::to_string(want.logprobs[j]));
    }
    if (has_nan) {
      CHECK(std::isnan(tail[r]), where + ": NaN row must give a NaN tail");
      continue;
    }
    CHECK(close(tail[r], want.tail, 2e-6, 2e-6),
          where + ": tail is " + std::to_string(tail[r]) + ", want " + std::to_string(want.tail));
  }
}

std::vector<double> normal_values(size_t n, double scale, std::mt19937_64& rng) {
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

const LogitsDType kAllDtypes[] = {LogitsDType::kFloat32, LogitsDType::kBFloat16, LogitsDType::kFloat16};

// ---- tests --------------------------------------------------------------------------------------

void test_random_shapes() {
  std::mt19937_64 rng(1234);
  const int64_t vocabs[] = {1, 2, 7, 63, 64, 65, 129, 1000, 4099};
  for (LogitsDType dtype : kAllDtypes) {
    for (int64_t vocab : vocabs) {
      const int64_t rows = vocab > 1000 ? 3 : 5;
      // Scale 3 keeps the values distinct enough in 16-bit formats to exercise ordering, and
      // duplicates (ties) still occur in bf16.
      const Matrix m = make_matrix(normal_values(rows * vocab, 3.0, rng), rows, vocab, dtype);
      std::vector<int64_t> ks;
      if (vocab <= 65) {
        for (int64_t k = 1; k <= vocab; ++k) ks.push_back(k);  // every k from 1 to V
      } else {
        ks = {1, 2, 64, vocab / 2, vocab - 1, vocab};
      }
      for (int64_t k : ks) check_matrix(m, k, "random");
    }
  }
}

void test_large_vocab() {
  std::mt19937_64 rng(99);
  const int64_t vocab = 50257;
  for (LogitsDType dtype : kAllDtypes) {
    const Matrix m = make_matrix(normal_values(2 * vocab, 2.0, rng), 2, vocab, dtype);
    check_matrix(m, 64, "large");
  }
  // Increasing logits: every logit beats the threshold, the worst case for the candidate buffer.
  std::vector<double> rising(vocab);
  for (int64_t i = 0; i < vocab; ++i) rising[i] = 1e-3 * static_cast<double>(i);
  check_matrix(make_matrix(rising, 1, vocab, LogitsDType::kFloat32), 100, "rising");
}

void test_ties() {
  // Small integers: massive ties. The lower id must rank first among equal logits.
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int> dist(-3, 3);
  const int64_t vocab = 300;
  std::vector<double> v(4 * vocab);
  for (auto& x : v) x = dist(rng);
  for (LogitsDType dtype : kAllDtypes) {
    const Matrix m = make_matrix(v, 4, vocab, dtype);
    for (int64_t k : {1, 5, 64, 150, 299, 300}) check_matrix(m, k, "ties");
  }
  // All equal: the top k are ids 0..k-1.
  check_matrix(make_matrix(std::vector<double>(1000, 0.5), 1, 1000, LogitsDType::kFloat32), 10, "all-equal");
}

void test_infinities_and_extremes() {
  const int64_t vocab = 200;
  std::mt19937_64 rng(5);
  std::vector<std::vector<double>> rows;
  {
    auto r = normal_values(vocab, 1.0, rng);  // a few -inf entries
    for (int i = 0; i < vocab; i += 7) r[i] = -kInf;
    rows.push_back(r);
  }
  {
    std::vector<double> r(vocab, -kInf);  // fewer finite entries than k: -inf entries fill the top k
    r[3] = 1.0;
    r[150] = 2.0;
    rows.push_back(r);
  }
  {
    auto r = normal_values(vocab, 1.0, rng);  // huge logits: the tail is ~e^-2e30 of the total
    r[10] = 1e30;
    r[20] = -1e30;
    r[30] = 3e38;
    r[40] = -3e38;
    rows.push_back(r);
  }
  {
    auto r = normal_values(vocab, 1.0, rng);  // +-80 peaks: tail mass ~e^-80, must not be lost
    r[0] = 80.0;
    r[199] = -80.0;
    r[100] = 79.5;
    rows.push_back(r);
  }
  {
    std::vector<double> r(vocab, -100.0);  // everything far below 0
    r[123] = -99.0;
    rows.push_back(r);
  }
  for (LogitsDType dtype : {LogitsDType::kFloat32}) {
    std::vector<double> flat;
    for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
    const Matrix m = make_matrix(flat, static_cast<int64_t>(rows.size()), vocab, dtype);
    for (int64_t k : std::vector<int64_t>{1, 2, 5, 64, vocab - 1, vocab}) check_matrix(m, k, "extremes");
  }
  for (LogitsDType dtype : {LogitsDType::kBFloat16, LogitsDType::kFloat16}) {
    // 16-bit formats: -inf rows and +-80 peaks (1e30 is not representable in fp16).
    std::vector<double> flat;
    flat.insert(flat.end(), rows[0].begin(), rows[0].end());
    flat.insert(flat.end(), rows[1].begin(), rows[1].end());
    flat.insert(flat.end(), rows[3].begin(), rows[3].end());
    const Matrix m = make_matrix(flat, 3, vocab, dtype);
    for (int64_t k : std::vector<int64_t>{1, 2, 64, vocab}) check_matrix(m, k, "extremes");
  }
}

void test_degenerate_rows() {
  const int64_t vocab = 100;
  for (LogitsDType dtype : kAllDtypes) {
    // All -inf: no distribution. NaN log-probs and tail (torch.log_softmax gives NaN too).
    const Matrix all_neg_inf = make_matrix(std::vector<double>(vocab, -kInf), 1, vocab, dtype);
    std::vector<int32_t> ids(3);
    std::vector<float> lp(3), tail(1);
    selfreplay_fast::topk_logprobs_cpu(all_neg_inf.data(), dtype, 1, vocab, 3, ids.data(), lp.data(), tail.data());
    CHECK(std::isnan(lp[0]) && std::isnan(lp[2]) && std::isnan(tail[0]), "all -inf row gives NaN");
    CHECK(ids[0] == 0 && ids[1] == 1 && ids[2] == 2, "all -inf row still reports the lowest ids");

    // NaN anywhere (in the first k or later) poisons the row; other rows are unaffected.
    std::vector<double> v(3 * vocab, 0.25);
    v[1] = std::numeric_limits<double>::quiet_NaN();
    v[vocab + 77] = std::numeric_limits<double>::quiet_NaN();
    check_matrix(make_matrix(v, 3, vocab, dtype), 4, "nan");

    // +inf: NaN log-probs (inf - inf), the id of the +inf entry first.
    std::vector<double> w(vocab, 0.0);
    w[42] = kInf;
    const Matrix pos_inf = make_matrix(w, 1, vocab, dtype);
    selfreplay_fast::topk_logprobs_cpu(pos_inf.data(), dtype, 1, vocab, 3, ids.data(), lp.data(), tail.data());
    CHECK(ids[0] == 42 && std::isnan(lp[0]) && std::isnan(tail[0]), "+inf row gives NaN with the +inf id first");
  }
}

void test_threads_agree() {
  std::mt19937_64 rng(3);
  const int64_t rows = 37, vocab = 3001;
  const Matrix m = make_matrix(normal_values(rows * vocab, 2.0, rng), rows, vocab, LogitsDType::kFloat32);
  std::vector<int32_t> ids1(rows * 16), ids4(rows * 16);
  std::vector<float> lp1(rows * 16), lp4(rows * 16), t1(rows), t4(rows);
  selfreplay_fast::topk_logprobs_cpu(m.data(), m.dtype, rows, vocab, 16, ids1.data(), lp1.data(), t1.data(), 1);
  selfreplay_fast::topk_logprobs_cpu(m.data(), m.dtype, rows, vocab, 16, ids4.data(), lp4.data(), t4.data(), 4);
  CHECK(ids1 == ids4, "ids do not depend on the thread count");
  CHECK(std::memcmp(lp1.data(), lp4.data(), lp1.size() * sizeof(float)) == 0, "log-probs are bitwise reproducible");
  CHECK(std::memcmp(t1.data(), t4.data(), t1.size() * sizeof(float)) == 0, "tails are bitwise reproducible");
  check_matrix(m, 16, "threads", 3);
}

void expect_invalid(const std::function<void()>& call, const std::string& needle, const std::string& label) {
  ++g_checks;
  try {
    call();
    fail(label + ": no exception");
  } catch (const std::invalid_argument& e) {
    if (std::string(e.what()).find(needle) == std::string::npos) {
      fail(label + ": message '" + e.what() + "' lacks '" + needle + "'");
    }
  } catch (...) {
    fail(label + ": wrong exception type");
  }
}

void test_bad_arguments() {
  std::vector<float> x(10, 0.0f);
  std::vector<int32_t> ids(20);
  std::vector<float> lp(20), tail(2);
  auto run = [&](int64_t rows, int64_t vocab, int64_t k, const void* data) {
    return [&, rows, vocab, k, data] {
      selfreplay_fast::topk_logprobs_cpu(data, LogitsDType::kFloat32, rows, vocab, k, ids.data(), lp.data(),
                                         tail.data());
    };
  };
  expect_invalid(run(2, 5, 0, x.data()), "k must be >= 1", "k = 0");
  expect_invalid(run(2, 5, -3, x.data()), "k must be >= 1", "k < 0");
  expect_invalid(run(2, 5, 6, x.data()), "must be <= vocab", "k > vocab");
  expect_invalid(run(-1, 5, 1, x.data()), "n_rows", "negative rows");
  expect_invalid(run(1, 0, 1, x.data()), "vocab must be >= 1", "empty vocab");
  expect_invalid(run(1, int64_t{1} << 31, 1, x.data()), "int32", "vocab too large for int32 ids");
  expect_invalid(run(1, 5, 1, nullptr), "null", "null logits");
  expect_invalid(
      [&] {
        selfreplay_fast::topk_logprobs_cpu(x.data(), static_cast<LogitsDType>(9), 1, 5, 1, ids.data(), lp.data(),
                                           tail.data());
      },
      "dtype", "unknown dtype");
  // Zero rows is valid and touches nothing.
  ids[0] = -5;
  selfreplay_fast::topk_logprobs_cpu(nullptr, LogitsDType::kFloat32, 0, 5, 2, nullptr, nullptr, nullptr);
  CHECK(ids[0] == -5, "zero rows writes nothing");
}

}  // namespace

int main() {
  test_decoders();
  test_random_shapes();
  test_large_vocab();
  test_ties();
  test_infinities_and_extremes();
  test_degenerate_rows();
  test_threads_agree();
  test_bad_arguments();
  if (g_failures != 0) {
    std::fprintf(stderr, "%d of %d checks failed\n", g_failures, g_checks);
    return 1;
  }
  std::printf("all %d checks passed\n", g_checks);
  return 0;
}
