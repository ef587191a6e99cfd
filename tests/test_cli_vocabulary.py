"""One vocabulary across the `vggkit` commands (issue 26): every option has help text with its default,
every --help shows examples that parse, old spellings still work (mapped, with a one-line note), summary
states the defaults it used, bench and train start from the same recipe."""
import argparse
import json
import shlex

import pytest

from vggkit.bench import BenchSettings
from vggkit.cli import build_parser, main
from vggkit.cli_vocabulary import EXAMPLES, HelpFormatter
from vggkit.config import CHOICES, DEFAULT_RECIPE, PRECISION_DTYPES, TrainConfig


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"vggkit": parser, **sub.choices}


def shown_options(parser: argparse.ArgumentParser):
    """The options --help lists (hidden aliases have help=SUPPRESS)."""
    return [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", list(commands()))
def test_every_option_has_help_with_its_default(command):
    parser = commands()[command]
    formatter = HelpFormatter(parser.prog)
    for action in shown_options(parser):
        text = formatter._get_help_string(action)
        assert action.help and action.help.strip(), f"{command} {action.option_strings[0]} has no help"
        assert "default" in text or action.required, f"{command} {action.option_strings[0]}: {text!r}"
    for action in parser._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            assert action.help, f"{command} {action.dest} has no help"


@pytest.mark.parametrize("command", list(commands()))
def test_every_help_shows_examples_that_parse(command):
    parser = commands()[command]
    text = parser.format_help()
    assert "example" in text and f"\n  vggkit {'' if command == 'vggkit' else command}" in text, text[-500:]
    for line in text[text.index("example"):].splitlines()[1:]:
        argv = shlex.split(line, comments=True)
        if argv and argv[1] != "COMMAND":
            build_parser().parse_args(argv[1:])  # a typo in an example would raise (exit code 2)


def test_every_command_has_examples():
    assert set(commands()) - {"vggkit"} <= set(EXAMPLES), "add the new command's examples to EXAMPLES"


def test_summary_counts_the_imagenet_vgg16_and_says_it_used_10_classes(capsys):
    code, out, err = run_cli(capsys, "summary", "--arch", "vgg16", "--num-classes", "1000")
    assert code == 0 and "138,357,544" in out and err == ""
    code, out, _ = run_cli(capsys, "summary", "--arch", "vgg16")
    first, defaults = out.splitlines()[:2]
    assert "134,301,514" in out and "10 classes" in first and "input 3x224x224" in first
    assert defaults.startswith("defaults used:")
    for flag in ("--num-classes 10", "--in-channels 3", "--input-size 224", "--batch-size 1", "--precision fp32",
                 "--optimizer sgd", "--momentum 0.9"):
        assert flag in defaults, flag
    assert "--num-classes 1000" in defaults  # the hint towards the README's figure


def test_summary_lists_only_the_defaults_it_used(capsys):
    code, out, _ = run_cli(capsys, "summary", "--arch", "1x8", "--input-size", "28", "--num-classes", "7",
                           "--precision", "bf16", "--optimizer", "adam", "--json")
    report = json.loads(out)
    assert report["settings"]["num_classes"] == 7 and report["settings"]["precision"] == "bf16"
    assert "--num-classes 10" not in report["defaults_used"] and "--in-channels 3" in report["defaults_used"]
    assert not any(flag.startswith(("--precision", "--optimizer", "--momentum")) for flag in report["defaults_used"])
    assert report["activation_dtype"] == "bfloat16" and report["optimizer"] == "adam"


def test_summary_precision_auto_is_what_train_would_use(capsys):
    import torch

    from vggkit.runtime import auto_precision, pick_device

    code, out, _ = run_cli(capsys, "summary", "--arch", "1x8", "--input-size", "28", "--precision", "auto", "--json")
    assert json.loads(out)["settings"]["precision"] == auto_precision(pick_device("auto"))
    assert isinstance(pick_device("auto"), torch.device)


@pytest.mark.parametrize("old,new", [
    (["--dtype", "bfloat16"], ["--precision", "bf16"]),
    (["--dtype", "float16"], ["--precision", "fp16"]),
    (["--dtype", "float32"], ["--precision", "fp32"]),
    (["--optimizer", "momentum"], ["--optimizer", "sgd"]),
])
def test_old_summary_spellings_give_the_same_report_with_a_note(capsys, old, new):
    base = ["summary", "--arch", "1x8,1x16", "--input-size", "32", "--batch-size", "4", "--json"]
    code, by_old, note = run_cli(capsys, *base, *old)
    assert code == 0
    assert note.count("\n") == 1 and note.startswith("vggkit: note:") and " ".join(new) in note, note
    code, by_new, err = run_cli(capsys, *base, *new)
    assert code == 0 and err == "" and json.loads(by_old) == json.loads(by_new)


def test_old_summary_default_estimate_is_kept(capsys):
    """The old default (--optimizer momentum, --dtype float32) is the new default (sgd, momentum 0.9, fp32)."""
    base = ["summary", "--arch", "1x8", "--input-size", "32", "--json"]
    old = json.loads(run_cli(capsys, *base, "--optimizer", "momentum", "--dtype", "float32")[1])
    new = json.loads(run_cli(capsys, *base)[1])
    assert old["training_memory_bytes"] == new["training_memory_bytes"] and new["optimizer"] == "momentum"
    plain = json.loads(run_cli(capsys, *base, "--momentum", "0")[1])
    assert plain["training_memory_bytes"]["optimizer_state"] == 0 and plain["optimizer"] == "sgd"


def test_old_spellings_are_hidden_and_bad_values_still_refused(capsys):
    summary = commands()["summary"].format_help()
    assert "--dtype" not in summary and "momentum}" not in summary and "{sgd,adam,adamw}" in summary
    assert "--warmup " not in commands()["bench"].format_help().replace("--warmup-steps", "")
    code, out, err = run_cli(capsys, "summary", "--dtype", "float64")
    assert code == 2 and "invalid choice: 'float64'" in err and "'fp32'" in err and "float32" not in err
    code, out, err = run_cli(capsys, "summary", "--optimizer", "lbfgs")
    assert code == 2 and "'sgd', 'adam', 'adamw')" in err


def test_bench_warmup_is_counted_in_steps_under_either_name(capsys):
    parser = build_parser()
    assert parser.parse_args(["bench", "--warmup-steps", "3"]).warmup == 3
    assert parser.parse_args(["bench", "--warmup", "3"]).warmup == 3
    assert "vggkit: note: --warmup 3 is now spelled --warmup-steps 3" in capsys.readouterr().err
    with pytest.raises(Exception, match="positive integer"):
        parser.parse_args(["bench", "--warmup", "0.2"])
    train_help = commands()["train"].format_help()
    assert "fraction of training" in " ".join(train_help.split())


def test_bench_and_train_start_from_the_same_recipe():
    parser = build_parser()
    assert parser.parse_args(["bench"]).preset == DEFAULT_RECIPE == TrainConfig.preset == BenchSettings().preset
    assert parser.parse_args(["train"]).preset is None  # resolved to DEFAULT_RECIPE by config.resolve_config


def test_the_shared_options_take_the_same_values_everywhere():
    parsers = commands()
    for flag, commands_with_it in {"--precision": ("train", "bench", "summary"),
                                   "--compile": ("train", "bench", "evaluate", "predict"),
                                   "--preset": ("train", "bench"), "--device": ("train", "bench", "evaluate", "predict"),
                                   "--optimizer": ("train", "summary")}.items():
        choices = {name: tuple(next(a for a in parsers[name]._actions if flag in a.option_strings).choices or ())
                   for name in commands_with_it}
        assert len(set(choices.values())) == 1, (flag, choices)
    assert set(CHOICES["precision"]) == {"auto", *PRECISION_DTYPES}


def test_compile_auto_says_what_it_means_in_each_command():
    helps = {name: " ".join(commands()[name].format_help().split()) for name in ("train", "bench", "evaluate", "predict")}
    for name, text in helps.items():
        assert "auto: the choice measured faster" in text, name
    assert "not compiling" in helps["train"] and "not compiled" in helps["bench"]
    assert "on this machine for this model and batch" in helps["evaluate"]
    assert "measured once" in helps["predict"]
