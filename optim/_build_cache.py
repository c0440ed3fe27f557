"""The on-disk cache of the C++ build: one directory per build key, a lock that a killed build cannot leave
stuck, and a digest that a damaged library cannot get past.

- **Key.** The directory is ``fusedoptim_cpu-<key>``, the key a hash of the sources' and headers' contents, the
  flags, the torch and Python versions, and where torch's and Python's headers are: not of the checkout's path, so
  another clone of the same sources reuses the build, and a changed source never loads a stale one. The header
  directories are in it because torch writes them into ``build.ninja``: two virtual environments with one torch
  version shared a directory without them, each load rewrote the other's ``build.ninja``, and ninja recompiled
  the whole library in place (94 s on 2 cores) at every switch.
- **Lock.** One build at a time per directory: ``build.lock`` is created exclusively and names its owner (pid,
  host, start time). A lock whose owner is gone (its pid is not alive on this host) or that is older than
  ``STALE_AFTER_S`` is stale: it is removed, and torch's own ``lock`` file with it (a build killed by SIGKILL or
  SIGTERM leaves that one behind, and torch then waits on it forever). A live owner is waited for, at most
  ``WAIT_S``; then ``BuildLockTimeout``.
- **Digest.** A finished build writes the library's SHA-256 beside it. A library without its digest, or whose
  bytes do not match (a truncated copy, a disk error), is deleted before anything loads it (dlopen of a truncated
  library is SIGBUS or SIGSEGV: a crash, not an exception), and the build relinks it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

LIBRARY = "fusedoptim_cpu.so"
DIGEST = LIBRARY + ".sha256"
LOCK = "build.lock"
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton
#: A build takes 1-4 minutes on 2 cores (measured); a lock this old belongs to no build still running.
STALE_AFTER_S = 30 * 60
#: How long a process waits for another one's build before it gives up (auto then falls back, cpu raises).
WAIT_S = 15 * 60
POLL_S = 0.5


class BuildLockTimeout(TimeoutError):
    """Another process held the build lock for longer than we wait."""


def header_dirs() -> list[str]:
    """Where the build's headers come from, as torch's ``load()`` names them in ``build.ninja``: torch's install
    directory and Python's include directory."""
    return [str(Path(torch.__file__).resolve().parent), sysconfig.get_paths()["include"]]


def build_key(source_dir: Path, names: Sequence[str], flags: Sequence[str]) -> str:
    """16 hex digits of SHA-256 over the named files' names and contents, the flags, the torch and Python versions
    and their header directories: what the library and its build commands depend on, and nothing else."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0" + (source_dir / name).read_bytes() + b"\0")
    h.update(json.dumps([list(flags), torch.__version__, sys.version_info[:2], sys.platform, header_dirs()]).encode())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_library(directory: Path) -> str | None:
    """None when ``directory`` holds no library or a library that matches its recorded digest; else what is
    wrong with it, after deleting it (and its digest) so that the build makes a new one."""
    library, digest = directory / LIBRARY, directory / DIGEST
    if not library.exists():
        digest.unlink(missing_ok=True)
        return None
    expected = digest.read_text().strip() if digest.exists() else None
    actual = file_digest(library)
    if expected == actual:
        return None
    problem = ("it has no recorded digest (a build that did not finish)" if expected is None
               else f"its SHA-256 {actual[:12]}... is not the recorded {expected[:12]}...")
    library.unlink()
    digest.unlink(missing_ok=True)
    return f"the cached {library} was not loaded: {problem}; it is rebuilt"


def record_library(directory: Path) -> None:
    """Write the library's digest beside it (after a build, or to adopt a library built before digests)."""
    library = directory / LIBRARY
    if library.exists():
        tmp = directory / (DIGEST + f".{os.getpid()}")
        tmp.write_text(file_digest(library) + "\n")
        tmp.replace(directory / DIGEST)


def record_if_rebuilt(directory: Path) -> bool:
    """After a load under the lock: record the library's digest when it has none or the library is newer than it
    (ninja relinked it in place: a changed compiler or header made it stale). ``verify_library`` ran before the
    load, so a library here is one that matched its digest or one the build just wrote. True when recorded."""
    library, digest = directory / LIBRARY, directory / DIGEST
    if not library.exists():
        return False
    if digest.exists() and digest.stat().st_mtime_ns >= library.stat().st_mtime_ns:
        return False
    record_library(directory)
    return True


def _owner_alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine on a shared disk: only its age can tell
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def stale_reason(lock: Path, now: float | None = None) -> str | None:
    """Why the lock at ``lock`` is stale (its owner is gone, or it is too old), or None while it is live."""
    try:
        owner = json.loads(lock.read_text() or "{}")
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        owner, age = {}, (time.time() if now is None else now) - lock.stat().st_mtime
    if age > STALE_AFTER_S:
        return f"it is {age / 60:.0f} minutes old"
    if owner and not _owner_alive(owner):
        return f"its owner, process {owner.get('pid')}, is gone"
    if not owner and age > 60:  # unreadable for a minute: never written by a live build
        return "it names no owner"
    return None


@contextmanager
def build_lock(directory: Path, wait_s: float | None = None, log=None) -> Iterator[None]:
    """Hold ``directory``'s build lock: taken exclusively, a stale one removed (with torch's stale ``lock``), a
    live one waited for at most ``wait_s`` seconds (``WAIT_S``)."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK
    wait_s = WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            reason = stale_reason(lock)
            if reason is not None:
                if log is not None:
                    log.warning("fusedoptim: removing the stale C++ build lock %s (%s)", lock, reason)
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() >= deadline:
                raise BuildLockTimeout(f"another process has been building the C++ kernels in {directory} for "
                                       f"longer than {wait_s:.0f} s (lock {lock})") from None
            if not waited and log is not None:
                log.warning("fusedoptim: waiting for another process's C++ build in %s", directory)
            waited = True
            time.sleep(POLL_S)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
        break
    try:
        # We hold the only lock of this directory: torch's lock, if any, is a killed build's.
        (directory / TORCH_LOCK).unlink(missing_ok=True)
        yield
    finally:
        lock.unlink(missing_ok=True)
