// relu(max_pool2d(x, 2, 2)) in one pass, and its backward in one pass, for CPU tensors: NCHW or
// channels-last (NHWC), float, double or bfloat16. See pool_relu.py for the Python side.
//
// The forward writes, besides the output, one byte per output value (`code`): which of the four
// window positions (0-3, row-major) held the max, or kBlocked where the ReLU stopped the gradient.
// The backward writes every input-gradient value exactly once from gO and code: no zero-fill, no
// int64 indices, no re-read of the input. The max follows PyTorch's max_pool2d (the first max in
// row-major window order; a NaN wins, the last NaN of the window), the ReLU PyTorch's relu (NaN
// stays NaN and passes its gradient, as threshold_backward does). Odd heights and widths are
// floored as MaxPool2d does: the last row/column gets gradient 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace {

constexpr uint8_t kBlocked = 4;        // the window's max was <= 0: ReLU passes no gradient
constexpr int64_t kGrainValues = 32768;  // values per parallel task, at least

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The float holding a bfloat16 exactly back to that bfloat16 (no rounding: the max is one of the inputs).
template <typename scalar_t>
inline scalar_t exact(acc_t<scalar_t> v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// One 2x2 window, a b / c d: the output value and the code. Straight-line selects so that the
// callers' loops over channels (NHWC) or columns (NCHW) vectorise.
template <typename scalar_t>
inline void window(scalar_t a, scalar_t b, scalar_t c, scalar_t d, scalar_t& out, uint8_t& code) {
  using acc = acc_t<scalar_t>;
  const acc v1 = acc(b), v2 = acc(c), v3 = acc(d);
  acc m = acc(a);
  uint8_t k = 0;
  bool take = (v1 > m) | (v1 != v1);
  m = take ? v1 : m;
  k = take ? 1 : k;
  take = (v2 > m) | (v2 != v2);
  m = take ? v2 : m;
  k = take ? 2 : k;
  take = (v3 > m) | (v3 != v3);
  m = take ? v3 : m;
  k = take ? 3 : k;
  const bool blocked = m <= acc(0);  // false for NaN
  out = blocked ? scalar_t(0) : exact<scalar_t>(m);
  code = blocked ? kBlocked : k;
}

template <typename scalar_t>
inline void gradient_pair(scalar_t g, uint8_t code, uint8_t left, scalar_t& gl, scalar_t& gr) {
  gl = code == left ? g : scalar_t(0);
  gr = code == left + 1 ? g : scalar_t(0);
}

template <typename T>
inline void zero(T* p, int64_t n) {
  std::memset(static_cast<void*>(p), 0, n * sizeof(T));  // 0 bits are 0.0 for every dtype here
}

struct Shape {
  int64_t N, C, H, W, OH, OW;
};

Shape shape_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "max_pool_relu: expected a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  const int64_t H = x.size(2), W = x.size(3);
  return {x.size(0), x.size(1), H, W, H / 2, W / 2};
}

int64_t grain(int64_t values_per_task) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, values_per_task));
}

// ---- forward

template <typename scalar_t>
void forward_nhwc(const scalar_t* x, scalar_t* y, uint8_t* code, const Shape& s) {
  const int64_t C = s.C, W = s.W;
  at::parallel_for(0, s.N * s.OH, grain(s.OW * C * 4), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = n * OH + oh
      const int64_t n = row / s.OH, oh = row % s.OH;
      const scalar_t* top = x + ((n * s.H + 2 * oh) * W) * C;
      const scalar_t* bottom = top + W * C;
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const scalar_t* p00 = top + 2 * ow * C;
        const scalar_t* p10 = bottom + 2 * ow * C;
        scalar_t* out = y + (row * s.OW + ow) * C;
        uint8_t* k = code + (row * s.OW + ow) * C;
        for (int64_t c = 0; c < C; ++c) {
          window(p00[c], p00[C + c], p10[c], p10[C + c], out[c], k[c]);
        }
      }
    }
  });
}

template <typename scalar_t>
void forward_nchw(const scalar_t* x, scalar_t* y, uint8_t* code, const Shape& s) {
  const int64_t W = s.W;
  at::parallel_for(0, s.N * s.C * s.OH, grain(s.OW * 4), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = (n * C + c) * OH + oh
      const int64_t plane = row / s.OH, oh = row % s.OH;
      const scalar_t* top = x + (plane * s.H + 2 * oh) * W;
      const scalar_t* bottom = top + W;
      scalar_t* out = y + row * s.OW;
      uint8_t* k = code + row * s.OW;
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        window(top[2 * ow], top[2 * ow + 1], bottom[2 * ow], bottom[2 * ow + 1], out[ow], k[ow]);
      }
    }
  });
}

// ---- backward

template <typename scalar_t>
void backward_nhwc(const scalar_t* g, const uint8_t* code, scalar_t* gi, const Shape& s) {
  const int64_t C = s.C, W = s.W;
  at::parallel_for(0, s.N * s.OH, grain(s.OW * C * 4), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / s.OH, oh = row % s.OH;
      for (int64_t dh = 0; dh < 2; ++dh) {
        scalar_t* line = gi + ((n * s.H + 2 * oh + dh) * W) * C;
        const uint8_t left = static_cast<uint8_t>(2 * dh);
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          const scalar_t* go = g + (row * s.OW + ow) * C;
          const uint8_t* k = code + (row * s.OW + ow) * C;
          scalar_t* l = line + 2 * ow * C;
          scalar_t* r = l + C;
          for (int64_t c = 0; c < C; ++c) {
            gradient_pair(go[c], k[c], left, l[c], r[c]);
          }
        }
        if (W % 2) zero(line + (W - 1) * C, C);
      }
      if (oh == s.OH - 1 && s.H % 2) zero(gi + ((n * s.H + s.H - 1) * W) * C, W * C);
    }
  });
}

template <typename scalar_t>
void backward_nchw(const scalar_t* g, const uint8_t* code, scalar_t* gi, const Shape& s) {
  const int64_t W = s.W;
  at::parallel_for(0, s.N * s.C * s.OH, grain(s.OW * 4), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / s.OH, oh = row % s.OH;
      const scalar_t* go = g + row * s.OW;
      const uint8_t* k = code + row * s.OW;
      for (int64_t dh = 0; dh < 2; ++dh) {
        scalar_t* line = gi + (plane * s.H + 2 * oh + dh) * W;
        const uint8_t left = static_cast<uint8_t>(2 * dh);
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          gradient_pair(go[ow], k[ow], left, line[2 * ow], line[2 * ow + 1]);
        }
        if (W % 2) line[W - 1] = scalar_t(0);
      }
      if (oh == s.OH - 1 && s.H % 2) zero(gi + (plane * s.H + s.H - 1) * W, W);
    }
  });
}

// ---- the operators

std::tuple<at::Tensor, at::Tensor> max_pool_relu(const at::Tensor& input) {
  const Shape s = shape_of(input);
  const auto format = input.suggest_memory_format();
  const bool nhwc = format == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = input.contiguous(format);
  at::Tensor y = at::empty({s.N, s.C, s.OH, s.OW}, x.options(), format);
  at::Tensor code = at::empty({s.N, s.C, s.OH, s.OW}, x.options().dtype(at::kByte), format);
  if (y.numel() == 0) return {y, code};
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, x.scalar_type(), "max_pool_relu", [&] {
    if (nhwc) {
      forward_nhwc(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), code.mutable_data_ptr<uint8_t>(), s);
    } else {
      forward_nchw(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), code.mutable_data_ptr<uint8_t>(), s);
    }
  });
  return {y, code};
}

at::Tensor max_pool_relu_backward(const at::Tensor& grad_output, const at::Tensor& code, int64_t height,
                                  int64_t width) {
  TORCH_CHECK(code.scalar_type() == at::kByte, "max_pool_relu_backward: code must be uint8");
  const auto format = code.suggest_memory_format();
  const bool nhwc = format == at::MemoryFormat::ChannelsLast;
  const at::Tensor g = grad_output.contiguous(format);
  const at::Tensor k = code.contiguous(format);
  const Shape s{code.size(0), code.size(1), height, width, code.size(2), code.size(3)};
  TORCH_CHECK(s.OH == height / 2 && s.OW == width / 2 && g.sizes() == k.sizes(),
              "max_pool_relu_backward: shapes do not match");
  if (k.numel() == 0) return at::zeros({s.N, s.C, height, width}, g.options().memory_format(format));
  at::Tensor gi = at::empty({s.N, s.C, height, width}, g.options(), format);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, g.scalar_type(), "max_pool_relu_backward", [&] {
    if (nhwc) {
      backward_nhwc(g.const_data_ptr<scalar_t>(), k.const_data_ptr<uint8_t>(), gi.mutable_data_ptr<scalar_t>(), s);
    } else {
      backward_nchw(g.const_data_ptr<scalar_t>(), k.const_data_ptr<uint8_t>(), gi.mutable_data_ptr<scalar_t>(), s);
    }
  });
  return gi;
}

}  // namespace

TORCH_LIBRARY(vggkit, m) {
  m.def("max_pool_relu(Tensor x) -> (Tensor, Tensor)");
  m.def("max_pool_relu_backward(Tensor grad_output, Tensor code, int height, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(vggkit, CPU, m) {
  m.impl("max_pool_relu", &max_pool_relu);
  m.impl("max_pool_relu_backward", &max_pool_relu_backward);
}
