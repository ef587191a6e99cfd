"""CIFAR-10/100 from small files in the real binary format: archive, extracted folder, download, bad input."""
import hashlib
import io
import socket
import tarfile
from dataclasses import replace

import numpy as np
import pytest

from test_download import server  # noqa: F401 (the 127.0.0.1 server fixture)
from vggkit import data as D
from vggkit.errors import VggkitError

CIFAR10_MEMBERS = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
PER_BATCH, N_TEST = 20, 40  # CIFAR-10: 5 batches of 20 train records; both: 40 test records
CIFAR100_TRAIN = 100


def images(n, seed):
    """n random RGB images whose first pixel's red and green encode their index."""
    pictures = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    pictures[:, 0, 0, 0], pictures[:, 0, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    return pictures


def records(pictures, *label_columns) -> bytes:
    """Records in the binary format: the label bytes, then the R, G and B planes of 32x32."""
    planes = np.asarray(pictures, np.uint8).transpose(0, 3, 1, 2).reshape(len(pictures), -1)
    labels = np.stack([np.asarray(c, np.uint8) for c in label_columns], axis=1)
    return np.concatenate([labels, planes], axis=1).tobytes()


def cifar10_members(names=True) -> dict[str, bytes]:
    members = {name: records(images(PER_BATCH, seed), np.arange(PER_BATCH) % 10)
               for seed, name in enumerate(CIFAR10_MEMBERS[:5])}
    members["test_batch.bin"] = records(images(N_TEST, 9), np.arange(N_TEST) % 10)
    if names:
        members["batches.meta.txt"] = "".join(f"c10-{i}\n" for i in range(10)).encode() + b"\n\n"
    return members


def cifar100_members(names=True) -> dict[str, bytes]:
    fine = np.arange(CIFAR100_TRAIN) % 100
    members = {"train.bin": records(images(CIFAR100_TRAIN, 1), fine // 5, fine),
               "test.bin": records(images(N_TEST, 2), np.arange(N_TEST) % 20, (np.arange(N_TEST) * 7) % 100)}
    if names:
        members["fine_label_names.txt"] = "".join(f"f{i}\n" for i in range(100)).encode()
        members["coarse_label_names.txt"] = "".join(f"c{i}\n" for i in range(20)).encode()
    return members


MEMBERS = {"cifar10": cifar10_members, "cifar100": cifar100_members}
FOLDER = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary"}
ARCHIVE = {"cifar10": "cifar-10-binary.tar.gz", "cifar100": "cifar-100-binary.tar.gz"}


def tar_bytes(members: dict[str, bytes], folder: str, gz=True, links=()) -> bytes:
    """A tar (gzip-compressed or not) of members under folder/, then symbolic links (name, target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}".removeprefix("./"))
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def write_archive(directory, name="cifar10", members=None, gz=True):
    directory.mkdir(parents=True, exist_ok=True)
    file = ARCHIVE[name] if gz else ARCHIVE[name][:-3]
    (directory / file).write_bytes(tar_bytes(MEMBERS[name]() if members is None else members, FOLDER[name], gz))
    return directory


def write_extracted(directory, name="cifar10", members=None):
    folder = directory / FOLDER[name]
    folder.mkdir(parents=True)
    for member, body in (MEMBERS[name]() if members is None else members).items():
        (folder / member).write_bytes(body)
    return directory


@pytest.fixture
def small(monkeypatch, tmp_path):
    """The CIFAR entries expecting this file's record counts; an empty search path (no $VGGKIT_DATA)."""
    monkeypatch.delenv("VGGKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for name, train in (("cifar10", 5 * PER_BATCH), ("cifar100", CIFAR100_TRAIN)):
        entry = D.REGISTRY[name]
        monkeypatch.setitem(D.REGISTRY, name, replace(entry, reader=replace(entry.reader, counts=(train, N_TEST))))
    return tmp_path


def load(name="cifar10", **kwargs):
    return D.load_data(name, val_size=0, download=False, log=lambda *_: None, **kwargs)


def error(name="cifar10", **kwargs) -> str:
    with pytest.raises(VggkitError) as e:
        load(name, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- reading

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_archive_and_extracted_folder_give_identical_arrays(small, name):
    from_gz = load(name, data_dir=write_archive(small / "gz", name))
    from_tar = load(name, data_dir=write_archive(small / "tar", name, gz=False))
    from_folder = load(name, data_dir=write_extracted(small / "x", name))
    inside_folder = load(name, data_dir=small / "x" / FOLDER[name])  # --data-dir naming the extracted folder
    assert "(archive)" in from_gz.source and "(extracted archive)" in from_folder.source
    n_train = 5 * PER_BATCH if name == "cifar10" else CIFAR100_TRAIN
    assert from_gz.train.images.shape == (n_train, 32, 32, 3) and from_gz.test.images.shape == (N_TEST, 32, 32, 3)
    for other in (from_tar, from_folder, inside_folder):
        for split in ("train", "test"):
            assert np.array_equal(getattr(from_gz, split).images, getattr(other, split).images)
            assert np.array_equal(getattr(from_gz, split).labels, getattr(other, split).labels)
    assert from_gz.flips_safe and len(from_gz.classes) == (10 if name == "cifar10" else 100)


def test_records_in_file_order_and_cifar100_fine_labels(small):
    cifar10 = load(data_dir=write_archive(small / "a"))
    first_ids = cifar10.train.images[:, 0, 0, 0].astype(int) * 256 + cifar10.train.images[:, 0, 0, 1]
    assert list(first_ids[:PER_BATCH + 2]) == [*range(PER_BATCH), 0, 1]  # batch 1, then batch 2
    assert np.array_equal(cifar10.train.images[:PER_BATCH], images(PER_BATCH, 0))
    cifar100 = load("cifar100", data_dir=write_archive(small / "b", "cifar100"))
    assert list(cifar100.test.labels[:3]) == [0, 7, 14]  # the fine label, not the coarse one
    assert cifar100.classes[:2] == ["f0", "f1"]


def test_pixel_layout_is_red_green_blue_planes(small):
    """One record built plane by plane: red 10, green 20, blue 30, except pixel (row 1, column 2)."""
    planes = np.zeros((3, 32, 32), np.uint8)
    planes[0], planes[1], planes[2] = 10, 20, 30
    planes[:, 1, 2] = (200, 100, 50)
    record = bytes([3]) + planes.tobytes()
    members = cifar10_members()
    members["test_batch.bin"] = record + members["test_batch.bin"][len(record):]
    test = load(data_dir=write_extracted(small, members=members)).test
    assert test.labels[0] == 3
    assert list(test.images[0, 1, 2]) == [200, 100, 50] and list(test.images[0, 2, 1]) == [10, 20, 30]
    assert list(test.images[0, 0, 0]) == [10, 20, 30]


@pytest.mark.parametrize("name, names_file, listed, builtin", [
    ("cifar10", "batches.meta.txt", "c10-1", ["airplane", "automobile"]),
    ("cifar100", "fine_label_names.txt", "f1", ["apple", "aquarium_fish"]),
])
def test_class_names_from_the_file_else_built_in(small, name, names_file, listed, builtin):
    members = MEMBERS[name]()
    assert load(name, data_dir=write_archive(small / "with", name, members)).classes[1] == listed
    del members[names_file]
    classes = load(name, data_dir=write_archive(small / "without", name, members)).classes
    assert classes[:2] == builtin and len(classes) == len(D.REGISTRY[name].classes)
    members[names_file] = b"only\ntwo\n"
    message = error(name, data_dir=write_extracted(small / "bad", name, members))
    assert names_file in message and "lists 2 class names" in message


def test_the_official_record_counts_are_checked():
    """Outside the `small` fixture, the registry expects the official numbers of records."""
    assert D.REGISTRY["cifar10"].reader.counts == (50_000, 10_000)
    assert D.REGISTRY["cifar100"].reader.counts == (50_000, 10_000)
    assert D.REGISTRY["cifar10"].val_size == 5000 and D.REGISTRY["cifar10"].flips_safe


# ---------------------------------------------------------------- bad input: one line naming the file and the fix

def damaged(name, member, change):
    members = MEMBERS[name]()
    members[member] = change(members[member])
    return members


@pytest.mark.parametrize("name, member, change, needles", [
    ("cifar10", "data_batch_3.bin", lambda b: b[:-100], ["truncated", "3,073-byte records"]),
    ("cifar10", "test_batch.bin", lambda b: b"", ["is empty"]),
    ("cifar10", "data_batch_2.bin", lambda b: b[:-3073], ["100 train records, found 99", "data_batch_2.bin 19"]),
    # one record too many: refused by its size, before it is read
    ("cifar100", "test.bin", lambda b: b + b[:3074], ["more than CIFAR-100's 40 test records of 3,074 bytes"]),
    ("cifar10", "data_batch_1.bin", lambda b: bytes([10]) + b[1:], ["record 0 has label 10", "10 classes"]),
    ("cifar100", "train.bin", lambda b: b[:3074 + 1] + bytes([100]) + b[3074 + 2:], ["record 1 has label 100",
                                                                                    "100 classes"]),
    ("cifar100", "train.bin", lambda b: bytes([20]) + b[1:], ["record 0 has label 20", "20 classes"]),
])
@pytest.mark.parametrize("where", ["archive", "extracted"])
def test_bad_record_files(small, name, member, change, needles, where):
    members = damaged(name, member, change)
    if where == "archive":
        message = error(name, data_dir=write_archive(small, name, members))
        assert str(small / ARCHIVE[name]) in message and member in message
    else:
        message = error(name, data_dir=write_extracted(small, name, members))
        assert str(small / FOLDER[name]) in message and member in message
    assert " again" in message
    for needle in needles:
        assert needle in message


def test_cifar100_file_in_the_cifar10_place_is_named_as_such(small):
    members = cifar10_members()
    members["test_batch.bin"] = records(images(3, 0), [0, 1, 2], [0, 1, 2]) * 3  # 9 records of 3,074 bytes
    message = error(data_dir=write_extracted(small, members=members))
    assert "test_batch.bin" in message and "other CIFAR version" in message


def test_tar_without_the_members(small):
    members = {f"cifar-10-batches-py/data_batch_{i}": b"pickle" for i in range(1, 6)}
    (small / ARCHIVE["cifar10"]).write_bytes(tar_bytes(members, "."))
    message = error(data_dir=small)
    assert str(small / ARCHIVE["cifar10"]) in message and "lacks cifar-10-batches-bin/data_batch_1.bin" in message
    assert "right archive" in message


def test_members_are_read_by_exact_name_never_extracted(small, monkeypatch):
    """A member with a path outside the folder is not written; a link named like a member is not followed."""
    escaping = {**cifar10_members(), "../../../escape.bin": b"x"}
    (small / "a").mkdir()
    (small / "a" / ARCHIVE["cifar10"]).write_bytes(tar_bytes(escaping, FOLDER["cifar10"]))
    monkeypatch.chdir(small / "a")
    assert len(load(data_dir=small / "a").train) == 5 * PER_BATCH
    assert [p.name for p in small.rglob("*") if p.is_file()] == [ARCHIVE["cifar10"]]
    assert not (small / "escape.bin").exists()

    members = {k: v for k, v in cifar10_members().items() if k != "test_batch.bin"}
    linked = tar_bytes(members, FOLDER["cifar10"], links=[(f"{FOLDER['cifar10']}/test_batch.bin", "/etc/passwd")])
    (small / "b").mkdir()
    (small / "b" / ARCHIVE["cifar10"]).write_bytes(linked)
    assert "lacks cifar-10-batches-bin/test_batch.bin" in error(data_dir=small / "b")


@pytest.mark.parametrize("damage", ["cut", "flipped", "not gzip"])
def test_damaged_gzip(small, damage):
    body = tar_bytes(cifar10_members(), FOLDER["cifar10"])
    if damage == "cut":
        body = body[: len(body) // 2]
    elif damage == "flipped":
        body = body[:200] + bytes(b ^ 0xFF for b in body[200:400]) + body[400:]
    else:
        body = b"\x1f\x8b" + b"garbage" * 100
    (small / ARCHIVE["cifar10"]).write_bytes(body)
    message = error(data_dir=small)
    assert str(small / ARCHIVE["cifar10"]) in message and "delete it and get it again" in message


def test_incomplete_extracted_folder_is_not_taken(small):
    members = cifar10_members()
    del members["data_batch_4.bin"]
    write_extracted(small, members=members)
    message = error(data_dir=small)
    assert "cifar10 not found" in message and "cifar-10-binary.tar.gz (or its extracted folder" in message
    assert "cifar-10-batches-bin/ there lacks some of" in message
    # ... while the archive beside it is taken
    write_archive(small)
    assert len(load(data_dir=small).train) == 5 * PER_BATCH


@pytest.mark.parametrize("layout", ["archive", "extracted"])
def test_a_cifar_folder_given_as_an_image_folder_says_to_use_the_name(small, layout):
    root = write_archive(small / "d") if layout == "archive" else write_extracted(small / "d") / FOLDER["cifar10"]
    with pytest.raises(VggkitError) as e:
        D.load_data(str(root))
    assert "files of cifar10: use the dataset's name with --data-dir" in str(e.value)


# ---------------------------------------------------------------- download (127.0.0.1)

def serve_archive(server, monkeypatch, name="cifar10", body=None, md5=None):
    good = tar_bytes(MEMBERS[name](), FOLDER[name])
    server.routes[f"/kriz/{ARCHIVE[name]}"] = [good if body is None else body]
    entry = D.REGISTRY[name]
    monkeypatch.setitem(D.REGISTRY, name, replace(entry, md5={ARCHIVE[name]: md5 or hashlib.md5(good).hexdigest()},
                                                  mirrors=(server.url("kriz"),)))
    return good


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_download_success(small, server, monkeypatch, name):
    good = serve_archive(server, monkeypatch, name)
    result = D.load_data(name, val_size=10, log=lambda *_: None)
    cache = small / "xdg" / "vggkit" / name
    assert f"{cache} (archive, downloaded from {server.url('kriz')})" == result.source
    assert sorted(p.name for p in cache.iterdir()) == [ARCHIVE[name]] and (cache / ARCHIVE[name]).read_bytes() == good
    assert len(result.val) == 10 and len(result.test) == N_TEST
    D.load_data(name, val_size=0, log=lambda *_: None)  # from the cache: no new request
    assert sum(server.hits.values()) == 1


def test_download_bad_md5_leaves_nothing(small, server, monkeypatch):
    serve_archive(server, monkeypatch, md5="0" * 32)
    with pytest.raises(VggkitError) as e:
        D.load_data("cifar10", log=lambda *_: None)
    message = str(e.value)
    assert "\n" not in message and "download failed" in message and "MD5" in message
    assert server.hits[f"/kriz/{ARCHIVE['cifar10']}"] == 2  # retried once from scratch
    cache = small / "xdg" / "vggkit" / "cifar10"
    assert not cache.exists() or not list(cache.iterdir())


def test_offline(small):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(VggkitError) as e:
        D.load_data("cifar100", mirrors=[f"http://127.0.0.1:{port}/"], log=lambda *_: None)
    message = str(e.value)
    assert "\n" not in message
    for part in ("cifar100 not found", "cifar-100-binary.tar.gz (or its extracted folder cifar-100-binary/)",
                 "download failed", "--data-dir", "$VGGKIT_DATA", f"by hand from http://127.0.0.1:{port}/cifar-100"):
        assert part in message


def test_the_registry_downloads_from_the_authors_site():
    for name in ("cifar10", "cifar100"):
        entry = D.REGISTRY[name]
        assert entry.mirrors == ("https://www.cs.toronto.edu/~kriz/",) and entry.files == (ARCHIVE[name],)
    assert D.REGISTRY["cifar10"].md5[ARCHIVE["cifar10"]] == "c32a1d4ab5d03f1284b67883e8d87530"
    assert D.REGISTRY["cifar100"].md5[ARCHIVE["cifar100"]] == "03b5dce01913d631647c71ecec9e9cb8"


# ---------------------------------------------------------------- train one step and evaluate

@pytest.mark.slow
def test_train_and_evaluate_on_cifar10(small):
    from vggkit.evaluate import evaluate
    from vggkit.train import train

    data_dir = str(write_archive(small / "data"))
    history = train({"data": "cifar10", "data_dir": data_dir, "epochs": 1, "limit": 64, "batch_size": 32,
                     "test_limit": 32, "val_size": 16, "out": str(small / "runs"), "name": "c", "input_size": 32,
                     "arch": "1x8,1x16", "fc_width": 16, "precision": "fp32"}, progress="none", log=lambda *a: None)
    assert len(history.epochs) == 1 and 0 <= history.test_acc <= 1
    result = evaluate(history.run_dir, data_dir=data_dir, test_limit=32, log=lambda *a: None)
    assert result["count"] == 32 and result["classes"][:2] == ["c10-0", "c10-1"]
    assert result["test_acc"] == pytest.approx(history.test_acc, abs=1e-9)


def test_cli_bad_cifar_file_is_one_line_exit_2(small, capsys):
    from vggkit.cli import main

    members = damaged("cifar10", "data_batch_1.bin", lambda b: b[:-1])
    code = main(["train", "--data", "cifar10", "--data-dir", str(write_archive(small / "d", members=members)),
                 "--out", str(small / "runs"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "data_batch_1.bin is truncated" in err
