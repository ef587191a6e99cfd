// relu(max_pool2d(batch_norm(x), 2, 2)), training-mode batch norm, as one op, forward and backward:
// the end of a VGG block with batch norm. 4-D CPU tensors, channels-last (NHWC) or NCHW, float or
// bfloat16; heights and widths of at least 2, odd ones floored as MaxPool2d does. See bn_relu.py for
// the Python side, batch_norm_common.h for what it shares with batch_norm_relu.cpp.
//
// forward: the statistics exactly as batch_norm_relu's forward, then one pass over the pooled grid:
// each 2x2 window's four values computed and rounded to the storage type as batch_norm_relu stores
// them, the max and its position chosen by max_pool_relu.cpp's rules, the pooled output and a code
// byte per output written (0-3: the window position that took the max, kBlocked: the ReLU blocked
// it). The full-size normalised tensor is never written; the result is batch_norm_relu(relu=False)
// then max_pool_relu's, to the bit.
// backward: the batch-norm backward with dy = the output gradient at the position the code names (0
// at the window's other positions, at all four where blocked, and where no window reaches): one pass
// over the windows for sum(dy) and sum(dy * (x - mean)), one writing dx at every input position.
#include <torch/library.h>

#include <initializer_list>
#include <tuple>

#include "batch_norm_common.h"
#include "contracts.h"

namespace vggkit::bn {
namespace {

constexpr const char* kOp = "batch_norm_pool_relu";
// The loops that touch the codes run over this many channels (NHWC) or windows (NCHW) at a time:
// GCC sizes a loop's vectors by its smallest type, and 16 bytes of codes would leave the float work
// in 128-bit vectors.
constexpr int64_t kCodeLanes = 2 * kLanes;

// The input as rows of 2x2 windows, one row per output row: (n, oh) over C channels in NHWC, (n, c,
// oh) in NCHW. A window's positions 0-3, row-major, lie at x, x + step, x + line, x + line + step.
struct Pooled {
  int64_t N, C, H, W, OH, OW;
  bool nhwc;
  int64_t count() const { return N * H * W; }  // values per channel
  int64_t rows() const { return nhwc ? N * OH : N * C * OH; }
  int64_t row_length() const { return nhwc ? OW * C : OW; }  // output values per row
  int64_t step() const { return nhwc ? C : 1; }
  int64_t line() const { return W * step(); }
  int64_t channel(int64_t row) const { return (row / OH) % C; }  // NCHW
  // Where the row's windows start in the input: n * H (NHWC) or plane * H (NCHW), plus 2 * oh, lines down.
  int64_t top(int64_t row) const { return ((row / OH) * H + 2 * (row % OH)) * line(); }
};

Pooled pooled_of(const at::Tensor& x, const Layout& s) {
  const int64_t H = x.size(2), W = x.size(3);
  TORCH_CHECK(H >= 2 && W >= 2, kOp, ": expected a height and width of at least 2, got input of size ", x.sizes());
  return {s.N, s.C, H, W, H / 2, W / 2, s.nhwc};
}

int64_t grain(int64_t values_per_row) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, values_per_row));
}

// ---- one window
//
// Its selects are bit masks, not ?: C++ compiles ?: as a branch first, and GCC 12 keeps such
// branches (threaded through the compares that follow, or merged into a multi-way one it cannot
// if-convert): the loop over channels would then stay scalar.

// take ? a : b.
inline float pick(bool take, float a, float b) {
  return float_of((bits_of(a) & mask_of(take)) | (bits_of(b) & ~mask_of(take)));
}

inline uint8_t pick(bool take, uint8_t a, uint8_t b) {
  const uint8_t mask = static_cast<uint8_t>(mask_of(take));
  return static_cast<uint8_t>((a & mask) | (b & ~mask));
}

// One window's pooled output and code, by max_pool_relu.cpp's rules (PyTorch's max_pool2d, then
// relu) on batch_norm_relu's output as it would be stored (rounded to scalar_t): the first max in
// row-major order, a NaN wins (the last NaN of the window); a max <= 0 is blocked. The selection is
// made on the affine values: a negative weight puts the max at the min of x.
template <typename scalar_t>
inline void pool_window(const scalar_t* x, int64_t step, int64_t line, float scale, float shift, scalar_t& out,
                        uint8_t& code) {
  const int64_t offsets[4] = {0, step, line, line + step};
  float m = 0.f;
  uint8_t position = 0;
  for (uint8_t k = 0; k < 4; ++k) {
    const float v = affine(widen(x[offsets[k]]), scale, shift);
    const bool nan = is_nan(v);
    const float y = stored<scalar_t>(v, nan);
    const bool take = (k == 0) | (y > m) | nan;
    m = pick(take, y, m);
    position = pick(take, k, position);
  }
  const bool blocked = !passes(m);
  out = narrow<scalar_t>(pick(blocked, 0.f, m));
  code = pick(blocked, kBlocked, position);
}

// The output gradient g at window position `position`: g where the code names it, else 0.
inline float routed(float g, uint8_t code, uint8_t position) { return pick(code == position, g, 0.f); }

// One window's terms of the backward's sums: u = dy, v = dy * (x - mean) at the position the code
// names (the other positions add 0).
template <typename scalar_t>
inline void window_terms(const scalar_t* x, int64_t step, int64_t line, float g, uint8_t code, float mean, float& u,
                         float& v) {
  const auto bits = [&](int64_t offset, uint8_t position) {
    return bits_of(widen(x[offset])) & mask_of(code == position);  // 0 but at the position the code names
  };
  const float chosen = float_of(bits(0, 0) | bits(step, 1) | bits(line, 2) | bits(line + step, 3));
  u = pick(code == kBlocked, 0.f, g);
  v = u * (chosen - mean);
}

// Per-channel coefficients of input_gradient (and the mean), from channel c on.
struct Coefficients {
  const float *a, *b, *mean_dy, *mean;
  Coefficients from(int64_t c) const { return {a + c, b + c, mean_dy + c, mean + c}; }
};

// One window's four input gradients: g at the position the code names, 0 at the others.
template <typename scalar_t>
inline void window_gradients(const scalar_t* x, scalar_t* dx, int64_t step, int64_t line, float g, uint8_t code,
                             float a, float b, float mean_dy, float mean) {
  const auto put = [&](int64_t offset, uint8_t position) {
    dx[offset] = narrow<scalar_t>(input_gradient(routed(g, code, position), widen(x[offset]), a, b, mean_dy, mean));
  };
  put(0, 0);
  put(step, 1);
  put(line, 2);
  put(line + step, 3);
}

// ---- forward: rows of windows. Plain functions, so that their loops are vectorised as they are
// here rather than inside the parallel region's outlined body (see max_pool_relu.cpp).

template <typename scalar_t>
void pool_row_nhwc(const scalar_t* __restrict__ x, const float* __restrict__ scale, const float* __restrict__ shift,
                   scalar_t* __restrict__ y, uint8_t* __restrict__ code, int64_t OW, int64_t C, int64_t line) {
  for (int64_t ow = 0; ow < OW; ++ow) {
    const scalar_t* xw = x + 2 * ow * C;
    scalar_t* yw = y + ow * C;
    uint8_t* kw = code + ow * C;
    in_lanes<kCodeLanes>(C, [&](int64_t c) { pool_window(xw + c, C, line, scale[c], shift[c], yw[c], kw[c]); });
  }
}

template <typename scalar_t>
void pool_row_nchw(const scalar_t* __restrict__ x, float scale, float shift, scalar_t* __restrict__ y,
                   uint8_t* __restrict__ code, int64_t OW, int64_t line) {
  in_lanes<kCodeLanes>(OW, [&](int64_t ow) { pool_window(x + 2 * ow, 1, line, scale, shift, y[ow], code[ow]); });
}

template <typename scalar_t>
void forward_kernel(const scalar_t* xp, const Pooled& p, const Affine& a, scalar_t* yp, uint8_t* cp) {
  const float* scale = a.scale.data();
  const float* shift = a.shift.data();
  at::parallel_for(0, p.rows(), grain(4 * p.row_length()), [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = xp + p.top(row);
      const int64_t out = row * p.row_length();
      if (p.nhwc) {
        pool_row_nhwc(x, scale, shift, yp + out, cp + out, p.OW, p.C, p.line());
      } else {
        const int64_t c = p.channel(row);
        pool_row_nchw(x, scale[c], shift[c], yp + out, cp + out, p.OW, p.line());
      }
    }
  });
}

// ---- backward

// {sum dy, sum dy * (x - mean)} per channel, window by window, with batch_norm_relu's accumulation
// (float over at most kFlush windows per accumulator, then double, in fixed chunks of rows).
template <typename scalar_t>
std::vector<double> window_sums(const scalar_t* xp, const scalar_t* gp, const uint8_t* cp, const Pooled& p,
                                const float* mean) {
  return chunked_sums(p.rows(), 4 * p.row_length(), p.C, [=](int64_t begin, int64_t end, double* out) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = xp + p.top(row);
      const scalar_t* g = gp + row * p.row_length();
      const uint8_t* code = cp + row * p.row_length();
      const int64_t C = p.C, line = p.line();
      if (p.nhwc) {  // i = ow * C + c: its window starts at x + 2 * ow * C + c
        sum_pixels<kCodeLanes>(C, [=](int64_t c, int64_t i, float& u, float& v) {
          window_terms(x + 2 * i - c, C, line, widen(g[i]), code[i], mean[c], u, v);
        }, 0, p.OW, out);
      } else {  // i = ow
        sum_run([=](int64_t c, int64_t i, float& u, float& v) {
          window_terms(x + 2 * i, 1, line, widen(g[i]), code[i], mean[c], u, v);
        }, C, p.channel(row), 0, p.OW, out);
      }
    }
  });
}

template <typename scalar_t>
void gradient_row_nhwc(const scalar_t* __restrict__ x, scalar_t* __restrict__ dx, const scalar_t* __restrict__ g,
                       const uint8_t* __restrict__ code, const Coefficients& k, int64_t OW, int64_t C, int64_t line) {
  const float *a = k.a, *b = k.b, *mean_dy = k.mean_dy, *mean = k.mean;
  for (int64_t ow = 0; ow < OW; ++ow) {
    const int64_t w = 2 * ow * C, o = ow * C;
    in_lanes<kCodeLanes>(C, [&](int64_t c) {
      window_gradients(x + w + c, dx + w + c, C, line, widen(g[o + c]), code[o + c], a[c], b[c], mean_dy[c], mean[c]);
    });
  }
}

template <typename scalar_t>
void gradient_row_nchw(const scalar_t* __restrict__ x, scalar_t* __restrict__ dx, const scalar_t* __restrict__ g,
                       const uint8_t* __restrict__ code, const Coefficients& k, int64_t OW, int64_t line) {
  const float a = k.a[0], b = k.b[0], mean_dy = k.mean_dy[0], mean = k.mean[0];
  in_lanes<kCodeLanes>(OW, [&](int64_t ow) {
    window_gradients(x + 2 * ow, dx + 2 * ow, 1, line, widen(g[ow]), code[ow], a, b, mean_dy, mean);
  });
}

// Input gradients where no window reaches (dy = 0): `pixels` pixels of C channels (C = 1 in NCHW, k
// then at the plane's channel).
template <typename scalar_t>
void gradient_outside(const scalar_t* __restrict__ x, scalar_t* __restrict__ dx, int64_t pixels, int64_t C,
                      const Coefficients& k) {
  const float *a = k.a, *b = k.b, *mean_dy = k.mean_dy, *mean = k.mean;
  for (int64_t i = 0; i < pixels * C; i += C) {
    in_lanes(C, [&](int64_t c) {
      dx[i + c] = narrow<scalar_t>(input_gradient(0.f, widen(x[i + c]), a[c], b[c], mean_dy[c], mean[c]));
    });
  }
}

// dx of output rows [begin, end): the two input lines of their windows, with the column no window
// reaches (odd W), and after the last row the line none reaches (odd H).
template <typename scalar_t>
void gradient_rows(const scalar_t* xp, const scalar_t* gp, const uint8_t* cp, const Pooled& p,
                   const Coefficients& all, scalar_t* dxp, int64_t begin, int64_t end) {
  const int64_t C = p.nhwc ? p.C : 1, line = p.line();  // C: channels per pixel as the loops see them
  for (int64_t row = begin; row < end; ++row) {
    const int64_t top = p.top(row), out = row * p.row_length();
    const Coefficients k = p.nhwc ? all : all.from(p.channel(row));
    if (p.nhwc) {
      gradient_row_nhwc(xp + top, dxp + top, gp + out, cp + out, k, p.OW, C, line);
    } else {
      gradient_row_nchw(xp + top, dxp + top, gp + out, cp + out, k, p.OW, line);
    }
    if (p.W % 2) {
      for (const int64_t last : {top + (p.W - 1) * C, top + line + (p.W - 1) * C}) {
        gradient_outside(xp + last, dxp + last, 1, C, k);
      }
    }
    if (p.H % 2 && row % p.OH == p.OH - 1) {
      const int64_t below = top + 2 * line;
      gradient_outside(xp + below, dxp + below, p.W, C, k);
    }
  }
}

template <typename scalar_t>
void backward_kernel(const scalar_t* xp, const scalar_t* gp, const uint8_t* cp, const Pooled& p,
                     const Parameters& prm, const float* mean, const float* invstd, scalar_t* dxp, float* dgamma,
                     float* dbeta) {
  const auto sums = window_sums(xp, gp, cp, p, mean);
  const Gradient k = gradient_coefficients(sums, p.count(), prm, invstd, dgamma, dbeta);
  const Coefficients all{k.a.data(), k.b.data(), k.mean_dy.data(), mean};
  at::parallel_for(0, p.rows(), grain(4 * p.row_length()), [=](int64_t begin, int64_t end) {
    gradient_rows(xp, gp, cp, p, all, dxp, begin, end);
  });
}

// ---- the operators

// -> (y, code, mean, invstd): y and code (uint8) of size (N, C, H / 2, W / 2) in x's memory format;
// running_mean and running_var (if given) updated in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_pool_relu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps) {
  const auto format = input.suggest_memory_format();
  const Layout s = layout_of(input, format, kOp);
  const Pooled p = pooled_of(input, s);
  const at::Tensor x = input.contiguous(format);
  const Parameters prm = parameters_of(weight, bias, s.C, kOp);
  const Running r = running_of(running_mean, running_var, s.C, kOp);
  at::Tensor y = at::empty({p.N, p.C, p.OH, p.OW}, x.options(), format);
  at::Tensor code = at::empty({p.N, p.C, p.OH, p.OW}, x.options().dtype(at::kByte), format);
  at::Tensor mean = per_channel(x, s.C), invstd = per_channel(x, s.C);
  by_dtype(x.scalar_type(), [&](auto scalar) {
    using scalar_t = decltype(scalar);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const Affine a = batch_statistics(xp, s, prm, r, momentum, eps, mean.mutable_data_ptr<float>(),
                                      invstd.mutable_data_ptr<float>());
    forward_kernel(xp, p, a, y.mutable_data_ptr<scalar_t>(), code.mutable_data_ptr<uint8_t>());
  });
  return {y, code, mean, invstd};
}

// -> (dx, dweight, dbias); dweight and dbias are float32 even without a weight or bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_pool_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& code, const at::Tensor& input,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& invstd) {
  const auto format = input.suggest_memory_format();
  const Layout s = layout_of(input, format, kOp);
  const Pooled p = pooled_of(input, s);
  const std::vector<int64_t> pooled_size{p.N, p.C, p.OH, p.OW};
  TORCH_CHECK(grad_output.sizes() == pooled_size && code.sizes() == pooled_size && code.scalar_type() == at::kByte,
              "batch_norm_pool_relu_backward: expected a gradient and a uint8 code of size ",
              at::IntArrayRef(pooled_size));
  const at::Tensor x = input.contiguous(format);
  const at::Tensor g = grad_output.to(x.scalar_type()).contiguous(format);
  const at::Tensor k = code.contiguous(format);
  const Parameters prm = parameters_of(weight, bias, s.C, kOp);
  const auto m = floats(mean, s.C, 0.f, kOp, "mean"), r = floats(invstd, s.C, 0.f, kOp, "invstd");
  at::Tensor dx = at::empty(x.sizes(), x.options(), format);
  at::Tensor dgamma = per_channel(x, s.C), dbeta = per_channel(x, s.C);
  by_dtype(x.scalar_type(), [&](auto scalar) {
    using scalar_t = decltype(scalar);
    backward_kernel(x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), k.const_data_ptr<uint8_t>(), p, prm,
                    m.data(), r.data(), dx.mutable_data_ptr<scalar_t>(), dgamma.mutable_data_ptr<float>(),
                    dbeta.mutable_data_ptr<float>());
  });
  return {dx, dgamma, dbeta};
}

}  // namespace
}  // namespace vggkit::bn

TORCH_LIBRARY_FRAGMENT(vggkit, m) {
  m.def("batch_norm_pool_relu(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_norm_pool_relu_backward(Tensor grad_output, Tensor code, Tensor x, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor invstd) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vggkit, CPU, m) {
  m.impl("batch_norm_pool_relu", &vggkit::bn::batch_norm_pool_relu);
  m.impl("batch_norm_pool_relu_backward", &vggkit::bn::batch_norm_pool_relu_backward);
}
