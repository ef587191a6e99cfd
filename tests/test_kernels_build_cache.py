"""The kernel cache (vggkit.kernels.build) under damage: a library that does not match the record of
its build (truncated, or a byte changed) is built again, never mapped (mapping a truncated one
crashed every command with SIGBUS); the locks a killed build leaves are not waited on; a live
builder is, and named; a rebuild that fails leaves PyTorch's own ops and one note.

Every case works on a copy of one finished build (the suite's own, built or loaded once) in a
temporary $XDG_CACHE_HOME, and loads it in a new process, as a command would."""
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import require_kernels

from vggkit.kernels import build

PROBE = ("from vggkit.kernels import build; import torch; "
         "print(build.LIBRARY.available() and hasattr(torch.ops.vggkit, 'max_pool_relu'))")
TIMEOUT = 300  # a relink takes seconds; a process waiting on a lock for ever fails here instead


@pytest.fixture(scope="module")
def finished_build() -> Path:
    require_kernels()
    return build.LIBRARY.build_dir()


@pytest.fixture
def cache(finished_build, tmp_path) -> Path:
    """A copy of the finished build's folder under tmp_path/cache (the $XDG_CACHE_HOME of the probes)."""
    folder = tmp_path / "cache" / "vggkit" / "kernels" / finished_build.name
    shutil.copytree(finished_build, folder, ignore=shutil.ignore_patterns(build.BUILD_LOCK, build.TORCH_LOCK))
    return folder


def library_of(folder: Path) -> Path:
    return folder / (folder / build.BUILT).read_text().split()[0]


def environment(folder: Path, **extra) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(folder.parents[2]), "PYTHONPATH": os.pathsep.join(sys.path), **extra}
    env.pop(build.SWITCH, None)
    return env


def load_in_new_process(folder: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=TIMEOUT,
                          env=environment(folder, **extra))


def notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("vggkit: note:")]


def truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def change_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated to half": (truncate_half, "bytes, its build"),
    "truncated to 4 KiB": (lambda p: os.truncate(p, 4096), "has 4,096 bytes"),
    "truncated to 64 KiB": (lambda p: os.truncate(p, 65536), "has 65,536 bytes"),
    "one byte changed": (change_one_byte, "SHA-256"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_every_damage_is_seen_before_the_library_is_mapped(cache, damage):
    spoil, why = DAMAGE[damage]
    spoil(library_of(cache))
    found, reason = build.verified_library(cache)
    assert found is None and why in reason


@pytest.mark.slow
def test_a_damaged_library_is_built_again_never_loaded(cache):
    """Before: SIGBUS (exit 135) in every later command until the cache was deleted by hand. One damage
    end to end (each rebuild compiles every kernel; every damage is seen: the test above)."""
    spoil, why = DAMAGE["truncated to half"]
    library = library_of(cache)
    intact = library.read_bytes()
    spoil(library)
    done = load_in_new_process(cache)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    [line] = notes(done.stderr)
    assert line.startswith(f"vggkit: note: the cached fast CPU kernels in {cache} do not match their build (")
    assert why in line and line.endswith("; building them again")
    assert build.verified_library(cache)[0] == library and library.stat().st_size == len(intact)
    again = load_in_new_process(cache)  # from now on loaded as it is: no note, no build
    assert (again.returncode, again.stdout.strip(), notes(again.stderr)) == (0, "True", [])


@pytest.mark.slow
def test_the_locks_of_a_killed_build_are_taken_over(cache):
    """A build killed before it linked: no library, no record, torch's lock file left and vggkit's
    lock naming a dead process. Before: every later run waited for ever after "building ..."."""
    library = library_of(cache)
    library.unlink()
    (cache / build.BUILT).unlink()
    (cache / build.TORCH_LOCK).write_text("")
    (cache / build.BUILD_LOCK).write_text(f"{dead_pid()}\n")
    done = load_in_new_process(cache)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert notes(done.stderr) == ["vggkit: note: building the fast CPU kernels (once per machine and PyTorch "
                                  "version, about a minute)"]
    assert not (cache / build.TORCH_LOCK).exists()
    assert build.verified_library(cache)[0] == library


@pytest.mark.slow
def test_a_live_builder_is_waited_for_and_named(cache):
    """While a live process holds the build lock, a process that needs a build waits (saying for whom);
    it goes on once that lock is released."""
    truncate_half(library_of(cache))
    fd = os.open(cache / build.BUILD_LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        waiting = subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=environment(cache))
        try:
            line = waiting.stderr.readline().strip()  # written before it blocks on the lock
            assert line == (f"vggkit: note: waiting for process {os.getpid()}, which is building the fast CPU "
                            f"kernels in {cache}")
            assert waiting.poll() is None
        except BaseException:
            waiting.kill()
            raise
    finally:
        os.close(fd)
    out, err = waiting.communicate(timeout=TIMEOUT)
    assert waiting.returncode == 0, err
    assert out.strip() == "True"
    assert "do not match their build" in err
    assert build.verified_library(cache)[0] is not None


@pytest.mark.slow
def test_a_rebuild_that_fails_leaves_pytorchs_ops_and_one_note(cache, tmp_path):
    """A damaged library and a compiler that now fails: the damaged file is still never mapped; the
    command goes on with PyTorch's ops and says so in one note."""
    real = shutil.which(build.compiler())
    broken = tmp_path / "c++"
    broken.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exec {real} --version\n'
                      'echo "error: compiler broken on purpose" >&2\nexit 1\n')
    broken.chmod(0o755)
    truncate_half(library_of(cache))
    for output in cache.glob("*.o"):  # so that the build compiles, not only links
        output.unlink()
    done = load_in_new_process(cache, CXX=str(broken))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    rebuilding, fallback = notes(done.stderr)
    assert "building them again" in rebuilding
    assert fallback.startswith("vggkit: note: fast CPU kernels unavailable (build failed: ")
    assert fallback.endswith("); using PyTorch's own ops")
    assert not list(cache.glob("vggkit_kernels_*.so")) and not (cache / build.BUILT).exists()


RECORDS = {
    "no record": (None, "no record of a finished build"),
    "a record from before sizes and digests": ("{name}\n", "built.txt is damaged"),
    "a record of another size": ("{name} 12 {digest}\n", "has 13 bytes, its build 12"),
    "a record of another digest": ("{name} 13 " + "0" * 64 + "\n", "SHA-256"),
    "a record naming a file elsewhere": ("../{name} 13 {digest}\n", "built.txt is damaged"),
    "a record naming a missing file": ("gone.so 13 {digest}\n", "gone.so is missing"),
}


@pytest.mark.parametrize("record", RECORDS)
def test_only_a_library_matching_its_record_counts_as_built(tmp_path, record):
    text, why = RECORDS[record]
    library = tmp_path / "vggkit_kernels_0.so"
    library.write_bytes(b"not a library")
    if text is not None:
        (tmp_path / build.BUILT).write_text(text.format(name=library.name, digest=build.file_sha256(library)))
    assert build.verified_library(tmp_path)[0] is None
    assert why in build.verified_library(tmp_path)[1]
    assert build._load_built(tmp_path) == build.verified_library(tmp_path)[1]


def test_a_matching_record_is_trusted(tmp_path):
    library = tmp_path / "vggkit_kernels_0.so"
    library.write_bytes(b"some bytes")
    (tmp_path / build.BUILT).write_text(f"{library.name} 10 {build.file_sha256(library)}\n")
    assert build.verified_library(tmp_path) == (library, "")


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
