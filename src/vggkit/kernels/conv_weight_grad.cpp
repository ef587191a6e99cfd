// The weight and bias gradients of a 3x3, stride-1, padding-1 convolution in bfloat16 on the AMX
// matrix units: grad_weight[o][i][kh][kw] = sum over images and pixels of
// grad_out[n][h][w][o] * x[n][h+kh-1][w+kw-1][i], grad_bias[o] = sum of grad_out[n][h][w][o].
//
// oneDNN's weight-gradient pass runs at about half the rate of its forward convolution on the
// shapes of the d2l and fast presets (2.0 against 4.3 TFLOP/s at 128 -> 128 channels, 28x28). Here
// each thread takes a slice of the images on a grid one row and one column wider than the image
// (the extra row and column are the zero padding, shared by neighbouring rows and images), so that
// tap (kh, kw) is a plain matrix product over pixels with the input read (kh-1)*(W+1) + (kw-1)
// pixels further on. Chunk by chunk, just before the products read them from cache, it lays out
// - grad_out transposed to [channel][pixel] (16x16 blocks transposed in registers), its values
//   summed on the way for the bias gradient: the products' first operand;
// - the input's pixel pairs interleaved (the VNNI layout AMX's bf16 product takes for its second
//   operand), in two versions, pairs starting at even and at odd pixels, so that every tap's
//   shift reads whole 64-byte rows.
// For each pair of 16-channel blocks and tap, four 16x16 float32 tiles accumulate in the tile
// registers. Products are exact in float32 and the sums are float32; unlike oneDNN's bf16 result,
// the float32 gradient is rounded once, by the caller.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__)
#define VGGKIT_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kTile = 16;        // channels per tile row block and columns
constexpr int64_t kStep = 32;        // pixels per tile product (64 bytes of bf16)
constexpr int64_t kChunk = 512;      // pixels per pass (256 and 1024 measured slower)

#ifdef VGGKIT_AMX

bool amx_permitted() {
  // Linux hands out the 8 KiB of tile state only to a process that asks (ARCH_REQ_XCOMP_PERM).
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTile;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// One thread's images on the padded grid, a window of it at a time. For the chunk of pixels
// [p0, p0 + kChunk):
// - gt [out channels][kChunk]: the output gradient transposed (the products' first operand, rows
//   read from 64-byte boundaries);
// - xv[2] [pairs][in channels][2]: the input's pixel pairs from `start` = p0 - lead on, interleaved,
//   pairs (even, odd) in xv[0] and (odd, even) in xv[1]: a tap's shift of s pixels reads its 32
//   pixels as 16 pairs of the version of s's parity, again from 64-byte boundaries.
struct Layout {
  int64_t height, width, row, image, pixels, padded, margin, lead, window, gt_row;
  Layout(int64_t images, int64_t h, int64_t w)
      : height(h), width(w), row(w + 1), image((h + 1) * (w + 1)), pixels(images * image),
        padded((pixels + kStep - 1) / kStep * kStep), margin(w + 2), lead((margin + 1) / 2 * 2 + 2),
        window(kChunk + 2 * lead), gt_row(staggered(kChunk)) {}
  // An odd number of cache lines a row: a tile's 16 rows then fall in different L1 sets.
  static int64_t staggered(int64_t values) { return ((values * 2 + 63) / 64 | 1) * 32; }
};

// Walks the grid pixel by pixel from p (which may be negative: before the first image), saying
// where each pixel's values start in the thread's channels-last slice (a pixel index), or -1 on the
// padding row and column and outside the images. One division at the start, none per step.
struct GridCursor {
  const Layout& g;
  int64_t p, n = 0, h = 0, w = 0;
  GridCursor(const Layout& layout, int64_t start) : g(layout), p(start) {
    if (p > 0) {
      n = p / g.image;
      h = p % g.image / g.row;
      w = p % g.row;
    }
  }
  int64_t source() const {
    return (p >= 0 && p < g.pixels && h < g.height && w < g.width) ? (n * g.height + h) * g.width + w : -1;
  }
  void next() {
    if (++p <= 0) return;  // still before the first pixel, or just reached it (n = h = w = 0)
    if (++w == g.row) {
      w = 0;
      if (++h == g.height + 1) {
        h = 0;
        ++n;
      }
    }
  }
};

// A 16x16 matrix of 16-bit values in 16 registers, transposed in place: four rounds that swap
// the off-diagonal blocks of every 2x2 block matrix of b x b blocks, b = 8, 4, 2 (32-bit moves)
// and 1 (16-bit moves).
struct Transposer {
  __m256i first[4], second[4];  // per round: the permutations giving rows i and i + b
  Transposer() {
    alignas(32) int32_t a[8], c[8];
    alignas(32) int16_t aw[16], cw[16];
    for (int round = 0; round < 3; ++round) {
      const int b = 4 >> round;  // in 32-bit units
      for (int k = 0; k < 8; ++k) {
        const int group = k / (2 * b) * 2 * b, r = k % (2 * b);
        a[k] = r < b ? group + r : 8 + group + r - b;
        c[k] = r < b ? group + b + r : 8 + group + r;
      }
      first[round] = _mm256_load_si256(reinterpret_cast<const __m256i*>(a));
      second[round] = _mm256_load_si256(reinterpret_cast<const __m256i*>(c));
    }
    for (int w = 0; w < 16; ++w) {
      aw[w] = static_cast<int16_t>(w % 2 ? 16 + w / 2 * 2 : w / 2 * 2);
      cw[w] = static_cast<int16_t>(w % 2 ? 16 + w / 2 * 2 + 1 : w / 2 * 2 + 1);
    }
    first[3] = _mm256_load_si256(reinterpret_cast<const __m256i*>(aw));
    second[3] = _mm256_load_si256(reinterpret_cast<const __m256i*>(cw));
  }
  template <int kRound, int kB>
  inline void round(__m256i* rows) const {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i % (2 * kB) >= kB) continue;
      const __m256i top = rows[i], bottom = rows[i + kB];
      if constexpr (kRound < 3) {
        rows[i] = _mm256_permutex2var_epi32(top, first[kRound], bottom);
        rows[i + kB] = _mm256_permutex2var_epi32(top, second[kRound], bottom);
      } else {
        rows[i] = _mm256_permutex2var_epi16(top, first[kRound], bottom);
        rows[i + kB] = _mm256_permutex2var_epi16(top, second[kRound], bottom);
      }
    }
  }
  inline void operator()(__m256i* rows) const {
    round<0, 8>(rows);
    round<1, 4>(rows);
    round<2, 2>(rows);
    round<3, 1>(rows);
  }
};

inline void add_widened16(float* sums, __m256i values) {
  const __m512 wide = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(values), 16));
  _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_loadu_ps(sums), wide));
}

// The chunk's output gradient transposed into gt: 16 pixels by 16 channels at a time, loaded as
// the pixels' lines and transposed in registers; each row's values also summed into
// sums[channel][16].
void lay_out_grad_by_blocks(const uint16_t* go, int64_t channels, const Layout& g, int64_t p0, int64_t p1,
                            uint16_t* gt, float* sums) {
  static const Transposer transpose;
  GridCursor cursor(g, p0);
  int64_t source[16];
  __m256i rows[16];
  for (int64_t q = p0; q < p1; q += 16) {
    for (int64_t j = 0; j < 16; ++j, cursor.next()) source[j] = cursor.source();
    uint16_t* dst = gt + (q - p0);
    for (int64_t c0 = 0; c0 < channels; c0 += 16) {
#pragma GCC unroll 16
      for (int64_t j = 0; j < 16; ++j)
        rows[j] = source[j] < 0 ? _mm256_setzero_si256()
                                : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(go + source[j] * channels + c0));
      transpose(rows);
#pragma GCC unroll 16
      for (int64_t c = 0; c < 16; ++c) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + (c0 + c) * g.gt_row), rows[c]);
        add_widened16(sums + (c0 + c) * 16, rows[c]);
      }
    }
  }
}

// Pixels [begin, end) of the grid (begin - 1 >= start - 1; pairs counted from start) into the
// input's two pair versions: each pixel and the one before it make one pair of xv[0] (the earlier
// one even) or of xv[1] (odd), their channels interleaved.
void lay_out_input(const uint16_t* x, int64_t channels, const Layout& g, int64_t start, int64_t begin, int64_t end,
                   uint16_t* const* xv) {
  alignas(64) int16_t lo[32], hi[32];
  for (int j = 0; j < 32; ++j) {
    lo[j] = static_cast<int16_t>((j & 1) * 32 + j / 2);
    hi[j] = static_cast<int16_t>((j & 1) * 32 + 16 + j / 2);
  }
  const __m512i lo_index = _mm512_load_si512(lo), hi_index = _mm512_load_si512(hi);
  GridCursor cursor(g, begin - 1);
  int64_t before = cursor.source();
  cursor.next();
  for (int64_t p = begin; p < end; ++p, cursor.next()) {
    const int64_t source = cursor.source();
    const int64_t first = p - 1;  // the pair (first, p)
    const int64_t version = (first - start) & 1;
    uint16_t* dst = xv[version] + (first - start - version) / 2 * channels * 2;
    for (int64_t c = 0; c < channels; c += 32) {
      const __mmask32 m = channels - c >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (channels - c)) - 1);
      const __m512i a = before < 0 ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(m, x + before * channels + c);
      const __m512i b = source < 0 ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(m, x + source * channels + c);
      _mm512_store_si512(dst + 2 * c, _mm512_permutex2var_epi16(a, lo_index, b));
      if (channels - c > 16) _mm512_store_si512(dst + 2 * c + 32, _mm512_permutex2var_epi16(a, hi_index, b));
    }
    before = source;
  }
}

// acc's tiles [out block o][in block i] (and o + 1, i + 1 where kTwoOut, kTwoIn) += the products
// of `steps` 32-pixel steps: gt rows from a0, input pairs from b0.
template <bool kTwoOut, bool kTwoIn>
void tile_products(const uint16_t* a0, const uint16_t* b0, float* acc, int64_t acc_out_stride,
                   int64_t acc_in_stride, int64_t a_stride, int64_t b_stride, int64_t steps) {
  float* c00 = acc;
  float* c01 = acc + acc_in_stride;
  float* c10 = acc + acc_out_stride;
  float* c11 = acc + acc_out_stride + acc_in_stride;
  _tile_loadd(0, c00, 64);
  if (kTwoIn) _tile_loadd(1, c01, 64);
  if (kTwoOut) _tile_loadd(2, c10, 64);
  if (kTwoOut && kTwoIn) _tile_loadd(3, c11, 64);
  const uint16_t* a1 = a0 + kTile * (a_stride / 2);
  const uint16_t* b1 = b0 + kTile * 2;
  const int64_t b_step = (kStep / 2) * (b_stride / 2);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a0 + s * kStep, a_stride);
    _tile_loadd(6, b0 + s * b_step, b_stride);
    if (kTwoIn) _tile_loadd(7, b1 + s * b_step, b_stride);
    if (kTwoOut) _tile_loadd(5, a1 + s * kStep, a_stride);
    _tile_dpbf16ps(0, 4, 6);
    if (kTwoIn) _tile_dpbf16ps(1, 4, 7);
    if (kTwoOut) _tile_dpbf16ps(2, 5, 6);
    if (kTwoOut && kTwoIn) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c00, 64);
  if (kTwoIn) _tile_stored(1, c01, 64);
  if (kTwoOut) _tile_stored(2, c10, 64);
  if (kTwoOut && kTwoIn) _tile_stored(3, c11, 64);
}

// The slice's products, chunk by chunk, each chunk's operands laid out just before its products
// read them, in buffers small enough to stay in cache (the next window keeps the last 2 * lead
// pixels' pairs of this one). acc: [tap][out block][in block][16][16].
void accumulate(const uint16_t* x, const uint16_t* go, uint16_t* gt, uint16_t* const* xv, int64_t in_ch,
                int64_t out_ch, const Layout& g, float* acc, float* sums) {
  const int64_t in_blocks = in_ch / kTile, out_blocks = out_ch / kTile;
  const int64_t block = kTile * kTile, acc_in_stride = block, acc_out_stride = in_blocks * block;
  const int64_t tap_stride = out_blocks * acc_out_stride;
  const int64_t a_stride = g.gt_row * 2, b_stride = in_ch * 2 * 2;
  const int64_t kept = 2 * g.lead;
  for (int64_t p0 = 0; p0 < g.padded; p0 += kChunk) {
    const int64_t p1 = std::min(p0 + kChunk, g.padded), steps = (p1 - p0) / kStep;
    const int64_t start = p0 - g.lead, end = p1 + g.lead;  // the pairs from start cover every tap's reads
    if (p0 == 0) {
      lay_out_input(x, in_ch, g, start, start + 1, end + 1, xv);
    } else {
      for (int v = 0; v < 2; ++v) std::memmove(xv[v], xv[v] + (kChunk / 2) * in_ch * 2, (kept / 2) * in_ch * 2 * 2);
      lay_out_input(x, in_ch, g, start, start + kept + 1, end + 1, xv);
    }
    lay_out_grad_by_blocks(go, out_ch, g, p0, p1, gt, sums);
    for (int64_t o = 0; o < out_blocks; o += 2)
      for (int64_t i = 0; i < in_blocks; i += 2)
        for (int64_t tap = 0; tap < 9; ++tap) {
          const int64_t first = p0 + (tap / 3 - 1) * g.row + (tap % 3 - 1) - start;  // >= 0
          const uint16_t* a = gt + o * kTile * g.gt_row;
          const uint16_t* b = xv[first & 1] + (first >> 1) * in_ch * 2 + i * kTile * 2;
          float* c = acc + tap * tap_stride + o * acc_out_stride + i * acc_in_stride;
          const bool two_out = o + 1 < out_blocks, two_in = i + 1 < in_blocks;
          if (two_out && two_in) tile_products<true, true>(a, b, c, acc_out_stride, acc_in_stride, a_stride, b_stride, steps);
          else if (two_out) tile_products<true, false>(a, b, c, acc_out_stride, acc_in_stride, a_stride, b_stride, steps);
          else if (two_in) tile_products<false, true>(a, b, c, acc_out_stride, acc_in_stride, a_stride, b_stride, steps);
          else tile_products<false, false>(a, b, c, acc_out_stride, acc_in_stride, a_stride, b_stride, steps);
        }
  }
}

#endif  // VGGKIT_AMX

bool conv3x3_weight_grad_available() {
#ifdef VGGKIT_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// grad_weight (float32, [out][in][3][3]) and grad_bias (float32, [out]) of a 3x3 / stride 1 /
// padding 1 convolution from its bfloat16 input and output gradient; channels multiples of 16.
std::tuple<at::Tensor, at::Tensor> conv3x3_weight_grad(const at::Tensor& grad_out, const at::Tensor& input) {
  TORCH_CHECK(conv3x3_weight_grad_available(), "conv3x3_weight_grad: needs AMX (bf16 tiles) and Linux's permission");
  TORCH_CHECK(input.dim() == 4 && grad_out.dim() == 4 && input.scalar_type() == at::kBFloat16 &&
                  grad_out.scalar_type() == at::kBFloat16,
              "conv3x3_weight_grad: 4-D bfloat16 tensors");
  const int64_t n = input.size(0), in_ch = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t out_ch = grad_out.size(1);
  TORCH_CHECK(grad_out.size(0) == n && grad_out.size(2) == h && grad_out.size(3) == w,
              "conv3x3_weight_grad: the output gradient's shape must match the input's (stride 1, padding 1)");
  TORCH_CHECK(in_ch % kTile == 0 && out_ch % kTile == 0, "conv3x3_weight_grad: channels must be multiples of 16");
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor go = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  const int64_t per_thread = (n + threads - 1) / threads;
  const int64_t weight_size = 9 * in_ch * out_ch, bias_size = out_ch * 16;
  const int64_t acc_size = weight_size + bias_size;
  at::Tensor partial = at::zeros({threads, acc_size}, input.options().dtype(at::kFloat));
#ifdef VGGKIT_AMX
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  const uint16_t* gs = reinterpret_cast<const uint16_t*>(go.const_data_ptr<at::BFloat16>());
  float* acc = partial.data_ptr<float>();
  const Layout shape(per_thread, h, w);
  const int64_t gt_size = out_ch * shape.gt_row, xv_size = (shape.window / 2 + 1) * in_ch * 2;  // multiples of 32
  const int64_t per_buffer = gt_size + 2 * xv_size;
  at::Tensor buffers = at::empty({threads, per_buffer}, input.options().dtype(at::kShort));
  uint16_t* buffer = reinterpret_cast<uint16_t*>(buffers.data_ptr<int16_t>());
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * per_thread, images = std::min(per_thread, n - first);
      if (images <= 0) continue;
      const Layout g(images, h, w);
      uint16_t* gt = buffer + t * per_buffer;
      uint16_t* xv[2] = {gt + gt_size, gt + gt_size + xv_size};
      float* sums = acc + t * acc_size;
      accumulate(xs + first * h * w * in_ch, gs + first * h * w * out_ch, gt, xv, in_ch, out_ch, g, sums + bias_size,
                 sums);
    }
    _tile_release();
  });
#endif
  // [tap][out block][in block][16 out][16 in] -> [out][in][tap]; bias: [out][16] -> [out]
  const at::Tensor summed = partial.sum(0);
  const at::Tensor weight = summed.slice(0, bias_size).view({9, out_ch / kTile, in_ch / kTile, kTile, kTile});
  return {weight.permute({1, 3, 2, 4, 0}).reshape({out_ch, in_ch, 3, 3}).contiguous(),
          summed.slice(0, 0, bias_size).view({out_ch, 16}).sum(1)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vggkit, m) {
  m.def("conv3x3_weight_grad(Tensor grad_out, Tensor input) -> (Tensor, Tensor)");
  m.def("conv3x3_weight_grad_available() -> bool", &conv3x3_weight_grad_available);
}

TORCH_LIBRARY_IMPL(vggkit, CPU, m) { m.impl("conv3x3_weight_grad", &conv3x3_weight_grad); }
