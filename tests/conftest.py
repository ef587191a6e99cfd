import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST = Path(os.environ.get("VGGKIT_TEST_DATA", ROOT.parent / "shared" / "data" / "fashion-mnist"))


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """The full Fashion-MNIST gz files (../shared/data/fashion-mnist in this repository's CI)."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_MNIST}; set VGGKIT_TEST_DATA")
    return FASHION_MNIST


@pytest.fixture(scope="session", autouse=True)
def prepared_cache(tmp_path_factory):
    """Photo folders that tests stream are prepared in a temporary cache, not the user's ~/.cache."""
    patch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("xdg-cache")
    patch.setattr("vggkit.data.prepared.cache_root", lambda: root / "vggkit" / "prepared")
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def fused():
    """The C++ kernels, built (or loaded from the cache) once per module; skipped without a compiler."""
    from helpers import require_kernels
    from vggkit import kernels

    require_kernels()
    return kernels.MaxPoolReLU.apply
