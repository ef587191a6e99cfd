// What the pooling kernels agree on (max_pool_relu.cpp, batch_norm_pool_relu.cpp, conv_pool_relu.cpp):
// the code byte each writes per pooled output and the backwards read. 0-3 name the 2x2 window
// position (row-major) that held the max; kBlocked says the window's max was <= 0, so the ReLU passes
// no gradient. A code written by one kernel is read by another's backward only through this meaning.
#pragma once

#include <cstdint>

namespace vggkit {

constexpr uint8_t kBlocked = 4;

}  // namespace vggkit
