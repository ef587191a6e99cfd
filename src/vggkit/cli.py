"""The `vggkit` command: a thin layer over the Python API. User errors: one line, exit code 2."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import VggkitError


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


def cmd_export(args) -> int:
    from .export import export_model

    result = export_model(args.run, fmt=args.format, out=args.out, opset=args.opset)
    print(f"wrote {result['out']} ({args.format}); max |logit difference| vs PyTorch: {result['max_abs_diff']:.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vggkit", description="Define, cost, train fast and ship VGG-style networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("summary", help="cost report: shapes, parameters, MACs, memory")
    add_model_args(p)
    p.add_argument("--batch-size", type=positive_int, default=1, help="batch size for the memory estimate")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adam", "adamw"], default="momentum",
                   help="optimizer whose state the training-memory estimate counts")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="activation precision for the memory estimate")
    p.add_argument("--per-layer", action="store_true", help="one row per layer instead of per block")
    p.add_argument("--json", action="store_true", help="the report as one JSON document")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("export", help="export a trained model to ONNX or TorchScript, verified")
    p.add_argument("run", help="run directory, checkpoint directory or model.safetensors")
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--out", default=None, help="output file (default: next to the weights)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except VggkitError as e:
        print(f"vggkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vggkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
