"""vggkit: define, cost, train fast and ship VGG-style networks.

    import vggkit
    history = vggkit.train({"preset": "fast"})        # same as `vggkit train`
    model = vggkit.load(history.run_dir)               # the best checkpoint, ready for inference
    print(vggkit.summary(model, batch_size=128).table())
"""
from .checkpoint import load_model
from .cost import summary
from .errors import VggkitError
from .model import VGG, vgg_block
from .specs import PRESETS, parse_arch
from .config import TrainConfig, resolve_config
from .train import train
from .evaluate import evaluate
from .predict import predict
from .export import export_model
from .convert import from_standard, load_standard, to_standard
from .features import FeatureExtractor, layer_names
from .pretrained import IMAGENET_MEAN, IMAGENET_STD, STANDARD_WEIGHTS, adapt, freeze_blocks, init_model, load_init

__all__ = ["VGG", "vgg_block", "PRESETS", "parse_arch", "VggkitError", "summary", "TrainConfig", "resolve_config",
           "train", "evaluate", "predict", "load",
           "export_model", "to_standard", "from_standard", "load_standard",
           "FeatureExtractor", "layer_names", "init_model", "load_init", "adapt", "freeze_blocks", "STANDARD_WEIGHTS",
           "IMAGENET_MEAN", "IMAGENET_STD"]
__version__ = "0.1.0"


def load(path, device="cpu"):
    """The model stored in a run directory (best checkpoint), checkpoint directory or weights file."""
    return load_model(path, device)[0]
