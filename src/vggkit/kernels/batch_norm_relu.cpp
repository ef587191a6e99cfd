// Training-mode batch norm (statistics over N, H, W per channel), optionally followed by a ReLU,
// forward and backward, for 4-D CPU tensors: channels-last (NHWC) or NCHW, float or bfloat16; the
// statistics, weight, bias and running statistics are float32 (as PyTorch keeps them under bf16
// autocast). What it shares with batch_norm_pool_relu.cpp (sums, statistics, the gradient formula)
// is in batch_norm_common.h. See bn_relu.py for the Python side.
//
// forward: one pass for the per-channel sums, one writing y = relu?(x * scale + shift).
// backward: one pass for sum(g) and sum(g * (x - mean)), one writing dx, where g is dy with the
// ReLU's mask applied; the mask is recomputed from x (which both passes read anyway) by the very
// expression that gave y, so it is the forward's to the bit.
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "batch_norm_common.h"

namespace vggkit::bn {
namespace {

constexpr const char* kOp = "batch_norm_relu";

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

// ---- the kernels

template <typename scalar_t, bool relu>
void forward_kernel(const at::Tensor& x, const Layout& s, const Parameters& p, const Running& r, double momentum,
                    double eps, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const Affine a = batch_statistics(xp, s, p, r, momentum, eps, mean.mutable_data_ptr<float>(),
                                    invstd.mutable_data_ptr<float>());
  const float* scale = a.scale.data();
  const float* shift = a.shift.data();
  for_each_value(s, y.mutable_data_ptr<scalar_t>(), [=](int64_t c, int64_t i) {
    const float out = affine(widen(xp[i]), scale[c], shift[c]);
    return relu && !passes(out) ? 0.f : out;
  });
}

template <typename scalar_t, bool relu>
void backward_kernel(const at::Tensor& dy, const at::Tensor& x, const Layout& s, const Parameters& p,
                     const float* mean, const float* invstd, at::Tensor& dx, at::Tensor& dgamma, at::Tensor& dbeta) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = dy.const_data_ptr<scalar_t>();
  const Affine a = affine_of(mean, invstd, p);
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
  const Gradient k = gradient_coefficients(sums, s.count(), p, invstd, dgamma.mutable_data_ptr<float>(),
                                           dbeta.mutable_data_ptr<float>());
  const float *ca = k.a.data(), *cb = k.b.data(), *mg = k.mean_dy.data();
  for_each_value(s, dx.mutable_data_ptr<scalar_t>(), [=](int64_t c, int64_t i) {
    const float xv = widen(xp[i]);
    return input_gradient(masked(c, i, xv), xv, ca[c], cb[c], mg[c], mean[c]);
  });
}

// ---- the operators

// run(scalar_t{}, std::integral_constant<bool, relu>{}): the kernel's template arguments from runtime values.
template <typename Run>
void dispatch(at::ScalarType type, bool relu, const Run& run) {
  by_dtype(type, [&](auto scalar) {
    if (relu) {
      run(scalar, std::true_type{});
    } else {
      run(scalar, std::false_type{});
    }
  });
}

// -> (y, mean, invstd); running_mean and running_var (if given) updated in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps, bool relu) {
  const auto format = input.suggest_memory_format();
  const Layout s = layout_of(input, format, kOp);
  const at::Tensor x = input.contiguous(format);
  const Parameters p = parameters_of(weight, bias, s.C, kOp);
  const Running r = running_of(running_mean, running_var, s.C, kOp);
  at::Tensor y = at::empty(x.sizes(), x.options(), format);
  at::Tensor mean = per_channel(x, s.C), invstd = per_channel(x, s.C);
  dispatch(x.scalar_type(), relu, [&](auto scalar, auto on) {
    forward_kernel<decltype(scalar), decltype(on)::value>(x, s, p, r, momentum, eps, y, mean, invstd);
  });
  return {y, mean, invstd};
}

// -> (dx, dweight, dbias); dweight and dbias are float32 even without a weight or bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, bool relu) {
  const auto format = input.suggest_memory_format();
  const Layout s = layout_of(input, format, kOp);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "batch_norm_relu_backward: shapes do not match");
  const at::Tensor x = input.contiguous(format);
  const at::Tensor dy = grad_output.to(x.scalar_type()).contiguous(format);
  const Parameters p = parameters_of(weight, bias, s.C, kOp);
  const auto m = floats(mean, s.C, 0.f, kOp, "mean"), r = floats(invstd, s.C, 0.f, kOp, "invstd");
  at::Tensor dx = at::empty(x.sizes(), x.options(), format);
  at::Tensor dgamma = per_channel(x, s.C), dbeta = per_channel(x, s.C);
  dispatch(x.scalar_type(), relu, [&](auto scalar, auto on) {
    backward_kernel<decltype(scalar), decltype(on)::value>(dy, x, s, p, m.data(), r.data(), dx, dgamma, dbeta);
  });
  return {dx, dgamma, dbeta};
}

}  // namespace
}  // namespace vggkit::bn

TORCH_LIBRARY_FRAGMENT(vggkit, m) {
  m.def("batch_norm_relu(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_relu_backward(Tensor grad_output, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor invstd, bool relu) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vggkit, CPU, m) {
  m.impl("batch_norm_relu", &vggkit::bn::batch_norm_relu);
  m.impl("batch_norm_relu_backward", &vggkit::bn::batch_norm_relu_backward);
}
