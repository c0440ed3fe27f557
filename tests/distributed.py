"""Multi-process test machinery: gloo on 127.0.0.1, ranks spawned by the test itself and bounded in time.

``spawn(world_size, job, *args)`` starts ``world_size`` fresh processes that each join one gloo group and run
``job(rank, world_size, *args)`` (a module-level function: it is pickled by name), and returns what every rank
returned, in rank order. A rank that raises fails the test with its traceback; ranks that do not finish within
``timeout`` seconds are killed and fail it too, so a hang never stalls the suite.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import interpreter_speed
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out: str, job: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores
    interpreter_speed.install()  # a fresh process: what conftest.py does for the test process
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        result: Any = ("ok", job(rank, world_size, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        result = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while another still uses it (rank 0 hosts the store)
    dist.destroy_process_group()


def spawn(world_size: int, job: Callable[..., Any], *args: Any, timeout: float = 300) -> list[Any]:
    with tempfile.TemporaryDirectory() as out:
        context = mp.start_processes(_entry, args=(world_size, free_port(), out, job, args), nprocs=world_size,
                                     join=False, start_method="spawn")
        try:
            deadline = time.monotonic() + timeout
            while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):  # returns as each rank ends
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout} s")
        except mp.ProcessExitedException as e:
            # A rank killed by a signal after every rank saved its result died in gloo's teardown (once in CI:
            # SIGABRT, "terminate called without an active exception"): its results stand, and are checked below.
            if not all((Path(out) / f"rank{r}.pt").is_file() for r in range(world_size)):
                raise
            warnings.warn(f"{e} after every rank had reported its result (process group teardown)", stacklevel=2)
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        results = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    errors = [value for status, value in results if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [value for _, value in results]


def environment_ok() -> str | None:
    """None when gloo process groups can run here, else why not."""
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available"
    return None if os.name == "posix" else "spawned gloo ranks are tested on POSIX only"
