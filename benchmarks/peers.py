"""Import the peer libraries' optimizers (timm, pytorch-optimizer, holocron) when they are installed.

They are an optional extra, installed beside a CPU torch without their dependencies::

    pip install --no-deps timm==1.0.31 pytorch-optimizer==4.1.0 pylocron==0.3.0

``pytorch_optimizer`` then imports as it is. ``timm`` and ``holocron`` (the ``pylocron`` distribution) do
not: their top-level ``__init__`` imports their model zoos, which need torchvision (absent, or, from
PyPI beside a CPU torch, failing with ``operator torchvision::nms does not exist``). Their optimizer
modules need only torch, so when the normal import fails they are loaded under stub parent packages
that have the real ``__path__`` but never run ``__init__``.

This module is the one place that knows these quirks; tests that compare against peers import it too.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any


def load(target: str) -> Any | None:
    """The object named ``"package.module:Name"``, or None when its package is not installed.

    Errors other than a missing package (a renamed class, a peer that fails to import for another
    reason) propagate: they are bugs to see, not peers to skip.
    """
    module_name, _, attr = target.partition(":")
    top = module_name.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return None
    try:
        module = importlib.import_module(module_name)
    except (ImportError, RuntimeError):
        # The package's __init__ pulled in something absent or broken (torchvision): stub the parents.
        _forget(top)
        _stub_parents(module_name)
        module = importlib.import_module(module_name)
    return getattr(module, attr)


def _forget(top: str) -> None:
    """Drop the modules a failed import of ``top`` left behind, so the stubbed import starts clean."""
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


def _stub_parents(module_name: str) -> None:
    """Register every parent package of ``module_name`` as an empty module with the real ``__path__``."""
    parts = module_name.split(".")
    spec = importlib.util.find_spec(parts[0])
    assert spec is not None and spec.submodule_search_locations is not None, f"{parts[0]} is not a package"
    path = list(spec.submodule_search_locations)
    for depth in range(1, len(parts)):
        name = ".".join(parts[:depth])
        stub = types.ModuleType(name)
        stub.__path__ = path
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        stub.__spec__.submodule_search_locations = path
        sys.modules[name] = stub
        path = [f"{path[0]}/{parts[depth]}"]
