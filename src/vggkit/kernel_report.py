"""Which kernel computes each part of a network on this machine, and why the others do not
(`vggkit summary --explain`): kernels.routing's plan, for training and for inference, in words."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import build, routing, tuning
from .kernels.weight_copies import WeightCopy
from .optim import copied_linears

# Fashion-MNIST's images, the default data, where a recipe leaves the input to the data
DEFAULT_IMAGE = (1, 28)
DEFAULT_BATCH = 128


@dataclass
class Setting:
    """What the routes depend on besides the network: batch, precision, the optimizer, the kernels setting."""
    batch_size: int = DEFAULT_BATCH
    precision: str = "auto"
    optimizer: str = "sgd"
    kernels: str = "fast"
    channels_last: str = "auto"  # what runtime.speed_settings reads besides precision (not the routes)
    compile: str = "off"

    @classmethod
    def of(cls, config) -> Setting:
        """A run's or a recipe's (a TrainConfig)."""
        return cls(config.batch_size or DEFAULT_BATCH, config.precision, config.optimizer, config.kernels)


def preset_network(preset: str):
    """(the recipe's VGG, its config): on Fashion-MNIST's input where the recipe leaves that to the data."""
    from .config import resolve_config
    from .model import VGG

    config = resolve_config(preset)
    in_channels, size = DEFAULT_IMAGE
    return VGG(**config.model_arguments(in_channels, 10) | {"input_size": config.input_size or size}), config


def explain(model: torch.nn.Module, in_channels: int, input_size: tuple[int, int], setting: Setting) -> str:
    """The routes `vggkit train` (and evaluation) would take through `model` on this machine's CPU."""
    from .model import set_kernels
    from .runtime import block_kernels, speed_settings

    cpu = torch.device("cpu")
    wanted = block_kernels(setting.kernels, cpu)
    mode = set_kernels(model, wanted)
    if setting.optimizer == "sgd":  # the copies optim.make_optimizer gives, in one process
        for linear in copied_linears(model, world_size=1):
            linear.weight_copy = WeightCopy()
    amp = speed_settings(setting, cpu).amp_dtype
    spec = routing.Spec((setting.batch_size, in_channels, *input_size), torch.float32, cpu)
    lines = [_machine_line(), f"kernels: {_mode_line(setting.kernels, wanted, mode)}"]
    for training in (True, False):
        precision = "bf16 autocast" if amp == torch.bfloat16 else "float32"
        lines.append(f"{'training' if training else 'inference'} ({precision}, batch {setting.batch_size}, "
                     f"input {in_channels}x{input_size[0]}x{input_size[1]}):")
        for name, steps in routing.network_routes(model, spec, training=training, autocast=amp):
            lines += _block_lines(name, steps)
    return "\n".join(lines)


def _machine_line() -> str:
    cpu = tuning.cpu_features()
    features = [cpu.capability] + (["AMX"] if cpu.amx else ["no AMX"])
    library = "C++ kernels loaded" if build.LIBRARY.available() else f"no C++ kernels ({build.LIBRARY.reason})"
    return f"this machine: CPU {', '.join(features)}; {library}; oneDNN {'yes' if torch.backends.mkldnn.is_available() else 'no'}"


def _mode_line(setting: str, wanted: str, mode: str) -> str:
    if mode == wanted:
        return mode
    return f"{mode} (asked {setting}: {build.LIBRARY.reason or 'the kernels cannot be had'})"


def _block_lines(name: str, steps: list[routing.Step]) -> list[str]:
    lines = [f"  {name:<11} {' -> '.join(_step_name(step) for step in steps) or '-'}"]
    seen = set()
    for step in steps:
        for op, reasons in step.declined:
            text = f"not {op}: {'; '.join(reasons)}"
            if text not in seen:
                seen.add(text)
                lines.append(f"  {'':<11}   {text}")
    return lines


def _step_name(step: routing.Step) -> str:
    if step.op == routing.PYTORCH:
        names = [type(layer).__name__ for layer in step.layers]
        return "+".join(reversed(names) if len(names) == 2 and names[1] == "MaxPool2d" else names) + " (PyTorch)"
    if step.op == "in_order":
        return "layers in order (PyTorch)"
    if step.op == "folded_block" and step.option:
        return "folded_block (last conv + pool: conv_pool_relu)"
    if step.op == "batch_norm_relu" and not step.option:
        return "batch_norm_relu (no ReLU)"
    if step.op == "conv_relu" and step.option:
        return "conv_relu (weight gradient on AMX tiles)"
    return step.op


def explain_args(args) -> str:
    """explain() for `vggkit summary --explain`: the network and settings of a trained run (--run), of
    --preset (its recipe, on Fashion-MNIST's input where the recipe leaves that to the data) or of the
    model flags (--arch ...)."""
    from .model import VGG

    if args.run:
        from .checkpoint import load_model
        from .evaluate import run_config_for

        model, _ = load_model(args.run)
        return f"run {args.run}\n" + explain(model, model.in_channels, model.input_size,
                                              Setting.of(run_config_for(args.run)))
    if args.preset:
        model, config = preset_network(args.preset)
        return f"preset {args.preset}\n" + explain(model, model.in_channels, model.input_size, Setting.of(config))
    model = VGG(args.arch, ratio=args.ratio, in_channels=args.in_channels, num_classes=args.num_classes,
                input_size=args.input_size, fc_width=args.fc_width, batch_norm=args.batch_norm)
    setting = Setting(batch_size=args.batch_size)
    return f"arch {args.arch}\n" + explain(model, model.in_channels, model.input_size, setting)
