"""A `vggkit bench` result (the dict `bench.bench` returns) as text for people."""
from __future__ import annotations

from ..units import si

COLUMN = 14
LABEL = 28  # the widest: compiled inference images/s


def format_bench(r: dict) -> str:
    lines = _heading(r) + [""] + _table(r) + [""] + _peak(r) + _notes(r)
    if r.get("warning"):
        lines.append(f"warning: {r['warning']}")
    return "\n".join(lines)


def _heading(r: dict) -> list[str]:
    shape = "x".join(map(str, r["input_shape"]))
    return [
        f"vggkit bench: {r['arch_name']}" + (f"/{r['ratio']}" if r["ratio"] != 1 else "")
        + f" ({r['arch']}), input {shape}, batch {r['batch_size']}, {r['params']:,} params, "
        f"{r['macs_per_image'] / 1e9:.3f} GMACs/image",
        f"device: {r['device']} ({r['device_name']}, {r['threads']} threads); vggkit: {r['settings'] or 'fp32'}, "
        f"kernels {r.get('kernels', 'plain')}, allocator {r['allocator']}; data: {r['data']}",
    ]


def _table(r: dict) -> list[str]:
    """vggkit's figures, and with --compare the textbook loop's and their ratio."""
    base = r.get("baseline")
    lines = [f"{'':<{LABEL}}{'vggkit':>{COLUMN}}" + (f"{'textbook':>{COLUMN}}{'ratio':>9}" if base else "")]
    flops = lambda v: si(v, "FLOP/s")  # noqa: E731
    rate = lambda v: f"{v:.1f}"  # noqa: E731
    for label, key, fmt in (("train images/s", "train_images_per_s", rate),
                            ("train FLOP/s", "train_flops_per_s", flops),
                            ("train fraction of peak", "train_fraction_of_peak", lambda v: f"{100 * v:.1f}%"),
                            ("inference images/s", "infer_images_per_s", rate),
                            ("inference FLOP/s", "infer_flops_per_s", flops),
                            ("compiled inference images/s", "infer_compiled_images_per_s", rate)):
        value = r.get(key)
        if value is None:
            continue
        text = f"{label:<{LABEL}}{fmt(value):>{COLUMN}}"
        if base and base.get(key) is not None:
            text += f"{fmt(base[key]):>{COLUMN}}{value / base[key]:>8.2f}x"
        lines.append(text)
    return lines


def _peak(r: dict) -> list[str]:
    if "peak" not in r:
        return []
    p = r["peak"]
    parts = ", ".join(f"{k} {si(v, 'FLOP/s')} ({p['shapes'][k]})" for k, v in p["probes"].items())
    lines = [f"measured peak: {si(p['flops_per_s'], 'FLOP/s')} ({p['best']}); probes: {parts}"]
    if "train_fraction_of_conv_peak" in r:
        lines.append(f"vggkit training reaches {100 * r['train_fraction_of_conv_peak']:.1f}% of the convolution "
                     f"probe and {100 * r['train_fraction_of_peak']:.1f}% of the measured peak")
    return lines


def _notes(r: dict) -> list[str]:
    """How the figures were obtained: FLOP counting, the textbook loop, runs, load from other processes."""
    lines = [f"training FLOPs per image = 3 x 2 x forward MACs (cost.summary) = "
             f"{r['train_flops_per_image'] / 1e9:.3f} GFLOP; inference = 2 x MACs"]
    if "infer_compiled_images_per_s" in r:
        lines.append(f"compiled inference (torch.compile): {r['infer_compiled_speedup']:.2f}x eager, after "
                     f"{r['infer_compile_seconds']:.1f} s compiling")
    elif r.get("infer_compile_error"):
        lines.append(f"compiled inference not timed: torch.compile failed ({r['infer_compile_error']})")
    base = r.get("baseline")
    if base:
        lines.append(f"textbook loop: {base['settings']}; its per-sample data pipeline took "
                     f"{1e3 * base['data_seconds_per_batch']:.1f} ms per batch")
        lines.append(f"training speed-up: {r['speedup']:.2f}x (per run: "
                     f"{', '.join(f'{s:.2f}x' for s in r['speedup_runs'])})")
    lines.append(f"median of {r['runs']} run{'s' if r['runs'] != 1 else ''} of {r['steps']} steps (after "
                 f"{r['warmup']} warm-up; first step {r['first_step_seconds']:.2f} s)")
    load = r.get("load_average") or [None, None]
    others = r.get("other_processes_cpu")
    if others is not None and r.get("cpu_count"):
        lines.append(f"other processes kept {others:.2f} of {r['cpu_count']} CPUs busy during the benchmark"
                     + ("; figures may be low (shared machine)" if others > 0.1 * r["cpu_count"] else "")
                     + f"; load average {load[0]:.2f} -> {load[1]:.2f}")
    return lines
