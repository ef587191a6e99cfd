"""The measured peak of `vggkit bench`: between timed runs, a bf16 (fp32 where the device has no bf16)
3x3 convolution in channels-last on the network's costliest convolution shape, and a square matmul;
the best rate seen is the "measured peak" that training and inference FLOP/s are compared with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cost import Report
from .machine import timed
from ..runtime import PRECISIONS, cpu_has_bf16


def probe_precision(device: torch.device) -> str:
    """The fastest precision the device computes natively: bf16, else fp16 (CUDA) or fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


class PeakProbe:
    """Best FLOP/s seen of the network's costliest 3x3 convolution and of a square matmul."""

    def __init__(self, report: Report, batch_size: int, device: torch.device, repeats: int = 4):
        self.report, self.batch_size, self.device, self.repeats = report, batch_size, device, repeats
        self.precision = probe_precision(device)
        self.dtype = PRECISIONS[self.precision] or torch.float32  # PRECISIONS says fp32 as "no autocast"
        self.probes: dict[str, float] = {}  # name: best FLOP/s
        self.shapes: dict[str, str] = {}  # name: what it computes

    def measure(self) -> None:
        self._convolution()
        self._matmul()

    def figures(self, result: dict) -> dict:
        """The "peak" entry of a bench result, and the fractions of it that `result` reached."""
        best = max(self.probes, key=self.probes.get)
        peak = self.probes[best]
        out = {"peak": {"flops_per_s": peak, "best": best, "probes": self.probes, "shapes": self.shapes},
               "train_fraction_of_peak": result["train_flops_per_s"] / peak}
        conv = next((v for k, v in self.probes.items() if k.startswith("conv")), None)
        if conv:
            out["train_fraction_of_conv_peak"] = result["train_flops_per_s"] / conv
        if "infer_flops_per_s" in result:
            out["infer_fraction_of_peak"] = result["infer_flops_per_s"] / peak
        return out

    def _convolution(self) -> None:
        layers = self.report.layers
        convs = [(r.macs, i) for i, r in enumerate(layers) if r.kind == "Conv2d"]
        if not convs:
            return
        budget = 3e10 if self.device.type == "cpu" else 1e12  # FLOPs per probe call
        macs, i = max(convs)
        out = layers[i].output_shape
        cin = macs // (out[0] * out[1] * out[2] * 9)
        batch = max(1, min(self.batch_size, int(budget // (2 * macs))))
        x = self._tensor(batch, cin, out[1], out[2]).contiguous(memory_format=torch.channels_last)
        w = self._tensor(out[0], cin, 3, 3).contiguous(memory_format=torch.channels_last)
        b = torch.zeros(out[0], device=self.device, dtype=self.dtype)
        F.conv2d(x, w, b, padding=1)
        self._record("conv", 2 * macs * batch, lambda: F.conv2d(x, w, b, padding=1),
                     f"3x3 conv {cin}->{out[0]} at {out[1]}x{out[2]}, batch {batch}, channels-last")

    def _matmul(self) -> None:
        n = 2048 if self.device.type == "cpu" else 8192
        a, b = self._tensor(n, n), self._tensor(n, n)
        c = torch.empty(n, n, device=self.device, dtype=self.dtype)
        torch.mm(a, b, out=c)
        self._record("matmul", 2 * n**3, lambda: torch.mm(a, b, out=c), f"{n}x{n} @ {n}x{n}")

    def _tensor(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def _record(self, kind: str, flops: float, fn, shape: str) -> None:
        rate = max(flops / timed(fn, 1, self.device) for _ in range(self.repeats))
        name = f"{kind}_{self.precision}"
        self.probes[name] = max(self.probes.get(name, 0.0), rate)
        self.shapes[name] = shape
