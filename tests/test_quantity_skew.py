"""data.planted.quantity_skew: unequal client sizes on planted data (issue 18), off by default."""
import numpy as np
import torch
import pytest

from fedhpc.config import load_config
from fedhpc.data import build_federated_data
from fedhpc.data.planted import QUANTITY_MIN

from conftest import REPO, TINY


def _data(*overrides, hosted=None):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [*TINY, "data.planted.teacher=latent", "num_clients=12",
                                                             "data.planted.samples_per_client=40", *overrides])
    return build_federated_data(cfg.data, num_clients=cfg.num_clients, seed=cfg.seed, hosted=hosted), cfg


def test_quantity_skew_keeps_a_prefix_of_each_client_and_its_test_split():
    plain, cfg = _data()
    skewed, _ = _data("data.planted.quantity_skew=1.0")
    num_train = len(plain.client_train[0])
    sizes = np.array([len(t) for t in skewed.client_train])
    assert sizes.max() == num_train and sizes.min() >= QUANTITY_MIN and len(set(sizes)) > 4
    # independent reference: log-normal shares exp(sigma g) / max, from the same stream, rounded and clipped
    from fedhpc.rng import make_rng
    g = make_rng(cfg.seed, "planted-quantity").standard_normal(cfg.num_clients)
    expected = np.clip(np.rint(num_train * np.exp(g) / np.exp(g).max()), QUANTITY_MIN, num_train)
    assert sizes.tolist() == expected.astype(int).tolist()
    for a, b, ta, tb in zip(plain.client_train, skewed.client_train, plain.client_test, skewed.client_test):
        assert np.array_equal(a[:len(b)], b) and np.array_equal(ta, tb)
    for name in ("train_x", "train_y", "test_x", "test_y", "global_test_y"):
        assert np.array_equal(getattr(plain, name).numpy(), getattr(skewed, name).numpy())


def test_quantity_skew_per_rank_build_matches_the_full_build():
    full, _ = _data("data.planted.quantity_skew=0.5")
    part, _ = _data("data.planted.quantity_skew=0.5", hosted=np.arange(3, 7))
    assert [len(t) for t in part.client_train] == [len(t) for t in full.client_train]
    for c in range(3, 7):  # the hosted clients' samples themselves, not only their counts
        for x in ("train_x", "train_y"):
            assert torch.equal(getattr(part, x)[part.client_train[c]], getattr(full, x)[full.client_train[c]])


def test_quantity_skew_must_be_non_negative():
    with pytest.raises(ValueError, match="quantity_skew"):
        _data("data.planted.quantity_skew=-1")
