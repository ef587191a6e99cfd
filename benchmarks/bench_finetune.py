"""Fine-tuning on photos: test accuracy of `vggkit train --data TARGET --init PRETRAINED` with no other
flag, for one or more vggkit commands (an A/B between versions), over seeds (BENCHMARKS.md, "Photos").

    .venv/bin/python benchmarks/bench_finetune.py build OUT        # needs: pip install scikit-image
    .venv/bin/python benchmarks/bench_finetune.py run OUT --seeds 0,1,2 [--vggkit "CMD" ...] [-- FLAGS]

No ImageNet weights can be downloaded here, so the "pretrained" network is trained here, on a pretext
task of other photographs: OUT/pretext holds 8 classes of random regions of scikit-image's colour
photographs (astronaut, chelsea, coffee, hubble_deep_field, ihc, motorcycle_left, retina, rocket),
80 each at 640x480 and mixed sizes; OUT/target holds 3 classes of scikit-learn's and matplotlib's
photographs (benchmarks/make_photos.py), 40 each. `run` trains OUT/pretrained on the pretext once
(`vggkit train --data OUT/pretext --epochs 8`, the first --vggkit command), then fine-tunes from it on
the target with each command and seed, and prints the best checkpoint's test accuracy and the wall time.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_photos import photo, write_folder  # noqa: E402

PRETEXT = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
           "retina.jpg", "rocket.jpg")  # files of the scikit-image wheel's skimage/data/


def build(out: Path, seed: int = 0) -> None:
    import skimage

    rng = np.random.default_rng(seed)
    for name in PRETEXT:
        source = Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")
        folder = out / "pretext" / name.split(".")[0]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(80):
            scale = rng.uniform(0.5, 1.0)
            photo(source, (int(640 * scale), int(480 * scale)), rng).save(folder / f"{i:03d}.jpg", quality=90)
    write_folder(out / "target", 40, (640, 480), mixed=True, seed=seed)


def train(command: list[str], *args: str) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([*command, "train", *args, "--quiet", "--overwrite"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} train failed: {done.stderr.strip()[-1500:]}")
    return json.loads(Path(args[args.index("--out") + 1], args[args.index("--name") + 1], "metrics.jsonl")
                      .read_text().splitlines()[-1]), seconds


def run(out: Path, commands: list[list[str]], seeds: list[int], flags: list[str]) -> dict:
    runs = str(out / "runs")
    train(commands[0], "--data", str(out / "pretext"), "--epochs", "8", "--out", runs, "--name", "pretrained")
    result = {}
    for command in commands:
        rows = []
        for seed in seeds:
            end, seconds = train(command, "--data", str(out / "target"), "--init", f"{runs}/pretrained",
                                 "--seed", str(seed), "--out", runs, "--name", f"tuned-{seed}", *flags)
            best = end.get("best_checkpoint", {})
            rows.append({"seed": seed, "test_acc": best.get("test_acc"), "seconds": round(seconds, 1)})
            print(" ".join(command), rows[-1], flush=True)
        accs = [r["test_acc"] for r in rows if r["test_acc"] is not None]
        result[" ".join(command)] = {"runs": rows, "median_test_acc": statistics.median(accs) if accs else None,
                                     "median_seconds": statistics.median(r["seconds"] for r in rows)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["build", "run"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--vggkit", action="append", default=None,
                        help="a vggkit command line (default: this interpreter's -m vggkit); repeat for an A/B")
    args, flags = parser.parse_known_args()  # what is left: more train flags for the fine-tuning runs
    args.flags = [f for f in flags if f != "--"]
    if args.what == "build":
        build(args.out)
        return
    commands = [shlex.split(c) for c in (args.vggkit or [f"{sys.executable} -m vggkit"])]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(json.dumps(run(args.out, commands, seeds, args.flags), indent=2))


if __name__ == "__main__":
    main()
