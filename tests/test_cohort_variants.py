"""Adapter variants of the cohort layer against a dense per-client float64 reference.

The reference forms each client's weights explicitly (W_c = W0 + Δ + update_B update_A +
s_c [λ_c B A + (1 − λ_c) E_B E_A]) and runs the clients one at a time; outputs and gradients
of every bound tensor must agree. Without variant keys the layer must compute what it did
before the variants existed, bit for bit.
"""
import pytest
import torch
import torch.nn as nn

from fedhpc.models.cohort import (VARIANTS, CohortLoRALinear, CohortModel, base_delta_key, factored_keys,
                                  lora_keys, mixture_keys, variant_shapes)
from fedhpc.models.dropout import client_keys, keyed_dropout

TARGETS = ["fc1", "fc2"]
RANK, ALPHA, CLIENTS, ROWS, TOKENS = 2, 3.0, 3, 4, 3


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3)

    def forward(self, x):                                   # [N, tokens, 5] -> [N, 3]
        return self.head(self.fc2(torch.tanh(self.fc1(x))).mean(1))


def _model(dtype=torch.float64, dropout=0.0):
    torch.manual_seed(0)
    tiny = Tiny().to(dtype)
    frozen = {name: (m.weight.detach().clone(), m.bias.detach().clone()) for name, m in tiny.named_children()}
    model = CohortModel(tiny, head_name="head", targets=TARGETS, rank=RANK, lora_alpha=ALPHA,
                        lora_dropout=dropout, call_backbone=lambda m, x: m(x))
    return model, frozen


def _adapters(model, parts, dtype=torch.float64, q=3):
    """Random (non-zero, distinct per client) tensors for the key groups in `parts`."""
    g = torch.Generator().manual_seed(1)
    shapes = {k: s for k, s in model.shapes.items() if k.startswith("head.") or "lora" in parts}
    if "mixture" in parts:
        shapes |= variant_shapes(model.shapes, "mixture", rank=RANK)
    if "factored" in parts:
        shapes |= variant_shapes(model.shapes, "factored", rank=q)
    out = {k: 0.5 * torch.randn(CLIENTS, *s, generator=g, dtype=dtype) for k, s in shapes.items()}
    for k in out:
        if k.endswith("mix_logit"):
            out[k] = 1.5 * torch.randn(CLIENTS, 1, generator=g, dtype=dtype)  # λ far from 0.5 and unequal
    if "base_delta" in parts:
        for name, w in model.frozen_weights().items():
            out[base_delta_key(name)] = 0.3 * torch.randn(1, *w.shape, generator=g, dtype=dtype)
    return out


def _dense_reference(frozen, adapters, x, scaling, *, dropout=0.0, dropout_keys=None):
    """Logits `[C, n, classes]`, one client at a time, each layer's weights formed densely."""
    logits = []
    for c in range(CLIENTS):
        h = x[c * ROWS:(c + 1) * ROWS]
        for index, name in enumerate(TARGETS):
            w0, b0 = frozen[name]
            rest, lora = w0.clone(), torch.zeros_like(w0)    # input as is / input after the adapter dropout
            if base_delta_key(name) in adapters:
                rest = rest + adapters[base_delta_key(name)][0]
            key_ua, key_ub = factored_keys(name)
            if key_ua in adapters:
                rest = rest + adapters[key_ub][c] @ adapters[key_ua][c]
            key_a, key_b = lora_keys(name)
            if key_a in adapters:
                cluster = adapters[key_b][c] @ adapters[key_a][c]
                key_ea, key_eb, key_mix = mixture_keys(name)
                if key_mix in adapters:
                    lam = torch.sigmoid(adapters[key_mix][c, 0])
                    cluster = lam * cluster + (1 - lam) * adapters[key_eb][c] @ adapters[key_ea][c]
                lora = scaling[c] * cluster
            dropped = h
            if dropout > 0:
                dropped = keyed_dropout(h.reshape(1, -1, h.shape[-1]), dropout, dropout_keys[c:c + 1],
                                        salt=index).reshape(h.shape)
            h = h @ rest.T + dropped @ lora.T + b0
            if name == "fc1":
                h = torch.tanh(h)
        h = h.mean(1)
        logits.append(h @ adapters["head.weight"][c].T + adapters["head.bias"][c])
    return torch.stack(logits)


def _leaves(adapters):
    return {k: v.detach().clone().requires_grad_(True) for k, v in adapters.items()}


def _check_against_dense(parts, per_client_scaling, dropout):
    model, frozen = _model(dropout=dropout)
    adapters = _adapters(model, parts)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(CLIENTS * ROWS, TOKENS, 5, generator=g, dtype=torch.float64)
    scaling = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64) if per_client_scaling else None
    keys = client_keys(7, torch.arange(CLIENTS), 1, 0) if dropout > 0 else None

    ours_in = _leaves(adapters)
    ours = model(x, ours_in, scaling=scaling, dropout_keys=keys).view(CLIENTS, ROWS, -1)
    ref_in = _leaves(adapters)
    ref_scaling = scaling if scaling is not None else torch.full((CLIENTS,), ALPHA / RANK, dtype=torch.float64)
    ref = _dense_reference(frozen, ref_in, x, ref_scaling, dropout=dropout, dropout_keys=keys)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)

    probe = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (ours * probe).sum().backward()
    (ref * probe).sum().backward()
    for k in adapters:
        assert ours_in[k].grad is not None and ours_in[k].grad.abs().sum() > 0, k
        torch.testing.assert_close(ours_in[k].grad, ref_in[k].grad, rtol=1e-10, atol=1e-12, msg=k)


CASES = {"mixture": {"lora", "mixture"}, "factored": {"lora", "factored"}, "factored-alone": {"factored"},
         "mixture+factored": {"lora", "mixture", "factored"}}


@pytest.mark.parametrize("per_client_scaling", [False, True], ids=["alpha-over-r", "per-client-s"])
@pytest.mark.parametrize("base_delta", [False, True], ids=["", "base-delta"])
@pytest.mark.parametrize("case", list(CASES))
def test_variant_matches_dense_per_client(case, base_delta, per_client_scaling):
    parts = CASES[case] | ({"base_delta"} if base_delta else set())
    _check_against_dense(parts, per_client_scaling, dropout=0.0)


@pytest.mark.parametrize("case", ["mixture", "mixture+factored"])
def test_dropout_acts_on_both_experts_and_not_on_the_update(case):
    _check_against_dense(CASES[case] | {"base_delta"}, per_client_scaling=True, dropout=0.4)


def _forward_before_variants(self, x):
    """`CohortLoRALinear.forward` as it was before the variants (verbatim copy)."""
    out = self.base(x)
    bound = self.binding
    if bound.adapters is None:
        return out
    shared = bound.adapters.get(self.key_delta)
    if shared is not None:
        out = out + torch.nn.functional.linear(x, shared.reshape(shared.shape[-2:]).to(x.dtype))
    if self.key_a not in bound.adapters:
        return out
    a, b = bound.adapters[self.key_a], bound.adapters[self.key_b]
    h = x.reshape(a.shape[0], -1, x.shape[-1])
    if bound.dropout_keys is not None and self.dropout > 0:
        h = keyed_dropout(h, self.dropout, bound.dropout_keys, salt=self.index)
    low = torch.bmm(h, a.transpose(1, 2)) * bound.scaling
    delta = torch.baddbmm(out.reshape(a.shape[0], -1, out.shape[-1]), low, b.transpose(1, 2))
    return delta.reshape(out.shape)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("base_delta", [False, True], ids=["plain", "base-delta"])
def test_without_variant_keys_output_and_grads_are_bit_identical(base_delta, dropout, monkeypatch):
    model, _ = _model(dtype=torch.float32, dropout=dropout)
    adapters = _adapters(model, {"lora", "base_delta"} if base_delta else {"lora"}, dtype=torch.float32)
    x = torch.randn(CLIENTS * ROWS, TOKENS, 5, generator=torch.Generator().manual_seed(3))
    keys = client_keys(7, torch.arange(CLIENTS), 1, 0)

    def run():
        leaves = _leaves(adapters)
        out = model(x, leaves, scaling=torch.tensor([0.5, 2.0, 1.25]), dropout_keys=keys)
        out.square().sum().backward()
        return out, {k: v.grad for k, v in leaves.items()}

    now, now_grads = run()
    monkeypatch.setattr(CohortLoRALinear, "forward", _forward_before_variants)
    before, before_grads = run()
    assert torch.equal(now, before)
    for k in adapters:
        assert (now_grads[k] is None and before_grads[k] is None) or torch.equal(now_grads[k], before_grads[k]), k


def test_variant_shapes_follow_the_modules():
    model, frozen = _model()
    mixture = variant_shapes(model.shapes, "mixture", rank=5)
    factored = variant_shapes(model.shapes, "factored", rank=4)
    for name in TARGETS:
        d_out, d_in = frozen[name][0].shape
        expert_a, expert_b, mix = mixture_keys(name)
        assert (mixture[expert_a], mixture[expert_b], mixture[mix]) == ((5, d_in), (d_out, 5), (1,))
        update_a, update_b = factored_keys(name)
        assert (factored[update_a], factored[update_b]) == ((4, d_in), (d_out, 4))
    assert len(mixture) == 3 * len(TARGETS) and len(factored) == 2 * len(TARGETS)
    assert set(VARIANTS) == {"mixture", "factored"}
    with pytest.raises(ValueError, match="mixture, factored"):
        variant_shapes(model.shapes, "mixtures", rank=2)


def test_incomplete_variant_keys_fail_loudly():
    model, _ = _model()
    x = torch.randn(CLIENTS * ROWS, TOKENS, 5, dtype=torch.float64)
    adapters = _adapters(model, {"lora", "mixture"})
    del adapters[mixture_keys("fc2")[2]]
    with pytest.raises(KeyError, match="go together"):
        model(x, adapters)
    adapters = _adapters(model, {"mixture"})               # an external expert but no cluster expert
    with pytest.raises(KeyError, match="without the cluster expert"):
        model(x, adapters)
