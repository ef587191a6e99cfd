"""The `vggkit` command: a thin layer over the Python API. User errors: one line, exit code 2."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import VggkitError
from .optim import OPTIMIZER_STATES, SCHEDULES, TRAINING_OPTIMIZERS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise VggkitError(f"{message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="vgg11", help="preset (vgg11|vgg13|vgg16|vgg19|d2l-vgg11) or blocks like 1x64,2x128")
    p.add_argument("--ratio", type=positive_int, default=1, help="divide every conv width by R (the textbook uses 4)")
    p.add_argument("--in-channels", type=positive_int, default=None, help="input channels (default: 1 for d2l-vgg11, else 3)")
    p.add_argument("--input-size", type=positive_int, default=224, help="input height and width")
    p.add_argument("--num-classes", type=positive_int, default=10)
    p.add_argument("--fc-width", type=positive_int, default=4096, help="width of the two hidden dense layers")
    p.add_argument("--batch-norm", action="store_true", help="batch norm after every conv")


def cmd_summary(args) -> int:
    from .cost import summary
    from .model import VGG
    import torch

    with torch.device("meta"):
        model = VGG(args.arch, ratio=args.ratio, in_channels=args.in_channels, num_classes=args.num_classes,
                    input_size=args.input_size, fc_width=args.fc_width, batch_norm=args.batch_norm)
    report = summary(model, batch_size=args.batch_size, optimizer=args.optimizer, dtype=args.dtype)
    if args.json:
        print(json.dumps(report.to_dict(per_layer=args.per_layer), indent=2))
    else:
        print(report.table(per_layer=args.per_layer))
    return 0


def _either(names) -> str:
    *others, last = names
    return f"{', '.join(others)} or {last}" if others else last


TRAIN_HELP = {
    "arch": "blocks: preset name or NUMxCHANNELS,... (e.g. 1x32,2x64,2x128)",
    "ratio": "divide every conv width by R", "input_size": "images are resized to this size",
    "data": "fashion-mnist, mnist or a folder with one sub-folder per class",
    "data_dir": "where the dataset's files are (default: $VGGKIT_DATA/<name>, then ~/.cache/vggkit/<name>)",
    "val_size": "validation images carved from the training set (0: none)",
    "crop_padding": "random crop with this padding (0: off)", "erasing": "random erasing probability",
    "limit": "use at most N training images", "test_limit": "use at most N test images",
    "skip_bad": "skip unreadable images (listed in the log) instead of stopping",
    "optimizer": _either(TRAINING_OPTIMIZERS), "schedule": _either(SCHEDULES),
    "device": "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps",
    "precision": "auto (bf16 where supported), fp32, bf16 or fp16 (CUDA)",
    "channels_last": "NHWC memory format (auto: on for CPU and CUDA)", "compile": "torch.compile the model",
    "allocator": "CPU malloc: retain freed memory for the next step (auto: on for CPU; faster, more RSS) or default",
    "out": "directory holding runs", "name": "run name (default: preset and time)",
    "init": "weight-initialisation scheme (TOML key: init)",
    "init_from": "start from these weights: a vggkit run or checkpoint, a standard-layout .pth/.safetensors "
                 "state dict, or vgg11|vgg11_bn|...|vgg19_bn (ImageNet, downloaded once); the architecture "
                 "comes from them",
    "freeze": "keep the first N blocks (or 'features': all) as they are, batch-norm statistics too (for --init)",
    "head_pool": "average the last feature map to 7x7 before the classifier (adaptive), as the standard VGG; "
                 "default: none, or adaptive when --init weights meet another input size",
    "tensorboard": "also write TensorBoard event files under RUN/tensorboard/ (pip install 'vggkit[tensorboard]')",
}
# Flags whose name is not the config key's: --init names initial weights, as in other tools.
TRAIN_FLAGS = {"init_from": "--init", "init": "--init-scheme"}


def train_flag(key: str) -> str:
    """The `vggkit train` flag of a TrainConfig key (booleans also take --no-<name>)."""
    return TRAIN_FLAGS.get(key, "--" + key.replace("_", "-"))


def freeze_spec(text: str) -> int | str:
    """--freeze: a number of blocks or 'features'."""
    if text == "features":
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a number of blocks or 'features', got {text!r}")


def add_train_args(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from .config import CHOICES, DEFAULT_RECIPE, RECIPES, TrainConfig
    from .model import HEAD_POOLS

    p.add_argument("--preset", choices=list(RECIPES), default=None, help=f"base recipe (default: {DEFAULT_RECIPE})")
    p.add_argument("--config", default=None, help="TOML file with config keys (under [train] or at top level)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--nproc", type=positive_int, default=None, help="launch N processes on this machine (torchrun)")
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        flag = train_flag(f.name)
        kind = f.type.split(" | ")[0]
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=TRAIN_HELP.get(f.name))
        elif f.name in ("lr",):
            p.add_argument(flag, type=positive_float, default=None, help="learning rate (peak for onecycle)")
        elif f.name == "freeze":
            p.add_argument(flag, type=freeze_spec, default=None, metavar="N|features", help=TRAIN_HELP[f.name])
        else:
            convert = {"int": int, "float": float, "str": str}[kind]
            choices = HEAD_POOLS if f.name == "head_pool" else CHOICES.get(f.name)
            p.add_argument(flag, dest=f.name, type=convert, default=None, choices=choices,
                           help=TRAIN_HELP.get(f.name), metavar="SOURCE" if f.name == "init_from" else None)


def cmd_train(args) -> int:
    from dataclasses import fields

    from .config import TrainConfig, resolve_config
    from .train import train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "preset"}
    if args.resume:
        config = overrides
    else:
        config = resolve_config(args.preset, args.config, overrides)
    if args.nproc and args.nproc > 1:  # after resolving: a config error is reported once, before launching
        from .distributed import launch
        return launch(args.nproc, args.argv, config=None if args.resume else config, resume=args.resume)

    def work() -> int:
        history = train(config, resume=args.resume, overwrite=args.overwrite, progress="none" if args.quiet else "auto",
                        log=(lambda *a, **k: None) if args.quiet else print)
        return 130 if history.interrupted else 0

    from .distributed import run_rank
    return run_rank(work)  # under torchrun: the rank's errors as one line, and a clean exit


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_report

    result = evaluate(args.run, data=args.data, data_dir=args.data_dir, device=args.device,
                      batch_size=args.batch_size, test_limit=args.test_limit, out_dir=args.out)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2))
    else:
        print(format_report(result))
    return 0


def cmd_predict(args) -> int:
    from .predict import predict

    results = predict(args.run, args.images, top_k=args.top_k, device=args.device)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["image"] + ": " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
    return 0


def cmd_export(args) -> int:
    from .export import export_model

    result = export_model(args.run, fmt=args.format, out=args.out, opset=args.opset)
    print(f"wrote {result['out']} ({args.format}); max |logit difference| vs PyTorch: {result['max_abs_diff']:.2e}")
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchSettings, bench
    from .bench import format_bench

    keys = ("arch", "ratio", "input_size", "in_channels", "batch_size", "device", "precision", "channels_last", "compile",
            "steps", "warmup", "compare", "threads", "preset", "runs", "data", "data_dir", "allocator")
    settings = BenchSettings(**{k: getattr(args, k) for k in keys}, peak=not args.no_peak)
    result = bench(settings, log=(lambda *a: print(*a, file=sys.stderr)) if args.verbose else None)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import RECIPES

    parser = _Parser(prog="vggkit", description="Define, cost, train fast and ship VGG-style networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("summary", help="cost report: shapes, parameters, MACs, memory")
    add_model_args(p)
    p.add_argument("--batch-size", type=positive_int, default=1, help="batch size for the memory estimate")
    p.add_argument("--optimizer", choices=list(OPTIMIZER_STATES), default="momentum",
                   help="optimizer whose state the training-memory estimate counts")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="activation precision for the memory estimate")
    p.add_argument("--per-layer", action="store_true", help="one row per layer instead of per block")
    p.add_argument("--json", action="store_true", help="the report as one JSON document")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help=f"train a VGG (recipes {', '.join(RECIPES)}; every field overridable)")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test accuracy, per-class accuracy, confusion matrix, misclassified grid")
    p.add_argument("run", help="run directory (its best checkpoint), checkpoint directory or model.safetensors")
    p.add_argument("--data", default=None, help="dataset (default: the one the model was trained on)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=512)
    p.add_argument("--test-limit", type=positive_int, default=None, help="evaluate on the first N test images")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: <checkpoint>/evaluation)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k classes for PNG/JPEG files")
    p.add_argument("run", help="run directory, checkpoint directory or model.safetensors")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=positive_int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a trained model to ONNX or TorchScript, verified")
    p.add_argument("run", help="run directory, checkpoint directory or model.safetensors")
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--out", default=None, help="output file or folder (default: model.onnx / model.pt in the run directory)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="training/inference images/s, FLOP/s vs measured peak; --compare: vs the textbook loop")
    p.add_argument("--preset", choices=list(RECIPES), default="d2l", help="the recipe's model and optimizer (default: d2l)")
    for flag in ("--arch", "--device", "--data", "--data-dir"):
        p.add_argument(flag, default="auto" if flag == "--device" else None)
    for flag in ("--ratio", "--input-size", "--batch-size", "--steps", "--warmup", "--threads"):
        p.add_argument(flag, type=positive_int, default=None, help="default: the preset's / auto" if flag != "--threads" else None)
    p.add_argument("--in-channels", type=positive_int, default=1, help="channels of the random images (no --data)")
    p.add_argument("--runs", type=positive_int, default=3, help="timed runs; figures are medians")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--allocator", choices=["auto", "retain", "default"], default="auto", help="CPU malloc (allocator.py)")
    p.add_argument("--compare", action="store_true", help="also time the textbook loop (fp32, NCHW, per-sample resize)")
    p.add_argument("--no-peak", action="store_true", help="skip the convolution/matmul peak probes")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(argv) if argv is not None else sys.argv[1:]
        return args.func(args)
    except VggkitError as e:
        print(f"vggkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vggkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
