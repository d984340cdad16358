"""segment_sum against a Python loop, properties, and Triton vs torch."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedhpc.kernels import segment_sum
from .kernel_testing import PROPERTY, assert_rel_close, needs_interpreter


def loop_segment_sum(values, group_ids, weights, num_groups):
    """The definition, one client at a time in float64."""
    out = torch.zeros(num_groups, *values.shape[1:], dtype=torch.float64)
    for c in range(values.shape[0]):
        out[int(group_ids[c])] += float(weights[c]) * values[c].double()
    return out


def make(C, shape, G, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(C, *shape, generator=gen).to(dtype), torch.randint(0, G, (C,), generator=gen),
            torch.rand(C, generator=gen))


@pytest.mark.parametrize("C,shape,G", [pytest.param(5, (3, 7), 3, id="C5-F3x7-G3"),
                                       pytest.param(13, (40,), 20, id="C13-F40-G20-empty-groups"),
                                       pytest.param(1, (), 1, id="C1-scalar-G1")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_matches_python_loop(C, shape, G, dtype):
    values, ids, w = make(C, shape, G, seed=C, dtype=dtype)
    out = segment_sum(values, ids, w, G)
    assert out.dtype == torch.float64 and out.shape == (G, *shape)
    ref = loop_segment_sum(values, ids, w, G)
    assert torch.equal(out, ref), f"not bitwise equal to the in-order loop: max diff {(out - ref).abs().max():.1e}"


def test_float32_accumulation():
    values, ids, w = make(9, (50,), 4, seed=1)
    out = segment_sum(values, ids, w, 4, accumulate_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_rel_close("fp32", loop_segment_sum(values, ids, w, 4), out, 1e-6)


def test_empty_inputs():
    assert segment_sum(torch.empty(0, 3), torch.empty(0, dtype=torch.int64), torch.empty(0), 2).eq(0).all()
    assert segment_sum(torch.randn(2, 0), torch.zeros(2, dtype=torch.int64), torch.ones(2), 1).shape == (1, 0)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(3, 2), torch.tensor([0, 1, 3]), torch.ones(3), 3), r"\[0, 3\), got values in \[0, 3\]"),
    ((torch.randn(3, 2), torch.tensor([0, -1, 1]), torch.ones(3), 3), r"got values in \[-1, 1\]"),
    ((torch.randn(3, 2), torch.tensor([0.0, 1, 1]), torch.ones(3), 3), "integer tensor"),
    ((torch.randn(3, 2), torch.tensor([0, 1]), torch.ones(3), 3), r"\[C=3\]"),
    ((torch.randn(3, 2), torch.tensor([0, 1, 1]), torch.ones(2), 3), r"weights must be a tensor \[C=3\]"),
    ((torch.randn(3, 2), torch.tensor([0, 1, 1]), torch.ones(3), -1), "num_groups"),
])
def test_validation(args, match):
    with pytest.raises(ValueError, match=match):
        segment_sum(*args)


def test_accumulate_dtype_must_be_float():
    with pytest.raises(ValueError, match="accumulate_dtype"):
        segment_sum(torch.randn(2, 2), torch.zeros(2, dtype=torch.int64), torch.ones(2), 1,
                    accumulate_dtype=torch.int64)


@PROPERTY
@given(C=st.integers(1, 12), F=st.integers(1, 9), G=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_property_groups_partition_the_total(C, F, G, seed):
    """Summing the groups gives the one-group sum, and relabelling groups permutes the rows."""
    values, ids, w = make(C, (F,), G, seed)
    out = segment_sum(values, ids, w, G)
    assert_rel_close("Σ groups", segment_sum(values, torch.zeros_like(ids), w, 1)[0], out.sum(0), 1e-13)
    perm = torch.randperm(G, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(segment_sum(values, perm[ids], w, G)[perm], out)


@needs_interpreter
@pytest.mark.parametrize("C,F,G,acc", [
    pytest.param(5, 21, 3, torch.float64, id="C5-F21-G3-fp64"),
    pytest.param(13, 2000, 4, torch.float64, id="C13-F2000-G4-fp64"),
    pytest.param(7, 33, 9, torch.float32, id="C7-F33-G9-fp32"),
])
def test_triton_matches_reference(C, F, G, acc):
    values, ids, w = make(C, (F,), G, seed=C)
    ref = segment_sum(values, ids, w, G, accumulate_dtype=acc, backend="torch")
    out = segment_sum(values, ids, w, G, accumulate_dtype=acc, backend="triton")
    assert out.dtype == acc
    assert_rel_close("out", ref, out, 1e-15 if acc == torch.float64 else 1e-6)
