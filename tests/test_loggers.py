"""The outputs of a run, each a Logger: console lines (the README quotes them), CSV, event log, curves."""
import torch

from vggkit.loggers import (ConsoleLogger, CsvLogger, CurvesPlot, EventLog, Interruption, Logger, Loggers, RunEnd,
                            RunStart, default_loggers)
from vggkit.rundir import RunDir

ROW = {"epoch": 1, "train_loss": 1.42449, "train_acc": 0.59151, "val_loss": 0.5, "val_acc": 0.82164,
       "test_loss": 0.49, "test_acc": 0.82311, "lr": 0.1, "seconds": 16.49, "images_per_s": 3316.2, "elapsed": 17.0}


def start_info(run: RunDir, **changes) -> RunStart:
    return RunStart(**{
        "run": run, "resumed": False, "epochs": 10, "batches": 215, "history": [], "dataset": "fashion-mnist",
        "source": "/data/fashion-mnist (gz files)", "is_sample": False, "device": torch.device("cpu"),
        "speed": "bf16, channels-last", "threads": 2, "allocator": "retain", "world_size": 1,
        "images": (55000, 5000, 10000), "parameters": 1234567, "input_size": 28, "batch_size": 256, "lr": 0.1,
        "augment": ("crop 2", "flip"), "decisions": {"val_size": "10%, at most 5,000", "input_size": "native",
                                                     "flip": "fashion-mnist is flip-safe"}, **changes})


def test_console_lines_are_the_documented_ones():
    lines = []
    console = ConsoleLogger(lines.append)
    console.start(start_info(RunDir("runs/fast1")))
    console.epoch(ROW)
    console.epoch({k: v for k, v in ROW.items() if k not in ("val_acc", "test_acc")})
    best = {**ROW, "epoch": 9, "test_acc": 0.9301}
    console.end(RunEnd([ROW, {**ROW, "epoch": 10}], test_acc=0.9123, seconds=185.12, images_per_s=3217.64,
                       device=torch.device("cpu"), best=best))
    assert lines == [
        "vggkit: fashion-mnist (/data/fashion-mnist (gz files))",
        "data: train 55,000, val 5,000 (10%, at most 5,000), test 10,000 images; input 28x28 (native); "
        "batch 256, lr 0.1, 215 steps per epoch, 10 epochs; augment: crop 2, flip (fashion-mnist is flip-safe)",
        "device: cpu (bf16, channels-last, 2 threads, retain allocator); 1,234,567 parameters; run dir runs/fast1",
        "epoch 1/10, train loss 1.4245, train acc 0.5915, val acc 0.8216, test acc 0.8231, 16.5 s (3316 img/s)",
        "epoch 1/10, train loss 1.4245, train acc 0.5915, 16.5 s (3316 img/s)",
        "best checkpoint (what evaluate, predict and export use): epoch 9 of 10 by val acc 0.8216; test acc 0.9301",
        "last epoch: loss 1.424, train acc 0.592, test acc 0.912",
        "3217.6 examples/sec on cpu; total 185.1 s; run dir runs/fast1",
    ]


def test_the_header_says_why_for_what_the_data_decided():
    lines = []
    ConsoleLogger(lines.append).start(start_info(
        RunDir("r"), images=(1456, 161, 180), input_size=16, batch_size=32, lr=0.0595, batches=45, epochs=23,
        augment=("crop 2",),
        decisions={"val_size": "10%", "input_size": "8x8 images upscaled", "batch_size": "from the data",
                   "epochs": "from the data", "flip": "no flip: unknown data may not be flip-safe; --flip turns it on",
                   "lr": "0.1 x (32/256)**0.25"}))
    assert lines[1] == ("data: train 1,456, val 161 (10%), test 180 images; input 16x16 (8x8 images upscaled); "
                        "batch 32 (from the data), lr 0.0595 (0.1 x (32/256)**0.25), 45 steps per epoch, 23 epochs (from the data); augment: crop 2 "
                        "(no flip: unknown data may not be flip-safe; --flip turns it on)")


def test_the_closing_line_without_validation_or_test_split_says_so():
    lines = []
    console = ConsoleLogger(lines.append)
    console.start(start_info(RunDir("r"), images=(900, 0, 0)))
    row = {k: v for k, v in ROW.items() if not k.startswith(("val", "test"))}
    console.end(RunEnd([row], seconds=1.0, images_per_s=2.0, device=torch.device("cpu"), best=row))
    assert lines[-3:-1] == [
        "best checkpoint (what evaluate, predict and export use): epoch 1 of 1 by train acc 0.5915 "
        "(no validation split); no test split",
        "last epoch: loss 1.424, train acc 0.592"]


def test_console_names_the_sample_processes_and_both_kinds_of_interruption():
    lines = []
    console = ConsoleLogger(lines.append)
    console.start(start_info(RunDir("r"), is_sample=True, device=torch.device("cuda", 1), world_size=2))
    console.interrupted(Interruption("SIGINT", epoch=2, step=37, mid_epoch=True))
    console.interrupted(Interruption("SIGTERM", epoch=3, step=60, mid_epoch=False))
    assert lines[0].endswith(" [bundled sample: accuracy not comparable to published figures]")
    assert lines[2].startswith("device: cuda:1 (bf16, channels-last), 2 processes; 1,234,567 parameters")
    assert lines[3:] == ["SIGINT: saved a checkpoint at epoch 2, step 37; resume with: vggkit train --resume r",
                         "SIGTERM: saved a checkpoint after epoch 3; resume with: vggkit train --resume r"]


def test_csv_keeps_the_rows_from_before_a_resume(tmp_path):
    run = RunDir(tmp_path)
    csv = CsvLogger(run)
    csv.start(start_info(run, history=[{**ROW, "val_loss": None}]))
    csv.epoch({"epoch": 2, "train_loss": 0.123456789, "train_acc": 0.5, "lr": 0.0, "seconds": 1.0,
               "images_per_s": 100.0, "elapsed": 3.25})
    assert run.metrics_csv.read_text().splitlines() == [
        "epoch,train_loss,train_acc,val_loss,val_acc,test_loss,test_acc,lr,seconds,images_per_s,elapsed",
        "1,1.42449,0.59151,,0.82164,0.49,0.82311,0.1,16.49,3316.2,17",
        "2,0.123457,0.5,,,,,0,1,100,3.25",
    ]


def test_event_log_records_the_run(tmp_path):
    run = RunDir(tmp_path)
    events = EventLog(run)
    events.start(start_info(run, resumed=True))
    events.epoch(ROW)
    events.interrupted(Interruption("SIGINT", 2, 300, mid_epoch=True))
    events.interrupted(Interruption("SIGINT", 2, 430, mid_epoch=False))  # its epoch event is the record
    events.diverged(3, 450)
    events.end(RunEnd([ROW], test_acc=0.5, seconds=12.345, images_per_s=99.99))
    records = run.read_events()
    assert [r["event"] for r in records] == ["resume", "epoch", "interrupted", "diverged", "end"]
    assert records[1] == {"event": "epoch", **ROW}
    assert records[2] == {"event": "interrupted", "signal": "SIGINT", "epoch": 2, "step": 300}
    assert records[3] == {"event": "diverged", "epoch": 3, "step": 450}
    assert records[4] == {"event": "end", "test_acc": 0.5, "seconds": 12.35, "images_per_s": 100.0}


def test_curves_are_a_png_and_need_an_epoch(tmp_path):
    run = RunDir(tmp_path)
    CurvesPlot(run).end(RunEnd([]))
    assert not run.curves_path.exists()
    CurvesPlot(run).end(RunEnd([ROW, {**ROW, "epoch": 2}]))
    assert run.curves_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_put_loss_and_accuracy_apart_with_whole_epochs_and_the_best_one_marked(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at
    rows = [{**ROW, "epoch": e, "val_acc": acc} for e, acc in ((1, 0.8), (2, 0.9), (3, 0.85))]
    CurvesPlot(RunDir(tmp_path)).end(RunEnd(rows, best=rows[1]))
    loss, accuracy = figures[0].axes
    assert (loss.get_title(), accuracy.get_title()) == ("loss", "accuracy")
    assert [line.get_label() for line in loss.get_lines()] == ["train", "val", "test", "best checkpoint (epoch 2)"]
    assert list(accuracy.get_lines()[1].get_ydata()) == [0.8, 0.9, 0.85]
    assert list(accuracy.get_lines()[-1].get_xdata()) == [2, 2]  # the vertical mark at the best epoch
    figures[0].canvas.draw()
    ticks = [t for t in accuracy.get_xticks() if 0.5 <= t <= 3.5]
    assert ticks and all(float(t).is_integer() for t in ticks)
    monkeypatch.undo()
    plt.close(figures[0])


def test_a_new_logger_is_one_class_and_every_logger_is_told_in_order(tmp_path):
    calls = []

    class Recorder(Logger):
        def __init__(self, name):
            self.name = name

        def epoch(self, row):
            calls.append((self.name, row["epoch"]))

    loggers = Loggers([Recorder("a"), Recorder("b")])
    loggers.start(start_info(RunDir(tmp_path)))  # the calls a logger leaves out do nothing
    loggers.step(1, {})
    loggers.epoch(ROW)
    assert calls == [("a", 1), ("b", 1)]


def test_the_standard_outputs(tmp_path):
    kinds = [type(logger).__name__ for logger in default_loggers(RunDir(tmp_path), print, progress_bar=True)]
    assert kinds == ["ProgressBar", "CsvLogger", "EventLog", "CurvesPlot", "ConsoleLogger"]
    assert "ProgressBar" not in [type(x).__name__ for x in default_loggers(RunDir(tmp_path), print, False)]


def test_progress_bar_shows_the_running_metrics_and_is_gone_after_the_last_batch(tmp_path, capsys):
    from vggkit.loggers import ProgressBar

    bar = ProgressBar()
    bar.start(start_info(RunDir(tmp_path), epochs=3, batches=4))
    bar.epoch_start(2, first_batch=1)  # resumed after its first batch
    bar.step(6, {})
    bar.step(7, {"loss": 0.51234, "acc": 0.9, "images_per_s": 1234.4, "lr": 0.1})
    assert bar.bar is not None and bar.bar.n == 3
    bar.step(8, {})
    assert bar.bar is None
    err = capsys.readouterr().err
    assert "epoch 2/3" in err and "loss 0.512 acc 0.900 1234 img/s" in err
