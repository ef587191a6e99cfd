// The storage types' widening to float and narrowing from it, on raw bits, shared by the kernels
// (batch_norm_common.h, conv_pool_relu.cpp): bfloat16 rounds to nearest even (NaN to the quiet
// NaN) exactly as c10::BFloat16 does, written without branches so that the loops vectorise.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace vggkit::storage {

inline uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

inline float float_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// bfloat16's round to nearest even on a float's bits: the result's upper 16 bits (NaN aside).
inline uint32_t round_bits(uint32_t bits) { return bits + 0x7FFFu + ((bits >> 16) & 1u); }

inline float widen(float v) { return v; }

inline float widen(c10::BFloat16 v) { return float_of(static_cast<uint32_t>(v.x) << 16); }

template <typename scalar_t>
inline scalar_t narrow(float v);

template <>
inline float narrow<float>(float v) {
  return v;
}

template <>
inline c10::BFloat16 narrow<c10::BFloat16>(float v) {
  const uint32_t rounded = round_bits(bits_of(v)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

}  // namespace vggkit::storage
