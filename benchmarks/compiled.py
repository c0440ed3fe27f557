"""What a GPU would execute: every Triton kernel variant fusedoptim launches, compiled for sm_80, sm_90 and sm_100
on a machine without a GPU, and read back from the PTX and SASS.

``python -m benchmarks.compiled`` prints, per optimizer, the bytes moved per parameter element as the compiled
loads and stores move them, beside the minimum of docs/design.md#bytes-model, the launches per step (counted by
running a step under the Triton interpreter with the launch counter), registers, spills, occupancy and a
**modelled** H100 step time. ``--json`` writes every variant's figures; ``tests/test_compiled.py`` checks them in CI.

How the figures are read off the compiled code (nothing here runs a kernel):

- registers and local memory: ``cuobjdump --dump-resource-usage``; spill bytes: the local-memory stores and loads
  (``STL`` / ``LDL``) in the SASS, per thread;
- load and store widths: every ``ld.global`` / ``st.global`` of the PTX by bits, and the SASS ``LDG`` / ``STG``;
- bytes per element: the template has two paths, full blocks (unmasked) and the masked tail. Each path's global
  loads and stores that every thread executes move ``bits / 8 * threads`` bytes for the ``BLOCK`` elements of a
  program; the table loads of the entry block and the per-program partial-sum stores (guarded by a one-thread
  predicate) are per program, not per element, and left out. Both paths must move the same bytes.

The variants (see ``variants()``): each optimizer's kernels with its default options in every param dtype
(fp32, bf16, fp16), with and without the fused Lookahead sync on the last pass, for every target; every other
structural option (``FLAGS``, ``MAXIMIZE``) in fp32 and bf16; the segment sums, with each rule's finalize in their
epilogue and without (sharded params); and Lookahead / Scout's standalone sync. Alignment is no variant: each
program picks the hinted full-block path when its chunk is aligned, the masked one otherwise. Compiling is 0.5-1 s
per variant per target (cached by Triton after, with ptxas's and cuobjdump's reports beside it: ``_tool_output``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any

ARCHS = (80, 90, 100)
DTYPES = ("fp32", "bf16", "fp16")
#: Scout's kernel (kernels/scout.py) as it is launched: a step's params into the ring ("snapshot"), the sync's
#: coherence sums ("coherence"), and with the step's position read on the device ("position": either, decided there).
#: Its period is a run-time loop: the bytes depend on k, so the figures read are registers, spills and access widths.
SCOUT_MODES = ("snapshot", "coherence", "position")

#: Modelled H100 (SXM, HBM3): 3.0 TB/s achievable copy bandwidth (docs/design.md#bytes-model), 1 B parameters.
MODEL_BANDWIDTH = 3.0e12
MODEL_PARAMS = 1e9
#: Bytes per param of the anchors under the same model (docs/design.md#bytes-model): torch fused AdamW and
#: Apex FusedLAMB, fp32.
ANCHORS = {"torch fused AdamW": 28, "Apex FusedLAMB": 52}


@dataclass(frozen=True)
class Optimizer:
    """An optimizer whose kernels are compiled: its default options for the report, and its option grid."""

    name: str
    cls: str
    defaults: dict[str, Any]
    grid: dict[str, tuple[Any, ...]]
    #: The minimal bytes per param element of docs/design.md#bytes-model: fp32 params, grads and states; bf16
    #: params and grads with fp32 states (no master copy, as here).
    minimal_fp32: int
    minimal_bf16: int


_MAXIMIZE = {"maximize": (False, True)}
OPTIMIZERS = (
    Optimizer("adabelief", "AdaBelief", {}, {"amsgrad": (False, True), "decoupled_weight_decay": (False, True),
                                             **_MAXIMIZE}, 28, 22),
    # Adan bf16: 34 B (docs/design.md#bytes-model), the previous-grad copy at the grad's 2 B (Adan.param_dtype_states).
    Optimizer("adan", "Adan", {}, {"no_prox": (False, True), "amsgrad": (False, True), **_MAXIMIZE}, 44, 34),
    Optimizer("ademamix", "AdEMAMix", {}, dict(_MAXIMIZE), 36, 30),
    # LARS's 28 B (docs/design.md#bytes-model) is with momentum (the paper's setting): without, 20 B.
    Optimizer("lars", "LARS", {"momentum": 0.9}, {"momentum": (0.0, 0.9), "nesterov": (False, True), **_MAXIMIZE},
              28, 18),
    Optimizer("lamb", "LAMB", {}, {"bias_correction": (True, False), **_MAXIMIZE}, 40, 32),
    Optimizer("ralars", "RaLars", {}, {"force_adaptive_momentum": (False, True), **_MAXIMIZE}, 40, 32),
    # TAdam's 40 B is without weight decay; with it pass A reads θ too (44 B).
    Optimizer("tadam", "TAdam", {}, {"amsgrad": (False, True), "weight_decay": (0.0, 0.1), **_MAXIMIZE}, 40, 32),
    Optimizer("adamp", "AdamP", {}, {"nesterov": (False, True), "amsgrad": (False, True), **_MAXIMIZE}, 40, 32),
)
BY_NAME = {o.name: o for o in OPTIMIZERS}


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation. ``pass_`` is "step" (one-pass rules), "prepare" / "apply" (pass A / B),
    "segment_sum", "sync" (Lookahead's standalone sync) or "scout" (Scout's ring and sums, ``options`` its mode)."""

    optimizer: str
    options: str           # "default", or the non-default options, e.g. "amsgrad=True,maximize=True"
    pass_: str
    rule: tuple[str, str]  # (kernels module, rule function); ("", "") for the segment sum
    flags: tuple[bool, ...]
    num_states: int
    num_hyper: int
    num_sums: int
    num_factors: int
    store_param: bool
    store_state: bool
    dtype: str
    sync: bool
    maximize: bool
    arch: int
    bytes_model: float | None = None  # the optimizer's bytes model for this pass's whole step (checks)
    state_types: tuple[str, ...] | None = None  # Triton's name of each state's dtype (None: all fp32)
    advance_steps: int = 0  # the step's first pass sees step + 1 (2: and stores it)
    amp: bool = False  # GradScaler's unscale and skip (options "gradscaler")
    lr_tensor: int = 0  # 1: the lr read from a device tensor (options "tensor-lr"); 2: every scalar ("tensor-betas")

    @property
    def label(self) -> str:
        kind = f"{self.rule[1]}" if self.rule[0] else "segment_sum"
        return (f"{self.optimizer}[{self.options}] {self.pass_}:{kind} {self.dtype} "
                f"{' +sync' if self.sync else ''} sm_{self.arch}")


@dataclass
class Result:
    variant: Variant
    error: str | None = None
    block: int = 0  # elements per program
    threads: int = 0  # per program
    regs: int = 0
    local_bytes: int = 0  # local-memory (STL / LDL) bytes per thread in the SASS: spills; read with the SASS only
    stack_bytes: int = 0
    shared_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    occupancy: float = 0.0
    ptx_loads: dict[int, int] = field(default_factory=dict)   # bits -> instructions
    ptx_stores: dict[int, int] = field(default_factory=dict)
    sass_loads: dict[int, int] = field(default_factory=dict)
    sass_stores: dict[int, int] = field(default_factory=dict)
    path_bytes: list[float] = field(default_factory=list)     # bytes per element of each path (full, tail)
    load_bytes: float = 0.0                                    # of which loaded, on the full path
    full_path_widths: list[int] = field(default_factory=list)  # bits of the per-element ops of the full path
    per_program_stores: int = 0

    @property
    def bytes_per_elem(self) -> float | None:
        """Bytes moved per param element: the full-block path's (None for the segment sum)."""
        return self.path_bytes[0] if self.path_bytes else None


# ---------------------------------------------------------------------------------------------- what is compiled
def _options_label(cls: type, options: dict[str, Any]) -> str:
    """The options that differ from the constructor's defaults, e.g. "amsgrad=True,maximize=True"."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    return ",".join(f"{k}={v}" for k, v in options.items() if defaults.get(k) != v) or "constructor defaults"


def _torch_dtype(name: str) -> Any:
    """The torch dtype of one of ``DTYPES`` (torch is imported lazily: the compile workers are spawned)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _rule_name(rule: Any) -> tuple[str, str]:
    """(module, function) of a ``@triton.jit`` rule: what a spawned compile worker imports it by."""
    return rule.fn.__module__, rule.fn.__name__


def _passes(spec: Optimizer, options: dict[str, Any]) -> tuple[Any, list, tuple, int, float, float, Any]:
    """Construct the optimizer (reference backend, a CPU tensor) and read what its Triton step would launch."""
    import torch

    import fusedoptim

    cls = getattr(fusedoptim, spec.cls)
    opt = cls([torch.zeros(16)], **options, backend="reference")
    group = opt.param_groups[0]
    names = {_torch_dtype(name): name for name in DTYPES}  # Triton's names of the dtypes are the same

    state_names = opt.group_state_names(group)
    hyper, flags = opt.group_scalars(group)

    def state_types(dtype: str) -> tuple[str, ...]:
        return tuple(names[opt.state_dtype(name, _torch_dtype(dtype))] for name in state_names)

    return (cls.rule.kernel_passes(), flags, len(state_names), len(hyper),
            opt.bytes_per_param(group, torch.float32), opt.bytes_per_param(group, torch.bfloat16), state_types)


def _option_grid(spec: Optimizer) -> Iterator[dict[str, Any]]:
    keys = list(spec.grid)
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        yield {**spec.defaults, **dict(zip(keys, values, strict=True))}


def variants(archs: tuple[int, ...] = ARCHS, optimizers: tuple[str, ...] | None = None) -> list[Variant]:
    """Every kernel specialisation fusedoptim launches for the given optimizers, on the given targets."""
    out: list[Variant] = []
    seen: set[tuple] = set()
    num_sums_seen: set[int] = set()
    element_size = {"fp32": 4, "bf16": 2, "fp16": 2}
    import fusedoptim

    for spec in OPTIMIZERS:
        if optimizers is not None and spec.name not in optimizers:
            continue
        for index, options in enumerate([dict(spec.defaults)] + list(_option_grid(spec))):
            try:
                passes, flags, num_states, num_hyper, model32, model16, state_types = _passes(spec, options)
            except ValueError:  # an invalid combination (LARS: nesterov needs momentum) is never launched
                continue
            maximize = bool(options.get("maximize", False))
            key = (spec.name, tuple(flags), num_states, maximize)  # what makes a different specialisation
            if key in seen:
                continue
            seen.add(key)
            default = index == 0
            label = "default" if default else _options_label(getattr(fusedoptim, spec.cls), options)
            # The other options change the rule's code, not how it is addressed: fp32 and bf16, on sm_90.
            dtypes = DTYPES if default else ("fp32", "bf16")
            targets = archs if default else ((90,) if 90 in archs else archs[:1])
            for p, dtype, arch in itertools.product(passes, dtypes, targets):
                model = {"fp32": model32, "bf16": model16}.get(dtype)
                if dtype == "fp16":
                    model = model16  # same element size as bf16
                name = "step" if len(passes) == 1 else ("prepare" if p.num_sums else "apply")
                for sync in ((False, True) if p.last and default else (False,)):
                    out.append(Variant(spec.name, label, name, _rule_name(p.rule), tuple(flags), num_states, num_hyper,
                                       p.num_sums, p.num_factors, p.store_param, p.store_state, dtype,
                                       sync, maximize, arch, model, state_types(dtype), p.advance_steps))
                if default and dtype != "fp16":  # under GradScaler: the same bytes, no spill, 128-bit full blocks
                    out.append(Variant(spec.name, "gradscaler", name, _rule_name(p.rule), tuple(flags), num_states,
                                       num_hyper, p.num_sums, p.num_factors, p.store_param, p.store_state, dtype,
                                       False, maximize, arch, model, state_types(dtype), p.advance_steps, amp=True))
                if default and dtype != "fp16" and arch == (90 if 90 in archs else archs[0]):
                    # a tensor lr: one scalar load more, the addressing unchanged (sm_90 stands for the others);
                    # tensor betas: every scalar loaded (RaLars and LARS take none)
                    for mode, options in ((1, "tensor-lr"), (2, "tensor-betas")):
                        if mode == 2 and spec.name in ("lars", "ralars"):
                            continue
                        out.append(Variant(spec.name, options, name, _rule_name(p.rule), tuple(flags), num_states,
                                           num_hyper, p.num_sums, p.num_factors, p.store_param, p.store_state,
                                           dtype, False, maximize, arch, model, state_types(dtype), p.advance_steps,
                                           lr_tensor=mode))
            for p in passes:
                if not p.num_sums:
                    continue
                finalize = getattr(fusedoptim, spec.cls).rule.triton_finalize
                # the segment sum with the rule's finalize: its flags change the finalize's code
                amps = (False, True) if default else (False,)
                for arch, amp in itertools.product(archs if default else targets, amps):
                    out.append(Variant(spec.name, "gradscaler" if amp else label, "segment_sum",
                                       _rule_name(finalize[0]), tuple(flags), 0, num_hyper, p.num_sums,
                                       passes[-1].num_factors, False, False, "fp32", False, maximize, arch, amp=amp))
                if default:
                    for mode, options in ((1, "tensor-lr"), (2, "tensor-betas")):
                        if mode == 2 and spec.name in ("lars", "ralars"):
                            continue
                        out.append(Variant(spec.name, options, "segment_sum", _rule_name(finalize[0]), tuple(flags),
                                           0, num_hyper, p.num_sums, passes[-1].num_factors, False, False, "fp32",
                                           False, maximize, 90 if 90 in archs else archs[0], lr_tensor=mode))
                if p.num_sums not in num_sums_seen:  # without a finalize (sharded params): one per sum count
                    num_sums_seen.add(p.num_sums)
                    for arch in archs:
                        out.append(Variant(spec.name, label, "segment_sum", ("", ""), (), 0, 0, p.num_sums, 0,
                                           False, False, "fp32", False, False, arch))
    from fusedoptim.wrappers import SYNC_PASS

    for dtype, arch in itertools.product(DTYPES, archs):
        # read θ and the fp32 slow weight, write both
        model = 2 * element_size[dtype] + 8
        out.append(Variant("lookahead", "sync", "sync", _rule_name(SYNC_PASS.rule), (), 0, 0, 0, 0,
                           SYNC_PASS.store_param, SYNC_PASS.store_state, dtype, True, False, arch, model))
    for mode, dtype, arch in itertools.product(SCOUT_MODES, DTYPES, archs):
        out.append(Variant("scout", mode, "scout", ("fusedoptim.kernels.scout", "scout_snapshot_kernel"), (), 0, 0,
                           0, 0, False, False, dtype, False, False, arch))
    return out


# ---------------------------------------------------------------------------------------------- compiling
_TOOLS: dict[str, str] = {}
_TOOL_DIGESTS: dict[str, str] = {}


def _tool(name: str) -> str:
    if name not in _TOOLS:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: the triton wheel ships cuobjdump; is this triton built for NVIDIA?")
        _TOOLS[name] = path
    return _TOOLS[name]


def compile_variant(v: Variant) -> tuple[Any, int]:
    """triton.compile of the variant for its target, with the launcher's own signature and constexprs, and the
    16-byte divisibility the JIT gives every pointer argument (fresh torch allocations are 64-byte aligned)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusedoptim import kernels
    from fusedoptim.kernels import multi_tensor_step_kernel, segment_sum_kernel

    if not isinstance(multi_tensor_step_kernel, triton.runtime.JITFunction):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted functions and cannot be compiled")
    if v.pass_ == "scout":
        from fusedoptim.kernels.scout import scout_snapshot_kernel

        kernel = scout_snapshot_kernel
        coherence, on_device = v.options == "coherence", v.options == "position"
        signature = kernels.scout_snapshot_signature(coherence, on_device)
        options = kernels.scout_snapshot_options(_torch_dtype(v.dtype), coherence, on_device)
    elif v.pass_ == "segment_sum":
        import fusedoptim

        rule = getattr(fusedoptim, BY_NAME[v.optimizer].cls).rule
        finalize = rule.triton_finalize if v.rule[0] else ()
        kernel = segment_sum_kernel
        signature = kernels.segment_sum_signature(len(rule.tensor_states) if finalize else 0, v.num_hyper)
        options = kernels.segment_sum_options(v.num_sums, finalize, v.flags, v.num_factors, amp=v.amp,
                                              lr_tensor=v.lr_tensor)
    else:
        kernel, signature = multi_tensor_step_kernel, kernels.step_signature(v.num_states, v.num_hyper, v.state_types)
        rule = getattr(importlib.import_module(v.rule[0]), v.rule[1])
        dtype = _torch_dtype(v.dtype)
        options = kernels.step_options(rule, v.flags, dtype, v.maximize, num_sums=v.num_sums,
                                       num_factors=v.num_factors, store_param=v.store_param,
                                       store_state=v.store_state, sync=v.sync, advance_steps=v.advance_steps,
                                       amp=v.amp, lr_tensor=v.lr_tensor)
    compiler = {name: options.pop(name) for name in list(options) if name not in kernel.arg_names}
    for name in options:
        signature[name] = "constexpr"
    signature = {name: signature[name] for name in kernel.arg_names}
    divisible = [["tt.divisibility", 16]]
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(kernel.arg_names):
        kind = signature[name]
        if isinstance(kind, tuple):
            attrs.update({(i, j): divisible for j, k in enumerate(kind) if k.startswith("*")})
        elif kind.startswith("*"):
            attrs[(i,)] = divisible
    src = ASTSource(fn=kernel, signature=signature, constexprs=options, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", v.arch, 32), options=compiler)
    return compiled, options.get("BLOCK", 0)


_LABEL = re.compile(r"^\$L__BB\d+_\d+:")
_PTX_MEM = re.compile(r"^(@!?%p\d+\s+)?(ld|st)\.global((?:\.[a-z0-9]+)*)\s")
_SETP_ZERO = re.compile(r"^setp\.eq\.[bsu]32\s+(%p\d+),\s*%r\d+,\s*0;", re.M)


def _bits(modifiers: str) -> int:
    vector, bits = 1, 0
    for part in modifiers.split("."):
        if re.fullmatch(r"v\d+", part):
            vector = int(part[1:])
        elif re.fullmatch(r"[bfsu]\d+", part):
            bits = int(part[1:])
    return vector * bits


def ptx_blocks(ptx: str) -> list[list[tuple[str, int, str | None]]]:
    """The kernel's basic blocks, each a list of its global memory ops as (ld | st, bits, predicate)."""
    blocks: list[list[tuple[str, int, str | None]]] = [[]]
    for raw in ptx.splitlines():
        line = raw.split("//")[0].strip()
        if _LABEL.match(line):
            blocks.append([])
            continue
        m = _PTX_MEM.match(line)
        if m:
            predicate = m.group(1).strip().lstrip("@") if m.group(1) else None
            blocks[-1].append((m.group(2), _bits(m.group(3)), predicate))
        if re.match(r"^(@!?%p\d+\s+)?bra", line):
            blocks.append([])
    return blocks


def _tool_digest(tool: str) -> str:
    """SHA-256 of the tool's file (the C++ build cache's ``file_digest``), once per process and tool (ptxas is
    40-50 MB: about 0.1 s)."""
    if tool not in _TOOL_DIGESTS:
        from pathlib import Path

        from fusedoptim._build_cache import file_digest

        _TOOL_DIGESTS[tool] = file_digest(Path(tool))
    return _TOOL_DIGESTS[tool]


def _tool_output(tool: str, args: list[str], data: bytes, name: str, stream: str) -> str:
    """What ``tool args <file holding data>`` prints on ``stream``, kept beside Triton's cache under the SHA-256 of
    the tool's bytes, the arguments and the data: the same tool on the same bytes prints the same report. With a
    warm Triton cache, running ptxas again for every kernel's report and cuobjdump on sm_90's took 11 of the 12.5 s
    of AdaBelief's 78 variants (552 variants: 90 s of the test suite). The tool's bytes, not its path: CI installs
    triton into a new virtual environment each time."""
    import hashlib

    import triton

    key = hashlib.sha256(json.dumps([_tool_digest(tool), args, stream]).encode() + data)
    cache = os.path.join(triton.knobs.cache.dir, "fusedoptim-tool-reports", key.hexdigest() + ".txt")
    with contextlib.suppress(OSError):
        with open(cache) as f:
            return f.read()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        done = subprocess.run([tool, *(a.replace("{tmp}", tmp) for a in args), path], capture_output=True,
                              text=True, check=True)
    out = getattr(done, stream)
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        partial = f"{cache}.{os.getpid()}"
        with open(partial, "w") as f:
            f.write(out)
        os.replace(partial, cache)  # whole or absent: a reader never sees half a report
    return out


def _ptxas_log(compiled: Any, captured: str, arch: int) -> str:
    """ptxas's ``-v`` report of the kernel: the one Triton's own ptxas run printed, or (when Triton took the kernel
    from its cache) a second ptxas run on the PTX with Triton's flags."""
    if "Used" in captured:
        return captured
    ptx = compiled.asm["ptx"]
    gpu = re.search(r"^\s*\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    ptxas = _tool("ptxas" if arch < 90 else "ptxas-blackwell")
    return _tool_output(ptxas, ["-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", "-o", "{tmp}/kernel.cubin"],
                        ptx.encode(), "kernel.ptx", "stderr")


def _sass_ops(cubin: bytes) -> dict[str, Counter]:
    """Global (LDG / STG) and local-memory (STL / LDL: spills) instructions of the SASS, by bits."""
    sass = _tool_output(_tool("cuobjdump"), ["-sass"], cubin, "kernel.cubin", "stdout")
    ops: dict[str, Counter] = {"LDG": Counter(), "STG": Counter(), "STL": Counter(), "LDL": Counter()}
    for line in sass.splitlines():
        code = re.sub(r"/\*[^*]*\*/", "", line.split(";")[0])
        for op, mods in re.findall(r"\b(LDG|STG|STL|LDL)((?:\.[A-Z0-9_]+)*)", code):
            width = re.search(r"\.(64|128)\b", mods)
            narrow = re.search(r"\.[US](8|16)\b", mods)
            ops[op][int(width.group(1)) if width else int(narrow.group(1)) if narrow else 32] += 1
    return ops


def analyze(v: Variant, compiled: Any, result: Result, ptxas_log: str, sass: bool) -> None:
    """Fill ``result`` from the compiled kernel's ptxas report, PTX and (with ``sass``) SASS. Disassembling takes
    0.7 s a kernel, compiling 0.45 s: the SASS is read for the default options on sm_90 only."""
    ptx = compiled.asm["ptx"]
    threads = result.threads = compiled.metadata.num_warps * 32
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    if m is None or regs is None:
        raise RuntimeError(f"no register report in ptxas's output: {ptxas_log[-500:]}")
    result.stack_bytes, result.spill_store_bytes, result.spill_load_bytes = map(int, m.groups())
    result.regs = int(regs.group(1))
    result.shared_bytes = int(compiled.metadata.shared)
    if sass:
        ops = _sass_ops(compiled.asm["cubin"])
        result.sass_loads, result.sass_stores = dict(ops["LDG"]), dict(ops["STG"])
        result.local_bytes = sum(bits // 8 * n for op in ("STL", "LDL") for bits, n in ops[op].items())
    loads: Counter = Counter()
    stores: Counter = Counter()
    blocks = ptx_blocks(ptx)
    for ops in blocks:
        for kind, bits, _ in ops:
            (loads if kind == "ld" else stores)[bits] += 1
    result.ptx_loads, result.ptx_stores = dict(loads), dict(stores)
    result.occupancy = occupancy(result.regs, compiled.metadata.num_warps, result.shared_bytes, v.arch)
    if v.pass_ in ("segment_sum", "scout"):
        return
    one_thread = set(_SETP_ZERO.findall("\n".join(line.split("//")[0].strip() for line in ptx.splitlines())))
    block = result.block
    paths = []
    # the entry block loads the per-chunk tables: per program (under GradScaler the entry is two blocks, split by
    # the skipped step's early return)
    for ops in blocks[2 if v.amp else 1:]:
        per_element = [(kind, bits) for kind, bits, predicate in ops if predicate not in one_thread
                       or predicate is None]
        result.per_program_stores += sum(1 for kind, _, predicate in ops if predicate in one_thread and kind == "st")
        if per_element:
            paths.append(per_element)
    if len(paths) != 2:
        raise RuntimeError(f"expected the full-block and the tail path, found {len(paths)} blocks with memory ops")
    paths.sort(key=lambda ops: -max(bits for _, bits in ops))  # the full path has the widest accesses
    result.path_bytes = [sum(bits // 8 for _, bits in ops) * threads / block for ops in paths]
    result.full_path_widths = sorted({bits for _, bits in paths[0]})
    result.load_bytes = sum(bits // 8 for kind, bits in paths[0] if kind == "ld") * threads / block


#: Per SM (sm_80 / sm_90 / sm_100 alike for these limits): 64 K registers, 64 resident warps, 32 resident blocks;
#: registers are allocated per warp in units of 256. Shared memory per SM: 164 KB (sm_80), 228 KB (sm_90, sm_100).
def occupancy(regs: int, num_warps: int, shared: int, arch: int = 90) -> float:
    """Theoretical occupancy: resident warps / 64."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    blocks = min(32, 64 // num_warps, 65536 // (per_warp * num_warps))
    if shared:
        blocks = min(blocks, (164 if arch == 80 else 228) * 1024 // shared)
    return blocks * num_warps / 64


#: Modelled H100: bytes a streaming kernel must have in flight per SM to saturate memory (Little's law): 3.35 TB/s
#: × ~1 µs loaded DRAM latency / 132 SMs.
NEEDED_IN_FLIGHT = 3.35e12 * 1e-6 / 132


def in_flight_bytes(result: Result) -> float:
    """Modelled bytes of loads in flight per SM: resident threads × what each thread's full block loads at once
    (the loads of a block are all issued before the first is used)."""
    resident_threads = result.occupancy * 64 * 32
    return resident_threads * result.load_bytes * result.block / result.threads


def run_variant(v: Variant) -> Result:
    """Compile and analyse one variant; a failure is recorded, not raised, so one report shows all of them."""
    import io

    import triton

    result = Result(v)
    try:
        triton.knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v and prints its report: keep it
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            compiled, result.block = compile_variant(v)
        analyze(v, compiled, result, _ptxas_log(compiled, captured.getvalue(), v.arch),
                sass=v.options == "default" and v.arch == 90)
    except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a finding, reported with its cause
        result.error = f"{type(exc).__name__}: {str(exc).strip()[-1500:]}"
    return result


def compile_all(todo: list[Variant], jobs: int, progress: bool = True) -> list[Result]:
    """Every variant, in ``jobs`` processes that import triton without the interpreter."""
    os.environ.pop("TRITON_INTERPRET", None)  # the workers are spawned with this environment
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    results: list[Result] = []
    bar = None
    if progress:
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="compiling", unit="kernel", file=sys.stderr)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for result in pool.map(run_variant, todo, chunksize=4):
            results.append(result)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return results


# ---------------------------------------------------------------------------------------------- launches per step
_COUNT_LAUNCHES = """
import json, torch, fusedoptim
from fusedoptim.kernels import LAUNCH_COUNTS
out = {}
for name, cls, kwargs in SPECS:
    params = [torch.randn(n) for n in (7, 1025, 33)] + [torch.randn(4, 8)]
    opt = getattr(fusedoptim, cls)(params, **kwargs, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    LAUNCH_COUNTS.clear()
    opt.step()
    out[name] = sum(LAUNCH_COUNTS.values())
print(json.dumps(out))
"""


def count_launches(names: list[str]) -> dict[str, int]:
    """Kernel launches of one (second) step per optimizer, counted under the Triton interpreter in a child process
    (the launch count does not depend on the tensor count: tests/test_launches.py)."""
    specs = [(o.name, o.cls, o.defaults) for o in OPTIMIZERS if o.name in names]
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", f"SPECS = {specs!r}\n" + _COUNT_LAUNCHES], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report
def _fmt_widths(widths: dict[int, int]) -> str:
    return " ".join(f"{bits}b×{n}" for bits, n in sorted(widths.items(), reverse=True))


def summary(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    return {
        "variants": len(results),
        "compiled": len(ok),
        "archs": sorted({r.variant.arch for r in results}),
        "max_spill_bytes": max((r.spill_store_bytes + r.spill_load_bytes for r in ok), default=0),
        "full_path_all_128": all(set(r.full_path_widths) == {128} for r in ok
                                 if r.variant.pass_ not in ("segment_sum", "scout")),
    }


def table(results: list[Result], launches: dict[str, int], arch: int = 90) -> str:
    """The per-optimizer table (default options, sm_90 registers)."""
    def pick(name: str, dtype: str, sync: bool = False) -> list[Result]:
        return [r for r in results if r.variant.optimizer == name and r.variant.options == "default"
                and r.variant.dtype == dtype and r.variant.arch == arch
                and r.variant.pass_ not in ("segment_sum",) and r.variant.sync == sync and r.error is None]

    def seconds(bytes_per_param: float) -> str:
        return f"{bytes_per_param * MODEL_PARAMS / MODEL_BANDWIDTH * 1e3:.2f}"

    head = ("| optimizer | launches / step | B/param compiled fp32 | minimal fp32 | "
            "B/param compiled bf16 | minimal bf16 | + fused sync | registers sm_90 (per pass) | spills | "
            "occupancy sm_90 | **modelled** H100 ms / step, 1 B params |")
    lines = [head, "|---|" + "---:|" * 10]
    for spec in OPTIMIZERS:
        fp32, bf16 = pick(spec.name, "fp32"), pick(spec.name, "bf16")
        if not fp32:
            continue
        synced = pick(spec.name, "fp32", sync=True)
        order = {"prepare": 0, "step": 1, "apply": 1}
        fp32.sort(key=lambda r: order[r.variant.pass_])
        b32 = sum(r.bytes_per_elem for r in fp32)
        b16 = sum(r.bytes_per_elem for r in bf16)
        sync_extra = sum(r.bytes_per_elem for r in synced) - sum(r.bytes_per_elem for r in fp32 if r.variant.pass_
                                                                 != "prepare")
        spills = max(r.spill_store_bytes + r.spill_load_bytes for r in fp32 + bf16)
        lines.append(
            f"| {spec.cls} | {launches.get(spec.name, '—')} | {b32:g} | {spec.minimal_fp32} | {b16:g} | "
            f"{spec.minimal_bf16} | +{sync_extra:g} | {' / '.join(str(r.regs) for r in fp32)} | {spills} | "
            f"{' / '.join(f'{r.occupancy:.0%}' for r in fp32)} | {seconds(b32)} |")
    for name, b in ANCHORS.items():
        lines.append(f"| {name} (for comparison) | — | {b} (model) | — | — | — | — | — | — | — | {seconds(b)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compiled", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma list of SM versions")
    p.add_argument("--optimizers", default=None, help=f"comma list of {', '.join(BY_NAME)} (default: all)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    p.add_argument("--json", default=None, help="write every variant's figures to this file")
    p.add_argument("--no-launches", action="store_true", help="skip counting launches under the interpreter")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    args = p.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    names = tuple(args.optimizers.split(",")) if args.optimizers else None
    todo = variants(archs, names)
    results = compile_all(todo, args.jobs, progress=not args.quiet)
    launches = {} if args.no_launches else count_launches([o.name for o in OPTIMIZERS
                                                          if names is None or o.name in names])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary(results), "launches": launches,
                       "results": [dict(asdict(r), bytes_per_elem=r.bytes_per_elem) for r in results]}, f, indent=1)
    if not args.quiet:
        s = summary(results)
        print(table(results, launches, 90 if 90 in archs else archs[0]))
        print(f"\n{s['compiled']} of {s['variants']} variants compiled for sm_{', sm_'.join(map(str, s['archs']))}; "
              f"largest spill {s['max_spill_bytes']} B; full-block loads and stores all 128-bit: "
              f"{s['full_path_all_128']}. Modelled: bytes/param × 1e9 / 3.0 TB/s (H100 achievable copy bandwidth); "
              "no GPU ran.")
        for r in results:
            if r.error:
                print(f"FAILED {r.variant.label}: {r.error}", file=sys.stderr)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
