"""Build the C++ kernels at first use and load them; the build is cached per machine.

The sources (SOURCES) make one library, in <cache>/vggkit/kernels/<torch version>-<hash>, <cache>
being $XDG_CACHE_HOME or ~/.cache; the hash covers the sources (and the headers they include), the
compiler flags, Python's version, the CPU (the build targets the CPU it runs on) and CACHE_FORMAT.
torch.utils.cpp_extension builds it with ninja (a vggkit dependency) and the C++ compiler ($CXX,
else c++), with OpenMP where that is torch's (openmp_flags); once built and loaded, a file BUILT
records its name, size and SHA-256, and a later process loads it straight away (torch.ops.load_library:
no cpp_extension import, no ninja run) once the file matches that record. A library that does not
(truncated, damaged, or a build that never finished) is never mapped: mapping a truncated library
crashes the process (SIGBUS) at the first page past its end. It is removed and built again.

One process builds in a folder at a time: it holds BUILD_LOCK (flock; its PID inside, for the note
of a process that waits). The kernel releases that lock when its holder dies, however it ends, so a
killed build never leaves a lock to wait on forever; the next builder also removes the lock file of
torch's builder that such a build leaves (only a holder of BUILD_LOCK builds there). Without flock
(Windows) torch's lock file is the only guard.

Where the library cannot be had (VGGKIT_KERNELS=plain, no compiler, a failed build) the process
says so once on stderr and vggkit uses PyTorch's own ops.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: torch's own lock file is the only guard
    fcntl = None

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cpp")))  # every kernel: a new op's .cpp needs no line here
SWITCH = "VGGKIT_KERNELS"  # set to "plain": never build or load the kernels
BUILT = "built.txt"  # in the build folder: "<library file name> <size> <sha256>", written once it built and loaded
BUILD_LOCK = "vggkit-build.lock"  # in the build folder: flock'ed by the one process building there
TORCH_LOCK = "lock"  # torch's builder's own lock file (torch.utils.file_baton), left behind by a killed build
CACHE_FORMAT = b"built.txt with size and SHA-256; flock"  # in the hash: a vggkit that kept the cache otherwise builds elsewhere


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vggkit" / "kernels"


def compiler() -> str:
    return os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")


def compiler_flags() -> list[str]:
    if sys.platform == "win32":
        return ["/O2"]
    flags = ["-O3", *openmp_flags()]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")  # AVX-512 / AVX2 for the loops over channels; hence the CPU in the hash
    return flags


def openmp_flags() -> list[str]:
    """["-fopenmp"] where torch's threads are OpenMP's and the compiler is GCC (Linux): at::parallel_for
    is an OpenMP loop in torch's headers, which a library built without the flag runs on one thread.
    The library then uses libgomp.so.1, the runtime torch has already loaded. Elsewhere (clang would
    bring another runtime) nothing: the kernels run on one thread."""
    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"] if _is_gcc(compiler()) else []


@functools.lru_cache(maxsize=None)
def _is_gcc(command: str) -> bool:
    try:
        out = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=30).stdout.lower()
    except (OSError, subprocess.SubprocessError):
        return False
    return "free software foundation" in out and "clang" not in out


def cpu_fingerprint() -> str:
    """The CPU's name and instruction-set flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


class KernelLibrary:
    """The C++ kernels of one or more source files, one library: built or loaded on the first
    `available()` call, which remembers the outcome for the process (`reason` says why they are
    unavailable)."""

    def __init__(self, sources: Path | Sequence[Path] = SOURCES):
        self.sources = (Path(sources),) if isinstance(sources, (str, os.PathLike)) else tuple(map(Path, sources))
        self.reason: str | None = None
        self._tried = False
        self._lock = threading.Lock()

    def available(self) -> bool:
        with self._lock:
            if not self._tried:
                self._tried = True
                self.reason = self._load()
                if self.reason:
                    note(f"fast CPU kernels unavailable ({self.reason}); using PyTorch's own ops")
        return self.reason is None

    def digest(self) -> str:
        parts = [*source_texts(self.sources), " ".join(compiler_flags()).encode(),
                 torch.__version__.encode(), sys.version.split()[0].encode(), cpu_fingerprint().encode(), CACHE_FORMAT]
        return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]

    def build_dir(self) -> Path:
        return cache_root() / f"{torch.__version__}-{self.digest()}"

    def _load(self) -> str | None:
        """None once the library is loaded, else why not."""
        if os.environ.get(SWITCH, "").lower() == "plain":
            return f"{SWITCH}=plain"
        if shutil.which(compiler()) is None:
            return f"no C++ compiler: {compiler()} not found; install one (e.g. g++) or set CXX"
        try:
            return self._build_and_load()
        except Exception as e:  # a failed build or load of any kind: the plain path still works
            return f"build failed: {_first_error(str(e)) or type(e).__name__}"

    def _build_and_load(self) -> None:
        folder = self.build_dir()
        if _load_built(folder) is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        with _build_lock(folder):
            why_not = _load_built(folder)  # None: another process built it while this one waited
            if why_not is not None:
                self._build(folder, why_not)
        return None

    def _build(self, folder: Path, why_not: str) -> None:
        """Build the library in folder (whose BUILD_LOCK this process holds), load it and record it in BUILT."""
        from torch.utils import cpp_extension

        name = f"vggkit_kernels_{self.digest()}"
        damaged = _libraries(folder, name)
        if damaged:
            note(f"the cached fast CPU kernels in {folder} do not match their build ({why_not}); building them again")
        else:
            note("building the fast CPU kernels (once per machine and PyTorch version, about a minute)")
        (folder / BUILT).unlink(missing_ok=True)
        for library in damaged:  # else ninja would call it up to date and cpp_extension map it
            library.unlink()
        if fcntl is not None:  # this process holds BUILD_LOCK: torch's lock file is a killed build's
            (folder / TORCH_LOCK).unlink(missing_ok=True)
        with _ninja_on_path(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's compiler-version and ABI warnings
            cpp_extension.load(name=name, sources=[str(source) for source in self.sources],
                               extra_cflags=compiler_flags(), extra_ldflags=openmp_flags(),
                               build_directory=str(folder), is_python_module=False, verbose=False)
        built = _libraries(folder, name)
        if built:
            from ..atomic import atomic_write_text

            atomic_write_text(folder / BUILT, f"{built[0].name} {built[0].stat().st_size} {file_sha256(built[0])}\n")


def _libraries(folder: Path, name: str) -> list[Path]:
    return [f for f in folder.glob(f"{name}.*") if f.suffix in (".so", ".pyd", ".dylib")]


def verified_library(folder: Path) -> tuple[Path | None, str]:
    """(the library a complete build left in folder, ""), or (None, why there is none: the record BUILT is
    missing or damaged, the library is missing, or its size or SHA-256 differ from the record's)."""
    try:
        fields = (folder / BUILT).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None, "no record of a finished build"
    if len(fields) != 3 or Path(fields[0]).name != fields[0] or not fields[1].isdigit():
        return None, f"{BUILT} is damaged"
    library, size, digest = folder / fields[0], int(fields[1]), fields[2]
    if not library.is_file():
        return None, f"{library.name} is missing"
    if library.stat().st_size != size:
        return None, f"{library.name} has {library.stat().st_size:,} bytes, its build {size:,}"
    if file_sha256(library) != digest:
        return None, f"the SHA-256 of {library.name} differs from its build's"
    return library, ""


def _load_built(folder: Path) -> str | None:
    """Load the library a finished build left in `folder` once it matches its record (verified_library):
    None when loaded, else why not (there is none, it does not match or it does not load: build it again)."""
    library, why_not = verified_library(folder)
    if library is None:
        return why_not
    try:
        torch.ops.load_library(str(library))
        return None
    except (OSError, RuntimeError) as e:
        return f"it does not load: {_first_error(str(e)) or type(e).__name__}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _build_lock(folder: Path):
    """Hold folder/BUILD_LOCK: wait while a live process builds there (saying which), never for a dead one."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder / BUILD_LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            note(f"waiting for process {holder}, which is building the fast CPU kernels in {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


_LOCAL_INCLUDE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)


def source_texts(sources: Sequence[Path]) -> list[bytes]:
    """The text of each source, each followed by that of the headers it includes with #include "name"
    (found beside the including file, themselves searched in turn): each file once. A changed header
    must change the hash, or a stale library would be loaded."""
    texts, seen = [], set()

    def add(path: Path) -> None:
        if path in seen:
            return
        seen.add(path)
        text = path.read_bytes()
        texts.append(text)
        for name in _LOCAL_INCLUDE.findall(text):
            header = path.parent / name.decode()
            if header.is_file():
                add(header)

    for source in sources:
        add(source)
    return texts


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower()]  # a compiler's "file:line:col: error: ..."
    line = (errors or lines or [""])[0]
    return line if len(line) <= 160 else line[:157] + "..."


@contextmanager
def _ninja_on_path():
    """torch's builder runs `ninja` from PATH; the ninja package's copy lies beside a venv's python,
    which is not on PATH when the venv is not activated."""
    folders = [os.path.dirname(sys.executable)]
    try:
        import ninja

        folders.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([*folders, before])
    try:
        yield
    finally:
        os.environ["PATH"] = before


_noted: set[str] = set()


def note(text: str) -> None:
    """One line on stderr, once per process."""
    if text not in _noted:
        _noted.add(text)
        print(f"vggkit: note: {text}", file=sys.stderr)


LIBRARY = KernelLibrary()
