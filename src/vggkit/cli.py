"""The `vggkit` command: a thin layer over the Python API. User errors: one line, exit code 2.

A closed standard stream (`>&-`) is opened on /dev/null first, so that no file the command opens
takes its descriptor (and receives what a library prints). A command whose results go to stdout
(summary, evaluate, predict without --csv, bench, serve: its address) then refuses to start (exit 2): its
work would be lost. train, export and explain, whose results are files, run as with stdout sent to /dev/null."""
from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import sys
import warnings

from .balance import AUTO_REMEDY, IMBALANCE_RATIO
from .cli_vocabulary import (COMPILE_HELP, DEVICE_HELP, JSON_HELP, add_renamed_flag, add_renamed_values,
                             finish_help)
from .errors import DEBUG_ENV, STDOUT, VggkitError, debug_requested, user_message
from .optim import SCHEDULES, TRAINING_OPTIMIZERS
from .untrusted import printable, printable_lines


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away

# At exit the interpreter's last garbage collections would walk every object torch (with dynamo and
# matplotlib) made, a noticeable pause, for nothing: what holds a file or a lock is closed before then.
atexit.register(gc.freeze)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise VggkitError(f"{message} (see '{self.prog} --help')")


def say(*parts, file=None, **kwargs) -> None:
    """print, with what a terminal would act on in names (escape sequences, control characters) escaped."""
    print(printable_lines(" ".join(map(str, parts))), file=file, **kwargs)


def say_on_stderr(*parts, **kwargs) -> None:
    say(*parts, file=sys.stderr, **kwargs)


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
    p.add_argument("--num-classes", type=positive_int, default=10,
                   help="classes of the output layer (Fashion-MNIST's 10; ImageNet's VGGs: 1000)")
    p.add_argument("--fc-width", type=positive_int, default=4096, help="width of the two hidden dense layers")
    p.add_argument("--batch-norm", action="store_true", help="batch norm after every conv")


def add_summary_memory_args(p: argparse.ArgumentParser) -> None:
    """The training step the memory estimate is for, in `vggkit train`'s words (--precision, --optimizer,
    --momentum); the old --dtype and --optimizer momentum still read."""
    from .config import CHOICES, PRECISION_DTYPES, TrainConfig

    p.add_argument("--batch-size", type=positive_int, default=1, help="batch size for the memory estimate")
    p.add_argument("--precision", choices=CHOICES["precision"], default="fp32",
                   help="activation precision for the memory estimate, as `vggkit train --precision`: fp32, bf16, "
                        "fp16, or auto (what train would use on this machine)")
    add_renamed_flag(p, "--dtype", "--precision", "precision", choices=CHOICES["precision"],
                     renamed_values={dtype: name for name, dtype in PRECISION_DTYPES.items()})
    add_renamed_values(p, "--optimizer", TRAINING_OPTIMIZERS, {"momentum": "sgd"}, default=TrainConfig.optimizer,
                       help="optimizer whose state the memory estimate counts, as `vggkit train --optimizer`")
    p.add_argument("--momentum", type=float, default=TrainConfig.momentum,
                   help="SGD momentum, as `vggkit train --momentum`: above 0 SGD keeps a buffer the size of the "
                        "weights; 0 for plain SGD")


def cmd_summary(args) -> int:
    from .bounds import check_arch_input
    from .cost import summary
    from .model import VGG
    from .optim import state_kind
    from .specs import parse_arch
    import torch

    if args.explain or args.preset or args.run:
        from .kernel_report import explain_args

        if not args.explain:
            flag = "--preset" if args.preset else "--run"
            raise VggkitError(f"{flag} goes with --explain; give the network by --arch for the cost report")
        if not (args.preset or args.run):
            check_arch_input(len(parse_arch(args.arch, args.ratio)), args.input_size, args.in_channels or 1)
        print(explain_args(args))
        return 0
    # nothing is allocated (the meta device), but sizes past the machine's memory are a typo: said as such
    check_arch_input(len(parse_arch(args.arch, args.ratio)), args.input_size, args.in_channels or 1)
    with torch.device("meta"):
        model = VGG(args.arch, ratio=args.ratio, in_channels=args.in_channels, num_classes=args.num_classes,
                    input_size=args.input_size, fc_width=args.fc_width, batch_norm=args.batch_norm)
    settings = summary_settings(args, model)
    report = summary(model, batch_size=args.batch_size, optimizer=state_kind(args.optimizer, args.momentum),
                     dtype=settings["precision"])
    defaults = summary_defaults_used(args, settings)
    if args.json:
        print(json.dumps({"settings": settings, "defaults_used": defaults,
                          **report.to_dict(per_layer=args.per_layer)}, indent=2))
    else:
        print(summary_header(settings, defaults))
        print(report.table(per_layer=args.per_layer))
    return 0


SUMMARY_FLAGS = ("arch", "ratio", "num_classes", "in_channels", "input_size", "fc_width", "batch_norm", "batch_size",
                 "precision", "optimizer", "momentum")


def summary_settings(args, model) -> dict:
    """What the report is for, every value resolved (in_channels from the model, precision auto as train would)."""
    settings = {key: getattr(args, key) for key in SUMMARY_FLAGS}
    settings["in_channels"] = model.in_channels
    if args.precision == "auto":
        from .runtime import auto_precision, pick_device

        settings["precision"] = auto_precision(pick_device("auto"))
    return settings


def summary_defaults_used(args, settings: dict) -> list[str]:
    """The flags left at their defaults, as `--flag value` (what the report silently assumed before)."""
    defaults = _summary_defaults()
    return [f"--{key.replace('_', '-')} {settings[key]}" for key in SUMMARY_FLAGS
            if key != "batch_norm"  # its absence is said in the first line
            and not (key == "momentum" and args.optimizer != "sgd")  # SGD's alone
            and getattr(args, key) == defaults[key]]


def _summary_defaults() -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    add_model_args(parser)
    add_summary_memory_args(parser)
    return {action.dest: action.default for action in parser._actions if action.default is not argparse.SUPPRESS}


def summary_header(settings: dict, defaults: list[str]) -> str:
    """Two lines: the network and training step the report is for, then the defaults it used to get there."""
    from .specs import PRESETS

    s = settings
    optimizer = s["optimizer"]
    if optimizer == "sgd":
        optimizer += f" with momentum {s['momentum']:g}" if s["momentum"] > 0 else " without momentum"
    network = s["arch"] + (f" / {s['ratio']}" if s["ratio"] != 1 else "")
    first = (f"{network}: {s['num_classes']} classes, input {s['in_channels']}x{s['input_size']}x{s['input_size']}, "
             f"dense width {s['fc_width']}, {'batch norm' if s['batch_norm'] else 'no batch norm'}; memory for "
             f"batch {s['batch_size']}, {s['precision']}, {optimizer}")
    if not defaults:
        return first
    imagenet = s["arch"] in PRESETS and s["arch"].startswith("vgg") and s["num_classes"] == 10
    return (f"{first}\ndefaults used: {', '.join(defaults)}"
            + (" (ImageNet's VGGs: --num-classes 1000)" if imagenet else ""))


def _either(names) -> str:
    *others, last = names
    return f"{', '.join(others)} or {last}" if others else last


# One help line per TrainConfig field; add_train_args appends each one's default (the `fast` recipe's,
# "from the data" for config.FROM_THE_DATA) and what the other recipes set it to.
TRAIN_HELP = {
    "arch": "blocks: preset name or NUMxCHANNELS,... (e.g. 1x32,2x64,2x128)",
    "ratio": "divide every conv width by R",
    "input_size": "images are resized to SIZE x SIZE",
    "fc_width": "width of the two hidden dense layers", "dropout": "dropout before each dense layer",
    "batch_norm": "batch norm after every conv", "init": "weight initialisation: xavier or kaiming",
    "data": "{names}, or a folder with one sub-folder of images per class",
    "data_dir": "where the dataset's files are (default: $VGGKIT_DATA/<name>, then ~/.cache/vggkit/<name>)",
    "val_size": "validation images carved from the training set, 0 for none",
    "normalize": "subtract the training set's mean, divide by its std, per channel",
    "crop_padding": "random crop with this padding (0: off)",
    "flip": "random horizontal flips",
    "erasing": "random erasing probability",
    "limit": "use at most N training images (default: all)", "test_limit": "use at most N test images (default: all)",
    "skip_bad": "skip unreadable images (listed in the log) instead of stopping",
    "streaming": "keep an image folder's images on disk, decoded once into a prepared cache (auto: for photos, "
                 "images of 128 px or more, or folders over 2 GiB decoded)",
    "workers": "processes that decode streamed images (default: one per core) and make their training batches "
               "(default: none on a CPU, whose cores all train; one per core beside a GPU)",
    "backbone_lr": "the feature blocks' learning rate as a fraction of --lr (default: 0.1 with --init, else 1)",
    "balance": f"imbalanced classes (the largest {IMBALANCE_RATIO} times the smallest or more; the 'data:' line "
               "says so): weights (a class-weighted loss), sampling (class-balanced epochs), off, or auto: "
               f"{AUTO_REMEDY} where the training classes are imbalanced, else off",
    "allow_sample": "train on the bundled Fashion-MNIST sample when the data set cannot be had",
    "epochs": "passes over the training set", "batch_size": "images per step",
    "lr": "learning rate (peak for onecycle)", "optimizer": _either(TRAINING_OPTIMIZERS),
    "momentum": "SGD momentum", "nesterov": "Nesterov momentum",
    "weight_decay": "L2 weight decay (not on biases, batch norm)",
    "schedule": _either(SCHEDULES),
    "warmup": "fraction of training (0 to 1 of its steps) rising to the peak lr, for onecycle; `vggkit bench` counts "
              "its warm-up in steps (--warmup-steps)",
    "label_smoothing": "label smoothing of the loss", "drop_last": "drop each epoch's last, incomplete batch",
    "ema": "average the weights (EMA) with this decay, e.g. 0.999, 0 for off; the epochs' evaluation, the best "
           "checkpoint, evaluate, predict and export then use the average",
    "ema_every": "update the weight average every K steps (the decay raised to the K-th power)",
    "device": DEVICE_HELP,
    "precision": "auto (bf16 where supported), fp32, bf16 or fp16 (CUDA)",
    "channels_last": "NHWC memory format (auto: on for CPU and CUDA)", "compile": COMPILE_HELP["train"],
    "allocator": "CPU malloc: retain freed memory for the next step (auto: on for CPU; faster, more RSS) or default",
    "kernels": "fast: vggkit's CPU kernels (pool+ReLU and batch norm+ReLU in C++, conv+ReLU in one oneDNN call, "
                "fast dropout masks; where each applies: summary --explain; auto: fast); plain: the network as it was",
    "threads": "CPU threads, 1 to 1024, capped at the cores this process may use (default: PyTorch's, one per core)",
    "seed": "seed of the splits, the initialisation and the batches, 0 to 2**64-1",
    "out": "directory holding runs", "name": "run name (default: preset and time)",
    "eval_every_epoch_on_test": "also test after every epoch (else only the best checkpoint, at the end)",
    "init": "weight-initialisation scheme (TOML key: init)",
    "init_from": "start from these weights: a vggkit run or checkpoint, a standard-layout .pth/.safetensors "
                 "state dict, or vgg11|vgg11_bn|...|vgg19_bn (ImageNet, downloaded once); the architecture "
                 "comes from them (default: none, the --init-scheme's random weights)",
    "freeze": "keep the first N blocks (or 'features': all) as they are, batch-norm statistics too (for --init)",
    "head_pool": "average the last feature map to 7x7 before the classifier (adaptive), as the standard VGG; "
                 "default: none, or adaptive when --init weights meet another input size",
    "tensorboard": "also write TensorBoard event files under RUN/tensorboard/ (pip install 'vggkit[tensorboard]')",
    "tta": "test-time augmentation of the best checkpoint's test figure in the final report, beside the plain one "
           "(never chooses the checkpoint): off, flip, translate or flip-translate; a bare --tta: the strongest "
           "the data allows (flips only if trained with them)",
}
# Flags whose name is not the config key's: --init names initial weights, as in other tools.
TRAIN_FLAGS = {"init_from": "--init", "init": "--init-scheme"}
TRAIN_METAVARS = {"init_from": "SOURCE", "ema": "DECAY", "ema_every": "K", "warmup": "FRACTION"}  # the rest: the key in capitals


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

TRAIN_DESCRIPTION = (
    "Train a VGG on a named data set or a folder of your images. Each value comes from the recipe "
    "(--preset), then a --config TOML file, then the flags. Values marked 'from the data' are decided "
    "when the data is loaded (input size, batch size, epochs, validation split, flips; the run's "
    "'data:' line says what was decided) unless a flag, the TOML file or the recipe gives them; the "
    "run's config.toml keeps the values used.")


def _train_flag_help(name: str) -> str:
    """The field's help line, then its default and the other recipes' values, e.g. "(default: 0.1; d2l: 0.05)"."""
    from .config import FROM_THE_DATA, RECIPES, TrainConfig
    from .decide import RULES

    def shown(value) -> str:
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else str(value)

    default = getattr(TrainConfig, name)
    text = TRAIN_HELP[name]
    if name == "data":
        from .data import REGISTRY, SAMPLE

        text = text.format(names=", ".join([*REGISTRY, SAMPLE]))
    if name in FROM_THE_DATA:
        text += f" (default: from the data, {RULES[name]}"
    elif default is not None:
        text += f" (default: {shown(default)}"
    else:
        return text  # it says what None means
    others = [f"{recipe}: {shown(values[name])}" for recipe, values in RECIPES.items()
              if name in values and values[name] != default]
    return (text + "".join(f"; {other}" for other in others) + ")").replace("%", "%%")  # argparse formats %


def add_train_args(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from .config import CHOICES, DEFAULT_RECIPE, RECIPES, TrainConfig
    from .model import HEAD_POOLS

    p.add_argument("--preset", choices=list(RECIPES), default=None, help=f"base recipe (default: {DEFAULT_RECIPE})")
    p.add_argument("--config", default=None, help="TOML file with config keys (under [train] or at top level; "
                   "default: none)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR (default: a new run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run of the same name, when it holds nothing but what vggkit wrote "
                        "(default: off)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (default: off)")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="launch N processes on this machine (torchrun; default: 1, this process)")
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        flag, help_line = train_flag(f.name), _train_flag_help(f.name)
        kind = f.type.split(" | ")[0]
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_line)
        elif f.name in ("lr",):
            p.add_argument(flag, type=positive_float, default=None, help=help_line)
        elif f.name == "tta":
            add_tta_flag(p, help_line)
        elif f.name == "freeze":
            p.add_argument(flag, type=freeze_spec, default=None, metavar="N|features", help=help_line)
        else:
            convert = {"int": int, "float": float, "str": str}[kind]
            choices = HEAD_POOLS if f.name == "head_pool" else CHOICES.get(f.name)
            p.add_argument(flag, dest=f.name, type=convert, default=None, choices=choices, help=help_line,
                           metavar=TRAIN_METAVARS.get(f.name))


def add_tta_flag(p: argparse.ArgumentParser, help_line: str) -> None:
    """--tta [LEVEL]: a level of tta.TTA_LEVELS; given bare, the strongest (without flips where the data forbids)."""
    from .tta import STRONGEST, TTA_LEVELS

    p.add_argument("--tta", nargs="?", const=STRONGEST, default=None, choices=list(TTA_LEVELS), metavar="LEVEL",
                   help=help_line)


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
                        log=(lambda *a, **k: None) if args.quiet else say)
        return 130 if history.interrupted else 0

    from .distributed import run_rank
    return run_rank(work)  # under torchrun: the rank's errors as one line, and a clean exit


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, format_report

    result = evaluate(args.run, data=args.data, data_dir=args.data_dir, split=args.split, device=args.device,
                      batch_size=args.batch_size, test_limit=args.test_limit, skip_bad=args.skip_bad or None,
                      out_dir=args.out, averaged=not args.raw_weights, compile=args.compile, tta=args.tta or "off",
                      log=say_on_stderr)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2))
    else:
        print(format_report(result))
    return 0


def cmd_predict(args) -> int:
    from .predict import format_line, iter_predictions, write_csv

    results = iter_predictions(args.run, args.images, top_k=args.top_k, device=args.device,
                               batch_size=args.batch_size, skip_bad=args.skip_bad, averaged=not args.raw_weights,
                               compile=args.compile, log=say_on_stderr)
    if args.json:
        results = list(results)
        print(json.dumps(results, indent=2))
    if args.csv:
        rows = write_csv(results, args.csv)
        print(f"wrote {args.csv} ({rows} images)", file=sys.stderr if args.json else sys.stdout)
    if not (args.json or args.csv):
        for result in results:
            print(format_line(result))
    return 0


def cmd_export(args) -> int:
    from .export import export_model

    result = export_model(args.run, fmt=args.format, out=args.out, opset=args.opset, averaged=not args.raw_weights)
    weights = "averaged weights" if result["weights"] == "ema" else "raw weights"
    print(f"wrote {result['out']} ({args.format}, {weights}); max |logit difference| vs PyTorch: "
          f"{result['max_abs_diff']:.2e}")
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchSettings, bench, format_bench, format_profile, profile

    keys = ("arch", "ratio", "input_size", "in_channels", "batch_size", "device", "precision", "channels_last", "compile",
            "steps", "warmup", "compare", "threads", "preset", "runs", "data", "data_dir", "allocator",
            "kernels")
    settings = BenchSettings(**{k: getattr(args, k) for k in keys}, peak=not args.no_peak)
    measure, text = (profile, format_profile) if args.profile else (bench, format_bench)
    result = measure(settings, log=(lambda *a: print(*a, file=sys.stderr)) if args.verbose else None)
    if "first_pass" in result:  # a folder of photos: the data path's report (bench/data.py)
        from .bench.data import format_folder_bench
        text = format_folder_bench
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 0


def cmd_prepare(args) -> int:
    from .stream import prepare_photos

    prepare_photos(args.folder, input_size=args.input_size, workers=args.workers, skip_bad=args.skip_bad,
                   log=print, progress=sys.stderr.isatty())
    return 0


def add_inference_compile_arg(p: argparse.ArgumentParser) -> None:
    from .config import CHOICES

    p.add_argument("--compile", choices=CHOICES["compile"], default="auto", help=COMPILE_HELP["inference"])


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy (top-1, top-5), per-class accuracy, confusion matrix, misclassified grid")
    p.add_argument("run", help="run directory (its best checkpoint), checkpoint directory or model.safetensors")
    p.add_argument("--split", choices=["test", "val"], default=None,
                   help="which split of the run's data (default: test); the run's seed makes the same split again")
    p.add_argument("--data", default=None, metavar="DATA",
                   help="a folder of class sub-folders: evaluate on all its images; or a dataset name "
                        "(default: the data the model was trained on)")
    p.add_argument("--data-dir", default=None, help="where a named dataset's files are (default: the run's)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=positive_int, default=512, help="images per forward pass (bounds the memory)")
    p.add_argument("--limit", "--test-limit", dest="test_limit", type=positive_int, default=None, metavar="N",
                   help="evaluate on at most N images (class-balanced, seeded; default: all)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed) instead of stopping")
    p.add_argument("--out", default=None,
                   help="folder for the PNGs (default: <checkpoint>/evaluation, evaluation-val or evaluation-<folder>)")
    add_inference_compile_arg(p)
    add_tta_flag(p, "test-time augmentation: every figure from the logits averaged over views (off, flip, translate "
                    "or flip-translate; a bare --tta, after RUN: the strongest the data allows, flips only if trained "
                    "with them; default: off)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    add_raw_weights_flag(p)
    p.set_defaults(func=cmd_evaluate)


def add_raw_weights_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw-weights", action="store_true",
                   help="use the raw weights of a run trained with --ema (default: its averaged weights)")


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes for image files and folders; text, JSON or CSV")
    p.add_argument("run", help="run directory, checkpoint directory or model.safetensors")
    p.add_argument("images", nargs="+", metavar="PATH",
                   help="image files, and folders searched recursively for PNG/JPEG/BMP/WebP/TIFF images (sorted)")
    p.add_argument("--top-k", type=positive_int, default=3, help="classes per image, the most probable first")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass (bounds the memory)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed) instead of stopping")
    p.add_argument("--csv", default=None, metavar="FILE",
                   help="write the predictions to FILE: path, then class_i, probability_i for i = 1..top-k "
                        "(default: print them)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_inference_compile_arg(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    add_raw_weights_flag(p)
    p.set_defaults(func=cmd_predict)


def cmd_explain(args) -> int:
    from .explain import Explainer, write_pngs

    explainer = Explainer.from_run(args.run, args.layer, averaged=not args.raw_weights, device=args.device)
    found = explainer.explain(args.images, target=args.target)  # all of it first: nothing half-written
    for explanation, png in zip(found, write_pngs(found, args.out)):
        say(f"{explanation.image}: {explanation.title} -> {png}")
    return 0


def add_explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM: where in each image the model found its class, as PNGs")
    p.add_argument("run", help="run directory, checkpoint directory or model.safetensors")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, and folders searched recursively")
    p.add_argument("--class", dest="target", default=None, metavar="C",
                   help="explain this class (a name or an index; default: each image's predicted class)")
    p.add_argument("--layer", default=None, metavar="blockN",
                   help="the block whose activations are weighted (default: the last block)")
    p.add_argument("--out", default="gradcam", metavar="DIR",
                   help="folder for the PNGs, <image>.gradcam.png (default: ./gradcam)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    add_raw_weights_flag(p)
    p.set_defaults(func=cmd_explain)


def cmd_serve(args) -> int:
    from .serve import serve

    serve(args.run, host=args.host, port=args.port, averaged=not args.raw_weights,
          log=lambda *parts: say(*parts, flush=True))  # the address at once, even into a pipe
    return 0


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="a local web page: drop images, see the top-5 classes and the Grad-CAM")
    p.add_argument("run", help="run directory, checkpoint directory or model.safetensors")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=0, help="port (default: 0, a free one; the address is printed)")
    add_raw_weights_flag(p)
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    from .config import RECIPES

    from . import __version__

    parser = _Parser(prog="vggkit", description="Define, cost, train fast and ship VGG-style networks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("summary", help="cost report: shapes, parameters, MACs, memory",
                       description="Shapes, parameters and MACs per block of a VGG, and the memory one training "
                                   "step needs. The first lines say the settings used, and which were defaults.")
    add_model_args(p)
    add_summary_memory_args(p)
    p.add_argument("--per-layer", action="store_true", help="one row per layer instead of per block")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument("--explain", action="store_true",
                   help="instead: which kernel each block takes on this machine, training and inference, and why not the others")
    p.add_argument("--preset", choices=list(RECIPES), default=None,
                   help="with --explain: the recipe's network and settings (Fashion-MNIST's 1x28x28 where it leaves the input to the data; default: none, --arch)")
    p.add_argument("--run", default=None, metavar="RUN",
                   help="with --explain: a trained run's network and settings (a run or checkpoint directory; default: none, --arch)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help=f"train a VGG (recipes {', '.join(RECIPES)}; every field overridable)",
                       description=TRAIN_DESCRIPTION)
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    add_evaluate_parser(sub)
    add_predict_parser(sub)
    add_explain_parser(sub)
    add_serve_parser(sub)

    p = sub.add_parser("export", help="export a trained model to ONNX or TorchScript, verified")
    p.add_argument("run", help="run directory, checkpoint directory or model.safetensors")
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True, help="onnx or torchscript (required)")
    p.add_argument("--out", default=None, help="output file or folder (default: model.onnx / model.pt in the run directory)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's)")
    add_raw_weights_flag(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("prepare", help="decode a folder of photos once into the prepared cache that training reads",
                       description="Decode every image of a photo folder once, at the size training at the input "
                                   "size needs (256x256 for 224), into the prepared cache "
                                   "($XDG_CACHE_HOME or ~/.cache)/vggkit/prepared/; `vggkit train --data FOLDER` "
                                   "then starts at once.")
    p.add_argument("folder", help="an image folder: one sub-folder per class, or train/ [val/] [test/] trees")
    p.add_argument("--input-size", type=positive_int, default=None,
                   help="the input size training will use (default: as train decides for the folder, 224 for photos)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core)")
    p.add_argument("--skip-bad", action="store_true", help="list images that cannot be decoded instead of stopping")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("bench", help="training/inference images/s, FLOP/s vs measured peak; --compare: vs the textbook loop")
    add_bench_args(p)
    p.add_argument("--profile", action="store_true",
                   help="profile a few training steps instead: time per step by convolution, pooling, ... data, other")
    p.add_argument("--compare", action="store_true", help="also time the textbook loop (fp32, NCHW, per-sample resize)")
    p.add_argument("--no-peak", action="store_true", help="skip the convolution/matmul peak probes")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_bench)
    _add_debug_flag(parser, sub)
    finish_help(parser, sub)
    return parser


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """bench's model and speed choices, in `vggkit train`'s words and defaults (the same recipe by default);
    its warm-up is counted in steps: --warmup-steps (the old --warmup still reads)."""
    from .bench.measure import DEFAULT_WARMUP, RUN_SECONDS
    from .config import CHOICES, DEFAULT_RECIPE, RECIPES

    p.add_argument("--preset", choices=list(RECIPES), default=DEFAULT_RECIPE,
                   help="the recipe's model and optimizer, as `vggkit train --preset`")
    recipe = "(default: the preset's)"
    p.add_argument("--arch", default=None, help=f"{TRAIN_HELP['arch']} {recipe}")
    p.add_argument("--ratio", type=positive_int, default=None, help=f"{TRAIN_HELP['ratio']} {recipe}")
    p.add_argument("--input-size", type=positive_int, default=None, help=f"{TRAIN_HELP['input_size']} {recipe}")
    p.add_argument("--batch-size", type=positive_int, default=None, help=f"images per step {recipe}")
    p.add_argument("--in-channels", type=positive_int, default=1, help="channels of the random images (no --data)")
    p.add_argument("--data", default=None, help="a dataset name or an image folder (default: random 28x28 images "
                                                "held in memory, as Fashion-MNIST)")
    p.add_argument("--data-dir", default=None, help=TRAIN_HELP["data_dir"])
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=positive_int, default=None, help=TRAIN_HELP["threads"])
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"training steps per timed run (default: as many as take about {RUN_SECONDS:g} s)")
    p.add_argument("--warmup-steps", dest="warmup", type=positive_int, default=None, metavar="N",
                   help=f"untimed training steps before the runs (default: {DEFAULT_WARMUP})")
    add_renamed_flag(p, "--warmup", "--warmup-steps", "warmup", type=positive_int)
    p.add_argument("--runs", type=positive_int, default=3, help="timed runs; figures are medians")
    for key in ("precision", "channels_last", "allocator", "kernels"):
        p.add_argument(train_flag(key), choices=CHOICES[key], default="auto", help=TRAIN_HELP[key])
    p.add_argument("--compile", choices=CHOICES["compile"], default="auto", help=COMPILE_HELP["bench"])


def _add_debug_flag(parser: argparse.ArgumentParser, sub) -> None:
    """--debug before or after the command: tracebacks instead of one-line errors (main reads it)."""
    help_text = f"show tracebacks and raw warnings (also: {DEBUG_ENV}=1; default: off)"
    parser.add_argument("--debug", action="store_true", help=help_text)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=help_text)


def main(argv: list[str] | None = None) -> int:
    """Run the command; whatever goes wrong becomes one line on stderr and an exit code (errors.py)."""
    if argv is None:
        _in_utf8_mode()
    argv = list(argv) if argv is not None else sys.argv[1:]
    debug = debug_requested(argv)
    closed = _open_closed_streams()  # first: a closed stdout is reopened on /dev/null before it is wrapped
    stdout = sys.stdout
    sys.stdout = _Stdout(stdout) if stdout is not None else None
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _note
            return _run(argv, stdout_closed="stdout" in closed)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except BaseException as error:  # noqa: BLE001  the one place where exceptions meet the user
        if debug or isinstance(error, SystemExit):
            raise
        line, code = user_message(error)
        print(printable(line), file=sys.stderr)
        if getattr(error, "filename", None) == STDOUT:
            _detach_stdout()  # what it holds cannot be written: the interpreter's last flush would fail again
        return code
    finally:
        sys.stdout = stdout


class _Stdout:
    """sys.stdout, whose write errors name the standard output (errors.STDOUT): `vggkit train >
    /dev/full` then says that the output cannot be written, not that the run's disk is full."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            raise OSError(e.errno, e.strerror, STDOUT) from None  # EPIPE makes a BrokenPipeError, as before

    def flush(self):
        try:
            return self._stream.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, STDOUT) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _in_utf8_mode() -> None:
    """Run this command again in Python's UTF-8 mode where the locale makes file names ASCII
    (LC_ALL=C with PYTHONUTF8=0): the names are then read as UTF-8, as the libraries that take paths
    (safetensors, torch) and vggkit's files (TOML, JSON, CSV) need them. The mode is what Python
    itself chooses for that locale unless told not to; the command's processes inherit it."""
    if sys.flags.utf8_mode or sys.getfilesystemencoding().lower() != "ascii" or os.name != "posix" \
            or not getattr(sys, "orig_argv", None) or os.environ.get("PYTHONUTF8") == "1":  # the last: run again
        return
    os.environ["PYTHONUTF8"] = "1"
    try:
        os.execv(sys.executable, [sys.executable, "-X", "utf8", *sys.orig_argv[1:]])
    except OSError:  # go on as we are
        pass


def _run(argv: list[str], stdout_closed: bool = False) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    if stdout_closed and args.command in RESULTS_ON_STDOUT and not getattr(args, "csv", None):
        where = " (or give --csv FILE)" if args.command == "predict" else ""
        raise VggkitError(f"stdout is closed, and `vggkit {args.command}` writes its results there; redirect it to a "
                          f"file{where}, or to /dev/null to discard them")
    code = args.func(args)
    sys.stdout.flush()  # here, not at exit: a closed pipe is then a BrokenPipeError main() handles
    return code


RESULTS_ON_STDOUT = ("summary", "evaluate", "predict", "bench", "serve")  # what they print is what they are for
STREAMS = ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w"))


def _open_closed_streams() -> set[str]:
    """Open /dev/null on each standard descriptor that is closed (`>&-`); the names of those that were."""
    closed = set()
    for fd, name, mode in STREAMS:
        try:
            os.fstat(fd)
            continue
        except OSError:
            closed.add(name)
        try:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if getattr(sys, name) is None:  # the interpreter started without it
                setattr(sys, name, open(fd, mode, closefd=False))
        except OSError:
            pass
    return closed


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning from a library (Pillow, torch) as one line; the full one with --debug."""
    text = " ".join(str(message).split()) or category.__name__
    print(printable(f"vggkit: note: {text}"), file=sys.stderr)


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (`vggkit summary --json | head`): stop quietly, as a Unix
    tool killed by SIGPIPE does."""
    _detach_stdout()
    return SIGPIPE_EXIT


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not raise a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a file (a test's capture)
        pass


if __name__ == "__main__":
    sys.exit(main())
