"""The words the `vggkit` commands share: help texts said once, the examples under each command's
--help, every option's default in its help, and the old spellings still read (hidden, with a note).

The values themselves have one owner each: precisions, compile policies and recipes are config.py's
(CHOICES, RECIPES, DEFAULT_RECIPE; PRECISION_DTYPES from cost.py), optimizers optim.py's; this module only words them.
"""
from __future__ import annotations

import argparse
import sys

# --compile: "auto" is the choice measured faster, in every command; where it was measured differs.
COMPILE_HELP = {
    "train": "torch.compile the model: on, off, or auto: the choice measured faster, which for training these "
             "networks is not compiling (torch.compile measured slower; README, Speed)",
    "inference": "torch.compile the model: on, off, or auto: the choice measured faster on this machine for this "
                 "model and batch (measured once, for a job large enough to pay for a compile, and cached in "
                 "($XDG_CACHE_HOME or ~/.cache)/vggkit/inference.json)",
    "bench": "torch.compile: on (training compiled; inference timed eagerly and compiled), off, or auto: the choice "
             "measured faster, as in `vggkit train`: not compiled",
}
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
JSON_HELP = "print the report as one JSON document (default: text)"

# Under each command's --help: real commands (README's data and folder names), each with what it does.
EXAMPLES = {
    "summary": [("vggkit summary --arch vgg16 --num-classes 1000", "the ImageNet VGG-16: 138,357,544 parameters"),
                ("vggkit summary --arch d2l-vgg11 --ratio 4 --batch-size 128 --precision bf16", ""),
                ("vggkit summary --arch 1x32,2x64,2x128 --input-size 28 --per-layer --json", ""),
                ("vggkit summary --preset fast --explain", "which kernel each block takes here, and why"),
                ("vggkit summary --run runs/RUN --explain", "the same for a trained run")],
    "train": [("vggkit train", "the fast recipe on Fashion-MNIST"),
              ("vggkit train --preset d2l --epochs 2 --name d2l-short", "the textbook's recipe, 2 epochs"),
              ("vggkit train --data photos/ --init vgg16 --epochs 5", "fine-tune ImageNet weights")],
    "evaluate": [("vggkit evaluate runs/RUN", "the best checkpoint on the test split"),
                 ("vggkit evaluate runs/RUN --split val --tta flip --json", ""),
                 ("vggkit evaluate runs/RUN --data photos/ --limit 500", "on another folder of images")],
    "predict": [("vggkit predict runs/RUN photo.jpg --top-k 5", ""),
                ("vggkit predict runs/RUN photos/ --csv predictions.csv", "")],
    "export": [("vggkit export runs/RUN --format onnx", "writes runs/RUN/model.onnx, verified"),
               ("vggkit export runs/RUN --format torchscript --out model.pt", "")],
    "explain": [("vggkit explain runs/RUN photo.jpg", "Grad-CAM of the predicted class -> gradcam/photo.gradcam.png"),
                ("vggkit explain runs/RUN photos/ --class Shirt --layer block2 --out heatmaps", "")],
    "serve": [("vggkit serve runs/RUN", "a page on 127.0.0.1 to drop images on: top-5 bars and Grad-CAM"),
              ("vggkit serve runs/RUN --port 8000", "")],
    "prepare": [("vggkit prepare photos/ --workers 2", "")],
    "bench": [("vggkit bench", "the fast recipe on random 28x28 images"),
              ("vggkit bench --preset d2l --compare", "VGG-11/4 at 224x224 against the textbook loop"),
              ("vggkit bench --data photos/", "decode and batch rates; training on the folder")],
}


def examples_epilog(examples: list[tuple[str, str]]) -> str:
    """'examples:' and one indented line each, the comments aligned."""
    width = max(len(command) for command, comment in examples if comment) if any(c for _, c in examples) else 0
    lines = [f"  {command:<{width}}   # {comment}" if comment else f"  {command}" for command, comment in examples]
    return ("example:\n" if len(examples) == 1 else "examples:\n") + "\n".join(lines)


def finish_help(parser: argparse.ArgumentParser, sub) -> None:
    """`vggkit --help` and each command's: the shared formatter, and examples (EXAMPLES) underneath."""
    parser.formatter_class = HelpFormatter
    parser.epilog = examples_epilog([*(EXAMPLES[command][0] for command in ("summary", "train", "bench")),
                                     ("vggkit COMMAND --help", "a command's options, defaults and examples")])
    for command, command_parser in sub.choices.items():
        command_parser.formatter_class = HelpFormatter
        if command in EXAMPLES:
            command_parser.epilog = examples_epilog(EXAMPLES[command])


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; every option's help ends with its default, unless it says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.required or "(default" in text or "default:" in text
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        if action.default in (False, None) and action.nargs == 0:  # a switch (store_true)
            return f"{text} (default: off)"
        if action.default is None or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def note_renamed(old: str, new: str) -> None:
    """One line on stderr: a spelling that still works has a new name."""
    print(f"vggkit: note: {old} is now spelled {new}; the old spelling still works", file=sys.stderr)


class Choices(tuple):
    """The values an option shows (usage, help, errors), plus old spellings it still accepts unshown."""

    def __new__(cls, shown, hidden=()):
        choices = super().__new__(cls, shown)
        choices.hidden = tuple(hidden)
        return choices

    def __contains__(self, value):
        return tuple.__contains__(self, value) or value in self.hidden


class RenamedValues(argparse.Action):
    """Stores the value, an old spelling (`renamed`: old -> new) first replaced by its new one, with a note."""

    def __init__(self, option_strings, dest, renamed=None, flag=None, **kwargs):
        self.renamed, self.flag = dict(renamed or {}), flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        new_flag = self.flag or option_string
        if values in self.renamed or option_string != new_flag:
            value = self.renamed.get(values, values)
            note_renamed(f"{option_string} {values}", f"{new_flag} {value}")
            values = value
        setattr(namespace, self.dest, values)


def add_renamed_values(p: argparse.ArgumentParser, flag: str, choices, renamed: dict, **kwargs) -> None:
    """`flag` with `choices`; the old values in `renamed` (old -> new) still accepted, unshown."""
    p.add_argument(flag, choices=Choices(choices, renamed), action=RenamedValues, renamed=renamed, **kwargs)


def add_renamed_flag(p: argparse.ArgumentParser, old_flag: str, new_flag: str, dest: str,
                     renamed_values: dict | None = None, **kwargs) -> None:
    """`old_flag`: the old name of `new_flag`, hidden from --help; its values (old ones mapped) go to `dest`."""
    if renamed_values:
        kwargs["choices"] = Choices(kwargs.pop("choices", ()), renamed_values)
    p.add_argument(old_flag, dest=dest, action=RenamedValues, renamed=renamed_values, flag=new_flag,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
