"""The paged client store against a plain in-memory store (tensors indexed directly)."""
import numpy as np
import pytest
import torch

from fedhpc.store import PagedStore, make_store
from fedhpc.clients import ClientStore


def _init():
    g = torch.Generator().manual_seed(0)
    return {"m.lora_A": torch.randn(1, 3, 5, generator=g), "m.lora_B": torch.randn(1, 4, 3, generator=g),
            "step": torch.zeros(1, dtype=torch.int64)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cap_rows", [0, 1, 3, 100])
def test_paged_store_matches_a_plain_store(tmp_path, dtype, cap_rows):
    clients = np.arange(10, 30)
    init = _init()
    record = sum(v[0].numel() * v.element_size() for v in init.values())
    stored = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    paged = PagedStore(clients, init, path=tmp_path / "s.bin", cap_bytes=cap_rows * (record // (2 if dtype == "bfloat16" else 1)),
                       dtype=stored)
    # reference: plain stacked tensors, rounded through bfloat16 where the store keeps bfloat16
    rnd = (lambda t: t.to(torch.bfloat16).to(t.dtype)) if dtype == "bfloat16" else (lambda t: t)
    ref = {k: rnd(v.expand(len(clients), *v.shape[1:]).clone()) if v.is_floating_point()
           else v.expand(len(clients), *v.shape[1:]).clone() for k, v in init.items()}
    rng = np.random.default_rng(1)
    for step in range(60):
        ids = np.sort(rng.choice(clients, size=rng.integers(1, 6), replace=False))
        got = paged.get(ids)
        for k in ref:
            assert got[k].dtype == init[k].dtype
            torch.testing.assert_close(got[k], ref[k][ids - 10], rtol=0, atol=0)
        keys = list(ref) if step % 3 else ["m.lora_B"]
        new = {k: (torch.randn(len(ids), *ref[k].shape[1:]) if ref[k].is_floating_point()
                   else torch.randint(0, 99, (len(ids),))) for k in keys}
        paged.put(ids, new)
        for k, v in new.items():
            ref[k][ids - 10] = rnd(v) if v.is_floating_point() else v
        assert paged.cached_bytes <= max(paged.cap, 0)
    for lo, hi in ((0, 20), (3, 11), (19, 20)):
        rows = paged.read(lo, hi)
        for k in ref:
            torch.testing.assert_close(rows[k].to(ref[k].dtype), ref[k][lo:hi], rtol=0, atol=0)
    if cap_rows < 3:
        assert paged.writes > 0 and paged.reads > 0  # it really paged


def test_make_store_keeps_the_plain_store_when_rows_fit(tmp_path):
    clients = np.arange(4)
    init = _init()
    assert isinstance(make_store(clients, init, path=tmp_path / "a", cap_bytes=1 << 30), ClientStore)
    assert isinstance(make_store(clients, init, path=tmp_path / "b", cap_bytes=10), PagedStore)
    assert isinstance(make_store(clients, init, path=tmp_path / "c", cap_bytes=1 << 30, dtype="bfloat16"), PagedStore)


def test_write_rows_then_read_back(tmp_path):
    clients = np.arange(6)
    init = _init()
    paged = PagedStore(clients, init, path=tmp_path / "s.bin", cap_bytes=0)
    vals = {"m.lora_A": torch.randn(3, 3, 5), "m.lora_B": torch.randn(3, 4, 3), "step": torch.arange(3)}
    paged.write_rows(2, vals)
    got = paged.get(np.array([2, 3, 4, 5]))
    for k in vals:
        assert torch.equal(got[k][:3], vals[k])
        assert torch.equal(got[k][3], init[k][0])
