"""Distributed training: FSDP2 (DTensor params, uneven and empty shards), DCP checkpoints, DDP and ZeRO.

Every rank is a process spawned here (gloo on 127.0.0.1, tests/distributed.py). A sharded run must equal one
process stepping the whole params with the same gradients: within fp32 rtol 1e-5 (the shards' partial sums are
added in another order), with one all-reduce per two-pass bucket per step and none for elementwise rules.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cases import FIRST_CASES, case_named
from distributed import environment_ok, spawn
from helpers import state_atol

from fusedoptim import Lookahead, Scout

pytestmark = pytest.mark.skipif(environment_ok() is not None, reason=str(environment_ok()))

STEPS = 5
#: (case, backend, wrapper): every optimizer on every backend, and both wrappers (around a two-pass rule, a torch
#: optimizer and an elementwise rule).
JOBS = [(case.name, backend, None) for case in FIRST_CASES for backend in ("cpu", "reference", "triton")] + [
    ("adamp-wd-nesterov", "cpu", None), ("adamp-amsgrad-maximize", "triton", None),  # AdamP's projections fire
    ("lamb", "cpu", "lookahead"), ("adamw", "auto", "lookahead"), ("adamp", "cpu", "scout"),
    ("adabelief", "triton", "scout")]


def _model() -> torch.nn.Module:
    # Dims not divisible by 2 or 3, and a bias of 1 element: with 2 or 3 ranks some shards are empty.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3), torch.nn.Linear(3, 1))


def _grad(index: int, shape: torch.Size, step: int) -> torch.Tensor | None:
    if index == 3 and step == 2:
        return None  # a param without a gradient on one step: skipped on every rank
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 * step + index))


def _optimizer(job: tuple, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    name, backend, wrapper = job
    base = (torch.optim.AdamW(params, lr=1e-2) if name == "adamw"
            else case_named(name).make(params, backend=backend))
    if wrapper == "lookahead":
        return Lookahead(base, sync_rate=0.5, sync_period=2)
    if wrapper == "scout":
        return Scout(base, sync_rate=0.5, sync_period=2)
    return base


def _full(value):
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every param and every tensor of the optimizer's state_dict, whole (collective under FSDP2)."""
    out = {f"param {name}": _full(p.detach()).clone() for name, p in model.named_parameters()}
    state = opt.state_dict()["state"]
    for i, (name, _) in enumerate(model.named_parameters()):
        for key, value in state.get(i, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"{key} {name}"] = _full(value).clone()
    return out


def _train(job: tuple, sharded: bool) -> tuple[dict[str, torch.Tensor], list[int]]:
    import torch.distributed as dist

    model = _model()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    params = list(model.parameters())
    opt = _optimizer(job, params)
    calls, real_all_reduce = [0], dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls[0] += 1
        return real_all_reduce(*args, **kwargs)

    per_step = []
    dist.all_reduce = counting_all_reduce
    try:
        for step in range(STEPS):
            for i, p in enumerate(params):
                g = _grad(i, p.shape, step)
                if sharded and g is not None:
                    from torch.distributed.tensor import distribute_tensor

                    g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                p.grad = g
            before = calls[0]
            opt.step()
            per_step.append(calls[0] - before)
    finally:
        dist.all_reduce = real_all_reduce
    return _snapshot(model, opt), per_step


def _sharded_jobs(rank: int, world_size: int, jobs: list[tuple]) -> dict:
    return {job: _train(job, sharded=True) for job in jobs}


def _expected_all_reduces(job: tuple, step: int) -> int:
    name, _, wrapper = job
    two_pass = name != "adamw" and case_named(name).cls.rule.two_pass
    return int(two_pass) + int(wrapper == "scout" and step % 2 == 1)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """fp32 rtol 1e-5 with the scale-aware atol of tests/helpers.py; returns the max error relative to the
    tensor's magnitude."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=state_atol(expected), msg=lambda m: f"{what}: {m}")
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return ((actual.double() - expected.double()).abs().max().item() / scale) if scale else 0.0


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_matches_one_process(world_size):
    results = spawn(world_size, _sharded_jobs, JOBS, timeout=600)
    report = []
    for job in JOBS:
        expected, _ = _train(job, sharded=False)
        worst = 0.0
        for rank, result in enumerate(results):
            snapshot, per_step = result[job]
            assert snapshot.keys() == expected.keys(), f"{job}: {sorted(snapshot)} vs {sorted(expected)}"
            for key, value in expected.items():
                if key.startswith("step "):
                    assert torch.equal(snapshot[key], value), f"{job} rank {rank} {key}"
                else:
                    worst = max(worst, _assert_close(snapshot[key], value, f"{job} rank {rank} {key}"))
            assert per_step == [_expected_all_reduces(job, s) for s in range(STEPS)], f"{job}: {per_step}"
        report.append(f"{'/'.join(str(j) for j in job if j)}: max rel err {worst:.1e}")
    print(f"\nworld size {world_size}:\n" + "\n".join(report))


# ----------------------------------------------------------------------------- placements we cannot run
def _bad_placements(rank: int, world_size: int) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from fusedoptim import LAMB, Adan

    mesh = init_device_mesh("cpu", (world_size,))
    messages = []
    for bad in (distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)]),
                DTensor.from_local(torch.randn(3), mesh, [Partial()])):
        for cls in (LAMB, Adan):
            try:
                cls([torch.nn.Parameter(bad)])
            except ValueError as e:
                messages.append(str(e))
    # a gradient distributed unlike its param: refused at step, nothing written
    p = torch.nn.Parameter(distribute_tensor(torch.randn(7, 3), mesh, [Shard(0)]))
    opt = LAMB([p])
    before = p.detach().to_local().clone()
    p.grad = distribute_tensor(torch.randn(7, 3), mesh, [Replicate()])
    try:
        opt.step()
    except ValueError as e:
        messages.append(str(e))
    assert torch.equal(p.detach().to_local(), before) and float(opt.state[p]["step"]) == 0
    return messages


def test_unsupported_placements_raise_on_every_rank():
    for messages in spawn(2, _bad_placements, timeout=120):
        assert len(messages) == 5, messages
        assert all("Shard(dim=1)" in m and "not supported" in m for m in messages[:2])
        assert all("Partial" in m and "not supported" in m for m in messages[2:4])
        assert "distributed like its param" in messages[4]


# ----------------------------------------------------------------------------- distributed checkpoints
def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(1000 * rank + step))


def _fsdp_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    opt.zero_grad()
    model(_batch(rank, step)).square().mean().backward()
    opt.step()


def _dcp(rank: int, world_size: int, jobs: list[tuple], directory: str, phase: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    results = {}
    for job in jobs:
        model = _model()
        fully_shard(model)
        opt = _optimizer(job, list(model.parameters()))
        checkpoint = str(Path(directory) / "-".join(x for x in job if x))
        out = results[job] = {}
        if phase == "save":
            for step in range(3):
                _fsdp_step(model, opt, rank, step)
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=checkpoint)
            out["saved"] = _snapshot(model, opt)
        else:
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=checkpoint)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
            out["loaded"] = _snapshot(model, opt)
        for step in range(3, 6):
            _fsdp_step(model, opt, rank, step)
        out["final"] = _snapshot(model, opt)
    return results


DCP_JOBS = [("lamb", "cpu", None), ("adamp", "reference", None), ("adan", "cpu", None), ("tadam", "triton", None),
            ("lamb", "cpu", "lookahead"), ("adabelief", "cpu", "scout")]


def test_dcp_resume_is_bitwise_and_reshards(tmp_path):
    """Save on 2 ranks after 3 steps; load on 2 ranks, and the next 3 steps equal the uninterrupted run's bitwise;
    load on 3 ranks, and every param and state is the saved one."""
    saved = spawn(2, _dcp, DCP_JOBS, str(tmp_path), "save", timeout=400)
    resumed = spawn(2, _dcp, DCP_JOBS, str(tmp_path), "resume", timeout=400)
    three = spawn(3, _dcp, DCP_JOBS, str(tmp_path), "resume", timeout=400)
    for job in DCP_JOBS:
        for rank in range(2):
            assert resumed[rank][job]["loaded"].keys() == saved[rank][job]["saved"].keys()
            for key, value in saved[rank][job]["saved"].items():
                assert torch.equal(resumed[rank][job]["loaded"][key], value), f"{job} rank {rank}: loaded {key}"
            for key, value in saved[rank][job]["final"].items():
                assert torch.equal(resumed[rank][job]["final"][key], value), f"{job} rank {rank}: resumed {key}"
        for key, value in saved[0][job]["saved"].items():
            assert torch.equal(three[0][job]["loaded"][key], value), f"{job} world size 3: loaded {key}"


def _full_state_dict_round_trip(rank: int, world_size: int, jobs: list[tuple]) -> dict[tuple, tuple[bool, bool]]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    full = StateDictOptions(full_state_dict=True)
    out = {}
    for job in jobs:
        model, model2 = _model(), _model()
        fully_shard(model)
        fully_shard(model2)
        opt = _optimizer(job, list(model.parameters()))
        for step in range(3):
            _fsdp_step(model, opt, rank, step)
        state = get_optimizer_state_dict(model, opt, options=full)  # whole tensors on every rank
        with torch.no_grad():
            for p, q in zip(model.parameters(), model2.parameters(), strict=True):
                q.copy_(p)
        opt2 = _optimizer(job, list(model2.parameters()))
        set_optimizer_state_dict(model2, opt2, state, options=full)  # cut back into the local shards
        before, loaded = _snapshot(model, opt), _snapshot(model2, opt2)
        for step in range(3, 5):
            _fsdp_step(model, opt, rank, step)
            _fsdp_step(model2, opt2, rank, step)
        after, resumed = _snapshot(model, opt), _snapshot(model2, opt2)
        out[job] = (before.keys() == loaded.keys() and all(torch.equal(loaded[k], v) for k, v in before.items()),
                    all(torch.equal(resumed[k], v) for k, v in after.items()))
    return out


def test_full_state_dict_round_trip():
    jobs = [("lamb", "cpu", None), ("adamp", "cpu", "scout"), ("tadam", "reference", "lookahead")]
    for rank_result in spawn(2, _full_state_dict_round_trip, jobs, timeout=300):
        assert rank_result == {job: (True, True) for job in jobs}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, as intended
def test_single_process_dcp_keeps_the_wrappers_state(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    for job in (("lamb", "cpu", "lookahead"), ("adabelief", "cpu", "scout"), ("adamw", "auto", "scout")):
        def run(model, opt, steps):
            for step in steps:
                for i, p in enumerate(model.parameters()):
                    p.grad = _grad(i, p.shape, step)
                opt.step()

        model = _model()
        opt = _optimizer(job, list(model.parameters()))
        run(model, opt, range(3))
        directory = tmp_path / "-".join(x for x in job if x)
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=directory)
        model_state = {k: v.clone() for k, v in model.state_dict().items()}
        run(model, opt, range(3, 7))
        expected = _snapshot(model, opt)

        model2 = _model()
        model2.load_state_dict(model_state)
        opt2 = _optimizer(job, list(model2.parameters()))
        state = {"optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(state, checkpoint_id=directory)
        set_optimizer_state_dict(model2, opt2, state["optim"])
        assert opt2.fast_steps == 3
        run(model2, opt2, range(3, 7))
        for key, value in expected.items():
            assert torch.equal(_snapshot(model2, opt2)[key], value), f"{job}: {key}"


# ----------------------------------------------------------------------------- DDP and ZeRO
def _ddp(rank: int, world_size: int, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name in names:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        opt = case_named(name).make(model.parameters())
        for step in range(4):
            opt.zero_grad()
            model(_batch(rank, step)).square().mean().backward()
            opt.step()
        out[name] = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return out


def _zero(rank: int, world_size: int, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    out = {}
    for name in names:
        case = case_named(name)
        model = _model()
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=case.cls, **case.kwargs)
        for step in range(STEPS):
            for i, p in enumerate(model.parameters()):
                p.grad = _grad(i, p.shape, step)
            opt.step()
        out[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _ddp_and_zero(rank: int, world_size: int, names: list[str]) -> tuple[dict, dict]:
    return _ddp(rank, world_size, names), _zero(rank, world_size, names)


def test_ddp_ranks_stay_bitwise_identical_and_zero_matches_one_process():
    names = ["lamb", "adamp", "adan"]
    (ddp0, zero0), (ddp1, zero1) = spawn(2, _ddp_and_zero, names, timeout=300)
    for name in names:
        for key, value in ddp0[name].items():
            assert torch.equal(ddp1[name][key], value), f"DDP {name}: {key}"
        model = _model()
        opt = case_named(name).make(model.parameters())
        for step in range(STEPS):
            for i, p in enumerate(model.parameters()):
                p.grad = _grad(i, p.shape, step)
            opt.step()
        for n, p in model.named_parameters():  # ZeRO: each rank steps whole tensors, with the same kernels
            assert torch.equal(zero0[name][n], p.detach()) and torch.equal(zero1[name][n], p.detach()), f"{name} {n}"


def test_schedulers_see_the_base_defaults_through_a_wrapper():
    for wrapper in (Lookahead, Scout):
        opt = wrapper(case_named("lamb").make(_model().parameters()))
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        assert math.isclose(opt.param_groups[0]["betas"][0], 0.95)  # cycle_momentum moved beta1
        assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["sync_period"] == 6


def test_wrapper_state_dict_hooks_run():
    opt = Lookahead(case_named("adan").make(_model().parameters()))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    state_dict = opt.state_dict()
    assert state_dict["extra"] == 1
    opt.load_state_dict(state_dict)
    assert calls == ["pre", "load pre", "load post"]


