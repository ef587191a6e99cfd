"""Batch norm over the global batch: torch's SyncBatchNorm on GPUs, `CpuSyncBatchNorm` on CPUs
(where torch's refuses to run), both through `convert_sync_batchnorm`."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .collectives import world


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch norm whose statistics (and their gradients) are summed over all ranks.

    Each rank uses torch's own fused CPU kernels: batch_norm_update_stats for its part's mean and
    variance (combined across ranks in float64: one all-reduce of count, sum and sum of squares),
    batch_norm in inference form with the global statistics for the output, and the inference-form
    backward for dy * weight * invstd and the per-channel sums of dy and dy * xhat; after one
    all-reduce of those sums, grad_x gets the global-mean terms: + x * B + C per channel."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        c = x.shape[1]
        n_local = x.numel() // max(c, 1)
        if n_local:
            mean_r, var_r = torch.batch_norm_update_stats(x if x.dtype == torch.float32 else x.float(), None, None, 0.0)
            mean_r, var_r = mean_r.double(), var_r.double()  # var_r: biased, over this rank's part
        else:
            mean_r = var_r = torch.zeros(c, dtype=torch.float64, device=x.device)
        stats = torch.cat([mean_r * n_local, (var_r + mean_r * mean_r) * n_local,
                           torch.tensor([float(n_local)], dtype=torch.float64, device=x.device)])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        n = stats[-1].item()
        if n < 2:
            raise ValueError(f"batch norm needs more than 1 value per channel over all ranks, got {int(n)}")
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_(min=0)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * n / (n - 1)).to(running_var.dtype), alpha=momentum)
        mean32, var32 = mean.float(), var.float()
        y = F.batch_norm(x, mean32, var32, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean32, var32)
        ctx.n, ctx.eps = n, eps
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, var = ctx.saved_tensors
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last) \
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else grad_out.contiguous()
        # inference-form backward with the global statistics: dy * w * invstd, sum(dy * xhat), sum(dy)
        grad_x, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, mean, var, None, None, False, ctx.eps, [True, True, True])
        if sum_dy_xhat is None or sum_dy is None:  # no affine parameters: the sums by hand
            invstd = torch.rsqrt(var + ctx.eps).view(shape)
            dims = [d for d in range(x.dim()) if d != 1]
            sum_dy = grad_out.float().sum(dims)
            sum_dy_xhat = (grad_out.float() * (x.float() - mean.view(shape)) * invstd).sum(dims)
        # the affine parameters' gradients are this rank's (DDP averages them across ranks)
        grad_weight = sum_dy_xhat.clone() if ctx.has_weight else None
        grad_bias = sum_dy.clone() if ctx.has_bias else None
        total = torch.cat([sum_dy.double(), sum_dy_xhat.double()])
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        mean_dy, mean_dy_xhat = total[:c] / ctx.n, total[c:] / ctx.n
        # grad_x = a * (dy - mean_dy - xhat * mean_dy_xhat), a = w * invstd, xhat = (x - mean) * invstd
        invstd = torch.rsqrt(var.double() + ctx.eps)
        a = (weight.double() if weight is not None else torch.ones_like(invstd)) * invstd
        b = -a * invstd * mean_dy_xhat
        const = -a * mean_dy - b * mean.double()
        if grad_x is None:
            grad_x = grad_out * a.to(grad_out.dtype).view(shape)
        grad_x = grad_x.addcmul_(x, b.to(x.dtype).view(shape)).add_(const.to(x.dtype).view(shape))
        return grad_x, grad_weight, grad_bias, None, None, None, None


class CpuSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer whose training statistics cover the global batch on every device, with gloo
    (torch.nn.SyncBatchNorm runs on GPUs only). Same parameters and buffers as the layer it replaces;
    in eval mode, or in a single process, it is that layer."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        if not (self.training and world()[1] > 1):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats and self.running_mean is not None
        return _SyncBatchNormFn.apply(input, self.weight, self.bias, self.running_mean if track else None,
                                      self.running_var if track else None, self.eps, factor)


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Batch norm over the global batch: torch's SyncBatchNorm on GPUs, CpuSyncBatchNorm elsewhere."""
    if device.type in ("cuda", "xpu"):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
            module.__class__ = CpuSyncBatchNorm  # same state: only forward changes
    return model
