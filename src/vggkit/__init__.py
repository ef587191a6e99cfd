"""vggkit: define, cost, train fast and ship VGG-style networks."""
from .errors import VggkitError
from .model import VGG, vgg_block
from .specs import PRESETS, parse_arch

__all__ = ["VGG", "vgg_block", "PRESETS", "parse_arch", "VggkitError"]
__version__ = "0.1.0"
