"""`vggkit bench`: how fast a VGG trains and infers here, against the machine's measured peak and
the textbook loop.

- measure.py: the settings (BenchSettings), the vggkit step and the timed runs; `bench()`
- textbook.py: the textbook's loop (per-image PIL resize, fp32, NCHW, eager), for comparison
- peak.py: the convolution and matmul probes that give the measured peak
- machine.py: clocks, device names, what else kept the CPUs busy
- report.py: the printed report (format_bench)
"""
from .machine import device_name
from .measure import BenchSettings, bench
from .report import format_bench

__all__ = ["BenchSettings", "bench", "format_bench", "device_name"]
