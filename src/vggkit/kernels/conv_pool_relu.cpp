// relu(max_pool2d(conv2d(x, w, b, padding=1), 2, 2)) for a 3x3 stride-1 convolution of few input
// channels (1-4: gray and RGB first layers), forward and weight/bias backward, for CPU inputs of any
// strides, float or bfloat16. See conv_pool.py for the Python side.
//
// The forward computes, per pooled output, the 2x2 window's four convolution values for a block of
// kLanes output channels at once and keeps only the pooled value and max_pool_relu.cpp's code byte
// (0-3: the window position of the max, row-major; kBlocked: the ReLU stopped the gradient): the
// full-resolution convolution output is never written. The max follows max_pool2d (the first max
// in row-major order; a NaN wins, the last NaN), the ReLU torch.relu (NaN passes). In bfloat16 the
// input, weights and bias are bfloat16 values, the products are summed in float, the bias added and
// the sum rounded to bfloat16 before the max: what a bfloat16 convolution followed by the pool gives,
// up to the convolution's summation order.
//
// The backward computes no input gradient (the layer's input is the network's): from the output
// gradient, the codes and the input, dW[co][ci][ky][kx] = sum of g * x at the window position the
// code names, db[co] = sum of g over outputs the ReLU passed. Sums in float over one row of outputs,
// then in double per chunk of rows; the chunks are added in order, so the result does not depend on
// the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "bfloat16.h"
#include "contracts.h"

#include <algorithm>
#include <numeric>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

// Vectorisation over a block's lanes, by hand-holding GCC (12): the loops over input channels,
// taps and window positions unroll completely (VGGKIT_UNROLL), else GCC vectorises them with
// gathers; where it would unroll a loop over the lanes first and then vectorise the statements
// piecemeal, that loop stays a loop for the vectoriser (VGGKIT_LANES). Either way the kernels ran
// 4-20x slower (GCC's -fopt-info-vec and perf annotate show which loops it vectorised).
#if defined(__GNUC__) || defined(__clang__)
#define VGGKIT_UNROLL _Pragma("GCC unroll 16")
#define VGGKIT_LANES _Pragma("GCC unroll 1")
#else
#define VGGKIT_UNROLL
#define VGGKIT_LANES
#endif

// 512-bit vectors for this file's loops: GCC 12 prefers 256-bit ones on AVX-512 CPUs, and the d2l
// first layer's forward and backward measured faster at 512 bits (bench_kernels.py; where it was
// measured: tuning.py's C++ table). Not library-wide: max_pool_relu's 32-channel backward measured
// slower so. Without AVX-512 (-march=native) the preference changes nothing.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("prefer-vector-width=512")
#endif

namespace {

constexpr int64_t kLanes = 16;  // output channels per block: 16 float sums, one AVX-512 register
constexpr int kTaps = 9;        // a 3x3 kernel
constexpr int kRows = 4;        // input rows under one row of 2x2 windows of 3x3 convolutions
constexpr int64_t kMaxInChannels = 4;
using vggkit::kBlocked;
constexpr int64_t kGrainValues = 4096;  // pooled values (x channels) per parallel task or chunk, at least
constexpr int64_t kMaxChunks = 256;     // partial sums of the backward, at most

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

using vggkit::storage::narrow;
using vggkit::storage::widen;

// v at the precision the convolution computes in: widen(narrow<scalar_t>(v)) in integer operations
// without a branch (GCC leaves a loop over narrow's select scalar).
template <typename scalar_t>
inline float rounded(float v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t nearest = vggkit::storage::round_bits(vggkit::storage::bits_of(v)) & 0xFFFF0000u;
    const uint32_t number = 0u - static_cast<uint32_t>(v == v);  // all ones, or 0 for NaN
    return vggkit::storage::float_of((nearest & number) | (0x7FC00000u & ~number));
  } else {
    return v;
  }
}

struct Shape {
  int64_t N, Cin, H, W, Cout, OH, OW;
  int64_t blocks() const { return divup(Cout, kLanes); }
  int64_t lanes() const { return blocks() * kLanes; }  // Cout rounded up to whole blocks
  int64_t strip_width() const { return W + 2; }         // an input row with its padding
  int64_t rows() const { return N * OH; }               // rows of pooled outputs: (n, oy)
};

// A 4-D tensor's data and strides (elements), whatever its layout.
template <typename T>
struct View {
  T* data;
  int64_t sn, sc, sh, sw;
  T* at(int64_t n, int64_t c, int64_t h, int64_t w) const { return data + n * sn + c * sc + h * sh + w * sw; }
  // Whether a row's pixels lie one after the other with their C channels innermost (channels-last).
  bool dense_pixels(int64_t C) const { return sc == 1 && sw == C; }
};

template <typename T>
View<T> view(const at::Tensor& t, T* data) {
  return {data, t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The weights as [block][ci][tap][lane] and the bias as [block][lane], in float at the precision the
// convolution computes in; 0 in the lanes past Cout.
struct Packed {
  std::vector<float> weights, bias;
};

template <typename scalar_t>
Packed pack(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const Shape& s) {
  const at::Tensor w = weight.to(at::kFloat).contiguous();  // [Cout][Cin][3][3]
  const float* wp = w.const_data_ptr<float>();
  Packed p{std::vector<float>(s.blocks() * s.Cin * kTaps * kLanes, 0.f), std::vector<float>(s.lanes(), 0.f)};
  for (int64_t co = 0; co < s.Cout; ++co) {
    const int64_t block = co / kLanes, lane = co % kLanes;
    for (int64_t ci = 0; ci < s.Cin; ++ci) {
      for (int tap = 0; tap < kTaps; ++tap) {
        p.weights[((block * s.Cin + ci) * kTaps + tap) * kLanes + lane] =
            rounded<scalar_t>(wp[(co * s.Cin + ci) * kTaps + tap]);
      }
    }
  }
  if (bias.has_value() && bias->defined()) {
    const at::Tensor b = bias->to(at::kFloat).contiguous();
    for (int64_t co = 0; co < s.Cout; ++co) p.bias[co] = rounded<scalar_t>(b.const_data_ptr<float>()[co]);
  }
  return p;
}

// Input rows top .. top + 3 of image n in float, 0 outside the image: per channel and row, a line
// of W + 2 values, value j being input column j - 1 (the padding on both sides).
template <typename scalar_t, int kCin>
void load_strip(const View<const scalar_t>& x, const Shape& s, int64_t n, int64_t top, float* strip) {
  const int64_t width = s.strip_width();
  for (int ci = 0; ci < kCin; ++ci) {
    for (int r = 0; r < kRows; ++r) {
      float* line = strip + (ci * kRows + r) * width;
      const int64_t h = top + r;
      if (h < 0 || h >= s.H) {
        std::fill(line, line + width, 0.f);
        continue;
      }
      const scalar_t* src = x.at(n, ci, h, 0);
      line[0] = line[width - 1] = 0.f;
      for (int64_t w = 0; w < s.W; ++w) line[w + 1] = widen(src[w * x.sw]);
    }
  }
}

// The input value under tap (ky, kx) of window position p (row-major) at pooled column ox.
inline float input_at(const float* strip, int64_t width, int64_t ox, int ci, int tap, int p) {
  return strip[(ci * kRows + tap / 3 + p / 2) * width + 2 * ox + tap % 3 + p % 2];
}

// ---- forward

// One window's four convolution sums (without the bias), sum[p] for window position p, for one
// block of output channels (w: the block's packed weights). All loops but the one over the lanes
// unroll: 4 x 9 x kCin vector multiply-adds into 4 accumulators.
template <int kCin>
inline void window_sums(const float* strip, int64_t width, int64_t ox, const float* w, float (&sum)[4][kLanes]) {
  for (auto& position : sum) std::fill(position, position + kLanes, 0.f);
  VGGKIT_UNROLL
  for (int ci = 0; ci < kCin; ++ci) {
    VGGKIT_UNROLL
    for (int tap = 0; tap < kTaps; ++tap) {
      const float* wv = w + (ci * kTaps + tap) * kLanes;
      VGGKIT_UNROLL
      for (int p = 0; p < 4; ++p) {
        const float v = input_at(strip, width, ox, ci, tap, p);
        for (int64_t j = 0; j < kLanes; ++j) sum[p][j] += v * wv[j];
      }
    }
  }
}

// max_pool_relu.cpp's rule on a window's four values a b / c d, then the ReLU: the output and the
// code (32 bits wide, as the values: the loop over lanes then vectorises at full width).
inline void pool_window(float a, float b, float c, float d, float& out, int32_t& code) {
  float m = a;
  int32_t k = 0;
  bool take = (b > m) | (b != b);
  m = take ? b : m;
  k = take ? 1 : k;
  take = (c > m) | (c != c);
  m = take ? c : m;
  k = take ? 2 : k;
  take = (d > m) | (d != d);
  m = take ? d : m;
  k = take ? 3 : k;
  const bool blocked = m <= 0.f;  // false for NaN
  out = blocked ? 0.f : m;
  code = blocked ? kBlocked : k;
}

// One row of pooled outputs from its strip into values and codes, [OW][lanes] each.
template <typename scalar_t, int kCin>
void forward_row(const float* strip, const Shape& s, const Packed& packed, float* values, uint8_t* codes) {
  const int64_t width = s.strip_width(), lanes = s.lanes();
  for (int64_t ox = 0; ox < s.OW; ++ox) {
    for (int64_t block = 0; block < s.blocks(); ++block) {
      float sum[4][kLanes];
      window_sums<kCin>(strip, width, ox, packed.weights.data() + block * kCin * kTaps * kLanes, sum);
      const float* bias = packed.bias.data() + block * kLanes;
      float out[kLanes];  // local: no aliasing, so that the loop vectorises
      int32_t code[kLanes];
      VGGKIT_LANES
      for (int64_t j = 0; j < kLanes; ++j) {
        pool_window(rounded<scalar_t>(sum[0][j] + bias[j]), rounded<scalar_t>(sum[1][j] + bias[j]),
                    rounded<scalar_t>(sum[2][j] + bias[j]), rounded<scalar_t>(sum[3][j] + bias[j]), out[j], code[j]);
      }
      std::memcpy(values + ox * lanes + block * kLanes, out, sizeof(out));
      uint8_t* code_out = codes + ox * lanes + block * kLanes;
      VGGKIT_LANES
      for (int64_t j = 0; j < kLanes; ++j) code_out[j] = static_cast<uint8_t>(code[j]);
    }
  }
}

// A row of pooled outputs from the [OW][lanes] buffers into y and code at (n, :, oy, :).
template <typename scalar_t>
void store_row(const float* values, const uint8_t* codes, const Shape& s, int64_t n, int64_t oy,
               const View<scalar_t>& y, const View<uint8_t>& code) {
  const int64_t lanes = s.lanes();
  if (lanes == s.Cout && y.dense_pixels(s.Cout) && code.dense_pixels(s.Cout)) {  // one run, as the buffers
    scalar_t* out = y.at(n, 0, oy, 0);
    for (int64_t i = 0; i < s.OW * lanes; ++i) out[i] = narrow<scalar_t>(values[i]);
    std::memcpy(code.at(n, 0, oy, 0), codes, s.OW * lanes);
    return;
  }
  for (int64_t co = 0; co < s.Cout; ++co) {
    for (int64_t ox = 0; ox < s.OW; ++ox) {
      *y.at(n, co, oy, ox) = narrow<scalar_t>(values[ox * lanes + co]);
      *code.at(n, co, oy, ox) = codes[ox * lanes + co];
    }
  }
}

template <typename scalar_t, int kCin>
void forward(const at::Tensor& x, const Packed& packed, const Shape& s, at::Tensor& y, at::Tensor& code) {
  const View<const scalar_t> in = view(x, x.const_data_ptr<scalar_t>());
  const View<scalar_t> out = view(y, y.mutable_data_ptr<scalar_t>());
  const View<uint8_t> codes_out = view(code, code.mutable_data_ptr<uint8_t>());
  const int64_t grain = std::max<int64_t>(1, kGrainValues / (s.OW * s.lanes()));
  at::parallel_for(0, s.rows(), grain, [&](int64_t begin, int64_t end) {
    std::vector<float> strip(kCin * kRows * s.strip_width()), values(s.OW * s.lanes());
    std::vector<uint8_t> codes(s.OW * s.lanes());
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / s.OH, oy = row % s.OH;
      load_strip<scalar_t, kCin>(in, s, n, 2 * oy - 1, strip.data());
      forward_row<scalar_t, kCin>(strip.data(), s, packed, values.data(), codes.data());
      store_row<scalar_t>(values.data(), codes.data(), s, n, oy, out, codes_out);
    }
  });
}

// ---- backward

// n gradient values and their codes split by window position: masked[p * n + i] is g[i] where
// code[i] names position p, else 0 (all four 0 where the ReLU blocked it).
template <typename scalar_t>
void mask_by_position(const scalar_t* __restrict__ g, const uint8_t* __restrict__ code, int64_t n,
                      float* __restrict__ masked) {
  for (int64_t i = 0; i < n; ++i) {
    const float value = widen(g[i]);
    const uint8_t position = code[i];
    VGGKIT_UNROLL
    for (int p = 0; p < 4; ++p) masked[p * n + i] = position == p ? value : 0.f;
  }
}

// The row of the output gradient at (n, :, oy, :) as mask_by_position's four [OW][lanes] planes; the
// lanes past Cout get gradient 0. grads, codes: [OW][lanes] buffers for a row in another layout.
template <typename scalar_t>
void mask_row(const View<const scalar_t>& g, const View<const uint8_t>& code, const Shape& s, int64_t n, int64_t oy,
              float* grads, uint8_t* codes, float* masked) {
  const int64_t lanes = s.lanes(), values = s.OW * lanes;
  if (lanes == s.Cout && g.dense_pixels(s.Cout) && code.dense_pixels(s.Cout)) {
    mask_by_position(g.at(n, 0, oy, 0), code.at(n, 0, oy, 0), values, masked);
    return;
  }
  std::fill(grads, grads + values, 0.f);
  std::fill(codes, codes + values, kBlocked);
  for (int64_t co = 0; co < s.Cout; ++co) {
    for (int64_t ox = 0; ox < s.OW; ++ox) {
      grads[ox * lanes + co] = widen(*g.at(n, co, oy, ox));
      codes[ox * lanes + co] = *code.at(n, co, oy, ox);
    }
  }
  mask_by_position(grads, codes, values, masked);
}

// One row's weight and bias gradient terms for one block of output channels (masked: the row's
// mask_row planes from the block's first lane), added to sums: sums[ci * kTaps + tap] for the
// weights, sums[kCin * kTaps] for the bias.
template <int kCin>
inline void add_row_terms(const float* strip, int64_t width, const float* masked, int64_t OW, int64_t lanes,
                          float (&sums)[kCin * kTaps + 1][kLanes]) {
  constexpr int kBias = kCin * kTaps;
  const int64_t plane = OW * lanes;
  float acc[kBias + 1][kLanes] = {};
  for (int64_t ox = 0; ox < OW; ++ox) {
    const float* at = masked + ox * lanes;  // at + p * plane: the gradients at window position p
    VGGKIT_UNROLL
    for (int p = 0; p < 4; ++p) {
      VGGKIT_LANES
      for (int64_t j = 0; j < kLanes; ++j) acc[kBias][j] += at[p * plane + j];
    }
    VGGKIT_UNROLL
    for (int ci = 0; ci < kCin; ++ci) {
      VGGKIT_UNROLL
      for (int tap = 0; tap < kTaps; ++tap) {
        VGGKIT_UNROLL
        for (int p = 0; p < 4; ++p) {
          const float v = input_at(strip, width, ox, ci, tap, p);
          VGGKIT_LANES
          for (int64_t j = 0; j < kLanes; ++j) acc[ci * kTaps + tap][j] += v * at[p * plane + j];
        }
      }
    }
  }
  for (int t = 0; t <= kBias; ++t) {
    for (int64_t j = 0; j < kLanes; ++j) sums[t][j] += acc[t][j];
  }
}

// The gradient sums over every row, as [block][term][lane] (terms as add_row_terms').
template <typename scalar_t, int kCin>
std::vector<double> gradient_sums(const at::Tensor& grad, const at::Tensor& code, const at::Tensor& x,
                                  const Shape& s) {
  constexpr int kTerms = kCin * kTaps + 1;
  const int64_t per_block = kTerms * kLanes, size = s.blocks() * per_block, rows = s.rows();
  const int64_t per_chunk = std::max(divup(kGrainValues, s.OW * s.lanes()), divup(rows, kMaxChunks));
  const int64_t chunks = divup(rows, per_chunk);
  const View<const scalar_t> in = view(x, x.const_data_ptr<scalar_t>());
  const View<const scalar_t> g = view(grad, grad.const_data_ptr<scalar_t>());
  const View<const uint8_t> k = view(code, code.const_data_ptr<uint8_t>());
  std::vector<double> partial(chunks * size, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> strip(kCin * kRows * s.strip_width()), grads(s.OW * s.lanes()), masked(4 * s.OW * s.lanes());
    std::vector<uint8_t> codes(s.OW * s.lanes());
    for (int64_t chunk = first; chunk < last; ++chunk) {
      double* out = partial.data() + chunk * size;
      for (int64_t row = chunk * per_chunk; row < std::min(rows, (chunk + 1) * per_chunk); ++row) {
        const int64_t n = row / s.OH, oy = row % s.OH;
        load_strip<scalar_t, kCin>(in, s, n, 2 * oy - 1, strip.data());
        mask_row<scalar_t>(g, k, s, n, oy, grads.data(), codes.data(), masked.data());
        for (int64_t block = 0; block < s.blocks(); ++block) {
          float sums[kTerms][kLanes] = {};
          add_row_terms<kCin>(strip.data(), s.strip_width(), masked.data() + block * kLanes, s.OW, s.lanes(), sums);
          double* o = out + block * per_block;
          for (int t = 0; t < kTerms; ++t) {
            for (int64_t j = 0; j < kLanes; ++j) o[t * kLanes + j] += sums[t][j];
          }
        }
      }
    }
  });
  std::vector<double> total(size, 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t i = 0; i < size; ++i) total[i] += partial[chunk * size + i];
  }
  return total;
}

// ---- the input's moments: a following batch norm's statistics in closed form (conv_pool.py)

// Image n's zero-padded planes, [Cin][H + 2][pitch] in float (pitch = s.W rounded up to whole blocks
// of kLanes pixels, + 2): tap k = ci * 9 + ky * 3 + kx of pixel (h, w) is
// plane[(ci * (H + 2) + h + ky) * pitch + w + kx].
template <typename scalar_t, int kCin>
void load_planes(const View<const scalar_t>& x, const Shape& s, int64_t n, int64_t pitch, float* plane) {
  const int64_t height = s.H + 2;
  std::fill(plane, plane + kCin * height * pitch, 0.f);
  for (int ci = 0; ci < kCin; ++ci) {
    for (int64_t h = 0; h < s.H; ++h) {
      const scalar_t* src = x.at(n, ci, h, 0);
      float* line = plane + (ci * height + h + 1) * pitch + 1;
      for (int64_t w = 0; w < s.W; ++w) line[w] = widen(src[w * x.sw]);
    }
  }
}

// Adds image n's tap products to gram (k1 <= k2) and its tap values to sums. Taps come in rows of
// three (a channel's ky): for each pair of tap rows, the image's pixels in blocks of kLanes along a
// row, 3 + 3 loaded vectors and 9 products summed in 9 vector registers over the whole image (the
// first row's values masked to 0 past the image's width).
template <typename scalar_t, int kCin>
void add_image_moments(const View<const scalar_t>& x, const Shape& s, int64_t n, int64_t pitch, float* plane,
                       const float* mask, double* gram, double* sums) {
  constexpr int K = kCin * kTaps, kTapRows = kCin * 3;
  const int64_t height = s.H + 2;
  load_planes<scalar_t, kCin>(x, s, n, pitch, plane);
  for (int r1 = 0; r1 < kTapRows; ++r1) {
    for (int r2 = r1; r2 < kTapRows; ++r2) {
      const float* top1 = plane + ((r1 / 3) * height + r1 % 3) * pitch;
      const float* top2 = plane + ((r2 / 3) * height + r2 % 3) * pitch;
      float products[3][3][kLanes] = {}, values[3][kLanes] = {};
      for (int64_t h = 0; h < s.H; ++h) {
        for (int64_t w = 0; w + 2 < pitch; w += kLanes) {
          const float* a = top1 + h * pitch + w;
          const float* b = top2 + h * pitch + w;
          VGGKIT_UNROLL
          for (int kx1 = 0; kx1 < 3; ++kx1) {
            VGGKIT_UNROLL
            for (int kx2 = 0; kx2 < 3; ++kx2) {
              VGGKIT_LANES
              for (int64_t j = 0; j < kLanes; ++j) products[kx1][kx2][j] += a[kx1 + j] * mask[w + j] * b[kx2 + j];
            }
            if (r1 == r2) {
              VGGKIT_LANES
              for (int64_t j = 0; j < kLanes; ++j) values[kx1][j] += a[kx1 + j] * mask[w + j];
            }
          }
        }
      }
      for (int kx1 = 0; kx1 < 3; ++kx1) {
        for (int kx2 = 0; kx2 < 3; ++kx2) {
          const int k1 = r1 * 3 + kx1, k2 = r2 * 3 + kx2;
          if (k1 <= k2) gram[k1 * K + k2] += std::accumulate(products[kx1][kx2], products[kx1][kx2] + kLanes, 0.0);
        }
        if (r1 == r2) sums[r1 * 3 + kx1] += std::accumulate(values[kx1], values[kx1] + kLanes, 0.0);
      }
    }
  }
}

// gram [K][K] and sums [K], float64, K = Cin * 9: the sums over every pixel of the products and values
// of the zero-padded input under the 3x3 taps (tap k = ci * 9 + ky * 3 + kx). Images are summed in
// chunks, the chunks in order: the result does not depend on the number of threads.
template <typename scalar_t, int kCin>
void input_moments(const at::Tensor& x, const Shape& s, double* gram, double* sums) {
  constexpr int K = kCin * kTaps;
  const int64_t size = K * K + K, pitch = divup(s.W, kLanes) * kLanes + 2;
  const int64_t per_chunk = std::max(divup(kGrainValues, s.H * s.W * kCin), divup(s.N, kMaxChunks));
  const int64_t chunks = divup(s.N, per_chunk);
  const View<const scalar_t> in = view(x, x.const_data_ptr<scalar_t>());
  std::vector<float> mask(pitch, 0.f);
  std::fill(mask.begin(), mask.begin() + s.W, 1.f);
  std::vector<double> partial(chunks * size, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> plane(kCin * (s.H + 2) * pitch);
    for (int64_t chunk = first; chunk < last; ++chunk) {
      double* out = partial.data() + chunk * size;
      for (int64_t n = chunk * per_chunk; n < std::min(s.N, (chunk + 1) * per_chunk); ++n) {
        add_image_moments<scalar_t, kCin>(in, s, n, pitch, plane.data(), mask.data(), out, out + K * K);
      }
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const double* part = partial.data() + chunk * size;
    for (int k1 = 0; k1 < K; ++k1) {
      for (int k2 = k1; k2 < K; ++k2) gram[k1 * K + k2] += part[k1 * K + k2];
      sums[k1] += part[K * K + k1];
    }
  }
  for (int k1 = 0; k1 < K; ++k1) {
    for (int k2 = 0; k2 < k1; ++k2) gram[k1 * K + k2] = gram[k2 * K + k1];
  }
}

// ---- the operators

bool floating(const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

Shape shape_of(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && floating(x), op,
              ": expected a 4-D float32 or bfloat16 CPU input, got ", x.dim(), "-D ", x.scalar_type());
  const int64_t Cin = x.size(1);
  TORCH_CHECK(Cin >= 1 && Cin <= kMaxInChannels, op, ": 1 to ", kMaxInChannels, " input channels, got ", Cin);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == Cin && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.device().is_cpu() && floating(weight),
              op, ": expected a float32 or bfloat16 [C_out, ", Cin, ", 3, 3] CPU weight, got ", weight.sizes());
  return {x.size(0), Cin, x.size(2), x.size(3), weight.size(0), x.size(2) / 2, x.size(3) / 2};
}

// Runs body(scalar, channels) with scalar_t (float or bfloat16) and kCin (1-4) as compile-time values.
template <typename F>
void dispatch(at::ScalarType dtype, int64_t Cin, const F& body) {
  const auto with_channels = [&](auto scalar) {
    switch (Cin) {
      case 1: return body(scalar, std::integral_constant<int, 1>{});
      case 2: return body(scalar, std::integral_constant<int, 2>{});
      case 3: return body(scalar, std::integral_constant<int, 3>{});
      default: return body(scalar, std::integral_constant<int, 4>{});
    }
  };
  if (dtype == at::kBFloat16) {
    with_channels(c10::BFloat16{});
  } else {
    with_channels(float{});
  }
}

std::tuple<at::Tensor, at::Tensor> conv_pool_relu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias) {
  const Shape s = shape_of(x, weight, "conv_pool_relu");
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->numel() == s.Cout && floating(*bias)),
              "conv_pool_relu: expected a float32 or bfloat16 bias of ", s.Cout, " values");
  // The layout PyTorch's CPU convolution gives: channels-last where the input or the weight is.
  const bool channels_last = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                             weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor y = at::empty({s.N, s.Cout, s.OH, s.OW}, x.options(), format);
  at::Tensor code = at::empty({s.N, s.Cout, s.OH, s.OW}, x.options().dtype(at::kByte), format);
  if (y.numel() == 0) return {y, code};
  dispatch(x.scalar_type(), s.Cin, [&](auto scalar, auto channels) {
    using scalar_t = decltype(scalar);
    forward<scalar_t, decltype(channels)::value>(x, pack<scalar_t>(weight, bias, s), s, y, code);
  });
  return {y, code};
}

std::tuple<at::Tensor, at::Tensor> conv_pool_relu_backward(const at::Tensor& grad_output, const at::Tensor& code,
                                                           const at::Tensor& x, const at::Tensor& weight) {
  const Shape s = shape_of(x, weight, "conv_pool_relu_backward");
  const std::vector<int64_t> sizes{s.N, s.Cout, s.OH, s.OW};
  TORCH_CHECK(code.scalar_type() == at::kByte && code.sizes() == sizes && grad_output.sizes() == sizes,
              "conv_pool_relu_backward: expected a gradient and uint8 codes of ", at::IntArrayRef(sizes));
  const at::Tensor grad = grad_output.to(x.scalar_type());
  at::Tensor grad_weight32 = at::zeros({s.Cout, s.Cin, 3, 3}, x.options().dtype(at::kFloat));
  at::Tensor grad_bias32 = at::zeros({s.Cout}, x.options().dtype(at::kFloat));
  if (code.numel() > 0) {
    dispatch(x.scalar_type(), s.Cin, [&](auto scalar, auto channels) {
      constexpr int kCin = decltype(channels)::value;
      const auto total = gradient_sums<decltype(scalar), kCin>(grad, code, x, s);
      float* gw = grad_weight32.mutable_data_ptr<float>();
      float* gb = grad_bias32.mutable_data_ptr<float>();
      const int64_t per_block = (kCin * kTaps + 1) * kLanes;
      for (int64_t co = 0; co < s.Cout; ++co) {
        const double* sums = total.data() + (co / kLanes) * per_block + co % kLanes;
        for (int t = 0; t < kCin * kTaps; ++t) gw[co * kCin * kTaps + t] = static_cast<float>(sums[t * kLanes]);
        gb[co] = static_cast<float>(sums[kCin * kTaps * kLanes]);
      }
    });
  }
  at::Tensor grad_weight = at::empty_like(weight);  // the weight's dtype and layout
  grad_weight.copy_(grad_weight32);
  return {grad_weight, grad_bias32.to(weight.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> conv3x3_input_moments(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "conv3x3_input_moments: expected a 4-D input, got ", x.dim(), "-D");
  const Shape s = shape_of(x, at::empty({1, x.size(1), 3, 3}, x.options()), "conv3x3_input_moments");
  const int64_t K = s.Cin * kTaps;
  at::Tensor gram = at::zeros({K, K}, x.options().dtype(at::kDouble));
  at::Tensor sums = at::zeros({K}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) return {gram, sums};
  dispatch(x.scalar_type(), s.Cin, [&](auto scalar, auto channels) {
    input_moments<decltype(scalar), decltype(channels)::value>(x, s, gram.mutable_data_ptr<double>(),
                                                                sums.mutable_data_ptr<double>());
  });
  return {gram, sums};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vggkit, m) {
  m.def("conv_pool_relu(Tensor x, Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def("conv_pool_relu_backward(Tensor grad_output, Tensor code, Tensor x, Tensor weight) -> (Tensor, Tensor)");
  m.def("conv3x3_input_moments(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vggkit, CPU, m) {
  m.impl("conv_pool_relu", &conv_pool_relu);
  m.impl("conv_pool_relu_backward", &conv_pool_relu_backward);
  m.impl("conv3x3_input_moments", &conv3x3_input_moments);
}
