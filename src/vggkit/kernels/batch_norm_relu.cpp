// Training-mode batch norm (statistics over N, H, W per channel), optionally followed by a ReLU,
// forward and backward, for 4-D CPU tensors: channels-last (NHWC) or NCHW, float or bfloat16; the
// statistics, weight, bias and running statistics are float32 (as PyTorch keeps them under bf16
// autocast). See bn_relu.py for the Python side.
//
// forward: one pass for the per-channel sums, one writing y = relu?(x * scale + shift).
// backward: one pass for sum(g) and sum(g * (x - mean)), one writing dx, where g is dy with the
// ReLU's mask applied; the mask is recomputed from x (which both passes read anyway) by the very
// expression that gave y, so it is the forward's to the bit.
//
// Sums: in float (in registers) over at most kFlush values per accumulator, then in double; each
// chunk of rows has its own partial sums, added in chunk order afterwards, so the result does not
// depend on the number of threads. The variance is summed around the channel's first value: a mean
// far from zero costs no precision.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
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

namespace {

// Inner loops run over fixed blocks of kLanes channels (NHWC) or values (NCHW), then a remainder:
// a loop over a runtime count of 16 or 32 bfloat16 channels could fall wholly into a compiler's
// scalar remainder at AVX-512 width.
constexpr int64_t kLanes = 16;
// Values per channel (per lane in NCHW) summed in float before the double sum: at 64, bf16 data
// already cost the variance ~1e-6 of its value; at 16 it is a float32 rounding.
constexpr int64_t kFlush = 16;
constexpr int64_t kGrainValues = 32768;  // values per parallel task and per partial sum, at least
constexpr int64_t kMaxChunks = 256;      // partial sums per reduction, at most

inline float widen(float v) { return v; }

inline float widen(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// float to the storage type: for bfloat16, round to nearest even (NaN to the quiet NaN) exactly as
// c10::BFloat16 does, written without branches.
template <typename scalar_t>
inline scalar_t narrow(float v);

template <>
inline float narrow<float>(float v) {
  return v;
}

template <>
inline c10::BFloat16 narrow<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// The affine output before the ReLU; fma: one rounding, the same in the forward and the mask.
inline float affine(float x, float scale, float shift) { return std::fma(x, scale, shift); }

// As torch.relu and threshold_backward: y <= 0 is blocked, NaN passes.
inline bool passes(float y) { return !(y <= 0.f); }

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

template <typename Body>
inline void in_lanes(int64_t n, const Body& body) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    VGGKIT_NO_ALIAS
    for (int64_t j = 0; j < kLanes; ++j) body(i + j);
  }
  for (; i < n; ++i) body(i);
}

// out[i] = f(c, i) for every value i of the tensor, c its channel. Each task works on its own copy
// of f: the pointers it holds stay in registers instead of being reloaded row after row.
template <typename scalar_t, typename F>
void for_each_value(const Layout& s, scalar_t* out, const F& f) {
  const int64_t length = s.row_length(), C = s.C;
  const bool nhwc = s.nhwc;
  at::parallel_for(0, s.rows(), std::max<int64_t>(1, kGrainValues / length), [=](int64_t begin, int64_t end) {
    const F fn = f;
    if (nhwc && C % kLanes == 0) {  // the pixels as one run of blocks of kLanes channels: no loop per pixel
      for (int64_t i = begin * C, c0 = 0; i < end * C; i += kLanes) {
        VGGKIT_NO_ALIAS
        for (int64_t j = 0; j < kLanes; ++j) out[i + j] = narrow<scalar_t>(fn(c0 + j, i + j));
        c0 = c0 + kLanes == C ? 0 : c0 + kLanes;
      }
      return;
    }
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * length;
      scalar_t* o = out + base;
      if (nhwc) {
        in_lanes(length, [&](int64_t c) { o[c] = narrow<scalar_t>(fn(c, base + c)); });
      } else {
        const int64_t c = row % C;
        in_lanes(length, [&](int64_t i) { o[i] = narrow<scalar_t>(fn(c, base + i)); });
      }
    }
  });
}

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

// Channels [c0, c0 + width), width <= kLanes, of pixels [first, last) added to out. The float sums
// live in registers, two sets (even and odd pixels) so that consecutive additions do not wait on
// each other; accumulators in memory, updated pixel after pixel, would.
template <typename Term>
inline void sum_channels(const Term& term, int64_t C, int64_t c0, int64_t width, int64_t first, int64_t last,
                         double* out) {
  float u0[kLanes] = {}, v0[kLanes] = {}, u1[kLanes] = {}, v1[kLanes] = {};
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

// NHWC rows (pixels) [begin, end): out[c] and out[C + c] += the sums of the terms u and v of channel c.
template <typename Term>
void sum_pixels(const Layout& s, const Term& term, int64_t begin, int64_t end, double* out) {
  const int64_t C = s.C, full = C - C % kLanes;
  for (int64_t first = begin; first < end; first += 2 * kFlush) {  // kFlush values per set
    const int64_t last = std::min(end, first + 2 * kFlush);
    for (int64_t c0 = 0; c0 < full; c0 += kLanes) sum_channels(term, C, c0, kLanes, first, last, out);
    if (full < C) sum_channels(term, C, full, C - full, first, last, out);
  }
}

// NCHW rows (planes) [begin, end): as sum_pixels, each plane summed in kLanes float lanes.
template <typename Term>
void sum_planes(const Layout& s, const Term& term, int64_t begin, int64_t end, double* out) {
  const int64_t HW = s.HW, span = kLanes * kFlush;
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t c = plane % s.C, base = plane * HW;
    double du = 0, dv = 0;
    for (int64_t first = 0; first < HW; first += span) {
      float lu[kLanes] = {}, lv[kLanes] = {};
      const int64_t stop = std::min(HW, first + span);
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
    out[s.C + c] += dv;
  }
}

// Per channel c, the sums (double) of the terms u and v that term(c, i, u, v) gives for the values
// i of channel c: {sum u (C values), sum v (C values)}.
template <typename Term>
std::vector<double> channel_sums(const Layout& s, const Term& term) {
  const int64_t C = s.C, rows = s.rows();
  const int64_t per_chunk = std::max(divup(kGrainValues, s.row_length()), divup(rows, kMaxChunks));
  const int64_t chunks = divup(rows, per_chunk);
  std::vector<double> partial(chunks * 2 * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    const Term own = term;  // as in for_each_value
    for (int64_t k = first; k < last; ++k) {
      const int64_t begin = k * per_chunk, end = std::min(rows, begin + per_chunk);
      double* out = partial.data() + k * 2 * C;
      if (s.nhwc) {
        sum_pixels(s, own, begin, end, out);
      } else {
        sum_planes(s, own, begin, end, out);
      }
    }
  });
  std::vector<double> sums(2 * C, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < 2 * C; ++i) sums[i] += partial[k * 2 * C + i];
  }
  return sums;
}

// ---- the per-channel coefficients

std::vector<float> floats(const std::optional<at::Tensor>& t, int64_t C, float fill, const char* name) {
  if (!t.has_value() || !t->defined()) return std::vector<float>(C, fill);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == C && t->device().is_cpu(), "batch_norm_relu: ", name,
              " must be a float32 CPU tensor of ", C, " values");
  const at::Tensor c = t->contiguous();
  return std::vector<float>(c.const_data_ptr<float>(), c.const_data_ptr<float>() + C);
}

// y = x * scale + shift, from the saved mean and invstd: one function for the forward and the mask.
struct Affine {
  std::vector<float> scale, shift;
};

Affine affine_of(const float* mean, const float* invstd, const std::vector<float>& gamma,
                 const std::vector<float>& beta) {
  const int64_t C = static_cast<int64_t>(gamma.size());
  Affine a{std::vector<float>(C), std::vector<float>(C)};
  for (int64_t c = 0; c < C; ++c) {
    a.scale[c] = invstd[c] * gamma[c];
    a.shift[c] = beta[c] - mean[c] * a.scale[c];
  }
  return a;
}

// mean and invstd from the shifted sums; the running statistics as PyTorch updates them.
void finish_statistics(const std::vector<double>& sums, const float* first, int64_t count, double momentum,
                       double eps, float* mean, float* invstd, float* running_mean, float* running_var) {
  const int64_t C = static_cast<int64_t>(sums.size() / 2);
  const double n = static_cast<double>(count);
  for (int64_t c = 0; c < C; ++c) {
    const double d = sums[c] / n;
    const double m = first[c] + d;
    const double var = std::max(0.0, sums[C + c] / n - d * d);
    mean[c] = static_cast<float>(m);
    invstd[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
    if (running_mean) running_mean[c] = static_cast<float>(momentum * m + (1 - momentum) * running_mean[c]);
    if (running_var) {
      running_var[c] = static_cast<float>(momentum * var * n / (n - 1) + (1 - momentum) * running_var[c]);
    }
  }
}

// ---- the kernels

template <typename scalar_t, bool relu>
void forward_kernel(const at::Tensor& x, const Layout& s, const std::vector<float>& gamma,
                    const std::vector<float>& beta, float* running_mean, float* running_var, double momentum,
                    double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  std::vector<float> first(s.C);
  for (int64_t c = 0; c < s.C; ++c) first[c] = widen(xp[s.first_of_channel(c)]);
  const float* k = first.data();
  const auto sums = channel_sums(s, [=](int64_t c, int64_t i, float& u, float& v) {
    u = widen(xp[i]) - k[c];
    v = u * u;
  });
  float* m = mean.mutable_data_ptr<float>();
  float* r = invstd.mutable_data_ptr<float>();
  finish_statistics(sums, k, s.count(), momentum, eps, m, r, running_mean, running_var);
  const Affine a = affine_of(m, r, gamma, beta);
  const float* scale = a.scale.data();
  const float* shift = a.shift.data();
  for_each_value(s, y.mutable_data_ptr<scalar_t>(), [=](int64_t c, int64_t i) {
    const float out = affine(widen(xp[i]), scale[c], shift[c]);
    return relu && !passes(out) ? 0.f : out;
  });
}

template <typename scalar_t, bool relu>
void backward_kernel(const at::Tensor& dy, const at::Tensor& x, const Layout& s, const std::vector<float>& gamma,
                     const std::vector<float>& beta, const float* mean, const float* invstd, at::Tensor& dx,
                     at::Tensor& dgamma, at::Tensor& dbeta) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = dy.const_data_ptr<scalar_t>();
  const Affine a = affine_of(mean, invstd, gamma, beta);
  const float* scale = a.scale.data();
  const float* shift = a.shift.data();
  const auto masked = [=](int64_t c, int64_t i, float xv) {
    const float g = widen(gp[i]);  // loaded either way: a conditional load would not vectorise
    return relu && !passes(affine(xv, scale[c], shift[c])) ? 0.f : g;
  };
  const auto sums = channel_sums(s, [=](int64_t c, int64_t i, float& u, float& v) {
    const float xv = widen(xp[i]);
    u = masked(c, i, xv);
    v = u * (xv - mean[c]);
  });
  // dx = w * invstd * (g - mean(g) - xhat * mean(g * xhat)) = a * (g - mean(g)) - (x - mean) * b
  const int64_t C = s.C;
  const double n = static_cast<double>(s.count());
  std::vector<float> coef_a(C), coef_b(C), mean_g(C);
  float* dw = dgamma.mutable_data_ptr<float>();
  float* db = dbeta.mutable_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const double r = invstd[c], wr = gamma[c] * r;
    dw[c] = static_cast<float>(sums[C + c] * r);
    db[c] = static_cast<float>(sums[c]);
    coef_a[c] = static_cast<float>(wr);
    coef_b[c] = static_cast<float>(wr * r * r * sums[C + c] / n);
    mean_g[c] = static_cast<float>(sums[c] / n);
  }
  const float *ca = coef_a.data(), *cb = coef_b.data(), *mg = mean_g.data();
  for_each_value(s, dx.mutable_data_ptr<scalar_t>(), [=](int64_t c, int64_t i) {
    const float xv = widen(xp[i]);
    return ca[c] * (masked(c, i, xv) - mg[c]) - (xv - mean[c]) * cb[c];
  });
}

// ---- the operators

Layout layout_of(const at::Tensor& x, at::MemoryFormat format) {
  TORCH_CHECK(x.dim() == 4, "batch_norm_relu: expected a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), "batch_norm_relu: expected a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "batch_norm_relu: expected float32 or bfloat16, got ", x.scalar_type());
  const Layout s{x.size(0), x.size(1), x.size(2) * x.size(3), format == at::MemoryFormat::ChannelsLast};
  TORCH_CHECK(s.C > 0 && s.count() > 1, "batch_norm_relu: expected more than 1 value per channel, got input of size ",
              x.sizes());
  return s;
}

float* running(const std::optional<at::Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == C && t->is_contiguous() && t->device().is_cpu(),
              "batch_norm_relu: ", name, " must be a contiguous float32 CPU tensor of ", C, " values");
  return t->mutable_data_ptr<float>();
}

// run(scalar_t{}, std::integral_constant<bool, relu>{}): the kernel's template arguments from runtime values.
template <typename Run>
void dispatch(at::ScalarType type, bool relu, const Run& run) {
  const auto with_relu = [&](auto scalar) {
    if (relu) {
      run(scalar, std::true_type{});
    } else {
      run(scalar, std::false_type{});
    }
  };
  if (type == at::kFloat) {
    with_relu(float{});
  } else {
    with_relu(c10::BFloat16{});
  }
}

// -> (y, mean, invstd); running_mean and running_var (if given) updated in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps, bool relu) {
  const auto format = input.suggest_memory_format();
  const Layout s = layout_of(input, format);
  const at::Tensor x = input.contiguous(format);
  const auto gamma = floats(weight, s.C, 1.f, "weight"), beta = floats(bias, s.C, 0.f, "bias");
  float* rm = running(running_mean, s.C, "running_mean");
  float* rv = running(running_var, s.C, "running_var");
  at::Tensor y = at::empty(x.sizes(), x.options(), format);
  at::Tensor mean = at::empty({s.C}, x.options().dtype(at::kFloat));
  at::Tensor invstd = at::empty({s.C}, x.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), relu, [&](auto scalar, auto on) {
    forward_kernel<decltype(scalar), decltype(on)::value>(x, s, gamma, beta, rm, rv, momentum, eps, y, mean, invstd);
  });
  return {y, mean, invstd};
}

// -> (dx, dweight, dbias); dweight and dbias are float32 even without a weight or bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, bool relu) {
  const auto format = input.suggest_memory_format();
  const Layout s = layout_of(input, format);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "batch_norm_relu_backward: shapes do not match");
  const at::Tensor x = input.contiguous(format);
  const at::Tensor dy = grad_output.to(x.scalar_type()).contiguous(format);
  const auto gamma = floats(weight, s.C, 1.f, "weight"), beta = floats(bias, s.C, 0.f, "bias");
  const auto m = floats(mean, s.C, 0.f, "mean"), r = floats(invstd, s.C, 0.f, "invstd");
  at::Tensor dx = at::empty(x.sizes(), x.options(), format);
  at::Tensor dgamma = at::empty({s.C}, x.options().dtype(at::kFloat));
  at::Tensor dbeta = at::empty({s.C}, x.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), relu, [&](auto scalar, auto on) {
    backward_kernel<decltype(scalar), decltype(on)::value>(dy, x, s, gamma, beta, m.data(), r.data(), dx, dgamma,
                                                           dbeta);
  });
  return {dx, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vggkit, m) {
  m.def("batch_norm_relu(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_relu_backward(Tensor grad_output, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor invstd, bool relu) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vggkit, CPU, m) {
  m.impl("batch_norm_relu", &batch_norm_relu);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward);
}
