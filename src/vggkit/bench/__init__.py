"""`vggkit bench`: how fast a VGG trains and infers here, against the machine's measured peak and
the textbook loop.

- measure.py: the settings (BenchSettings), the vggkit step and the timed runs; `bench()`
- textbook.py: the textbook's loop (per-image PIL resize, fp32, NCHW, eager), for comparison
- peak.py: the convolution and matmul probes that give the measured peak
- machine.py: clocks, device names, what else kept the CPUs busy
- report.py: the printed report (format_bench)
- profile.py: `vggkit bench --profile`, a step's time by group of ops (profile, format_profile)
"""
from .machine import device_name
from .measure import BenchSettings, bench
from .profile import format_profile, profile
from .report import format_bench

__all__ = ["BenchSettings", "bench", "format_bench", "device_name", "profile", "format_profile"]
