import gzip
import struct
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from vggkit import data as D
from vggkit.errors import VggkitError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    return b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path, array, gz=True):
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_images(n, size=28, offset=0):
    """n images whose first two pixels encode their index: a way to tell them apart."""
    images = np.random.default_rng(n + offset).integers(0, 256, (n, size, size), dtype=np.uint8)
    ids = np.arange(offset, offset + n)
    images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256
    return images


def image_ids(images):
    return images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 1, 0]


def write_dataset(directory, n_train=40, n_test=20, gz=True, offset=0):
    """A tiny dataset in the IDX layout: 10 balanced classes."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = (make_images(n_train, offset=offset), np.arange(n_train) % 10,
              make_images(n_test, offset=offset + 1000), np.arange(n_test) % 10)
    for name, array in zip(FILES, arrays):
        write_idx(directory / (name + ".gz" if gz else name), array, gz)
    return directory


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.fixture(autouse=True)
def tiny_idx_datasets(monkeypatch):
    """The IDX datasets' entries take any number of images: these tests write tiny files (the official
    counts are held in test_bounds.py)."""
    for name in ("fashion-mnist", "mnist"):
        entry = D.REGISTRY[name]
        monkeypatch.setitem(D.REGISTRY, name, replace(entry, reader=replace(entry.reader, counts=None)))


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """An empty search path: no $VGGKIT_DATA, cache under tmp_path."""
    monkeypatch.delenv("VGGKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


# ---------------------------------------------------------------- the real files

@pytest.fixture(scope="session")
def fmnist(fmnist_dir):
    return D.load_data(data_dir=fmnist_dir, download=False, log=lambda *_: None)


def test_read_real_files(fmnist_dir):
    train = D.read_idx_pair(fmnist_dir / "train-images-idx3-ubyte.gz", fmnist_dir / "train-labels-idx1-ubyte.gz", 10)
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.labels.min() == 0 and train.labels.max() == 9
    assert (np.bincount(train.labels) == 6000).all()
    test = D.read_idx(fmnist_dir / "t10k-labels-idx1-ubyte.gz", 1)
    assert test.shape == (10000,) and (np.bincount(test) == 1000).all()


@pytest.mark.slow
def test_load_fashion_mnist(fmnist, fmnist_dir):
    assert fmnist.name == "fashion-mnist" and not fmnist.is_sample
    assert fmnist.classes[0] == "T-shirt/top" and fmnist.classes[9] == "Ankle boot" and len(fmnist.classes) == 10
    assert (len(fmnist.train), len(fmnist.val), len(fmnist.test)) == (55000, 5000, 10000)
    assert (np.bincount(fmnist.val.labels) == 500).all()
    assert fmnist.train.images.shape[1:] == (28, 28, 1) and fmnist.train.channels == 1
    assert str(fmnist_dir) in fmnist.source
    assert fmnist.mean[0] == pytest.approx(0.286, abs=0.002) and fmnist.std[0] == pytest.approx(0.353, abs=0.002)


# ---------------------------------------------------------------- bad IDX files

def test_idx_formats(tmp_path):
    images = make_images(5)
    assert np.array_equal(D.read_idx(write_idx(tmp_path / "a.gz", images)), images)
    assert np.array_equal(D.read_idx(write_idx(tmp_path / "raw", images, gz=False)), images)
    # a browser may have decompressed it but kept the name: still an IDX file
    assert np.array_equal(D.read_idx(write_idx(tmp_path / "b.gz", images, gz=False)), images)


@pytest.mark.parametrize("case, expect", [
    ("truncated-gz", "truncated"),
    ("not-gzip", "not a gzip file"),
    ("bad-magic", "magic"),
    ("short-data", "truncated"),
    ("trailing-data", "after its data"),
    ("wrong-ndim", "dimensions"),
    ("empty", "not a gzip file"),
])
def test_bad_idx_files(tmp_path, case, expect):
    images = make_images(5)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    gz = gzip.compress(idx_bytes(images))
    content = {
        "truncated-gz": gz[: len(gz) // 2],
        "not-gzip": b"<html>404 Not Found</html>",
        "bad-magic": gzip.compress(b"\0\0\x0b\x03" + idx_bytes(images)[4:]),
        "short-data": gzip.compress(idx_bytes(images)[:-10]),
        "trailing-data": gzip.compress(idx_bytes(images) + b"xx"),
        "wrong-ndim": gzip.compress(idx_bytes(np.arange(5))),
        "empty": b"",
    }[case]
    path.write_bytes(content)
    with pytest.raises(VggkitError) as e:
        D.read_idx(path, 3)
    message = one_line(e)
    assert str(path) in message and expect in message


def test_count_mismatch_and_label_range(tmp_path):
    images = write_idx(tmp_path / "i.gz", make_images(5))
    with pytest.raises(VggkitError) as e:
        D.read_idx_pair(images, write_idx(tmp_path / "l.gz", np.arange(4)), 10)
    assert "4 labels" in one_line(e) and "l.gz" in str(e.value)
    with pytest.raises(VggkitError) as e:
        D.read_idx_pair(images, write_idx(tmp_path / "l2.gz", [0, 1, 2, 3, 12]), 10)
    assert "label 12" in one_line(e) and "l2.gz" in str(e.value)


# ---------------------------------------------------------------- where named datasets are found

def test_search_order(no_env, monkeypatch):
    tmp = no_env
    quiet = dict(download=False, val_size=0, log=lambda *_: None)
    cache = write_dataset(tmp / "xdg" / "vggkit" / "mnist", n_train=10)
    assert len(D.load_data("mnist", **quiet).train) == 10
    monkeypatch.setenv("VGGKIT_DATA", str(tmp / "env"))
    env = write_dataset(tmp / "env" / "mnist", n_train=20, gz=False)
    result = D.load_data("mnist", **quiet)
    assert len(result.train) == 20 and str(env) in result.source and result.classes == [str(i) for i in range(10)]
    given = write_dataset(tmp / "given", n_train=30)
    assert len(D.load_data("mnist", data_dir=given, **quiet).train) == 30
    write_dataset(tmp / "parent" / "mnist", n_train=40)
    assert len(D.load_data("mnist", data_dir=tmp / "parent", **quiet).train) == 40
    # an incomplete folder is passed over
    (given / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(D.load_data("mnist", data_dir=given, **quiet).train) == 20
    # without XDG_CACHE_HOME the cache is ~/.cache
    monkeypatch.delenv("VGGKIT_DATA")
    monkeypatch.delenv("XDG_CACHE_HOME")
    write_dataset(tmp / "home" / ".cache" / "vggkit" / "mnist", n_train=50)
    assert len(D.load_data("mnist", **quiet).train) == 50
    assert cache.exists()


def test_local_copy_not_md5_checked(no_env):
    # our files' MD5s match nothing in the table: a user's own copy is read as it is
    directory = write_dataset(no_env / "mine", n_train=20)
    assert len(D.load_data("fashion-mnist", data_dir=directory, val_size=0, download=False).train) == 20


def test_not_found_message(no_env):
    partial = write_dataset(no_env / "partial")
    (partial / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(VggkitError) as e:
        D.load_data("fashion-mnist", data_dir=partial, download=False)
    message = one_line(e)
    for part in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", str(partial),
                 str(no_env / "xdg" / "vggkit" / "fashion-mnist"), "--data-dir", "$VGGKIT_DATA", "by hand"):
        assert part in message
    assert "missing train-images-idx3-ubyte.gz)" in message  # the partial folder lacks just that one


def test_unknown_name():
    with pytest.raises(VggkitError, match="unknown dataset 'cifar'"):
        D.load_data("cifar")


# ---------------------------------------------------------------- the bundled sample

def test_sample_fallback(no_env):
    logged = []
    result = D.load_data("fashion-mnist", download=False, allow_sample=True, log=logged.append)
    assert result.is_sample and "sample" in result.source
    assert (len(result.train), len(result.val), len(result.test)) == (4500, 500, 1000)
    assert (np.bincount(np.concatenate([result.train.labels, result.val.labels])) == 500).all()
    assert (np.bincount(result.test.labels) == 100).all()
    assert any("NOT comparable" in line for line in logged)
    assert D.SAMPLE_PATH.stat().st_size < 4e6


def test_sample_only_for_fashion_mnist(no_env):
    with pytest.raises(VggkitError, match="mnist not found"):
        D.load_data("mnist", download=False, allow_sample=True)


def test_sample_by_name():
    result = D.load_data("fashion-mnist-sample", val_size=0, log=lambda *_: None)
    assert result.is_sample and len(result.train) == 5000 and result.classes == list(D.REGISTRY["fashion-mnist"].classes)


# ---------------------------------------------------------------- splits

def synthetic(n=200):
    return D.Dataset(make_images(n)[..., None], np.arange(n) % 10, [str(i) for i in range(10)])


def test_stratified_split():
    data = synthetic()
    train, val = D.split_off(data, 50, seed=3)
    assert (np.bincount(val.labels) == 5).all() and len(train) == 150
    ids_train, ids_val = image_ids(train.images), image_ids(val.images)
    assert not set(ids_train) & set(ids_val) and len(set(ids_train) | set(ids_val)) == 200
    assert np.array_equal(D.split_off(data, 50, seed=3)[1].images, val.images)
    assert not np.array_equal(D.split_off(data, 50, seed=4)[1].images, val.images)
    empty = D.split_off(data, 0, seed=3)[1]
    assert len(empty) == 0 and empty.images.shape == (0, 28, 28, 1)
    # unequal classes: proportional, largest remainder
    picked = D.stratified_indices(np.array([0] * 70 + [1] * 30), 10, seed=0)
    assert np.bincount(np.array([0] * 70 + [1] * 30)[picked]).tolist() == [7, 3]


def test_val_limit_options(no_env):
    directory = write_dataset(no_env / "d", n_train=100, n_test=50)
    kwargs = dict(data_dir=directory, download=False)
    result = D.load_data("mnist", val_size=20, limit=30, test_limit=10, **kwargs)
    assert (len(result.train), len(result.val), len(result.test)) == (30, 20, 10)
    assert (np.bincount(result.train.labels) == 3).all() and (np.bincount(result.test.labels) == 1).all()
    assert not set(image_ids(result.train.images)) & set(image_ids(result.val.images))
    assert len(D.load_data("mnist", val_size=0, **kwargs).val) == 0
    for bad in (dict(val_size=100), dict(val_size=-1), dict(limit=0)):
        with pytest.raises(VggkitError):
            D.load_data("mnist", **kwargs, **bad)


def test_channel_stats():
    images = np.zeros((2, 2, 2, 3), np.uint8)
    images[..., 0] = 255
    images[0, ..., 1] = 255
    mean, std = D.channel_stats(images)
    assert mean == (1.0, 0.5, 0.0) and std == (1.0, 0.5, 1.0)  # a constant channel gets std 1, not 0


# ---------------------------------------------------------------- image folders

def save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)


def by_path(splits):
    """{file: pixels} over the train and test splits."""
    return dict(zip(splits.train.paths + splits.test.paths, np.concatenate([splits.train.images, splits.test.images])))


def gray_folder(root, classes=("cat", "dog", "eel"), n=10, size=8):
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(n):
            save(root / c / f"{i}.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
    return root


def test_gray_folder(tmp_path):
    root = gray_folder(tmp_path / "imgs")
    (root / "README.txt").write_text("not an image")
    (root / "cat" / "notes.txt").write_text("ignored")
    result = D.load_data(str(root), seed=1)
    assert result.classes == ["cat", "dog", "eel"] and result.name == str(root)
    # no test/ tree: 10% held out for test, 10% for validation, one per class each here
    assert (len(result.train), len(result.val), len(result.test)) == (24, 3, 3)
    assert result.train.images.shape == (24, 8, 8, 1) and result.image_size == (8, 8)
    assert (np.bincount(result.val.labels) == 1).all() and (np.bincount(result.test.labels) == 1).all()
    # PNG is lossless: the pixels come back exactly, with the file they came from
    for split in (result.train, result.val, result.test):
        for path, image in zip(split.paths, split.images, strict=True):
            assert np.array_equal(np.asarray(Image.open(path)), image[..., 0])
    again = D.load_data(str(root), seed=1)
    assert again.val.paths == result.val.paths and again.test.paths == result.test.paths
    other = D.load_data(str(root), seed=2)
    assert other.val.paths != result.val.paths and other.test.paths != result.test.paths


def test_flat_folder_splits_are_disjoint_and_reproducible(tmp_path):
    root = gray_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), n=25, size=4)
    save(root / "d" / "extra.png", np.zeros((4, 4), np.uint8))  # unequal classes
    result = D.load_data(str(root), seed=7, log=lambda *_: None)
    splits = [set(result.train.paths), set(result.val.paths), set(result.test.paths)]
    assert sum(map(len, splits)) == 101 and len(set.union(*splits)) == 101
    assert (len(result.val), len(result.test)) == (10, 10)
    assert sorted(np.bincount(result.test.labels)) == [2, 2, 3, 3]  # 10%, by class (largest remainder)
    # the test split depends on the folder and the seed only: evaluate (val_size=0) gets the run's test images
    for kwargs in (dict(val_size=0), dict(val_size=30), dict(limit=20)):
        assert D.load_data(str(root), seed=7, **kwargs).test.paths == result.test.paths
    assert D.load_data(str(root), seed=8).test.paths != result.test.paths
    assert D.load_data(str(root), seed=7, val_size=0).train.paths == sorted(splits[0] | splits[1])


def test_held_out_split_takes_and_leaves_one_per_class():
    labels = np.array([0] * 2 + [1] * 50 + [2] * 11)
    for seed in range(20):
        picked = D.stratified_indices(labels, 6, seed=seed, held_out=True)
        counts = np.bincount(labels[picked], minlength=3)
        assert len(picked) == 6 and counts[0] == 1 and (counts >= 1).all()
        assert (np.bincount(labels, minlength=3) - counts >= 1).all()
    # without held_out the proportional draw may leave a small class out
    assert np.bincount(labels[D.stratified_indices(labels, 6, seed=0)], minlength=3)[0] == 0


def test_rgb_and_mixed_folder(tmp_path):
    root = tmp_path / "rgb"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(5):
            save(root / c / f"{i}.jpg", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    result = D.load_data(str(root), val_size=0)
    assert result.train.images.shape == (8, 6, 6, 3) and len(result.test) == 2 and len(result.mean) == 3
    save(root / "a" / "gray.png", np.full((6, 6), 77, np.uint8))
    result = D.load_data(str(root), val_size=0)
    everything = np.concatenate([result.train.images, result.test.images])
    assert everything.shape == (11, 6, 6, 3)
    assert any((im == 77).all() for im in everything)  # gray replicated to 3 channels


def test_mixed_sizes_are_centre_cropped_to_the_median_size(tmp_path):
    root = gray_folder(tmp_path / "imgs", n=4)  # 12 images 8x8
    tall = np.full((16, 12), 100, np.uint8)
    tall[:2], tall[-2:] = 255, 255  # outside the centred 12x12 square: cropped away, not squashed in
    save(root / "cat" / "tall.png", tall)
    logged = []
    result = D.load_data(str(root), val_size=0, log=logged.append)
    assert result.image_size == (8, 8)
    assert any("1 of 13" in line and "centre-cropped" in line for line in logged)
    images = by_path(result)
    assert (images[str(root / "cat" / "tall.png")] == 100).all()
    # no size shared by most: the median height and width
    for i, (h, w) in enumerate([(10, 30), (20, 14), (40, 40), (12, 16), (30, 22)] * 2):
        save(tmp_path / "mixed" / "ab"[i % 2] / f"{i}.png", np.full((h, w), 9 * i, np.uint8))
    mixed = D.load_data(str(tmp_path / "mixed"), val_size=0, log=lambda *_: None)
    assert mixed.image_size == (20, 22)
    # a model's size wins over the median (evaluate)
    assert D.load_data(str(tmp_path / "mixed"), val_size=0, image_size=(5, 7)).image_size == (5, 7)


def test_train_val_test_trees(tmp_path):
    root = tmp_path / "trees"
    gray_folder(root / "train", n=6)
    gray_folder(root / "val", n=2)
    gray_folder(root / "test", classes=("cat", "eel"), n=3)
    logged = []
    result = D.load_data(str(root), val_size=5, log=logged.append)
    assert (len(result.train), len(result.val), len(result.test)) == (18, 6, 6)
    assert result.test.labels.tolist() == [0, 0, 0, 2, 2, 2]
    assert any("ignored" in line for line in logged)
    (root / "val").rename(root / "old")
    result = D.load_data(str(root), val_size=3)  # val carved from train, test from test/
    assert (len(result.train), len(result.val), len(result.test)) == (15, 3, 6)


def test_unreadable_images(tmp_path):
    root = gray_folder(tmp_path / "imgs")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    good = np.asarray(Image.fromarray(np.zeros((8, 8), np.uint8)).convert("L"))
    save(root / "eel" / "cut.jpg", good, "JPEG")
    (root / "eel" / "cut.jpg").write_bytes((root / "eel" / "cut.jpg").read_bytes()[:60])
    with pytest.raises(VggkitError) as e:
        D.load_data(str(root))
    message = one_line(e)
    assert "2 unreadable" in message and "broken.png" in message and "cut.jpg" in message and "skip" in message
    logged = []
    result = D.load_data(str(root), skip_bad=True, val_size=0, log=logged.append)
    assert len(result.train) + len(result.test) == 30 and any("broken.png" in line for line in logged)


def test_decompression_bomb_is_one_line_or_skipped(tmp_path, monkeypatch):
    root = gray_folder(tmp_path / "imgs")
    save(root / "dog" / "huge.png", np.zeros((40, 40), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: over it, as a real bomb is over 89 M
    with pytest.raises(VggkitError) as e:
        D.load_data(str(root))
    assert "1 unreadable" in one_line(e) and "huge.png (too large)" in str(e.value)
    result = D.load_data(str(root), skip_bad=True, val_size=0, log=lambda *_: None)
    assert len(result.train) + len(result.test) == 30


def test_folder_too_small_for_the_splits(tmp_path):
    root = gray_folder(tmp_path / "imgs", n=5)
    for i in range(2, 5):
        (root / "dog" / f"{i}.png").unlink()
    result = D.load_data(str(root), val_size=0)  # no validation split: 2 images are enough
    assert np.bincount(result.test.labels).tolist() == [1, 1, 1] and np.bincount(result.train.labels)[1] == 1
    with pytest.raises(VggkitError) as e:
        D.load_data(str(root))
    message = one_line(e)
    assert f"{root}: class(es) dog (2)" in message and "cat" not in message
    assert "fewer than the 3" in message and "held-out test + validation" in message and "add images" in message
    save(root / "dog" / "2.png", np.zeros((8, 8), np.uint8))
    result = D.load_data(str(root))
    assert [np.bincount(split.labels)[1] for split in (result.train, result.val, result.test)] == [1, 1, 1]
    gray_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(VggkitError) as e:
        D.load_data(str(tmp_path / "one"))
    assert "one class sub-folder (cat)" in one_line(e) and "at least two" in str(e.value)


def test_labelled_folder_follows_the_models_classes(tmp_path):
    from vggkit.data.folder import load_labelled_folder

    root = gray_folder(tmp_path / "imgs", classes=("eel", "cat"), n=2)
    result = load_labelled_folder(root, ["ant", "cat", "eel"], skip_bad=False, log=print, image_size=(4, 4), channels=3)
    assert result.labels.tolist() == [1, 1, 2, 2] and result.images.shape == (4, 4, 4, 3) and len(result.paths) == 4
    gray_folder(root, classes=("cow",), n=1)
    with pytest.raises(VggkitError) as e:
        load_labelled_folder(root, ["ant", "cat", "eel"], skip_bad=False, log=print)
    assert "sub-folders cow are not classes of the model (ant, cat, eel)" in one_line(e)


@pytest.mark.parametrize("case, expect", [
    ("empty", "no class sub-folders"),
    ("no-images", "holds no PNG/JPEG/BMP/WebP/TIFF images"),
    ("missing", "no such folder"),
    ("idx", "files of fashion-mnist or mnist: use the dataset's name"),
    ("stray-class", "not a class"),
])
def test_bad_folders(tmp_path, case, expect):
    root = tmp_path / "imgs"
    root.mkdir()
    if case == "no-images":
        gray_folder(root, n=2)
        (root / "fish").mkdir()
        (root / "fish" / "readme.txt").write_text("x")
    elif case == "missing":
        root = tmp_path / "nope"
    elif case == "idx":
        write_dataset(root)
    elif case == "stray-class":
        gray_folder(root / "train", n=2)
        gray_folder(root / "test", classes=("cow",), n=2)
    with pytest.raises(VggkitError) as e:
        D.load_data(str(root))
    assert expect in one_line(e)


# ---------------------------------------------------------------- images as they are (data/image.py)

def image_file(path, image, **save_args):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_args)
    return path


def test_sixteen_bit_gray_is_scaled_not_saturated(tmp_path):
    from vggkit.data.image import read_pixels

    wide = np.array([[0, 256, 257 * 100, 65535], [128, 129, 40000, 65280]], np.uint16)
    path = image_file(tmp_path / "16.png", Image.fromarray(wide))
    assert Image.open(path).mode.startswith("I")
    assert read_pixels(path)[..., 0].tolist() == [[0, 1, 100, 255], [0, 1, 156, 254]]
    assert read_pixels(path, channels=3).shape == (2, 4, 3)
    as_int32 = image_file(tmp_path / "i.tif", Image.fromarray(np.array([[-5, 257 * 7, 70000]], np.int32)))
    assert read_pixels(as_int32)[..., 0].tolist() == [[0, 7, 255]]


def test_float_images(tmp_path):
    from vggkit.data.image import read_pixels

    unit = image_file(tmp_path / "unit.tif", Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)))
    assert read_pixels(unit)[..., 0].tolist() == [[0, 128, 255]]
    wide = image_file(tmp_path / "wide.tif", Image.fromarray(np.array([[-3.0, 7.4, 300.0]], np.float32)))
    assert read_pixels(wide)[..., 0].tolist() == [[0, 7, 255]]


def test_palette_images(tmp_path):
    from vggkit.data.image import read_pixels

    color = Image.new("P", (3, 1))
    color.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0, 0, 0] * 253)
    color.putdata([0, 1, 2])
    assert read_pixels(image_file(tmp_path / "p.png", color)).tolist() == [[[255, 0, 0], [0, 255, 0], [10, 20, 30]]]
    gray = Image.new("P", (3, 1))
    gray.putpalette([v for g in range(256) for v in (255 - g,) * 3])
    gray.putdata([0, 100, 255])
    assert read_pixels(image_file(tmp_path / "g.png", gray)).tolist() == [[[255], [155], [0]]]  # one channel
    # a transparent palette entry: on white
    image_file(tmp_path / "t.png", color, transparency=1)
    assert read_pixels(tmp_path / "t.png").tolist() == [[[255, 0, 0], [255, 255, 255], [10, 20, 30]]]


def test_alpha_is_composited_on_white(tmp_path):
    from vggkit.data.image import read_pixels

    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 128]]], np.uint8)
    path = image_file(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA"))
    expected = [[[200, 100, 0], [255, 255, 255], [(200 * 128 + 255 * 127 + 127) // 255,
                                                   (100 * 128 + 255 * 127 + 127) // 255, 127]]]
    assert read_pixels(path).tolist() == expected
    marked = image_file(tmp_path / "trns.png", Image.fromarray(np.array([[10, 20]], np.uint8)), transparency=20)
    assert read_pixels(marked)[..., 0].tolist() == [[10, 255]]  # the colour marked transparent: on white
    la = np.array([[[0, 255], [0, 0], [40, 51]]], np.uint8)
    path = image_file(tmp_path / "la.png", Image.fromarray(la, "LA"))
    assert read_pixels(path)[..., 0].tolist() == [[0, 255, (40 * 51 + 255 * 204 + 127) // 255]]


def test_cmyk_jpeg_bilevel_and_exif_orientation(tmp_path):
    from vggkit.data.image import read_pixels

    cmyk = image_file(tmp_path / "c.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=95)
    assert Image.open(cmyk).mode == "CMYK"
    red = read_pixels(cmyk)
    assert red.shape == (8, 8, 3) and (red[..., 0] > 240).all() and (red[..., 1:] < 15).all()
    bilevel = image_file(tmp_path / "1.png", Image.fromarray(np.array([[True, False]])))
    assert read_pixels(bilevel)[..., 0].tolist() == [[255, 0]]
    stored = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    rotated = image_file(tmp_path / "r.png", Image.fromarray(stored), exif=exif)
    assert read_pixels(rotated)[..., 0].tolist() == np.rot90(stored, -1).tolist()


def test_folder_of_every_kind(tmp_path):
    """One folder: 16-bit, palette, RGBA, CMYK JPEG, BMP, WebP, TIFF and sizes that differ."""
    root = tmp_path / "kinds"
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 90, 255
    wide = np.full((6, 6), 257 * 60, np.uint16)
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    files = {
        "a/16bit.png": (Image.fromarray(wide), {}), "a/palette.png": (palette, {}),
        "a/rgba.png": (Image.fromarray(rgba, "RGBA"), {}), "a/cmyk.jpg": (Image.new("CMYK", (6, 6), (0, 0, 0, 0)), {}),
        "b/plain.bmp": (Image.new("RGB", (6, 6), (1, 2, 3)), {}),
        "b/lossless.webp": (Image.new("RGB", (6, 6), (4, 5, 6)), {"lossless": True}),
        "b/wide.tiff": (Image.new("RGB", (12, 6), (7, 8, 9)), {}), "b/small.png": (Image.new("L", (3, 3), 11), {}),
    }
    for name, (image, args) in files.items():
        image_file(root / name, image, **args)
    result = D.load_data(str(root), val_size=0, log=lambda *_: None)
    images = by_path(result)
    assert len(images) == 8 and result.image_size == (6, 6) and result.train.channels == 3

    def pixel(name):
        return images[str(root / name)][3, 3].tolist()

    assert pixel("a/16bit.png") == [60, 60, 60] and pixel("a/palette.png") == [10, 200, 30]
    assert pixel("a/rgba.png") == [90, 0, 0] and pixel("b/plain.bmp") == [1, 2, 3]
    assert pixel("b/lossless.webp") == [4, 5, 6] and pixel("b/wide.tiff") == [7, 8, 9]
    assert pixel("b/small.png") == [11] * 3
    assert all(abs(v - 255) <= 2 for v in pixel("a/cmyk.jpg"))


def test_image_files_in_folders(tmp_path):
    from vggkit.data.image import image_files

    for name in ("b.PNG", "a.jpeg", "c.webp", "d.tif", "notes.txt", ".hidden.png", "sub/e.bmp", ".git/f.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in image_files(tmp_path)] == ["a.jpeg", "b.PNG", "c.webp", "d.tif"]
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path, recursive=True)] == [
        "a.jpeg", "b.PNG", "c.webp", "d.tif", "sub/e.bmp"]


def test_folder_images_stand_as_their_exif_says(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 4 wide x 2 high, shown 2 wide x 4 high
    stored = np.arange(8, dtype=np.uint8).reshape(2, 4) * 30
    for c in ("a", "b"):
        for i in range(3):
            image_file(tmp_path / "f" / c / f"{i}.png", Image.fromarray(stored), exif=exif)
            image_file(tmp_path / "f" / c / f"{i}.jpg", Image.fromarray(np.zeros((4, 2), np.uint8)), quality=100)
    logged = []
    result = D.load_data(str(tmp_path / "f"), val_size=0, log=logged.append)
    assert result.image_size == (4, 2) and not any("note" in line for line in logged)  # no resize: same shown size
    assert by_path(result)[str(tmp_path / "f" / "a" / "0.png")][..., 0].tolist() == np.rot90(stored, -1).tolist()
