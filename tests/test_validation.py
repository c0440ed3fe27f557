"""Bad input raises a clear error before anything is modified."""

from __future__ import annotations

import math

import pytest
import torch
from cases import case_backends

from fusedoptim import AdaBelief, Adan, AdEMAMix

BAD_ARGS = [
    (dict(lr=-1e-3), "learning rate"),
    (dict(lr=math.nan), "learning rate"),
    (dict(lr="0.1"), "lr"),
    (dict(eps=-1.0), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_ARGS, ids=[str(k) for k, _ in BAD_ARGS])
@pytest.mark.parametrize("cls", [AdaBelief, Adan, AdEMAMix], ids=lambda c: c.__name__)
def test_bad_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.randn(3)], **kwargs)


@pytest.mark.parametrize(("cls", "betas"), [
    (AdaBelief, (0.9, 1.0)), (AdaBelief, (-0.1, 0.999)), (AdaBelief, (0.9, 0.99, 0.9)),
    (Adan, (0.98, 0.92)), (Adan, (0.98, 0.92, 1.5)),
    (AdEMAMix, (0.9, 0.999)), (AdEMAMix, (0.9, 0.999, 1.0)),
])
def test_bad_betas(cls, betas):
    with pytest.raises(ValueError, match="beta"):
        cls([torch.randn(3)], betas=betas)


def test_bad_warmups_and_backend():
    with pytest.raises(ValueError, match="alpha_warmup"):
        AdEMAMix([torch.randn(3)], alpha_warmup=0)
    with pytest.raises(ValueError, match="beta3_warmup"):
        AdEMAMix([torch.randn(3)], beta3_warmup=2.5)
    with pytest.raises(ValueError, match="betas\\[0\\] > 0"):
        AdEMAMix([torch.randn(3)], betas=(0.0, 0.999, 0.9999), beta3_warmup=10)
    with pytest.raises(ValueError, match="backend"):
        Adan([torch.randn(3)], backend="cuda")
    with pytest.raises(ValueError, match="floating-point"):
        Adan([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(RuntimeError, match="backend='triton'.*float64"):
        Adan([torch.zeros(3, dtype=torch.float64)], backend="triton")


def test_param_on_another_device_in_the_same_group():
    with pytest.raises(ValueError, match="one device"):
        Adan([torch.randn(3), torch.empty(3, device="meta")])
    opt = Adan([torch.randn(3)])
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [torch.randn(2), torch.empty(2, device="meta")]})
    opt.add_param_group({"params": [torch.empty(2, device="meta")]})  # its own group is fine


def test_triton_backend_rejects_non_contiguous_params_clearly():
    p = torch.randn(8, 6).t()
    opt = Adan([p], backend="triton")
    p.grad = torch.randn(6, 8)
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()


@pytest.mark.parametrize(("case", "backend"), case_backends(["reference", "triton", "cpu"]))
def test_sparse_gradient_fails_before_modifying_anything(case, backend):
    dense, emb = torch.randn(5), torch.randn(4, 3)
    opt = case.make([{"params": [dense]}, {"params": [emb]}], backend=backend)
    dense.grad, emb.grad = torch.randn(5), torch.randn(4, 3)
    opt.step()
    snapshot = [(p.clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in (dense, emb)]
    dense.grad = torch.randn(5)
    emb.grad = torch.sparse_coo_tensor([[0, 2]], torch.randn(2, 3), (4, 3))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    for p, (value, state) in zip((dense, emb), snapshot, strict=True):
        assert torch.equal(p, value)
        for k, v in state.items():
            assert torch.equal(opt.state[p][k], v), k
