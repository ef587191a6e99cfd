"""Fast CPU kernels for the training step, built from C++ at first use (build.py) with PyTorch's
ops as the fallback.

- pool_relu.py: `max_pool_relu(x)`, relu(max_pool2d(x, 2, 2)) fused, forward and backward
- bn_relu.py: `batch_norm_relu(x, bn, relu)`, a training-mode BatchNorm2d (and the ReLU after it)
  fused, forward and backward; `batch_norm_pool_relu(x, bn)`, the BatchNorm2d, 2x2 max-pool and ReLU
  that end a block, fused
- conv_relu.py: `conv_relu(conv, x)`, relu(conv(x)) as one oneDNN convolution with a ReLU post-op (or
  without it, `relu=False`), the weight gradient from conv_weight_grad.py where it applies
- conv_weight_grad.py: a 3x3 convolution's weight gradient on the AMX matrix units, where it measured
  faster than oneDNN's
- conv_pool.py: `conv_pool_relu(conv, x)`, relu(max_pool2d(conv(x), 2, 2)) fused for a network's
  first layer (1-4 input channels, no input gradient), forward and weight/bias backward; with a
  batch norm after the conv, `conv_batch_norm_pool_relu(conv, bn, x)`
- folded.py: `folded_block(body, x)`, inference through a block with batch norm: the batch norms
  folded into the convolutions, each conv + ReLU one oneDNN call
- dropout.py: `dropout(x, p)`, its mask from torch.rand instead of bernoulli_
- weight_copies.py: `SGDWithWeightCopies`, SGD keeping bfloat16 copies of the Linear weights that
  the Linears multiply by under bf16 autocast (`linear_with_copy`), instead of casting every step
- build.py: building, caching and loading the library; the one-line note when it cannot be had
- max_pool_relu.cpp, batch_norm_relu.cpp, batch_norm_pool_relu.cpp, conv_pool_relu.cpp,
  sgd_bf16_copy.cpp, conv_weight_grad.cpp: the kernels
  (NCHW and channels-last; float32 and bfloat16, and float64 for the pool); batch_norm_common.h:
  what the batch-norm ones share
"""
from . import build
from .build import KernelLibrary
from .bn_relu import BatchNormReLU, batch_norm_fusable, batch_norm_relu
from .conv_pool import (ConvBatchNormPoolReLU, ConvPoolReLU, conv_batch_norm_pool_faster, conv_batch_norm_pool_fusable,
                        conv_batch_norm_pool_relu, conv_pool_relu, conv_pool_relu_faster, conv_pool_relu_fusable,
                        conv_pool_relu_takes)
from .bn_relu import BatchNormPoolReLU, batch_norm_pool_fusable, batch_norm_pool_relu
from .conv_relu import ConvReLU, conv_fusable, conv_relu, conv_relu_fusable
from .dropout import dropout, dropout_fusable
from .folded import block as folded_block
from .folded import block_foldable
from .pool_relu import MaxPoolReLU, fusable, hooked, max_pool_relu
from .pool_relu import takes as pool_relu_takes
from .weight_copies import SGDWithWeightCopies, WeightCopy, copyable_linears
from .weight_copies import applies as weight_copy_applies
from .weight_copies import linear as linear_with_copy


def available() -> bool:
    """Whether the C++ kernels are loaded (building them at the first call if need be)."""
    return build.LIBRARY.available()


__all__ = ["BatchNormPoolReLU", "BatchNormReLU", "ConvBatchNormPoolReLU", "ConvPoolReLU", "ConvReLU", "KernelLibrary", "MaxPoolReLU",
           "SGDWithWeightCopies", "WeightCopy", "available", "block_foldable", "folded_block", "copyable_linears", "linear_with_copy",
           "weight_copy_applies", "batch_norm_fusable", "batch_norm_pool_fusable", "batch_norm_pool_relu", "batch_norm_relu",
           "conv_batch_norm_pool_faster", "conv_batch_norm_pool_fusable", "conv_batch_norm_pool_relu",
           "conv_fusable", "conv_pool_relu", "conv_pool_relu_faster", "conv_pool_relu_fusable", "conv_pool_relu_takes", "conv_relu", "conv_relu_fusable",
           "dropout", "dropout_fusable", "fusable", "hooked", "max_pool_relu", "pool_relu_takes"]
