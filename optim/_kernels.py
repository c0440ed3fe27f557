"""``fusedoptim.kernels`` (the Triton rules and their launcher), or None where triton cannot be imported.

triton is optional (the ``triton`` extra; no wheel exists for macOS or Windows), so this is the one place that
imports it for the optimizers: each ``optim/<name>.py`` names its Triton rules through the module imported here.
"""

from __future__ import annotations

from types import ModuleType

kernels: ModuleType | None
IMPORT_ERROR: str | None
try:
    from . import kernels
except Exception as exc:  # ImportError, or a triton that fails to initialise: either way the backend is not here
    kernels = None
    IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc}); install it with `pip install triton`"
else:
    IMPORT_ERROR = None
