"""Bad input raises a clear error before anything is modified."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, ERROR_PARAMS, FIRST_CASES, ORACLES, case_backends, error_id

from fusedoptim import Adan


@pytest.mark.parametrize(("case", "error"), ERROR_PARAMS, ids=[error_id(c, e) for c, e in ERROR_PARAMS])
def test_constructor_rejects_bad_arguments(case, error):
    """Every error input of the registry (tests/cases.py): given over the case's kwargs, the constructor raises
    the error with the message the check writes."""
    with pytest.raises(error.error, match=error.match):
        case.make([torch.randn(3)], **error.kwargs)


def test_every_optimizer_has_error_inputs():
    """A new optimizer in the registry comes with the checks of its constructor."""
    covered = {case.cls for case in CASES if case.errors}
    missing = [cls.__name__ for cls in ORACLES if cls not in covered]
    assert not missing, f"no case of {missing} has error inputs (Case.errors in tests/cases.py)"


def test_bad_backend_and_dtype():
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


def test_triton_backend_steps_params_of_any_strides():
    """A dense param in any order (here transposed) is addressed in place; a view with gaps is stepped in a staging
    copy written back after the kernels (values: the parity test's memory_formats profile)."""
    transposed, sliced = torch.randn(8, 6).t(), torch.randn(5, 12)[:, :8]
    opt = Adan([transposed, sliced], backend="triton")
    ref = Adan([transposed.clone(), sliced.clone()], backend="reference")
    for _ in range(2):
        grads = [torch.randn(6, 8), torch.randn(5, 8)]
        for o in (opt, ref):
            for p, g in zip(o.param_groups[0]["params"], grads, strict=True):
                p.grad = g
            o.step()
    (bucket,) = opt.bucket_layout()
    assert bucket.in_place == [True, False] and list(bucket.tables.staging) == [1]
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("case", "backend"), case_backends(["reference", "triton", "cpu"]))
def test_sparse_gradient_fails_before_modifying_anything(case, backend):
    def sparse(dense, emb):
        emb.grad = torch.sparse_coo_tensor([[0, 2]], torch.randn(2, 3), (4, 3))

    _assert_step_fails_unchanged(case, backend, sparse, RuntimeError, "sparse", groups=True)


def _assert_step_fails_unchanged(case, backend, spoil, error, match, groups=False):
    """One good step, then a step whose grads ``spoil(dense, matrix)`` broke: it raises and changes nothing."""
    dense, matrix = torch.randn(5), torch.randn(4, 3)
    opt = case.make([{"params": [dense]}, {"params": [matrix]}] if groups else [dense, matrix], backend=backend)
    dense.grad, matrix.grad = torch.randn(5), torch.randn(4, 3)
    opt.step()
    snapshot = [(p.clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in (dense, matrix)]
    dense.grad, matrix.grad = torch.randn(5), torch.randn(4, 3)
    spoil(dense, matrix)
    with pytest.raises(error, match=match):
        opt.step()
    for p, (value, state) in zip((dense, matrix), snapshot, strict=True):
        assert torch.equal(p, value)
        for k, v in state.items():
            assert torch.equal(opt.state[p][k], v), k


#: Gradients that torch's ``p.grad = ...`` setter would refuse, swapped in through ``.data`` (as code that
#: reuses grad buffers can): a Triton kernel would read the small one out of bounds.
BAD_GRADS = {"one element": lambda p: torch.randn(1), "fp64": lambda p: torch.randn(p.shape, dtype=torch.float64),
             "transposed shape": lambda p: torch.randn(p.shape[::-1])}


@pytest.mark.parametrize("bad", BAD_GRADS)
@pytest.mark.parametrize(("case", "backend"), case_backends(["reference", "triton", "cpu"], triton_cases=FIRST_CASES))
def test_mismatched_gradient_fails_before_modifying_anything(case, backend, bad):
    def mismatched(dense, matrix):
        matrix.grad.data = BAD_GRADS[bad](matrix)

    _assert_step_fails_unchanged(case, backend, mismatched, ValueError, "must match its param")


def _overlapping_params(w):
    return {"the same tensor twice": [w, w], "overlapping rows": [w[:4], w[2:]],
            "overlapping columns": [w[:, :5], w[:, 4:]], "a view of another param": [w, w[1]]}


@pytest.mark.parametrize("layout", ["the same tensor twice", "overlapping rows", "overlapping columns",
                                    "a view of another param", "in two groups", "added group overlaps"])
@pytest.mark.parametrize("case", FIRST_CASES, ids=lambda c: c.name)
def test_params_that_share_memory_are_refused(case, layout):
    """The kernels would update shared elements twice (the C++ threads race on them), so construction and
    add_param_group refuse; views that share a storage but no element (even and odd columns) are fine."""
    w = torch.randn(6, 8)
    if layout == "in two groups":
        with pytest.raises(ValueError, match="more than one parameter group"):
            case.make([{"params": [w]}, {"params": [w]}])
    elif layout == "added group overlaps":
        opt = case.make([w[:3]])
        with pytest.raises(ValueError, match="share memory"):
            opt.add_param_group({"params": [w[2:]]})
        assert len(opt.param_groups) == 1
    else:
        with pytest.raises(ValueError, match="twice|share memory"):
            case.make(_overlapping_params(w)[layout])
    case.make([w[:, ::2], w[:, 1::2], w[:3, :0]])  # disjoint views of one storage (and an empty one)


@pytest.mark.parametrize(("case", "backend"), case_backends(["reference", "triton", "cpu"], triton_cases=FIRST_CASES))
def test_a_gradient_that_shares_memory_with_its_param_fails_before_modifying_anything(case, backend):
    def aliased(dense, matrix):
        matrix.grad.data = matrix.data  # code that reuses buffers can do this; the setter refuses p.grad = p

    _assert_step_fails_unchanged(case, backend, aliased, ValueError, "shares memory with its param")
