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

#include "contracts.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace {

using vggkit::kBlocked;
constexpr int64_t kGrainValues = 32768;  // values per parallel task, at least

// The kernels move values as raw bits (a max-pool and a ReLU only select and compare): a
// bfloat16 is widened to float for the compare by a shift, and the bits of the selected value are
// stored as they are. Integer selects vectorise where c10::BFloat16's conversions would not.
template <typename scalar_t> struct Raw;
template <> struct Raw<float> { using bits = uint32_t; using acc = float; };
template <> struct Raw<double> { using bits = uint64_t; using acc = double; };
template <> struct Raw<c10::BFloat16> { using bits = uint16_t; using acc = float; };

template <typename scalar_t>
using bits_t = typename Raw<scalar_t>::bits;

template <typename scalar_t>
inline typename Raw<scalar_t>::acc value_of(bits_t<scalar_t> b) {
  using acc = typename Raw<scalar_t>::acc;
  acc v;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t wide = static_cast<uint32_t>(b) << 16;
    std::memcpy(&v, &wide, sizeof(v));
  } else {
    std::memcpy(&v, &b, sizeof(v));
  }
  return v;
}

// One 2x2 window, a b / c d: the output value and the code. Straight-line selects so that the
// callers' loops over channels (NHWC) or columns (NCHW) vectorise.
template <typename scalar_t, typename B = bits_t<scalar_t>>
inline void window(B a, B b, B c, B d, B& out, uint8_t& code) {
  using acc = typename Raw<scalar_t>::acc;
  const acc v1 = value_of<scalar_t>(b), v2 = value_of<scalar_t>(c), v3 = value_of<scalar_t>(d);
  acc m = value_of<scalar_t>(a);
  B mb = a;
  uint8_t k = 0;
  bool take = (v1 > m) | (v1 != v1);
  m = take ? v1 : m;
  mb = take ? b : mb;
  k = take ? 1 : k;
  take = (v2 > m) | (v2 != v2);
  m = take ? v2 : m;
  mb = take ? c : mb;
  k = take ? 2 : k;
  take = (v3 > m) | (v3 != v3);
  m = take ? v3 : m;
  mb = take ? d : mb;
  k = take ? 3 : k;
  const bool blocked = m <= acc(0);  // false for NaN
  out = blocked ? B(0) : mb;          // 0 bits are +0.0
  code = blocked ? kBlocked : k;
}

template <typename B>
inline void gradient_pair(B g, uint8_t code, uint8_t left, B& gl, B& gr) {
  gl = code == left ? g : B(0);
  gr = code == left + 1 ? g : B(0);
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
//
// NHWC loops run over the C channels of one window position. With AVX-512 a loop of 16-bit values
// is 32 lanes wide, so C = 16 (the first block of VGG-11/4) would run entirely in the compiler's
// scalar remainder loop: small channel counts get a compile-time trip count instead (kC > 0).

// GCC prefers 256-bit vectors on AVX-512 CPUs. In the forward 512-bit ones measured faster from
// kWideChannels channels on and no faster in the backward; library-wide they made the 32-channel
// backward slower (bench_kernels.py; where it was measured: tuning.py's C++ table). So the forward's
// row loop exists in both widths, the wide one (not inlined: inlined into the parallel region it
// loses its width) from kWideChannels on.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VGGKIT_WIDE_VECTORS __attribute__((target("prefer-vector-width=512"), noinline))
#else
#define VGGKIT_WIDE_VECTORS
#endif
constexpr int64_t kWideChannels = 64;

template <typename scalar_t, int kC>
__attribute__((always_inline)) inline void forward_row_body(const bits_t<scalar_t>* __restrict__ top,
                                                             const bits_t<scalar_t>* __restrict__ bottom,
                                                             bits_t<scalar_t>* __restrict__ out,
                                                             uint8_t* __restrict__ code, int64_t OW, int64_t C_) {
  const int64_t C = kC > 0 ? kC : C_;
  for (int64_t ow = 0; ow < OW; ++ow) {
    const auto* p00 = top + 2 * ow * C;
    const auto* p10 = bottom + 2 * ow * C;
    auto* o = out + ow * C;
    uint8_t* k = code + ow * C;
    for (int64_t c = 0; c < C; ++c) {
      window<scalar_t>(p00[c], p00[C + c], p10[c], p10[C + c], o[c], k[c]);
    }
  }
}

// One output row: a plain function, so that the loop is vectorised as it is here rather than
// inside the OpenMP region's outlined body (measured 5x slower there with GCC 12).
template <typename scalar_t, int kC>
void forward_row_nhwc(const bits_t<scalar_t>* top, const bits_t<scalar_t>* bottom, bits_t<scalar_t>* out,
                      uint8_t* code, int64_t OW, int64_t C) {
  forward_row_body<scalar_t, kC>(top, bottom, out, code, OW, C);
}

template <typename scalar_t, int kC>
VGGKIT_WIDE_VECTORS void forward_row_nhwc_wide(const bits_t<scalar_t>* top, const bits_t<scalar_t>* bottom,
                                               bits_t<scalar_t>* out, uint8_t* code, int64_t OW, int64_t C) {
  forward_row_body<scalar_t, kC>(top, bottom, out, code, OW, C);
}

template <typename scalar_t, int kC>
void forward_nhwc(const bits_t<scalar_t>* x, bits_t<scalar_t>* y, uint8_t* code, const Shape& s) {
  const int64_t C = s.C, W = s.W;
  at::parallel_for(0, s.N * s.OH, grain(s.OW * C * 4), [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = n * OH + oh
      const int64_t n = row / s.OH, oh = row % s.OH;
      const auto* top = x + ((n * s.H + 2 * oh) * W) * C;
      if (C >= kWideChannels)
        forward_row_nhwc_wide<scalar_t, kC>(top, top + W * C, y + row * s.OW * C, code + row * s.OW * C, s.OW, C);
      else
        forward_row_nhwc<scalar_t, kC>(top, top + W * C, y + row * s.OW * C, code + row * s.OW * C, s.OW, C);
    }
  });
}

template <typename scalar_t>
void forward_nchw(const bits_t<scalar_t>* x, bits_t<scalar_t>* y, uint8_t* code, const Shape& s) {
  const int64_t W = s.W;
  at::parallel_for(0, s.N * s.C * s.OH, grain(s.OW * 4), [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = (n * C + c) * OH + oh
      const int64_t plane = row / s.OH, oh = row % s.OH;
      const auto* top = x + (plane * s.H + 2 * oh) * W;
      const auto* bottom = top + W;
      auto* out = y + row * s.OW;
      uint8_t* k = code + row * s.OW;
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        window<scalar_t>(top[2 * ow], top[2 * ow + 1], bottom[2 * ow], bottom[2 * ow + 1], out[ow], k[ow]);
      }
    }
  });
}

// ---- backward

// One output row's gradient into the input line dh (0: top, 1: bottom) of its windows; see forward_row_nhwc.
template <typename B, int kC>
void backward_row_nhwc(const B* __restrict__ g, const uint8_t* __restrict__ code, B* __restrict__ line,
                       uint8_t left, int64_t OW, int64_t C_) {
  const int64_t C = kC > 0 ? kC : C_;
  for (int64_t ow = 0; ow < OW; ++ow) {
    const B* go = g + ow * C;
    const uint8_t* k = code + ow * C;
    B* l = line + 2 * ow * C;
    B* r = l + C;
    for (int64_t c = 0; c < C; ++c) {
      gradient_pair(go[c], k[c], left, l[c], r[c]);
    }
  }
}

template <typename B, int kC>
void backward_nhwc(const B* g, const uint8_t* code, B* gi, const Shape& s) {
  const int64_t C = s.C, W = s.W;
  at::parallel_for(0, s.N * s.OH, grain(s.OW * C * 4), [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / s.OH, oh = row % s.OH;
      for (int64_t dh = 0; dh < 2; ++dh) {
        B* line = gi + ((n * s.H + 2 * oh + dh) * W) * C;
        backward_row_nhwc<B, kC>(g + row * s.OW * C, code + row * s.OW * C, line, static_cast<uint8_t>(2 * dh),
                                 s.OW, C);
        if (W % 2) zero(line + (W - 1) * C, C);
      }
      if (oh == s.OH - 1 && s.H % 2) zero(gi + ((n * s.H + s.H - 1) * W) * C, W * C);
    }
  });
}

template <typename B>
void backward_nchw(const B* g, const uint8_t* code, B* gi, const Shape& s) {
  const int64_t W = s.W;
  at::parallel_for(0, s.N * s.C * s.OH, grain(s.OW * 4), [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / s.OH, oh = row % s.OH;
      const B* go = g + row * s.OW;
      const uint8_t* k = code + row * s.OW;
      for (int64_t dh = 0; dh < 2; ++dh) {
        B* line = gi + (plane * s.H + 2 * oh + dh) * W;
        const uint8_t left = static_cast<uint8_t>(2 * dh);
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          gradient_pair(go[ow], k[ow], left, line[2 * ow], line[2 * ow + 1]);
        }
        if (W % 2) line[W - 1] = B(0);
      }
      if (oh == s.OH - 1 && s.H % 2) zero(gi + (plane * s.H + s.H - 1) * W, W);
    }
  });
}

// The NHWC loops with a compile-time channel count where it is small (see above).
template <typename F>
void by_channels(int64_t C, F&& run) {
  switch (C) {
    case 4: return run(std::integral_constant<int, 4>{});
    case 8: return run(std::integral_constant<int, 8>{});
    case 16: return run(std::integral_constant<int, 16>{});
    case 24: return run(std::integral_constant<int, 24>{});
    default: return run(std::integral_constant<int, 0>{});
  }
}

template <typename scalar_t>
const bits_t<scalar_t>* raw(const at::Tensor& t) {
  return reinterpret_cast<const bits_t<scalar_t>*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
bits_t<scalar_t>* raw_out(at::Tensor& t) {
  return reinterpret_cast<bits_t<scalar_t>*>(t.mutable_data_ptr<scalar_t>());
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
    uint8_t* k = code.mutable_data_ptr<uint8_t>();
    if (nhwc) {
      by_channels(s.C, [&](auto kC) { forward_nhwc<scalar_t, decltype(kC)::value>(raw<scalar_t>(x), raw_out<scalar_t>(y), k, s); });
    } else {
      forward_nchw<scalar_t>(raw<scalar_t>(x), raw_out<scalar_t>(y), k, s);
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
    using B = bits_t<scalar_t>;
    const uint8_t* c = k.const_data_ptr<uint8_t>();
    if (nhwc) {
      by_channels(s.C, [&](auto kC) { backward_nhwc<B, decltype(kC)::value>(raw<scalar_t>(g), c, raw_out<scalar_t>(gi), s); });
    } else {
      backward_nchw<B>(raw<scalar_t>(g), c, raw_out<scalar_t>(gi), s);
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
