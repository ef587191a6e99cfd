// SGD's step on a float32 weight whose gradient came from a bfloat16 copy of it, writing the
// next bfloat16 copy in the same pass (kernels/weight_copies.py).
//
// Under bf16 autocast a Linear casts its float32 weight to bfloat16 every forward and casts the
// bfloat16 weight gradient back to float32 every backward: two passes over the weight that the
// d2l classifier (42 M weights) pays every step. Here the step reads the bfloat16 gradient, the
// weight and the momentum buffer once, and writes the weight, the buffer and the copy once.
// Arithmetic as torch.optim.SGD's (maximize off): g = grad + weight_decay * w; buf = g on the
// first step, else momentum * buf + (1 - dampening) * g; d = g + momentum * buf (nesterov) or buf;
// w -= lr * d. The copy is bfloat16(w) rounded to nearest even, as autocast's cast.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bfloat16.h"

namespace {

using vggkit::storage::narrow;
using vggkit::storage::widen;

constexpr int64_t kGrain = 1 << 15;  // values per task: 128 KiB of float32 weights

void sgd_step_bf16_copy(at::Tensor& weight, at::Tensor& momentum_buffer, const at::Tensor& grad, at::Tensor& copy,
                        double lr, double weight_decay, double momentum, double dampening, bool nesterov,
                        bool first) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && grad.scalar_type() == at::kBFloat16 &&
                  copy.scalar_type() == at::kBFloat16,
              "sgd_step_bf16_copy: a float32 weight, a bfloat16 gradient and a bfloat16 copy");
  TORCH_CHECK(weight.is_contiguous() && grad.is_contiguous() && copy.is_contiguous() &&
                  grad.numel() == weight.numel() && copy.numel() == weight.numel(),
              "sgd_step_bf16_copy: contiguous tensors of one size");
  const bool use_buffer = momentum != 0.0;
  TORCH_CHECK(!use_buffer || (momentum_buffer.scalar_type() == at::kFloat && momentum_buffer.is_contiguous() &&
                              momentum_buffer.numel() == weight.numel()),
              "sgd_step_bf16_copy: a contiguous float32 momentum buffer of the weight's size");
  float* w = weight.data_ptr<float>();
  float* buf = use_buffer ? momentum_buffer.data_ptr<float>() : nullptr;
  const c10::BFloat16* g = grad.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* out = copy.data_ptr<c10::BFloat16>();
  const float step = static_cast<float>(lr), decay = static_cast<float>(weight_decay);
  const float mom = static_cast<float>(momentum), keep = 1.0f - static_cast<float>(dampening);
  at::parallel_for(0, weight.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (!use_buffer) {
      for (int64_t i = begin; i < end; ++i) {
        const float v = w[i] - step * (widen(g[i]) + decay * w[i]);
        w[i] = v;
        out[i] = narrow<c10::BFloat16>(v);
      }
      return;
    }
    for (int64_t i = begin; i < end; ++i) {
      const float gi = widen(g[i]) + decay * w[i];
      const float b = first ? gi : mom * buf[i] + keep * gi;
      buf[i] = b;
      const float v = w[i] - step * (nesterov ? gi + mom * b : b);
      w[i] = v;
      out[i] = narrow<c10::BFloat16>(v);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vggkit, m) {
  m.def("sgd_step_bf16_copy(Tensor(a!) weight, Tensor(b!) momentum_buffer, Tensor grad, Tensor(c!) copy, "
        "float lr, float weight_decay, float momentum, float dampening, bool nesterov, bool first) -> ()");
}

TORCH_LIBRARY_IMPL(vggkit, CPU, m) { m.impl("sgd_step_bf16_copy", &sgd_step_bf16_copy); }
