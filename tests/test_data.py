import gzip
import struct

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
    assert result.classes == ["cat", "dog", "eel"] and result.test is None and result.name == str(root)
    assert result.train.images.shape == (27, 8, 8, 1) and (len(result.val), len(result.train)) == (3, 27)
    assert (np.bincount(result.val.labels) == 1).all()
    # PNG is lossless: the pixels come back exactly
    expected = np.asarray(Image.open(root / "cat" / "0.png"))
    everything = np.concatenate([result.train.images, result.val.images])[..., 0]
    assert any(np.array_equal(expected, im) for im in everything)
    again = D.load_data(str(root), seed=1)
    assert np.array_equal(again.val.images, result.val.images)
    other = D.load_data(str(root), seed=2)
    assert not np.array_equal(other.val.images, result.val.images)


def test_rgb_and_mixed_folder(tmp_path):
    root = tmp_path / "rgb"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(5):
            save(root / c / f"{i}.jpg", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    result = D.load_data(str(root), val_size=0)
    assert result.train.images.shape == (10, 6, 6, 3) and len(result.mean) == 3
    save(root / "a" / "gray.png", np.full((6, 6), 77, np.uint8))
    result = D.load_data(str(root), val_size=0)
    assert result.train.images.shape == (11, 6, 6, 3)
    assert any((im == 77).all() for im in result.train.images)  # gray replicated to 3 channels


def test_sizes_unified(tmp_path):
    root = gray_folder(tmp_path / "imgs", n=4)
    save(root / "cat" / "big.png", np.zeros((16, 12), np.uint8))
    logged = []
    result = D.load_data(str(root), val_size=0, log=logged.append)
    assert result.train.images.shape == (13, 8, 8, 1)
    assert any("1 of 13" in line and "resized" in line for line in logged)


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
    assert len(result.train) == 30 and any("broken.png" in line for line in logged)


@pytest.mark.parametrize("case, expect", [
    ("empty", "no class sub-folders"),
    ("no-images", "holds no PNG/JPEG images"),
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
