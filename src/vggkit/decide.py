"""What `vggkit train --data ANY` decides from the data: the config.FROM_THE_DATA fields left None.

A value given by a flag, a TOML file or the recipe (d2l, best) is kept. A run that could not make
a step is refused in one line: a given batch larger than the training set (drop_last), or fewer
training images than the smallest batch decided here.

    val_size    10% of the training images (of --limit's when given), at most 5,000; a val/ tree as it is
    input_size  the images' own size (the longer side), at least 16 and 2**(blocks + 1) (a last
                feature map of 2x2 or more), at most max(64, 7 x 2**blocks) (VGG's 7x7 map);
                photos (streamed): 224, VGG's and ImageNet's, where their shorter side is 256 or more
                (the centre crop takes 224 of 256), else the largest multiple of 16 in 7/8 of it
    head_pool   photos whose last feature map is over 7x7: adaptive (averaged to VGG's 7x7)
    batch_size  the largest power of two up to 256 that gives an epoch 32 steps or more; at least 8;
                photos: no more than 1 GiB of the step's activations holds (cost.summary; the fast blocks
                at 224: 32), so that memory does not grow with the folder
    epochs      12, or more where an epoch is short: enough for 1,000 steps in all, at most 40
    flip        on only for data known to be flip-safe (Fashion-MNIST, CIFAR) and photos, off for MNIST and
                other folders
    tta         flip where the run trains with flips (the closing report adds the mirrored view's figure,
                0.1-0.2 points on Fashion-MNIST for a second), else off
    lr          0.1 at batch 256 (the fast recipe's peak), times (batch / 256) ** 0.25 for other batches:
                at batch 8 the unscaled 0.1 made a 180-photo folder diverge, the square-root rule's 0.018
                left a 54-image folder half-trained; 0.042 trained both (BENCHMARKS.md)
    balance     auto: class-balanced sampling where the largest training class has 3 times the images of the
                smallest or more, else off (balance.py; it beat a class-weighted loss on a 20:1 folder: BENCHMARKS.md)
    backbone_lr with initial weights (--init): the pretrained blocks learn at a tenth of lr, the
                classifier at lr (discriminative rates, as fastai's fine_tune and ULMFiT do)

On Fashion-MNIST these are the fast recipe's values: 5,000, 28, 256, 12 epochs, flip on, lr 0.1 and flip TTA.
decide() is pure: it reads the config and the data's sizes, and returns a new config with every
field set, and a note for each value it decided (the header line shows them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .balance import AUTO_REMEDY, DESCRIBED, IMBALANCE_RATIO, class_counts, imbalance
from .config import TrainConfig
from .data.registry import REGISTRY
from .errors import VggkitError
from .preprocess import storage_size
from .specs import parse_arch

if TYPE_CHECKING:
    from .data import DataSplits

VAL_FRACTION, MAX_VAL = 0.1, 5000
MIN_INPUT, MAX_INPUT = 16, 64
MIN_BATCH, MAX_BATCH = 8, 256
MIN_STEPS_PER_EPOCH = 32
# 12: the fast recipe's record on Fashion-MNIST in its time budget (BENCHMARKS.md); at most the best
# recipe's 40: past that a small set is only memorised
MIN_EPOCHS, MAX_EPOCHS = 12, 40
MIN_TOTAL_STEPS = 1000
PHOTO_ACTIVATIONS = 1 << 30  # bytes of a photo step's activations (peak RSS measured ~2x: BENCHMARKS.md)
REFERENCE_LR = 0.1  # the fast recipe's peak learning rate, at batch MAX_BATCH
PHOTO_INPUT = 224  # VGG's input, and what ImageNet weights were trained at
POOLED = 7  # VGG's last feature map (7x7 at 224)
BACKBONE_LR = 0.1  # pretrained blocks' learning rate, as a fraction of lr, with initial weights

# The rules in a few words, for --help.
RULES = {
    "val_size": f"{VAL_FRACTION:.0%}, at most {MAX_VAL:,}", "input_size": f"the images' own size, at least {MIN_INPUT}",
    "batch_size": f"{MAX_BATCH}, smaller for small sets", "epochs": f"{MIN_EPOCHS}, more for small sets",
    "flip": "on for flip-safe data sets only", "tta": "flip where the run trains with flips, else off",
    "lr": f"{REFERENCE_LR:g} at batch {MAX_BATCH}, x (batch/{MAX_BATCH})**0.25 for other batches",
}


@dataclass(frozen=True)
class DataFacts:
    """What the decisions look at."""
    name: str
    images: int  # training images before validation is carved (with a val/ tree: the train tree's)
    val_tree: int  # images in a val/ tree; 0: none, validation is carved from `images`
    height: int
    width: int
    known: bool  # a registered data set (not an image folder)
    flips_safe: bool  # known to stay in its class when mirrored
    photos: bool = False  # an image folder streamed from disk (folder.py): photo sizes and augmentation
    channels: int = 1
    class_counts: tuple[int, ...] = ()  # training images per class (before validation is carved)

    @classmethod
    def of(cls, splits: DataSplits) -> DataFacts:
        """The facts of splits as load_data(val_size=0) gives them (nothing carved yet)."""
        height, width = splits.image_size
        known = splits.name in REGISTRY  # an image folder's DataSplits says flips_safe=True: nobody checked
        return cls(splits.name, len(splits.train), len(splits.val), height, width, known,
                   known and splits.flips_safe, photos=splits.streamed is not None, channels=splits.train.channels,
                   class_counts=tuple(int(n) for n in class_counts(splits.train.labels, len(splits.classes))))


# What bench's random 28x28 images stand for when a recipe leaves fields to the data.
LIKE_FASHION_MNIST = DataFacts("fashion-mnist", 60_000, 0, 28, 28, known=True, flips_safe=True, channels=1)


def decide(config: TrainConfig, data: DataSplits | DataFacts, world_size: int = 1) -> tuple[TrainConfig, dict]:
    """(config with every FROM_THE_DATA field set, {field: why} for the values decided here or worth a word)."""
    facts = data if isinstance(data, DataFacts) else DataFacts.of(data)
    notes = {}
    val_size, notes["val_size"] = decide_val_size(config, facts)
    train_images = facts.images - (0 if facts.val_tree else val_size)
    if config.limit is not None:
        train_images = min(train_images, config.limit)
    input_size, notes["input_size"] = decide_input_size(config, facts)
    head_pool, notes["head_pool"] = decide_head_pool(config, facts, input_size)
    batch_size, notes["batch_size"] = decide_batch_size(replace(config, input_size=input_size, head_pool=head_pool),
                                                        facts, train_images, world_size)
    steps = train_images // batch_size if config.drop_last else math.ceil(train_images / batch_size)
    epochs, notes["epochs"] = decide_epochs(config, steps)
    flip, notes["flip"] = decide_flip(config, facts)
    lr, notes["lr"] = decide_lr(config, batch_size)
    backbone_lr, notes["backbone_lr"] = decide_backbone_lr(config)
    balance, notes["balance"] = decide_balance(config, facts)
    tta = config.tta if config.tta is not None else ("flip" if flip else "off")
    decided = replace(config, val_size=val_size, input_size=input_size, batch_size=batch_size, epochs=epochs,
                      flip=flip, lr=lr, tta=tta, head_pool=head_pool, backbone_lr=backbone_lr, balance=balance)
    return decided, {key: why for key, why in notes.items() if why}


def decide_val_size(config: TrainConfig, facts: DataFacts) -> tuple[int, str | None]:
    if facts.val_tree:
        ignored = "; val_size ignored" if config.val_size not in (None, facts.val_tree) else ""
        return facts.val_tree, f"the val/ folder{ignored}"
    if config.val_size is not None:
        if config.val_size >= facts.images:
            raise VggkitError(f"val_size {config.val_size:,} leaves no training images ({facts.name} has "
                              f"{facts.images:,}); use a smaller --val-size, or leave it out to decide it "
                              "from the data")
        return config.val_size, None
    pool = facts.images if config.limit is None else min(facts.images, config.limit)
    size = min(int(pool * VAL_FRACTION), MAX_VAL)
    if size == 0:
        return 0, "too few images to hold some out"
    return size, "10%" if size < MAX_VAL else f"10%, at most {MAX_VAL:,}"


def decide_input_size(config: TrainConfig, facts: DataFacts) -> tuple[int, str]:
    """The images' size, within what the architecture can use (see the module docstring)."""
    h, w = facts.height, facts.width
    images = f"{w}x{h} images"
    if config.input_size is not None:
        return config.input_size, "native" if (h, w) == (config.input_size,) * 2 else f"configured; {images}"
    blocks = len(parse_arch(config.arch, config.ratio or 1))  # ratio None: from the initial weights
    low, high = max(MIN_INPUT, 2 ** (blocks + 1)), max(MAX_INPUT, 7 * 2 ** blocks)
    if facts.photos:
        return photo_input_size(h, w, low)
    native = max(h, w)
    size = min(max(native, low), high)
    if size > native:
        return size, f"{images} upscaled"
    if size < native:
        return size, f"{images} downscaled"
    return size, "native" if h == w else f"{images}, the longer side"


def photo_input_size(h: int, w: int, low: int) -> tuple[int, str]:
    """Photos: PHOTO_INPUT where the centre crop of their shorter side allows it (see the module docstring)."""
    images = f"photos, {w}x{h} median"
    if min(h, w) >= storage_size(PHOTO_INPUT):
        return PHOTO_INPUT, f"{images}: VGG's and ImageNet's 224"
    size = max(low, int(min(h, w) * PHOTO_INPUT / storage_size(PHOTO_INPUT)) // 16 * 16)
    return size, f"{images}: smaller than {storage_size(PHOTO_INPUT)}, so under 224"


def decide_head_pool(config: TrainConfig, facts: DataFacts, input_size: int) -> tuple[str | None, str | None]:
    """Photos at an input whose last feature map is over VGG's 7x7: averaged to 7x7 (a dense layer over a
    28x28 map would hold 16 times the weights). Initial weights choose their own (pretrained.py)."""
    if config.head_pool is not None or config.init_from or not facts.photos:
        return config.head_pool, None
    blocks = len(parse_arch(config.arch, config.ratio or 1))
    if input_size // 2 ** blocks > POOLED:
        return "adaptive", f"{input_size // 2 ** blocks}x{input_size // 2 ** blocks} last feature map averaged to 7x7"
    return None, None


def decide_backbone_lr(config: TrainConfig) -> tuple[float | None, str | None]:
    """With initial weights and no --backbone-lr: BACKBONE_LR; otherwise as given (None: 1, one rate)."""
    if config.backbone_lr is None and config.init_from:
        return BACKBONE_LR, f"pretrained blocks at {BACKBONE_LR:g} x lr"
    return config.backbone_lr, None


def decide_batch_size(config: TrainConfig, facts: DataFacts, train_images: int,
                      world_size: int) -> tuple[int, str | None]:
    """The configured batch if an epoch has a step with it; else a power of two (see the module docstring)."""
    if config.batch_size is not None:
        if config.drop_last and config.batch_size > train_images:
            raise VggkitError(
                f"batch size {config.batch_size:,} is more than the {train_images:,} training images of "
                f"{facts.name}, so an epoch would have no step; use --batch-size {_power_of_two_up_to(train_images)} "
                "or less, "
                "or leave it out to decide it from the data")
        return config.batch_size, None
    if train_images < MIN_BATCH:
        raise VggkitError(
            f"{facts.name} has {train_images} training image(s){_of(facts, train_images)}, fewer than one batch of "
            f"{MIN_BATCH}; add images, or give --batch-size {max(train_images, 1)}")
    size, why = MAX_BATCH, "from the data"
    while size > MIN_BATCH and train_images / size < MIN_STEPS_PER_EPOCH:
        size //= 2
    if facts.photos:
        fits = _power_of_two_up_to(PHOTO_ACTIVATIONS // activation_bytes(config, facts.channels))
        if fits < size:
            size, why = max(fits, 1), f"what 1 GiB of activations holds at {config.input_size}"
    size = max(size // world_size * world_size, world_size)  # every process gets an equal share
    return size, why


def activation_bytes(config: TrainConfig, channels: int) -> int:
    """What one image's activations take in a training step of config's network (cost.summary, bf16
    unless the run is fp32), built on the meta device: no memory, no weights."""
    import torch

    from .cost import summary

    with torch.device("meta"):
        model = config.build_model(channels, 2)
    dtype = "float32" if config.precision == "fp32" else "bfloat16"
    return max(summary(model, batch_size=1, dtype=dtype).memory()["activations"], 1)


def decide_epochs(config: TrainConfig, steps_per_epoch: int) -> tuple[int, str | None]:
    if config.epochs is not None:
        return config.epochs, None
    enough = math.ceil(MIN_TOTAL_STEPS / max(steps_per_epoch, 1))
    return min(max(MIN_EPOCHS, enough), MAX_EPOCHS), "from the data"


def decide_lr(config: TrainConfig, batch_size: int) -> tuple[float, str | None]:
    """The peak learning rate, smaller for smaller batches (their gradients are noisier)."""
    if config.lr is not None:
        return config.lr, None
    if batch_size == MAX_BATCH:
        return REFERENCE_LR, None
    return round(REFERENCE_LR * (batch_size / MAX_BATCH) ** 0.25, 4), f"{REFERENCE_LR:g} x ({batch_size}/{MAX_BATCH})**0.25"


def decide_balance(config: TrainConfig, facts: DataFacts) -> tuple[str, str | None]:
    """auto: AUTO_REMEDY where the training classes are imbalanced (balance.imbalance), else off; a remedy
    given is kept. The note says the imbalance where there is one, and the remedy in use."""
    skew = imbalance(facts.class_counts)
    said = (f"classes imbalanced: {skew[0]:,} to {skew[1]:,} images per class, {skew[0] / skew[1]:.1f}:1 "
            f"({IMBALANCE_RATIO}:1 or more)") if skew else None
    if config.balance != "auto":
        if config.balance == "off":
            return "off", said and f"{said}; no balancing (--balance off)"
        return config.balance, f"{said + '; ' if said else ''}{DESCRIBED[config.balance]} (--balance {config.balance})"
    if skew is None:
        return "off", None
    return AUTO_REMEDY, f"{said}; {DESCRIBED[AUTO_REMEDY]} (--balance off for none)"


def decide_flip(config: TrainConfig, facts: DataFacts) -> tuple[bool, str | None]:
    if config.flip is not None:
        return config.flip, None
    if facts.flips_safe:
        return True, f"{facts.name} is flip-safe"
    if facts.photos:
        return True, "photos are flip-safe as a rule; --no-flip for text or signs"
    if facts.known:
        return False, f"no flip: {facts.name} is not flip-safe"
    return False, "no flip: unknown data may not be flip-safe; --flip turns it on"


def _power_of_two_up_to(n: int) -> int:
    return 2 ** max(int(math.log2(max(n, 1))), 0)


def _of(facts: DataFacts, train_images: int) -> str:
    return f" (of {facts.images} before validation and --limit)" if train_images < facts.images else ""
