// What the training-mode batch-norm kernels share (batch_norm_relu.cpp, batch_norm_pool_relu.cpp):
// the storage types' widening and narrowing (bfloat16.h), the affine map, the per-channel sums, the batch
// statistics with the running-statistics update, the input-gradient formula and its coefficients,
// and the argument checks. Tensors are 4-D CPU, channels-last (NHWC) or NCHW, float or bfloat16;
// the statistics, weight, bias and running statistics are float32 (as PyTorch keeps them under
// bf16 autocast).
//
// Sums: in float (in registers) over at most kFlush values per accumulator, then in double; each
// chunk of rows has its own partial sums, added in chunk order afterwards, so the result does not
// depend on the number of threads. The variance is summed around the channel's first value: a mean
// far from zero costs no precision.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "bfloat16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

// The inner loops write through one pointer and read per-channel coefficients through others: tell
// the vectoriser they do not overlap (it would otherwise version or skip the loop).
#if defined(__clang__)
#define VGGKIT_NO_ALIAS _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define VGGKIT_NO_ALIAS _Pragma("GCC ivdep")
#else
#define VGGKIT_NO_ALIAS
#endif

namespace vggkit::bn {

// Inner loops run over fixed blocks of kLanes channels (NHWC) or values (NCHW), then a remainder:
// a loop over a runtime count of 16 or 32 bfloat16 channels could fall wholly into a compiler's
// scalar remainder at AVX-512 width.
constexpr int64_t kLanes = 16;
// Values per channel (per lane in NCHW) summed in float before the double sum: at 64, bf16 data
// already cost the variance ~1e-6 of its value; at 16 it is a float32 rounding.
constexpr int64_t kFlush = 16;
constexpr int64_t kGrainValues = 32768;  // values per parallel task and per partial sum, at least
constexpr int64_t kMaxChunks = 256;      // partial sums per reduction, at most

using storage::bits_of;
using storage::float_of;
using storage::narrow;
using storage::round_bits;
using storage::widen;

inline uint32_t mask_of(bool take) { return 0u - static_cast<uint32_t>(take); }  // all ones or all zeros

inline bool is_nan(float v) { return v != v; }

// widen(narrow<scalar_t>(v)), from v and is_nan(v), for kernels that go on computing with the stored
// value (batch_norm_pool_relu.cpp). The NaN case is a mask, not ?: (which C++ compiles as a branch
// first): with the compares that follow, GCC 12 would keep that branch, threaded through them, and
// the loop would not vectorise.
template <typename scalar_t>
inline float stored(float v, bool nan);

template <>
inline float stored<float>(float v, bool) {
  return v;
}

template <>
inline float stored<c10::BFloat16>(float v, bool nan) {
  const uint32_t rounded = round_bits(bits_of(v)) & 0xFFFF0000u;
  return float_of((rounded & ~mask_of(nan)) | (0x7FC00000u & mask_of(nan)));
}

// The affine output before the ReLU; fma: one rounding, the same in every kernel that recomputes it.
inline float affine(float x, float scale, float shift) { return std::fma(x, scale, shift); }

// As torch.relu and threshold_backward: y <= 0 is blocked, NaN passes.
inline bool passes(float y) { return !(y <= 0.f); }

// The batch norm's input gradient at one value from its output gradient dy and its input x, with the
// channel's coefficients from gradient_coefficients.
inline float input_gradient(float dy, float x, float a, float b, float mean_dy, float mean) {
  return a * (dy - mean_dy) - (x - mean) * b;
}

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A tensor as rows of contiguous values: pixels of C channels (NHWC) or planes of H*W values of
// one channel (NCHW).
struct Layout {
  int64_t N, C, HW;
  bool nhwc;
  int64_t count() const { return N * HW; }  // values per channel
  int64_t rows() const { return nhwc ? N * HW : N * C; }
  int64_t row_length() const { return nhwc ? C : HW; }
  int64_t first_of_channel(int64_t c) const { return nhwc ? c : c * HW; }
};

// body(i) for i in [0, n): blocks of Lanes, then of kLanes, then one by one.
template <int64_t Lanes = kLanes, typename Body>
inline void in_lanes(int64_t n, const Body& body) {
  int64_t i = 0;
  for (; i + Lanes <= n; i += Lanes) {
    VGGKIT_NO_ALIAS
    for (int64_t j = 0; j < Lanes; ++j) body(i + j);
  }
  if constexpr (Lanes > kLanes) {
    in_lanes(n - i, [&](int64_t j) { body(i + j); });
  } else {
    for (; i < n; ++i) body(i);
  }
}

// ---- per-channel sums: term(c, i, u, v) gives the two terms of value i, of channel c

// One pixel's terms for channels [c0, c0 + width) added to the accumulators u and v.
template <typename Term>
inline void add_pixel(const Term& term, int64_t base, int64_t c0, int64_t width, float* u, float* v) {
  VGGKIT_NO_ALIAS
  for (int64_t j = 0; j < width; ++j) {
    float a, b;
    term(c0 + j, base + c0 + j, a, b);
    u[j] += a;
    v[j] += b;
  }
}

// Channels [c0, c0 + width), width <= Lanes, of pixels [first, last) added to out. The float sums
// live in registers, two sets (even and odd pixels) so that consecutive additions do not wait on
// each other; accumulators in memory, updated pixel after pixel, would.
template <int64_t Lanes, typename Term>
inline void sum_channels(const Term& term, int64_t C, int64_t c0, int64_t width, int64_t first, int64_t last,
                         double* out) {
  float u0[Lanes] = {}, v0[Lanes] = {}, u1[Lanes] = {}, v1[Lanes] = {};
  int64_t p = first;
  for (; p + 2 <= last; p += 2) {
    add_pixel(term, p * C, c0, width, u0, v0);
    add_pixel(term, (p + 1) * C, c0, width, u1, v1);
  }
  if (p < last) add_pixel(term, p * C, c0, width, u0, v0);
  for (int64_t j = 0; j < width; ++j) {
    out[c0 + j] += static_cast<double>(u0[j]) + u1[j];
    out[C + c0 + j] += static_cast<double>(v0[j]) + v1[j];
  }
}

// Pixels [begin, end) of C channels (value i = pixel * C + c): out[c] and out[C + c] += the sums of
// the terms u and v of channel c; Lanes channels at a time.
template <int64_t Lanes = kLanes, typename Term>
void sum_pixels(int64_t C, const Term& term, int64_t begin, int64_t end, double* out) {
  const int64_t full = C - C % Lanes;
  for (int64_t first = begin; first < end; first += 2 * kFlush) {  // kFlush values per set
    const int64_t last = std::min(end, first + 2 * kFlush);
    for (int64_t c0 = 0; c0 < full; c0 += Lanes) sum_channels<Lanes>(term, C, c0, Lanes, first, last, out);
    if (full < C) sum_channels<Lanes>(term, C, full, C - full, first, last, out);
  }
}

// Values [base, base + length) of channel c, summed in kLanes float lanes: out[c] and out[C + c] +=
// the sums of their terms u and v.
template <typename Term>
void sum_run(const Term& term, int64_t C, int64_t c, int64_t base, int64_t length, double* out) {
  const int64_t span = kLanes * kFlush;
  double du = 0, dv = 0;
  for (int64_t first = 0; first < length; first += span) {
    float lu[kLanes] = {}, lv[kLanes] = {};
    const int64_t stop = std::min(length, first + span);
    int64_t i = first;
    for (; i + kLanes <= stop; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        float u, v;
        term(c, base + i + j, u, v);
        lu[j] += u;
        lv[j] += v;
      }
    }
    for (; i < stop; ++i) {
      float u, v;
      term(c, base + i, u, v);
      lu[0] += u;
      lv[0] += v;
    }
    for (int64_t j = 0; j < kLanes; ++j) {
      du += lu[j];
      dv += lv[j];
    }
  }
  out[c] += du;
  out[C + c] += dv;
}

// {sum u (C values), sum v (C values)} in double, where sum_rows(begin, end, out) adds the sums of
// rows [begin, end) (values_per_row values each, read) to out. Rows go in fixed chunks, each with its
// own partial sums, added in chunk order: the same result on any number of threads.
template <typename SumRows>
std::vector<double> chunked_sums(int64_t rows, int64_t values_per_row, int64_t C, const SumRows& sum_rows) {
  const int64_t per_row = std::max<int64_t>(1, values_per_row);
  const int64_t per_chunk = std::max(divup(kGrainValues, per_row), divup(rows, kMaxChunks));
  const int64_t chunks = divup(rows, per_chunk);
  std::vector<double> partial(chunks * 2 * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    const SumRows own = sum_rows;  // each task's own copy: the pointers it holds stay in registers
    for (int64_t k = first; k < last; ++k) {
      const int64_t begin = k * per_chunk, end = std::min(rows, begin + per_chunk);
      own(begin, end, partial.data() + k * 2 * C);
    }
  });
  std::vector<double> sums(2 * C, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < 2 * C; ++i) sums[i] += partial[k * 2 * C + i];
  }
  return sums;
}

// Per channel c, the sums (double) of the terms u and v that term(c, i, u, v) gives for the values
// i of channel c: {sum u (C values), sum v (C values)}.
template <typename Term>
std::vector<double> channel_sums(const Layout& s, const Term& term) {
  return chunked_sums(s.rows(), s.row_length(), s.C, [=](int64_t begin, int64_t end, double* out) {
    if (s.nhwc) {
      sum_pixels(s.C, term, begin, end, out);
    } else {
      for (int64_t plane = begin; plane < end; ++plane) sum_run(term, s.C, plane % s.C, plane * s.HW, s.HW, out);
    }
  });
}

// ---- the per-channel coefficients

inline std::vector<float> floats(const std::optional<at::Tensor>& t, int64_t C, float fill, const char* op,
                                 const char* name) {
  if (!t.has_value() || !t->defined()) return std::vector<float>(C, fill);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == C && t->device().is_cpu(), op, ": ", name,
              " must be a float32 CPU tensor of ", C, " values");
  const at::Tensor c = t->contiguous();
  return std::vector<float>(c.const_data_ptr<float>(), c.const_data_ptr<float>() + C);
}

// The weight (gamma) and bias (beta): 1 and 0 where the batch norm has none.
struct Parameters {
  std::vector<float> gamma, beta;
};

inline Parameters parameters_of(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                int64_t C, const char* op) {
  return {floats(weight, C, 1.f, op, "weight"), floats(bias, C, 0.f, op, "bias")};
}

// The running statistics, updated in place; null where the batch norm keeps none.
struct Running {
  float* mean;
  float* var;
};

inline float* running(const std::optional<at::Tensor>& t, int64_t C, const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == C && t->is_contiguous() && t->device().is_cpu(), op,
              ": ", name, " must be a contiguous float32 CPU tensor of ", C, " values");
  return t->mutable_data_ptr<float>();
}

inline Running running_of(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, int64_t C,
                          const char* op) {
  return {running(mean, C, op, "running_mean"), running(var, C, op, "running_var")};
}

// y = x * scale + shift, from the saved mean and invstd: one function for the forward and the mask.
struct Affine {
  std::vector<float> scale, shift;
};

inline Affine affine_of(const float* mean, const float* invstd, const Parameters& p) {
  const int64_t C = static_cast<int64_t>(p.gamma.size());
  Affine a{std::vector<float>(C), std::vector<float>(C)};
  for (int64_t c = 0; c < C; ++c) {
    a.scale[c] = invstd[c] * p.gamma[c];
    a.shift[c] = p.beta[c] - mean[c] * a.scale[c];
  }
  return a;
}

// mean and invstd from the shifted sums; the running statistics as PyTorch updates them.
inline void finish_statistics(const std::vector<double>& sums, const float* first, int64_t count, double momentum,
                              double eps, float* mean, float* invstd, const Running& r) {
  const int64_t C = static_cast<int64_t>(sums.size() / 2);
  const double n = static_cast<double>(count);
  for (int64_t c = 0; c < C; ++c) {
    const double d = sums[c] / n;
    const double m = first[c] + d;
    const double var = std::max(0.0, sums[C + c] / n - d * d);
    mean[c] = static_cast<float>(m);
    invstd[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
    if (r.mean) r.mean[c] = static_cast<float>(momentum * m + (1 - momentum) * r.mean[c]);
    if (r.var) r.var[c] = static_cast<float>(momentum * var * n / (n - 1) + (1 - momentum) * r.var[c]);
  }
}

// The batch's mean and invstd per channel (written to mean and invstd) and the running statistics'
// update; returns the affine map they give with the weight and bias.
template <typename scalar_t>
Affine batch_statistics(const scalar_t* xp, const Layout& s, const Parameters& p, const Running& r,
                        double momentum, double eps, float* mean, float* invstd) {
  std::vector<float> first(s.C);
  for (int64_t c = 0; c < s.C; ++c) first[c] = widen(xp[s.first_of_channel(c)]);
  const float* k = first.data();
  const auto sums = channel_sums(s, [=](int64_t c, int64_t i, float& u, float& v) {
    u = widen(xp[i]) - k[c];
    v = u * u;
  });
  finish_statistics(sums, k, s.count(), momentum, eps, mean, invstd, r);
  return affine_of(mean, invstd, p);
}

// Per channel, input_gradient's a, b and mean_dy.
struct Gradient {
  std::vector<float> a, b, mean_dy;
};

// dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) = a * (dy - mean(dy)) - (x - mean) * b,
// from sums = {sum dy, sum dy * (x - mean)} over count values per channel; the weight and bias
// gradients written to dgamma and dbeta.
inline Gradient gradient_coefficients(const std::vector<double>& sums, int64_t count, const Parameters& p,
                                      const float* invstd, float* dgamma, float* dbeta) {
  const int64_t C = static_cast<int64_t>(p.gamma.size());
  const double n = static_cast<double>(count);
  Gradient k{std::vector<float>(C), std::vector<float>(C), std::vector<float>(C)};
  for (int64_t c = 0; c < C; ++c) {
    const double r = invstd[c], wr = p.gamma[c] * r;
    dgamma[c] = static_cast<float>(sums[C + c] * r);
    dbeta[c] = static_cast<float>(sums[c]);
    k.a[c] = static_cast<float>(wr);
    k.b[c] = static_cast<float>(wr * r * r * sums[C + c] / n);
    k.mean_dy[c] = static_cast<float>(sums[c] / n);
  }
  return k;
}

// ---- the operators' arguments

inline Layout layout_of(const at::Tensor& x, at::MemoryFormat format, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": expected float32 or bfloat16, got ", x.scalar_type());
  const Layout s{x.size(0), x.size(1), x.size(2) * x.size(3), format == at::MemoryFormat::ChannelsLast};
  TORCH_CHECK(s.C > 0 && s.count() > 1, op, ": expected more than 1 value per channel, got input of size ",
              x.sizes());
  return s;
}

// C float32 values, as the statistics and parameter gradients are kept.
inline at::Tensor per_channel(const at::Tensor& x, int64_t C) { return at::empty({C}, x.options().dtype(at::kFloat)); }

// run(scalar_t{}): the kernel's storage type from the tensor's (layout_of has checked it).
template <typename Run>
void by_dtype(at::ScalarType type, const Run& run) {
  if (type == at::kFloat) {
    run(float{});
  } else {
    run(c10::BFloat16{});
  }
}

}  // namespace vggkit::bn
