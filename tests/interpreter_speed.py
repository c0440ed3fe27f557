"""The Triton interpreter without its redundant language patching at every device-function call.

The interpreter swaps ``triton.language``'s builtins for interpreted ones at each launch and puts them back after
it. It also does so at every call of a ``@triton.jit`` helper inside the launch (``InterpretedFunction.__call__``),
where the language is already swapped: a full ``inspect.getmembers`` walk of ``tl``, ``tl.tensor`` and ``tl.math``
that finds nothing left to swap. Our kernels call their rule and their loads and stores through helpers, so this
was half of the interpreter's time: AdamP on the 200-tensor parity profile took 50.8 s in the interpreter, 25.0 s
of it in that patching (cProfile, triton 3.9).

``install()`` skips the patching of a helper call when the launch around it already patched every language module
the helper sees, and changes nothing else: a helper that sees another one is patched as before, and a launch
patches and restores as before. Should a future triton rename what this wraps, ``install()`` does nothing, and the
tests only run slower.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading

_state = threading.local()


@functools.cache
def _languages(fn) -> frozenset[int]:
    """The ``triton.language`` modules (``tl``, ``tl.core``) visible from ``fn``, as the interpreter finds them
    (once per function: walking a module's globals at each call cost 1.7 s of the 12 s above)."""
    import triton.language as tl

    return frozenset(id(value) for value in fn.__globals__.values()
                     if inspect.ismodule(value) and value in (tl, tl.core))


def install() -> bool:
    """Wrap the interpreter's launch and language patching when this process runs it (``TRITON_INTERPRET=1``, set
    before triton is imported); True when installed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    executor = getattr(interpreter, "GridExecutor", None)
    patch_lang, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if executor is None or patch_lang is None or scope_type is None or getattr(patch_lang, "_fusedoptim", False):
        return False
    launch = executor.__call__

    @functools.wraps(patch_lang)
    def patch_once(fn):
        patched = getattr(_state, "patched", None)  # the languages the current launch patched; None outside one
        if patched is None:
            return patch_lang(fn)
        languages = _languages(fn)
        if patched and languages <= patched:
            return scope_type()  # a helper call: the launch's patching is in place, nothing to restore
        patched |= languages
        return patch_lang(fn)

    @functools.wraps(launch)
    def launch_with_state(self, *args, **kwargs):
        outer = getattr(_state, "patched", None)
        _state.patched = set()
        try:
            return launch(self, *args, **kwargs)
        finally:
            _state.patched = outer

    patch_once._fusedoptim = True
    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch_with_state
    return True
