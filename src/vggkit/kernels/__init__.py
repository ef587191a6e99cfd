"""Fast CPU kernels for the training step, built from C++ at first use (build.py) with PyTorch's
ops as the fallback; routing.py decides which runs where.

- routing.py: the table of ops, each saying why it does not apply (`why_not`), in one priority list;
  `route_block` computes a VGG block by it, `plan_block` says what it would do; the mode vocabulary
  (fast, reordered, plain); each op on its own with its fallback (`max_pool_relu(x)`, ...)
- tuning.py: every measured threshold, with the CPU it was measured on (C++ ones documented there)
- pool_relu.py: relu(max_pool2d(x, 2, 2)) fused, forward and backward
- bn_relu.py: a training-mode BatchNorm2d (and the ReLU after it) fused, forward and backward; the
  BatchNorm2d, 2x2 max-pool and ReLU that end a block, fused
- conv_relu.py: relu(conv(x)) as one oneDNN convolution with a ReLU post-op (or without it), the
  weight gradient from conv_weight_grad.py where the routing says
- conv_weight_grad.py: a 3x3 convolution's weight gradient on the AMX matrix units
- conv_pool.py: relu(max_pool2d(conv(x), 2, 2)) fused for a network's first layer (1-4 input
  channels, no input gradient), forward and weight/bias backward; with a batch norm after the conv
- folded.py: inference through a block with batch norm: the batch norms folded into the
  convolutions, each conv + ReLU one oneDNN call
- dropout.py: `dropout(x, p)`, its mask from 64-bit random words instead of bernoulli_
- weight_copies.py: `SGDWithWeightCopies`, SGD keeping bfloat16 copies of the Linear weights that
  the Linears multiply by under bf16 autocast (`linear_with_copy`), instead of casting every step
- build.py: building, caching and loading the library; the one-line note when it cannot be had
- max_pool_relu.cpp, batch_norm_relu.cpp, batch_norm_pool_relu.cpp, conv_pool_relu.cpp,
  sgd_bf16_copy.cpp, conv_weight_grad.cpp: the kernels
  (NCHW and channels-last; float32 and bfloat16, and float64 for the pool); batch_norm_common.h:
  what the batch-norm ones share; contracts.h: what the pooling ones agree on (the code byte)
"""
from . import build
from .build import KernelLibrary
from .bn_relu import BatchNormPoolReLU, BatchNormReLU
from .conv_pool import ConvBatchNormPoolReLU, ConvPoolReLU
from .conv_relu import ConvReLU
from .dropout import dropout
from .pool_relu import MaxPoolReLU
from .routing import (MODES, OPS, PRIORITY, batch_norm_pool_relu, batch_norm_relu, conv_batch_norm_pool_relu,
                      conv_pool_relu, conv_relu, folded_block, hooked, max_pool_relu, why_not)
from .weight_copies import SGDWithWeightCopies, WeightCopy, copyable_linears
from .weight_copies import linear as linear_with_copy


def available() -> bool:
    """Whether the C++ kernels are loaded (building them at the first call if need be)."""
    return build.LIBRARY.available()


__all__ = ["BatchNormPoolReLU", "BatchNormReLU", "ConvBatchNormPoolReLU", "ConvPoolReLU", "ConvReLU", "KernelLibrary",
           "MODES", "MaxPoolReLU", "OPS", "PRIORITY", "SGDWithWeightCopies", "WeightCopy", "available",
           "batch_norm_pool_relu", "batch_norm_relu", "conv_batch_norm_pool_relu", "conv_pool_relu", "conv_relu",
           "copyable_linears", "dropout", "folded_block", "hooked", "linear_with_copy", "max_pool_relu", "why_not"]
