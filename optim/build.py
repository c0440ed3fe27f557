"""Build the C++ CPU kernels ahead of time (else the first CPU step builds them): ``python -m fusedoptim.build``.

The library is cached on disk (torch's extensions directory, or ``$FUSEDOPTIM_BUILD_DIR``), so later processes
load it in well under a second.
"""

from __future__ import annotations

import sys
import time
from types import ModuleType

from . import _cpu


def cpu_extension() -> ModuleType:
    """The compiled C++ extension, built now if it is not cached; RuntimeError with the reason when it cannot be."""
    return _cpu.extension()


def cpu_unavailable_reason() -> str | None:
    """None when the C++ kernels can run (building them now if needed), else why not."""
    return _cpu.unavailable_reason()


def main() -> int:
    start = time.perf_counter()
    print("fusedoptim: building the C++ CPU kernels (first build about 1-2 minutes on 2 cores)...", flush=True)
    reason = cpu_unavailable_reason()
    if reason is not None:
        print(f"fusedoptim: {reason}", file=sys.stderr)
        return 1
    print(f"fusedoptim: C++ CPU kernels ready in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
