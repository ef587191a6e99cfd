// The weight gradient of a 3x3, stride-1, padding-1 convolution in bfloat16 on the AMX matrix units:
// grad_weight[o][i][kh][kw] = sum over images and pixels of grad_out[n][h][w][o] * x[n][h+kh-1][w+kw-1][i].
//
// oneDNN's weight-gradient pass runs at about half the rate of its forward convolution on the
// shapes of the d2l and fast presets (2.0 against 4.3 TFLOP/s at 128 -> 128 channels, 28x28). Here
// each thread lays its images out once so that every tap is a plain matrix product over pixels:
// - x transposed to [channel][pixel] on a grid one row and one column wider than the image
//   (the extra row and column are the zero padding, shared by neighbouring rows and images), so
//   that tap (kh, kw) is the same rows read at an offset of (kh-1)*(W+1) + (kw-1) pixels;
// - grad_out on the same grid (zero on the extra row and column), pairs of pixels interleaved
//   (the VNNI layout AMX's bf16 product takes for its second operand).
// Then for each block of pixels, tap and pair of 16-channel blocks, four 16x16 float32 tiles
// accumulate in the tile registers. Products are exact in float32 and sums are float32, as
// oneDNN's; only the order of the sums differs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
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
constexpr int64_t kChunk = 256;      // pixels per pass over the taps: the chunk's operands stay in L2

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

// One thread's images on the padded grid: xt [channels][margin + pixels + margin], go
// [pixels / 2][out channels][2].
struct Layout {
  int64_t height, width, row, image, pixels, padded, margin, xt_row;
  Layout(int64_t images, int64_t h, int64_t w)
      : height(h), width(w), row(w + 1), image((h + 1) * (w + 1)), pixels(images * image),
        padded((pixels + kStep - 1) / kStep * kStep), margin(w + 2),
        xt_row(staggered(margin + padded + margin)) {}
  // A row length of whole 4 KiB pages plus one cache line: a tile's 16 rows then fall in 16
  // different L1 sets (with whole pages they would all compete for one).
  static int64_t staggered(int64_t values) { return (values * 2 + 4095) / 4096 * 2048 + 32; }
};

// Where grid pixel p's values start in the thread's channels-last slice (a pixel index), or -1 on
// the padding row and column and beyond the images.
inline int64_t source_of(const Layout& g, int64_t p) {
  if (p < 0 || p >= g.pixels) return -1;
  const int64_t n = p / g.image, r = p % g.image, h = r / g.row, w = r % g.row;
  return (h < g.height && w < g.width) ? (n * g.height + h) * g.width + w : -1;
}

// Columns [begin, end) of xt (grid pixels, margin included) from x: 32 pixels at a time, each pair
// of channels gathered as one 32-bit value per pixel, then split into the two channels' rows.
void lay_out_input(const uint16_t* x, int64_t channels, const Layout& g, uint16_t* xt, int64_t begin, int64_t end) {
  const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26,
                                        24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
  const int* base = reinterpret_cast<const int*>(x);
  for (int64_t p0 = begin; p0 < end; p0 += kStep) {
    alignas(64) int32_t index[kStep];
    uint32_t valid = 0;
    for (int64_t j = 0; j < kStep; ++j) {
      const int64_t source = p0 + j < end ? source_of(g, p0 + j - g.margin) : -1;
      index[j] = source < 0 ? 0 : static_cast<int32_t>(source * channels / 2);
      valid |= static_cast<uint32_t>(source >= 0) << j;
    }
    for (int64_t j = 0; j < kStep; j += 4) {  // the next group's pixels: gathers do not wake the prefetchers
      const int64_t ahead = source_of(g, p0 + kStep + j - g.margin);
      if (ahead >= 0)
        for (int64_t c = 0; c < channels; c += 32) _mm_prefetch(reinterpret_cast<const char*>(x + ahead * channels + c), _MM_HINT_T0);
    }
    const __mmask32 keep = end - p0 >= kStep ? ~__mmask32{0} : static_cast<__mmask32>((1u << (end - p0)) - 1);
    const __m512i index_lo = _mm512_load_si512(index), index_hi = _mm512_load_si512(index + 16);
    uint16_t* dst = xt + p0;
    for (int64_t c = 0; c < channels; c += 2) {
      const __m512i offset = _mm512_set1_epi32(static_cast<int32_t>(c / 2));
      const __m512i lo = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), static_cast<__mmask16>(valid),
                                                     _mm512_add_epi32(index_lo, offset), base, 4);
      const __m512i hi = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), static_cast<__mmask16>(valid >> 16),
                                                     _mm512_add_epi32(index_hi, offset), base, 4);
      _mm512_mask_storeu_epi16(dst + c * g.xt_row, keep, _mm512_permutex2var_epi16(lo, even, hi));
      _mm512_mask_storeu_epi16(dst + (c + 1) * g.xt_row, keep, _mm512_permutex2var_epi16(lo, odd, hi));
    }
  }
}

inline void add_widened(float* sums, __m512i values) {
  const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(values)), 16));
  const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(values, 1)), 16));
  _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_loadu_ps(sums), lo));
  _mm512_storeu_ps(sums + 16, _mm512_add_ps(_mm512_loadu_ps(sums + 16), hi));
}

// Pairs [begin / 2, end / 2) of gv from grad_out: each pair of pixels' channels interleaved; the
// values also summed into sums (the bias gradient; rounded up to 32 channels).
void lay_out_grad(const uint16_t* go, int64_t channels, const Layout& g, uint16_t* gv, float* sums, int64_t begin,
                  int64_t end) {
  __m512i lo_index, hi_index;
  {
    alignas(64) int16_t lo[32], hi[32];
    for (int j = 0; j < 32; ++j) {
      lo[j] = static_cast<int16_t>((j & 1) * 32 + j / 2);
      hi[j] = static_cast<int16_t>((j & 1) * 32 + 16 + j / 2);
    }
    lo_index = _mm512_load_si512(lo);
    hi_index = _mm512_load_si512(hi);
  }
  for (int64_t p = begin; p < end; p += 2) {
    const int64_t s0 = source_of(g, p), s1 = source_of(g, p + 1);
    uint16_t* dst = gv + p * channels;
    for (int64_t c = 0; c < channels; c += 32) {
      const __mmask32 m = channels - c >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (channels - c)) - 1);
      const __m512i a = s0 < 0 ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(m, go + s0 * channels + c);
      const __m512i b = s1 < 0 ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(m, go + s1 * channels + c);
      if (s0 >= 0) add_widened(sums + c, a);
      if (s1 >= 0) add_widened(sums + c, b);
      _mm512_storeu_si512(dst + 2 * c, _mm512_permutex2var_epi16(a, lo_index, b));
      if (channels - c > 16) _mm512_storeu_si512(dst + 2 * c + 32, _mm512_permutex2var_epi16(a, hi_index, b));
    }
  }
}

// acc[tap][in block][out block][16][16] += this thread's products over pixels [begin, end).
template <bool kTwoIn, bool kTwoOut>
void tile_products(const uint16_t* a0, const uint16_t* b0, float* acc, int64_t acc_in_stride,
                   int64_t acc_out_stride, int64_t a_stride, int64_t b_stride, int64_t steps) {
  float* c00 = acc;
  float* c01 = acc + acc_out_stride;
  float* c10 = acc + acc_in_stride;
  float* c11 = acc + acc_in_stride + acc_out_stride;
  _tile_loadd(0, c00, 64);
  if (kTwoOut) _tile_loadd(1, c01, 64);
  if (kTwoIn) _tile_loadd(2, c10, 64);
  if (kTwoIn && kTwoOut) _tile_loadd(3, c11, 64);
  const uint16_t* a1 = a0 + kTile * (a_stride / 2);
  const uint16_t* b1 = b0 + kTile * 2;
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a0 + s * kStep, a_stride);
    _tile_loadd(6, b0 + s * (kStep / 2) * (b_stride / 2), b_stride);
    if (kTwoOut) _tile_loadd(7, b1 + s * (kStep / 2) * (b_stride / 2), b_stride);
    if (kTwoIn) _tile_loadd(5, a1 + s * kStep, a_stride);
    _tile_dpbf16ps(0, 4, 6);
    if (kTwoOut) _tile_dpbf16ps(1, 4, 7);
    if (kTwoIn) _tile_dpbf16ps(2, 5, 6);
    if (kTwoIn && kTwoOut) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c00, 64);
  if (kTwoOut) _tile_stored(1, c01, 64);
  if (kTwoIn) _tile_stored(2, c10, 64);
  if (kTwoIn && kTwoOut) _tile_stored(3, c11, 64);
}

// The slice's products, chunk by chunk: each chunk's columns of xt and pairs of gv are laid out
// just before its products read them, so they are read from cache, not memory.
void accumulate(const uint16_t* x, const uint16_t* go, uint16_t* xt, uint16_t* gv, int64_t in_ch, int64_t out_ch,
                const Layout& g, float* acc, float* sums) {
  const int64_t in_blocks = in_ch / kTile, out_blocks = out_ch / kTile;
  const int64_t block = kTile * kTile, acc_out_stride = block, acc_in_stride = out_blocks * block;
  const int64_t tap_stride = in_blocks * acc_in_stride;
  const int64_t a_stride = g.xt_row * 2, b_stride = out_ch * 2 * 2;
  int64_t laid = 0;  // xt's columns before this are laid out
  for (int64_t p0 = 0; p0 < g.padded; p0 += kChunk) {
    const int64_t p1 = std::min(p0 + kChunk, g.padded), steps = (p1 - p0) / kStep;
    const int64_t needed = std::min(p1 + 2 * g.margin, g.margin + g.padded + g.margin);
    lay_out_input(x, in_ch, g, xt, laid, needed);
    laid = needed;
    lay_out_grad(go, out_ch, g, gv, sums, p0, p1);
    for (int64_t i = 0; i < in_blocks; i += 2)
      for (int64_t o = 0; o < out_blocks; o += 2)
        for (int64_t tap = 0; tap < 9; ++tap) {
          const int64_t shift = (tap / 3 - 1) * g.row + (tap % 3 - 1);
          const uint16_t* a = xt + i * kTile * g.xt_row + g.margin + p0 + shift;
          const uint16_t* b = gv + (p0 / 2) * out_ch * 2 + o * kTile * 2;
          float* c = acc + tap * tap_stride + i * acc_in_stride + o * acc_out_stride;
          const bool two_in = i + 1 < in_blocks, two_out = o + 1 < out_blocks;
          if (two_in && two_out) tile_products<true, true>(a, b, c, acc_in_stride, acc_out_stride, a_stride, b_stride, steps);
          else if (two_in) tile_products<true, false>(a, b, c, acc_in_stride, acc_out_stride, a_stride, b_stride, steps);
          else if (two_out) tile_products<false, true>(a, b, c, acc_in_stride, acc_out_stride, a_stride, b_stride, steps);
          else tile_products<false, false>(a, b, c, acc_in_stride, acc_out_stride, a_stride, b_stride, steps);
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
  const int64_t weight_size = 9 * in_ch * out_ch, bias_size = (out_ch + 31) / 32 * 32;
  const int64_t acc_size = weight_size + bias_size;
  at::Tensor partial = at::zeros({threads, acc_size}, input.options().dtype(at::kFloat));
#ifdef VGGKIT_AMX
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  const uint16_t* gs = reinterpret_cast<const uint16_t*>(go.const_data_ptr<at::BFloat16>());
  float* acc = partial.data_ptr<float>();
  // The layouts through PyTorch's allocator: a fresh malloc of tens of MB would page-fault every call.
  const Layout most(per_thread, h, w);
  const int64_t xt_size = in_ch * most.xt_row, gv_size = most.padded * out_ch;
  at::Tensor buffers = at::empty({threads, xt_size + gv_size}, input.options().dtype(at::kShort));
  uint16_t* buffer = reinterpret_cast<uint16_t*>(buffers.data_ptr<int16_t>());
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * per_thread, images = std::min(per_thread, n - first);
      if (images <= 0) continue;
      const Layout g(images, h, w);
      uint16_t* xt = buffer + t * (xt_size + gv_size);
      uint16_t* gv = xt + xt_size;
      float* sums = acc + t * acc_size;
      accumulate(xs + first * h * w * in_ch, gs + first * h * w * out_ch, xt, gv, in_ch, out_ch, g, sums + bias_size,
                 sums);
    }
    _tile_release();
  });
#endif
  // [tap][in block][out block][16 in][16 out] -> [out][in][tap]
  const at::Tensor summed = partial.sum(0);
  const at::Tensor weight = summed.slice(0, bias_size).view({9, in_ch / kTile, out_ch / kTile, kTile, kTile});
  return {weight.permute({2, 4, 1, 3, 0}).reshape({out_ch, in_ch, 3, 3}).contiguous(),
          summed.slice(0, 0, out_ch).clone()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vggkit, m) {
  m.def("conv3x3_weight_grad(Tensor grad_out, Tensor input) -> (Tensor, Tensor)");
  m.def("conv3x3_weight_grad_available() -> bool", &conv3x3_weight_grad_available);
}

TORCH_LIBRARY_IMPL(vggkit, CPU, m) { m.impl("conv3x3_weight_grad", &conv3x3_weight_grad); }
