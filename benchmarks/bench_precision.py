"""Accuracy under lower precision: the same training run in bf16 autocast and in float32.

    .venv/bin/python benchmarks/bench_precision.py [--data-dir DIR] [--steps 150] [--presets d2l,fast]

d2l: the textbook recipe (VGG-11/4 at 224, SGD lr 0.05, batch 128, Xavier, dropout 0.5) for
     --steps steps (150 x 128 = 19,200 class-balanced training images, one pass), then test
     accuracy on 2,000 class-balanced test images. Same seed, same data order, same init;
     only --precision differs (channels-last in both).
fast: the fast preset for one epoch (55,000 images, 214 steps), full 10,000-image test set.
The final weights are then evaluated again on the same test images in fp32 and in bf16, to tell
training precision from evaluation precision.
Each run is a real `vggkit.train()` in a fresh process (with train's automatic retained allocator,
bit-for-bit neutral: tests/test_runtime.py).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from fresh import WorkerFailed, run_worker

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(os.environ.get("VGGKIT_TEST_DATA", ROOT.parent / "shared" / "data" / "fashion-mnist"))


def recipe(preset: str, steps: int, test_limit: int = 2000) -> dict:
    if preset == "d2l":
        return {"preset": "d2l", "epochs": 1, "limit": steps * 128, "test_limit": test_limit}
    return {"preset": preset, "epochs": 1}


def worker(spec: dict) -> dict:
    from vggkit.train import train

    start = time.perf_counter()
    history = train(spec, progress="none", log=lambda *a, **k: None, overwrite=True)
    last = history.epochs[-1]
    return {"precision": spec["precision"], "test_acc": history.test_acc, "test_loss": history.test_loss,
            "train_loss": last["train_loss"], "train_acc": last["train_acc"], "images_per_s": history.images_per_s,
            "seconds": time.perf_counter() - start, "cross_eval": cross_eval(spec, history.run_dir)}


def cross_eval(spec: dict, run_dir) -> dict:
    """Test accuracy of the final weights evaluated in fp32 and in bf16 (the same test images),
    to tell the precision of training from the precision of evaluation."""
    import torch

    from vggkit.checkpoint import load_model
    from vggkit.config import resolve_config
    from vggkit.data import load_data
    from vggkit.decide import LIKE_FASHION_MNIST, decide
    from vggkit.pipeline import BatchLoader
    from vggkit.runtime import Speed
    from vggkit.steps import evaluate_loader

    config = resolve_config(overrides={k: v for k, v in spec.items() if k != "precision"})
    config = decide(config, LIKE_FASHION_MNIST)[0]  # what the run decided on Fashion-MNIST
    splits = load_data(config.data, data_dir=config.data_dir, val_size=config.val_size, seed=config.seed,
                       test_limit=config.test_limit, log=lambda *a, **k: None)
    model, meta = load_model(Path(run_dir) / "checkpoints" / "last")
    model = model.to(memory_format=torch.channels_last)
    loader = BatchLoader(splits.test, 256, input_size=config.input_size, mean=meta["mean"], std=meta["std"],
                         channels_last=True)
    device = torch.device("cpu")
    return {name: evaluate_loader(model, loader, Speed(dtype, True, False), device)[1]
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DIR))
    parser.add_argument("--steps", type=int, default=150, help="d2l: training steps of batch 128")
    parser.add_argument("--test-limit", type=int, default=2000, help="d2l: class-balanced test images")
    parser.add_argument("--presets", default="d2l,fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    results = []
    with tempfile.TemporaryDirectory() as out:
        for preset in args.presets.split(","):
            for precision in ("bf16", "fp32"):
                spec = {**recipe(preset, args.steps, args.test_limit), "precision": precision, "data_dir": args.data_dir,
                        "allow_sample": False, "seed": args.seed, "out": out, "name": f"{preset}-{precision}"}
                try:
                    r = run_worker(__file__, json.dumps(spec))
                except WorkerFailed as e:
                    print(f"{preset} {precision}: failed\n{e}")
                    continue
                r.update(preset=preset, recipe=recipe(preset, args.steps, args.test_limit))
                results.append(r)
                print(f"{preset:<5} {precision}: test acc {r['test_acc']:.4f} (loss {r['test_loss']:.4f}), "
                      f"train loss {r['train_loss']:.4f}, train acc {r['train_acc']:.4f}, "
                      f"{r['images_per_s']:.1f} img/s, {r['seconds']:.0f} s; final weights evaluated in fp32 "
                      f"{r['cross_eval']['fp32']:.4f}, in bf16 {r['cross_eval']['bf16']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
