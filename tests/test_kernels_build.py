"""Building and loading the C++ kernels (vggkit.kernels.build): why they are unavailable, said once;
a missing compiler named; a failed build falls back to PyTorch's ops; the cache folder's name."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from vggkit import kernels
from vggkit.kernels import build
from vggkit.model import VGG, set_kernels


@pytest.fixture
def fresh_notes(monkeypatch):
    monkeypatch.setattr(build, "_noted", set())


def test_switched_off_library_says_why_once(monkeypatch, capsys, fresh_notes):
    monkeypatch.setenv(build.SWITCH, "plain")
    library = build.KernelLibrary()
    assert not library.available() and not library.available()
    assert library.reason == "VGGKIT_KERNELS=plain"
    err = capsys.readouterr().err
    assert err == "vggkit: note: fast CPU kernels unavailable (VGGKIT_KERNELS=plain); using PyTorch's own ops\n"


def test_missing_compiler_is_named(monkeypatch, capsys, fresh_notes):
    monkeypatch.delenv(build.SWITCH, raising=False)
    monkeypatch.setenv("CXX", "/no/such/c++")
    library = build.KernelLibrary()
    assert not library.available()
    assert "no C++ compiler: /no/such/c++ not found" in library.reason
    assert capsys.readouterr().err.count("\n") == 1


def test_failed_build_falls_back_to_pytorchs_ops(monkeypatch, tmp_path, capsys, fresh_notes):
    """A compiler that fails (`false`) in an empty cache: the build fails, the model still trains."""
    if shutil.which("false") is None:
        pytest.skip("no `false` command to stand in for a broken compiler")
    monkeypatch.delenv(build.SWITCH, raising=False)
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    broken = build.KernelLibrary()
    monkeypatch.setattr(build, "LIBRARY", broken)
    model = VGG("1x4,1x8", in_channels=1, input_size=8, fc_width=8, num_classes=3)
    assert set_kernels(model, "fast") == "reordered"
    assert broken.reason.startswith("build failed")
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    assert kernels.why_not("max_pool_relu", (), x)  # PyTorch's ops, to the bit
    torch.testing.assert_close(kernels.max_pool_relu(x), torch.relu(F.max_pool2d(x, 2, 2)), rtol=0, atol=0)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    notes = [line for line in capsys.readouterr().err.splitlines() if "unavailable" in line]
    assert len(notes) == 1 and notes[0].startswith("vggkit: note: fast CPU kernels unavailable (build failed")


def test_compile_error_is_reported_in_one_line(monkeypatch, tmp_path, fresh_notes):
    if shutil.which(build.compiler()) is None:
        pytest.skip(f"no C++ compiler ({build.compiler()})")
    monkeypatch.delenv(build.SWITCH, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = tmp_path / "broken.cpp"
    source.write_text("#error broken on purpose\n")
    library = build.KernelLibrary(source)
    assert not library.available()
    assert library.reason.startswith("build failed: ") and "broken on purpose" in library.reason
    assert "\n" not in library.reason


@pytest.mark.slow
def test_a_finished_build_is_loaded_without_the_builder(fused, tmp_path):
    """Once built, a new process loads the library straight from the cache: no cpp_extension import
    (setuptools) and no ninja run at every start."""
    import subprocess
    import sys

    assert (build.LIBRARY.build_dir() / build.BUILT).is_file()
    probe = ("import sys; from vggkit.kernels import build; assert build.LIBRARY.available(), build.LIBRARY.reason; "
             "import torch; assert hasattr(torch.ops.vggkit, 'max_pool_relu'); "
             "print('torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == "False"


def test_a_damaged_or_unfinished_build_is_not_loaded(tmp_path):
    """BUILT naming a file that is gone or not what was built: the builder runs instead (and repairs
    it); tests/test_kernels_build_cache.py damages a real build."""
    assert build._load_built(tmp_path) is not None  # nothing built
    (tmp_path / build.BUILT).write_text("vggkit_kernels_gone.so 13 " + "0" * 64)
    assert build._load_built(tmp_path) is not None
    (tmp_path / "vggkit_kernels_bad.so").write_text("not a library")
    (tmp_path / build.BUILT).write_text("vggkit_kernels_bad.so 13 " + "0" * 64)
    assert build._load_built(tmp_path) is not None


def test_cache_folder_names_torch_and_the_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = build.KernelLibrary().build_dir()
    assert folder.parent == tmp_path / "vggkit" / "kernels"
    assert folder.name.startswith(torch.__version__ + "-")
    other = tmp_path / "other.cpp"
    other.write_text("// another source\n")
    assert build.KernelLibrary(other).build_dir() != folder
    first, *rest = build.SOURCES
    assert rest and build.KernelLibrary([first, other]).build_dir() != folder  # every source counts


def test_openmp_only_with_gcc_on_linux(monkeypatch):
    """at::parallel_for is OpenMP in torch's headers: without -fopenmp the kernels run on one thread."""
    monkeypatch.setattr(build.sys, "platform", "linux")
    monkeypatch.setattr(build, "_is_gcc", lambda command: True)
    assert build.openmp_flags() == (["-fopenmp"] if torch.backends.openmp.is_available() else [])
    monkeypatch.setattr(build, "_is_gcc", lambda command: False)
    assert build.openmp_flags() == []
    monkeypatch.setattr(build.sys, "platform", "darwin")
    monkeypatch.setattr(build, "_is_gcc", lambda command: True)
    assert build.openmp_flags() == []
