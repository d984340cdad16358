"""Planted data built per rank (issue 21): a rank that builds only its own clients gets, for each
of them, the same bits as the full build; the blocked teacher calibration equals one pass."""
import dataclasses

import numpy as np
import pytest
import torch

import fedhpc.data.planted as planted
from fedhpc.data import DataConfig, PlantedConfig, build_federated_data
from fedhpc.runtime.world import block_range

NUM_CLIENTS = 11
SEED = 5


def config(**extra):
    return DataConfig(name="planted", image_size=8, unseen_fraction=0.2,
                      planted=PlantedConfig(teacher="latent", num_clusters=3, samples_per_client=10,
                                            global_test_size=50), **extra)


@pytest.fixture(scope="module")
def full():
    return build_federated_data(config(), num_clients=NUM_CLIENTS, seed=SEED)


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_each_rank_builds_its_clients_bit_for_bit(full, ranks):
    """The reference is the full build (every client's samples in one pool)."""
    for rank in range(ranks):
        lo, hi = block_range(NUM_CLIENTS, ranks, rank)
        part = build_federated_data(config(), num_clients=NUM_CLIENTS, seed=SEED, hosted=np.arange(lo, hi))
        assert np.array_equal(part.hosted, np.arange(lo, hi))
        assert np.array_equal(part.num_examples, full.num_examples)
        assert np.array_equal(part.groups, full.groups) and np.array_equal(part.unseen, full.unseen)
        assert torch.equal(part.global_test_x, full.global_test_x)
        assert torch.equal(part.global_test_y, full.global_test_y)
        for c in range(NUM_CLIENTS):
            for x, y, ix, fx, fy, fix in ((part.train_x, part.train_y, part.client_train, full.train_x,
                                           full.train_y, full.client_train),
                                          (part.test_x, part.test_y, part.client_test, full.test_x,
                                           full.test_y, full.client_test)):
                assert len(ix[c]) == len(fix[c])
                if lo <= c < hi:
                    assert torch.equal(x[ix[c]], fx[fix[c]]) and torch.equal(y[ix[c]], fy[fix[c]])
                else:  # another rank's client: touching its samples fails
                    assert ix[c].min() >= len(x)
                    with pytest.raises(IndexError):
                        x[ix[c]]
        assert len(part.train_x) == (hi - lo) * len(full.client_train[0])


def test_text_per_rank_matches_full():
    cfg = config()
    kw = dict(num_clients=NUM_CLIENTS, seed=SEED, modality="text", seq_len=6, vocab_size=40)
    whole = build_federated_data(cfg, **kw)
    part = build_federated_data(cfg, **kw, hosted=np.arange(4, 8))
    for c in range(4, 8):
        assert torch.equal(part.train_x[part.client_train[c]], whole.train_x[whole.client_train[c]])
        assert torch.equal(part.test_y[part.client_test[c]], whole.test_y[whole.client_test[c]])


def test_hosted_refused_for_other_data():
    with pytest.raises(ValueError, match="hosted"):
        build_federated_data(DataConfig(name="digits"), num_clients=4, seed=0, hosted=np.arange(2))


@pytest.mark.parametrize("latent_dim, num_classes", [(16, 10), (4, 4)])
def test_blocked_calibration_equals_one_pass(monkeypatch, latent_dim, num_classes):
    """Teachers calibrated 3 at a time give the bits of all 13 at once (each bias depends on its
    own teacher only), and a hosted subset gets its clients' biases bit for bit; at latent_dim 4
    some teachers take the exact solve (`_solve_balance`), at 16 none does."""
    cfg = dataclasses.replace(config().planted, latent_dim=latent_dim, num_classes=num_classes)
    solved = []
    solve = planted._solve_balance
    monkeypatch.setattr(planted, "_solve_balance", lambda logits: solved.append(1) or solve(logits))
    monkeypatch.setattr(planted, "CALIBRATION_BLOCK", 10 ** 6)
    one = planted.plant_teachers(cfg, num_clients=12, seed=SEED)
    monkeypatch.setattr(planted, "CALIBRATION_BLOCK", 3)
    blocked = planted.plant_teachers(cfg, num_clients=12, seed=SEED)
    assert np.array_equal(one.bias, blocked.bias) and np.array_equal(one.root_bias, blocked.root_bias)
    assert np.array_equal(one.weight, blocked.weight)
    part = planted.plant_teachers(cfg, num_clients=12, seed=SEED, hosted=np.array([2, 3, 4, 9]))
    assert np.array_equal(part.bias[[2, 3, 4, 9]], one.bias[[2, 3, 4, 9]])
    assert np.isnan(part.bias[[0, 1, 5]]).all() and np.array_equal(part.root_bias, one.root_bias)
    assert bool(solved) == (latent_dim == 4)
    # and calibration still balances each teacher's classes (the property it exists for)
    z = np.random.default_rng(0).standard_normal((4000, cfg.latent_dim))
    counts = np.bincount(planted.teacher_labels(one.weight[0], one.bias[0], z), minlength=cfg.num_classes)
    assert counts.min() > 0.5 * len(z) / cfg.num_classes
