"""`vggkit bench --data FOLDER` for photos: whether the data or the compute limits training here.

    from vggkit.bench.data import bench_folder, format_folder_bench
    print(format_folder_bench(bench_folder(BenchSettings(preset="fast", data="photos/"))))

Four measurements, each by worker count where workers matter (0 = in this process):
1. first pass: files decoded and fitted to the stored size (draft-mode JPEG decoding), images/s and
   per process, on a sample of the folder (nothing is written);
2. the prepared cache: found, or built now (timed), with its size on disk;
3. from the cache: training batches (random-resized crop, flip, normalize) made without training;
4. the training step on those batches against the same step on synthetic images held in memory at
   the input size (no decoding, no augmentation), timed in alternating rounds of the same run: the
   ratio is what the data path costs.
The model and recipe are what `vggkit train --data FOLDER --preset P` decides for the folder.
"""
from __future__ import annotations

import statistics
import time
import numpy as np
import torch

from ..config import resolve_config
from ..data import Dataset, load_data
from ..data.prepared import _Decoder, as_is, cached, prepare_datasets
from ..decide import decide
from ..pipeline import Augment
from ..preprocess import storage_size
from ..runtime import ProcessSettings, pick_device, speed_settings
from ..stream import StreamLoader, stream_workers
from .machine import auto_steps, device_name, timed
from .vggkit_steps import VggkitSteps

SAMPLE = 96  # images decoded per worker count in the first-pass figure


def bench_folder(settings, log=None) -> dict | None:
    """The four measurements of the module docstring, or None where the folder is not streamed."""
    log = log or (lambda *a, **k: None)
    splits = load_data(settings.data, val_size=0, seed=settings.seed, log=lambda *a, **k: None)
    if not splits.streamed:
        return None
    overrides = {name: getattr(settings, name) for name in settings.CONFIG_FIELDS} | {"data": settings.data}
    config, _ = decide(resolve_config(overrides=overrides), splits)
    size = (storage_size(config.input_size),) * 2
    most = stream_workers()
    counts = sorted({0, 1, most})
    device = pick_device(config.device)
    with ProcessSettings() as process:
        allocator = process.apply(config, device)
        result = {"data": str(settings.data), "images": len(splits.train), "median_size": list(splits.image_size),
                  "stored_size": list(size), "input_size": config.input_size, "batch_size": config.batch_size,
                  "arch": config.arch, "head_pool": config.head_pool or "none", "device": str(device),
                  "device_name": device_name(device), "threads": torch.get_num_threads(), "allocator": allocator,
                  "runs": settings.runs}
        log("first pass: decoding a sample by worker count")
        result["first_pass"] = {w: _decode_rate(splits.train, size, w, settings.runs) for w in counts if w}
        built = cached(splits.train.folder, size) is None
        started = time.perf_counter()
        train = prepare_datasets({"train": splits.train}, size, skip_bad=True, workers=most, log=log)["train"]
        result["cache"] = {"built_now": built, "seconds": round(time.perf_counter() - started, 2),
                           "bytes": train.prepared.count * train.prepared.record_bytes, "path": str(train.prepared.path)}
        loader_args = dict(input_size=config.input_size, mean=splits.mean, std=splits.std, shuffle=True,
                           seed=settings.seed, drop_last=True, augment=Augment(flip=True, resized_crop=True),
                           device=device, dtype=torch.float32, channels_last=speed_settings(config, device).channels_last)
        log("from the cache: batches by worker count")
        result["from_cache"] = {w: _batch_rate(StreamLoader(train, config.batch_size, workers=w, **loader_args),
                                               settings.runs) for w in counts}
        log("training: real batches against synthetic ones")
        result.update(_training(settings, config, device, train, loader_args, stream_workers(config.workers, device)))
    return result


def _decode_rate(dataset, size, workers: int, runs: int) -> dict:
    """Images/s decoding and fitting up to SAMPLE files in `workers` processes (median of runs)."""
    from torch.utils.data import DataLoader

    rows = dataset.rows[:SAMPLE]
    paths = [dataset.folder.paths[r] for r in rows]
    chunks = [range(s, min(s + 4, len(paths))) for s in range(0, len(paths), 4)]
    rates = []
    for _ in range(runs):
        loader = DataLoader(_Decoder(paths, size, dataset.channels), batch_size=None, sampler=chunks,
                            num_workers=workers, collate_fn=as_is, generator=torch.Generator())
        started = time.perf_counter()
        for _ in loader:
            pass
        rates.append(len(paths) / (time.perf_counter() - started))
    rate = statistics.median(rates)
    return {"images_per_s": round(rate, 1), "per_process": round(rate / workers, 1)}


BATCH_IMAGES = 512  # images per run of batches from the cache (the workers' start included, as in an epoch)


def _batch_rate(loader: StreamLoader, runs: int) -> dict:
    """Images/s of training batches from the cache, without a model (median of runs of BATCH_IMAGES)."""
    rates = []
    for run in range(runs):
        loader.set_epoch(run)
        started, images = time.perf_counter(), 0
        for x, y in loader:
            images += len(y)
            if images >= BATCH_IMAGES:
                break
        rates.append(images / (time.perf_counter() - started))
    return {"images_per_s": round(statistics.median(rates), 1)}


def _training(settings, config, device, train, loader_args: dict, workers: int) -> dict:
    """Training images/s on streamed batches and on synthetic in-memory ones, in alternating rounds."""
    speed = speed_settings(config, device)
    real = VggkitSteps(config, speed, device, None, settings.seed,
                       loader=StreamLoader(train, config.batch_size, workers=workers, **loader_args))
    n = config.batch_size * 4
    rng = np.random.default_rng(settings.seed)
    images = rng.integers(0, 256, (n, config.input_size, config.input_size, train.channels), dtype=np.uint8)
    synthetic = VggkitSteps(config, speed, device, Dataset(images, rng.integers(0, 3, n), ["0", "1", "2"]),
                            settings.seed)
    warmup = settings.warmup or 2
    steps = {}
    for name, contender in (("real", real), ("synthetic", synthetic)):
        contender.mode(training=True)
        timed(contender.train_step, warmup, device)
        steps[name] = settings.steps or auto_steps(timed(contender.train_step, 1, device), settings.run_seconds)
    count = min(steps.values())
    rates = {"real": [], "synthetic": []}
    for _ in range(settings.runs):
        for name, contender in (("real", real), ("synthetic", synthetic)):
            rates[name].append(count * config.batch_size / timed(contender.train_step, count, device))
    real_rate, synthetic_rate = (statistics.median(rates[k]) for k in ("real", "synthetic"))
    return {"train_steps": count, "train_workers": workers, "train_real_images_per_s": round(real_rate, 1),
            "train_synthetic_images_per_s": round(synthetic_rate, 1),
            "train_real_runs": [round(r, 1) for r in rates["real"]],
            "train_synthetic_runs": [round(r, 1) for r in rates["synthetic"]],
            "real_over_synthetic": round(real_rate / synthetic_rate, 3)}


def format_folder_bench(r: dict) -> str:
    h, w = r["median_size"]
    lines = [f"vggkit bench --data {r['data']}: {r['images']:,} images, {w}x{h} median, stored at "
             f"{r['stored_size'][1]}x{r['stored_size'][0]}, input {r['input_size']}, batch {r['batch_size']}, "
             f"arch {r['arch']} (head pool {r['head_pool']})",
             f"device: {r['device']} ({r['device_name']}, {r['threads']} threads); medians of {r['runs']} runs", ""]
    lines += ["first pass (decode + fit), images/s:"]
    lines += [f"  {w} worker(s): {v['images_per_s']:>8.1f}  ({v['per_process']:.1f} per process)"
              for w, v in r["first_pass"].items()]
    cache = r["cache"]
    lines += [f"prepared cache: {cache['bytes'] / 2**20:,.0f} MiB, "
              + (f"built now in {cache['seconds']:.1f} s" if cache["built_now"] else "found") + f" ({cache['path']})"]
    lines += ["training batches from the cache (no model), images/s:"]
    lines += [f"  {w} worker(s): {v['images_per_s']:>8.1f}" for w, v in r["from_cache"].items()]
    lines += [f"training, {r['train_workers']} worker(s): {r['train_real_images_per_s']:.1f} images/s on the folder, "
              f"{r['train_synthetic_images_per_s']:.1f} on synthetic in-memory images: "
              f"{100 * r['real_over_synthetic']:.1f}%"]
    return "\n".join(lines)
