"""Photos streamed from disk: listed from headers, decoded once into the prepared cache, batches made in
worker processes. The folders are built here (PNGs for exact comparisons, JPEGs for the decoder's draft
mode); every cache goes to a temporary XDG_CACHE_HOME."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vggkit.cli import main
from vggkit.data import load_data
from vggkit.data.dataset import FileDataset, IMAGENET_MEAN
from vggkit.data.folder import load_folder
from vggkit.data.image import fit, read_pixels
from vggkit.data import prepared as prepared_module
from vggkit.data.prepared import cached, decode_fitted, prepare, prepare_datasets
from vggkit.pipeline import Augment, BatchLoader
from vggkit.preprocess import CENTER, storage_size
from vggkit.stream import StreamLoader, crop_box
from vggkit.train import train

CLASSES = ("red", "green", "blue")
INPUT = 32
STORED = storage_size(INPUT)  # 37


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Each test's prepared caches in its own folder (the kernel build cache stays where it is)."""
    home = tmp_path / "xdg"
    monkeypatch.setattr("vggkit.data.prepared.cache_root", lambda: home / "vggkit" / "prepared")
    return home


def write_photos(root, per_class=20, ext="png", size=(200, 150), seed=0):
    """Per class, noisy images whose mean colour names the class; sizes vary around `size`, some portrait."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(n * rng.uniform(0.8, 1.2)) for n in size)
            if i % 4 == 3:
                w, h = h, w
            pixels = rng.normal(100, 40, (h, w, 3))
            pixels[..., c] += 80
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.{ext}")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos") / "photos")


@pytest.fixture(scope="module")
def jpeg_photos(tmp_path_factory):
    """Large enough that the decoder's draft mode reduces them (1/8 for the 37x37 stored size)."""
    return write_photos(tmp_path_factory.mktemp("jpegs") / "photos", ext="jpg", size=(640, 480))


def loader_options(**changes):
    return dict(input_size=INPUT, mean=IMAGENET_MEAN, std=(0.25, 0.25, 0.25), crop=CENTER) | changes


def test_a_photo_folder_is_listed_from_its_headers_and_left_on_disk(photos):
    splits = load_data(str(photos), val_size=0)
    h, w = splits.image_size
    assert splits.streamed == f"photos, {w}x{h} median" and min(h, w) >= 128 and isinstance(splits.train, FileDataset)
    assert splits.mean == IMAGENET_MEAN  # photos: ImageNet's statistics, nothing decoded to measure them
    assert len(splits.train) + len(splits.test) == 60 and splits.train.prepared is None
    assert not prepared_module.cache_root().exists()  # listing decodes nothing (its headers are remembered)
    memory = load_data(str(photos), val_size=0, streaming="off")
    assert memory.streamed is None and memory.train.images.shape[1:] == (h, w, 3)


def test_streamed_batches_are_the_tensors_of_the_in_memory_path(photos):
    """PNGs (no draft decoding): the prepared cache holds exactly the in-memory path's fitted pixels,
    and 2 worker processes give the model the same tensors as the in-memory loader."""
    memory = load_data(str(photos), val_size=0, streaming="off", image_size=(STORED, STORED))
    streamed = load_data(str(photos), val_size=0, streaming="on")
    prepared = prepare_datasets({"train": streamed.train, "test": streamed.test}, (STORED, STORED),
                                skip_bad=False, workers=2)
    for split in ("train", "test"):
        ours = StreamLoader(prepared[split], 4, workers=2, **loader_options())
        theirs = BatchLoader(getattr(memory, split), 4, **loader_options())
        pairs = list(zip(ours, theirs))
        assert len(pairs) == len(theirs) > 1
        for (x, y), (x_mem, y_mem) in pairs:
            assert x.shape == (len(y), 3, INPUT, INPUT) and torch.equal(x, x_mem) and torch.equal(y, y_mem)


def test_batches_do_not_depend_on_workers_or_ranks_and_resume_mid_epoch(photos):
    splits = load_data(str(photos), val_size=0)
    train_set = prepare_datasets({"train": splits.train}, (STORED, STORED), skip_bad=False)["train"]
    augment = Augment(flip=True, resized_crop=True, erasing=0.5)

    def batches(workers, rank=0, world_size=1, start=0, epoch=3):
        loader = StreamLoader(train_set, 8, workers=workers, shuffle=True, seed=7, augment=augment, rank=rank,
                              world_size=world_size, **loader_options(crop=None))
        loader.set_epoch(epoch)
        return list(loader.iter_from(start))

    alone = batches(0)
    assert len(alone) == len(train_set) // 8 + 1 and alone[0][0].shape == (8, 3, INPUT, INPUT)
    for (x, y), (x2, y2) in zip(alone, batches(2)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    halves = zip(batches(2, rank=0, world_size=2), batches(1, rank=1, world_size=2))
    for (x, y), ((x0, y0), (x1, y1)) in zip(alone, halves):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    for (x, y), (x2, y2) in zip(alone[3:], batches(2, start=3)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other_epoch = batches(0, epoch=4)
    assert not torch.equal(alone[0][1], other_epoch[0][1]) or not torch.equal(alone[0][0], other_epoch[0][0])


def test_random_resized_crops_follow_torchvision():
    rng = np.random.default_rng(0)
    boxes = [crop_box(100, 200, rng) for _ in range(500)]
    areas = np.array([(r - l) * (b - t) / (100 * 200) for l, t, r, b in boxes])
    ratios = np.array([(r - l) / (b - t) for l, t, r, b in boxes])
    assert all(0 <= l < r <= 200 and 0 <= t < b <= 100 for l, t, r, b in boxes)
    assert areas.min() >= 0.07 and areas.max() <= 1.0 and ratios.min() > 0.7 and ratios.max() < 1.4
    left, top, right, bottom = crop_box(10, 1000, rng)  # no try fits: the centre at the widest allowed aspect
    assert (top, bottom) == (0, 10) and right - left == round(10 * 4 / 3) and left == (1000 - 13) // 2


def test_jpegs_are_decoded_at_a_reduced_scale_close_to_a_full_decode(tmp_path):
    rows, cols = np.mgrid[0:1200, 0:1800] / 150.0  # a smooth 1800x1200 scene
    smooth = np.stack([128 + 100 * np.sin(rows), 128 + 100 * np.cos(cols), 128 + 60 * np.sin(rows + cols)], -1)
    smooth = smooth.astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    drafted = decode_fitted(tmp_path / "big.jpg", (64, 64), 3)
    full = fit(read_pixels(tmp_path / "big.jpg", 3), (64, 64))
    assert drafted.shape == full.shape == (64, 64, 3)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 1.5


def test_a_changed_file_is_never_read_from_an_old_cache(tmp_path):
    root = write_photos(tmp_path / "photos", per_class=3)
    folder = load_folder(root, False, print)[0]["train"].folder
    first = prepare(folder, (STORED, STORED))
    assert cached(folder, (STORED, STORED)) == first and first.count == 9 and not first.bad
    Image.new("RGB", (180, 160), (255, 255, 255)).save(root / "red" / "000.png")
    os.utime(root / "red" / "000.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load_folder(root, False, print)[0]["train"].folder
    assert cached(changed, (STORED, STORED)) is None
    rebuilt = prepare(changed, (STORED, STORED))
    row = changed.paths.index(str((root / "red" / "000.png").resolve()))
    assert rebuilt.path != first.path and (rebuilt.read(row) == 255).all() and not (first.read(row) == 255).all()


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_cache_that_is_used(tmp_path, cache_home):
    root = write_photos(tmp_path / "photos", per_class=30)
    script = textwrap.dedent(f"""
        import time, vggkit.data.prepared as P
        from pathlib import Path
        from vggkit.data.folder import load_folder
        P.cache_root = lambda: Path({str(cache_home)!r}) / "vggkit" / "prepared"
        slow = P.decode_fitted
        P.decode_fitted = lambda *a: (time.sleep(0.05), slow(*a))[1]
        P.prepare(load_folder(Path({str(root)!r}), False, print)[0]["train"].folder, ({STORED}, {STORED}))
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    prepared_dir = cache_home / "vggkit" / "prepared"
    deadline = time.time() + 60
    while not list(prepared_dir.glob(".*.tmp/pixels.u8")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # mid-way: some images written
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len(list(prepared_dir.glob(".*.tmp"))) == 1 and not [p for p in prepared_dir.iterdir()
                                                                 if not p.name.startswith(".")]
    folder = load_folder(root, False, print)[0]["train"].folder
    assert cached(folder, (STORED, STORED)) is None
    prepared = prepare(folder, (STORED, STORED))
    assert not list(prepared_dir.glob(".*.tmp"))  # the dead process's folder is gone
    assert prepared.count == 90 and all(prepared.read(r).any() for r in range(90))


@pytest.mark.slow
def test_an_image_that_fails_to_decode_stops_the_run_or_is_skipped(tmp_path, capsys):
    root = write_photos(tmp_path / "photos", per_class=12, ext="jpg")
    whole = (root / "red" / "005.jpg").read_bytes()
    (root / "red" / "005.jpg").write_bytes(whole[: len(whole) // 3])  # the header reads, the pixels do not
    args = ["train", "--data", str(root), "--arch", "1x4", "--fc-width", "8", "--input-size", str(INPUT),
            "--epochs", "1", "--precision", "fp32", "--out", str(tmp_path / "runs"), "--quiet"]
    assert main(args + ["--name", "strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vggkit: error: 1 image(s) in ") and "red/005.jpg (image file is truncated" in err
    assert err.endswith("remove or replace them, or skip them with --skip-bad")
    assert "\n" not in err and not (tmp_path / "runs" / "strict").exists()
    assert main(args + ["--name", "lenient", "--skip-bad"]) == 0
    assert (tmp_path / "runs" / "lenient" / "checkpoints" / "best" / "model.safetensors").is_file()


def photo_run(tmp_path, photos, **changes):
    return train(photo_config(tmp_path, photos, **changes), progress="none", log=lambda *a: None)


def photo_config(tmp_path, photos, **changes):
    """A tiny photo run; dropout, so that a stray draw from torch's generator would show."""
    return dict(data=str(photos), arch="1x4,1x8", fc_width=16, input_size=INPUT, epochs=2, batch_size=8, dropout=0.3,
                precision="fp32", threads=2, workers=2, out=str(tmp_path), name="photos", lr=0.05) | changes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_photo_run_records_its_preprocessing_and_evaluate_and_predict_feed_it_alike(tmp_path, kind, request):
    from vggkit import evaluate, load
    from vggkit.checkpoint import load_model
    from vggkit.predict import predict_logits

    photos = request.getfixturevalue("photos" if kind == "png" else "jpeg_photos")
    history = photo_run(tmp_path, photos)
    _, meta = load_model(history.run_dir)
    assert meta["image_size"] == [STORED, STORED] and meta["crop"] == "center" and meta["mean"] == list(IMAGENET_MEAN)
    result = evaluate(history.run_dir, log=lambda *a: None)
    assert result["acc"] == history.best["test_acc"] and result["count"] == 6
    test = load_data(str(photos), val_size=0).test  # the run's held-out split (seed 0)
    test = prepare_datasets({"test": test}, (STORED, STORED), skip_bad=False)["test"]
    model = load(history.run_dir)
    x, _ = next(iter(StreamLoader(test, 64, **loader_options(mean=meta["mean"], std=meta["std"]))))
    with torch.no_grad():
        streamed = model(x)
    from_files, _ = predict_logits(history.run_dir, test.paths, device="cpu")
    assert torch.allclose(streamed, from_files, atol=1e-5)  # predict reads each file as the cache was made


@pytest.mark.slow
def test_an_interrupted_photo_run_resumes_to_identical_weights(tmp_path, photos):
    from safetensors.torch import load_file

    straight = photo_run(tmp_path / "straight", photos)  # builds the prepared cache; the runs below find it

    def interrupt(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    first = train(photo_config(tmp_path, photos, name="resumed"), progress="none", log=lambda *a: None,
                  on_step=interrupt)
    assert first.interrupted
    resumed = train(resume=first.run_dir, progress="none", log=lambda *a: None)
    a = load_file(str(straight.run_dir / "checkpoints/last/model.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepare_decodes_a_folder_once_for_the_input_size_training_will_use(tmp_path, photos, capsys):
    assert main(["prepare", str(photos), "--input-size", str(INPUT), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"prepared 60 images at {STORED}x{STORED} in ") and "2 process(es)" in out
    assert main(["prepare", str(photos), "--input-size", str(INPUT)]) == 0
    assert capsys.readouterr().out.startswith(f"60 images already prepared at {STORED}x{STORED} in ")
    assert main(["prepare", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_on_a_photo_folder_weighs_the_data_path_against_the_compute(photos):
    from vggkit.bench import BenchSettings, bench
    from vggkit.bench.data import format_folder_bench

    result = bench(BenchSettings(preset="fast", data=str(photos), arch="1x4", input_size=INPUT, batch_size=8,
                                 runs=1, steps=1, warmup=1, precision="fp32"))
    assert result["stored_size"] == [STORED, STORED] and result["images"] == 54
    assert 1 in result["first_pass"] and 0 not in result["first_pass"] and 0 in result["from_cache"]
    assert all(v["images_per_s"] > 0 for v in [*result["first_pass"].values(), *result["from_cache"].values()])
    assert result["train_real_images_per_s"] > 0 and result["train_synthetic_images_per_s"] > 0
    text = format_folder_bench(result)
    assert "first pass (decode + fit), images/s:" in text and "on synthetic in-memory images" in text


@pytest.mark.slow
def test_a_photo_run_fine_tunes_from_initial_weights(tmp_path, photos):
    """The decisions that build the network to size a batch take the initial weights' shape."""
    from vggkit.checkpoint import load_model

    base = photo_run(tmp_path, photos, name="base", epochs=1)
    lines = []
    tuned = train(photo_config(tmp_path, photos, name="tuned", epochs=1, init_from=str(base.run_dir), arch=None,
                               fc_width=None, batch_size=None), progress="none", log=lines.append)
    assert any("; pretrained blocks at 0.1 x lr" in line for line in lines)
    _, meta = load_model(tuned.run_dir)
    assert meta["crop"] == "center" and meta["mean"] == list(IMAGENET_MEAN)
