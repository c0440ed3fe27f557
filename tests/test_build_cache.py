"""The C++ build cache (optim/_build_cache.py): a key of the sources' contents, a lock a killed build cannot leave
stuck, a digest a damaged library cannot get past, and a first build that says what it is doing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from fusedoptim import _build_cache, _cpu
from fusedoptim._build_cache import DIGEST, LIBRARY, LOCK, TORCH_LOCK


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _lock(directory, pid, age_s=0.0):
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK
    lock.write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "started": time.time() - age_s}))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_the_key_is_the_sources_contents_not_their_path(tmp_path):
    names = _cpu.SOURCES + _cpu.HEADERS
    for clone in ("a", "b"):
        shutil.copytree(_cpu.sources_dir(), tmp_path / clone, ignore=shutil.ignore_patterns("__pycache__"))
    key = _build_cache.build_key(tmp_path / "a", names, _cpu._CFLAGS)
    assert key == _build_cache.build_key(tmp_path / "b", names, _cpu._CFLAGS)  # another clone: the same build
    with open(tmp_path / "b" / "adan.h", "a") as f:
        f.write("\n")
    assert key != _build_cache.build_key(tmp_path / "b", names, _cpu._CFLAGS)  # a changed header: a new build
    assert key != _build_cache.build_key(tmp_path / "a", names, [*_cpu._CFLAGS, "-O2"])


def test_the_key_is_torchs_install_directory_too(tmp_path, monkeypatch):
    """Two virtual environments with one torch version: torch writes its header directory into build.ninja, so a
    shared build directory was recompiled in place at every switch between them."""
    names = _cpu.SOURCES + _cpu.HEADERS
    key = _build_cache.build_key(_cpu.sources_dir(), names, _cpu._CFLAGS)
    assert key == _build_cache.build_key(_cpu.sources_dir(), names, _cpu._CFLAGS)
    other_torch = tmp_path / "other-venv" / "site-packages" / "torch"
    other_torch.mkdir(parents=True)
    monkeypatch.setattr(_build_cache.torch, "__file__", str(other_torch / "__init__.py"))
    assert str(other_torch) in _build_cache.header_dirs()
    assert key != _build_cache.build_key(_cpu.sources_dir(), names, _cpu._CFLAGS)


def test_a_library_relinked_in_place_gets_its_digest_recorded_again(tmp_path):
    """A load that made ninja relink the library (its digest older than it) records the new digest, so that the
    next process does not find a mismatch and rebuild again; an unchanged library is not hashed again."""
    library, digest = tmp_path / LIBRARY, tmp_path / DIGEST
    assert not _build_cache.record_if_rebuilt(tmp_path)  # nothing built
    library.write_bytes(b"\x7fELF" + bytes(1000))
    assert _build_cache.record_if_rebuilt(tmp_path)  # a first build: no digest yet
    assert not _build_cache.record_if_rebuilt(tmp_path)  # loaded as it was
    library.write_bytes(b"\x7fELF" + bytes(2000))  # relinked by ninja
    os.utime(library, ns=(digest.stat().st_mtime_ns + 10**9,) * 2)
    assert _build_cache.record_if_rebuilt(tmp_path)
    assert _build_cache.verify_library(tmp_path) is None and library.exists()


def test_a_library_that_does_not_match_its_digest_is_deleted_before_it_loads(tmp_path):
    library = tmp_path / LIBRARY
    library.write_bytes(b"\x7fELF" + bytes(1000))
    _build_cache.record_library(tmp_path)
    assert _build_cache.verify_library(tmp_path) is None and library.exists()
    library.write_bytes(b"\x7fELF" + bytes(500))  # truncated
    assert "is not the recorded" in _build_cache.verify_library(tmp_path)
    assert not library.exists() and not (tmp_path / DIGEST).exists()
    library.write_bytes(b"\x7fELF")  # a build that died before recording its digest
    assert "no recorded digest" in _build_cache.verify_library(tmp_path) and not library.exists()


@pytest.mark.parametrize("stale", ["dead owner", "too old"])
def test_a_stale_lock_is_removed_with_torchs(tmp_path, stale, caplog):
    lock = _lock(tmp_path, _dead_pid() if stale == "dead owner" else os.getpid(),
                 age_s=0 if stale == "dead owner" else _build_cache.STALE_AFTER_S + 60)
    (tmp_path / TORCH_LOCK).write_text("")  # what a build killed inside torch's cpp_extension leaves
    with caplog.at_level(logging.WARNING), _build_cache.build_lock(tmp_path, wait_s=1.0,
                                                                  log=logging.getLogger("fusedoptim")):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not (tmp_path / TORCH_LOCK).exists()
    assert not lock.exists()
    assert "removing the stale C++ build lock" in caplog.text
    assert ("is gone" if stale == "dead owner" else "minutes old") in caplog.text


def test_a_live_lock_is_waited_for_a_bounded_time_then_auto_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDOPTIM_BUILD_DIR", str(tmp_path))
    directory = _cpu.build_directory()
    _lock(directory, os.getpid())  # a live build: this process
    start = time.monotonic()
    with pytest.raises(_build_cache.BuildLockTimeout, match="another process has been building"):
        _cpu.build(wait_s=0.5)
    assert time.monotonic() - start < 5
    loader = _cpu.ExtensionLoader(build=lambda: _cpu.build(wait_s=0.2))
    assert loader.load() is None and "BuildLockTimeout" in loader.failure  # auto: the reference, with the reason


def test_the_first_build_says_what_it_is_doing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FUSEDOPTIM_BUILD_DIR", str(tmp_path))
    from torch.utils import cpp_extension

    def fake_load(name, sources, build_directory, **kwargs):
        (tmp_path / build_directory / LIBRARY).write_bytes(b"built")
        return SimpleNamespace(name=name)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    with caplog.at_level(logging.WARNING, logger="fusedoptim"):
        _cpu.build()
    assert "building the C++ CPU kernels in" in caplog.text and "about 1-2 minutes" in caplog.text
    assert (_cpu.build_directory() / DIGEST).exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedoptim"):
        _cpu.build()  # cached: nothing to say
    assert caplog.text == ""


# A one-file extension under the name the cache builds (fusedoptim_cpu): the Python C API alone, so that it compiles
# in about a second. The real library's build is what .ci/run's build step and every C++ test prove; rebuilding it
# here took 157 s of the suite (a copied build directory recompiles everything: its commands name the new path).
_TINY_SOURCE = r"""
#include <Python.h>
#include "tiny.h"
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(kAnswer); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "fusedoptim_cpu", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_fusedoptim_cpu() { return PyModule_Create(&module); }
"""
# The cache's build(), run on that extension: _cpu.build reads its sources' names and directory from the module.
_TINY_BUILD = """
import sys
from pathlib import Path
from fusedoptim import _cpu
_cpu.SOURCES, _cpu.HEADERS = ("tiny.cpp",), ("tiny.h",)
_cpu.sources_dir = lambda: Path(sys.argv[1])
print("answer", _cpu.build().answer())
"""


def test_a_killed_build_and_a_truncated_library_neither_hang_nor_crash_the_next_process(tmp_path):
    """A build killed with the locks held and a library left truncated (SIGBUS if loaded): the next process removes
    both locks (ours and torch's), deletes the library, relinks it (the objects are intact: no recompile), records
    its digest and loads it."""
    sources, cache = tmp_path / "src", tmp_path / "cache"
    sources.mkdir()
    (sources / "tiny.cpp").write_text(_TINY_SOURCE)
    (sources / "tiny.h").write_text("constexpr long kAnswer = 42;\n")
    env = {**os.environ, "FUSEDOPTIM_BUILD_DIR": str(cache)}

    def build() -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-c", _TINY_BUILD, str(sources)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "answer 42" in done.stdout
        return done

    build()
    (target,) = cache.iterdir()
    library, objects = target / LIBRARY, sorted(target.glob("*.o"))
    compiled = [o.stat().st_mtime_ns for o in objects]
    assert objects and (target / DIGEST).exists()
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    (target / TORCH_LOCK).write_text("")
    _lock(target, _dead_pid())

    done = build()
    assert "removing the stale C++ build lock" in done.stderr and "was not loaded" in done.stderr
    assert not (target / LOCK).exists() and not (target / TORCH_LOCK).exists()
    assert _build_cache.verify_library(target) is None and library.exists()  # relinked, its digest recorded
    assert [o.stat().st_mtime_ns for o in objects] == compiled  # relinked, not recompiled
