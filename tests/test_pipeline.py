import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vggkit.data import Dataset
from vggkit.errors import VggkitError
from vggkit.pipeline import Augment, BatchLoader as _BatchLoader

ALL = Augment(crop_padding=2, flip=True, erasing=0.5)


def BatchLoader(data, batch_size, **kwargs):
    """The loader at the images' own size unless a test asks for another."""
    kwargs.setdefault("input_size", data.images.shape[1])
    return _BatchLoader(data, batch_size, **kwargs)


def dataset(n=50, size=8, channels=1, low=0):
    """Random images; label i = image index, so batches can be traced back to images."""
    images = np.random.default_rng(n).integers(low, 256, (n, size, size, channels), dtype=np.uint8)
    return Dataset(images, np.arange(n, dtype=np.int64), [str(i) for i in range(n)])


def originals(data, y, mean=0.0, std=1.0):
    """The un-augmented, normalized images for labels y, N x C x H x W."""
    x = torch.from_numpy(data.images[y.numpy()]).permute(0, 3, 1, 2).float()
    return (x / 255 - mean) / std


def same(a, b):
    """Equal up to float rounding (the loader computes x * (1/(255 std)) - mean/std)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-6)


def collect(loader):
    return list(loader)


def test_shapes_dtypes_lengths():
    data = dataset(50)
    loader = BatchLoader(data, 16)
    batches = collect(loader)
    assert len(loader) == 4 and len(batches) == 4 and loader.num_samples == 50
    x, y = batches[0]
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert batches[-1][0].shape == (2, 1, 8, 8)
    dropping = BatchLoader(data, 16, drop_last=True)
    assert len(dropping) == 3 and dropping.num_samples == 48
    assert [len(x) for x, _ in dropping] == [16, 16, 16]
    assert len(BatchLoader(data.subset([]), 8)) == 0 and list(BatchLoader(data.subset([]), 8)) == []


def test_normalization():
    data = dataset(20, channels=3)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    x, y = next(iter(BatchLoader(data, 20, mean=mean, std=std)))
    expected = originals(data, y, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))
    assert torch.allclose(x, expected, atol=1e-5)
    assert torch.equal(y, torch.arange(20))  # no shuffle: in order
    with pytest.raises(VggkitError, match="2 values for 3-channel"):
        BatchLoader(data, 4, mean=(0.1, 0.2))


def test_resize_matches_interpolate():
    data = dataset(6, size=28)
    x, y = next(iter(BatchLoader(data, 6, input_size=224, mean=(0.3,), std=(0.2,))))
    expected = F.interpolate(originals(data, y, 0.3, 0.2), size=(224, 224), mode="bilinear", align_corners=False)
    assert x.shape == (6, 1, 224, 224) and torch.allclose(x, expected, atol=1e-5)


def test_shuffle_is_seeded_per_epoch():
    data = dataset(50)

    def order(seed, epoch):
        loader = BatchLoader(data, 16, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader])

    first = order(0, 0)
    assert sorted(first.tolist()) == list(range(50))  # each image once per epoch
    assert torch.equal(first, order(0, 0))
    assert not torch.equal(first, order(0, 1)) and not torch.equal(first, order(1, 0))


def test_iter_from_reproduces_the_tail():
    data = dataset(70)
    loader = BatchLoader(data, 16, shuffle=True, seed=5, augment=ALL, input_size=12)
    loader.set_epoch(3)
    full = collect(loader)
    fresh = BatchLoader(data, 16, shuffle=True, seed=5, augment=ALL, input_size=12)
    fresh.set_epoch(3)
    tail = list(fresh.iter_from(2))
    assert len(tail) == len(full) - 2
    for (x, y), (xt, yt) in zip(full[2:], tail):
        assert torch.equal(x, xt) and torch.equal(y, yt)
    assert list(fresh.iter_from(len(fresh))) == []
    with pytest.raises(VggkitError, match="cannot start at batch 9"):
        fresh.iter_from(9)


def test_augmentation_off_changes_nothing():
    data = dataset(30)
    for augment in (None, Augment()):
        x, y = next(iter(BatchLoader(data, 30, augment=augment, shuffle=True)))
        assert same(x, originals(data, y))


def test_flip():
    data = dataset(40)
    x, y = next(iter(BatchLoader(data, 40, augment=Augment(flip=True))))
    orig = originals(data, y)
    flipped = torch.tensor([same(a, b.flip(-1)) for a, b in zip(x, orig)])
    unchanged = torch.tensor([same(a, b) for a, b in zip(x, orig)])
    assert (flipped ^ unchanged).all() and 5 < flipped.sum() < 35


def test_crop():
    data = dataset(40, low=1)  # no zero pixels: zeros come from the padding
    pad = 2
    x, y = next(iter(BatchLoader(data, 40, augment=Augment(crop_padding=pad))))
    orig = F.pad(originals(data, y), (pad,) * 4)
    moved = 0
    for a, b in zip(x, orig):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if same(a, b[:, dy:dy + 8, dx:dx + 8])]
        assert len(matches) == 1
        moved += matches[0] != (pad, pad)
    assert moved > 20


def test_erasing():
    data = dataset(40, low=1)
    x, y = next(iter(BatchLoader(data, 40, input_size=16, augment=Augment(erasing=1.0))))
    plain = next(iter(BatchLoader(data, 40, input_size=16)))[0]
    for a, b in zip(x, plain):
        erased = a[0] == 0
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        assert erased.sum() > 0
        box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and erased.sum() == box.numel()  # one filled rectangle
        assert torch.equal(a[0][~erased], b[0][~erased])  # the rest untouched
    half = next(iter(BatchLoader(data, 40, input_size=16, augment=Augment(erasing=0.5))))[0]
    n_erased = sum(bool((a == 0).any()) for a in half)
    assert 5 < n_erased < 35


def test_distributed_shards_union_is_the_global_batch():
    data = dataset(50)
    kwargs = dict(shuffle=True, seed=2, augment=ALL, input_size=10)
    single = BatchLoader(data, 16, **kwargs)
    single.set_epoch(1)
    expected = collect(single)
    ranks = [BatchLoader(data, 16, rank=r, world_size=4, **kwargs) for r in range(4)]
    for loader in ranks:
        loader.set_epoch(1)
    per_rank = [collect(loader) for loader in ranks]
    assert all(len(batches) == len(expected) == len(loader) for batches, loader in zip(per_rank, ranks))
    for i, (x, y) in enumerate(expected):
        assert torch.equal(torch.cat([b[i][0] for b in per_rank]), x)
        assert torch.equal(torch.cat([b[i][1] for b in per_rank]), y)
    # last global batch has 2 images: ranks 0 and 1 get one each, ranks 2 and 3 an empty part
    assert [len(b[-1][0]) for b in per_rank] == [1, 1, 0, 0]
    assert per_rank[3][-1][0].shape == (0, 1, 10, 10)
    assert [loader.num_samples for loader in ranks] == [13, 13, 12, 12]


def test_batch_size_must_divide_by_world_size():
    with pytest.raises(VggkitError) as e:
        BatchLoader(dataset(10), 10, world_size=4)
    assert "10" in str(e.value) and "4" in str(e.value)


def test_formats_and_channels():
    data = dataset(8, channels=3)
    x, _ = next(iter(BatchLoader(data, 8, channels_last=True, input_size=16)))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (8, 3, 16, 16)
    x, _ = next(iter(BatchLoader(data, 8, dtype=torch.bfloat16)))
    assert x.dtype == torch.bfloat16
    gray = dataset(8)
    x, y = next(iter(BatchLoader(gray, 8, out_channels=3)))
    assert x.shape == (8, 3, 8, 8) and x.is_contiguous()
    assert same(x, originals(gray, y).expand(-1, 3, -1, -1))
    with pytest.raises(VggkitError):
        BatchLoader(data, 8, out_channels=1)


def test_bad_augment_settings():
    with pytest.raises(VggkitError):
        Augment(erasing=1.5)
    with pytest.raises(VggkitError):
        Augment(crop_padding=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_batches_match_cpu():
    data = dataset(40)
    kwargs = dict(shuffle=True, seed=1, augment=ALL, input_size=16)
    for (x, y), (xc, yc) in zip(BatchLoader(data, 16, **kwargs), BatchLoader(data, 16, device="cuda", **kwargs)):
        assert xc.is_cuda and torch.equal(y, yc.cpu()) and torch.allclose(x, xc.cpu(), atol=1e-5)
