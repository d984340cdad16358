"""Partitioners checked against their defining properties, computed here from the labels."""
import numpy as np
import pytest

from fedhpc.data.config import PartitionConfig
from fedhpc.data.partition import (balanced_groups, choose_unseen, ensure_min_samples,
                                   matched_test_partition, partition_clients)

NUM_CLASSES = 10


def rng(seed=0):
    return np.random.default_rng(seed)


def make_labels(per_class=200, num_classes=NUM_CLASSES, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def assert_disjoint_cover(parts, num_samples):
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "a sample is held by two clients"
    assert np.array_equal(np.sort(joined), np.arange(num_samples)), "some sample is held by no client"
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def label_entropy(labels, parts):
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    out = []
    for p in parts:
        q = np.bincount(labels[p], minlength=NUM_CLASSES) / len(p)
        out.append(-(q[q > 0] * np.log(q[q > 0])).sum())
    return float(np.mean(out))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological", "grouped"])
@pytest.mark.parametrize("num_clients", [7, 40])
def test_disjoint_cover_and_min_samples(kind, num_clients):
    labels = make_labels()
    cfg = PartitionConfig(kind=kind, alpha=0.1, classes_per_client=3, num_groups=3, min_samples=5)
    parts, groups = partition_clients(labels, cfg, num_clients=num_clients, rng=rng())
    assert len(parts) == len(groups) == num_clients
    assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 5
    assert (groups >= 0).all() == (kind == "grouped")


def test_iid_sizes_differ_by_at_most_one():
    parts, _ = partition_clients(make_labels(), PartitionConfig(kind="iid"), num_clients=13, rng=rng())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_decreases_with_alpha():
    labels = make_labels(per_class=500)
    entropy = [label_entropy(labels, partition_clients(labels, PartitionConfig(kind="dirichlet", alpha=a),
                                                       num_clients=20, rng=rng())[0])
               for a in (0.05, 0.3, 3.0, 100.0)]
    assert entropy == sorted(entropy), entropy
    assert entropy[0] < 0.5 * np.log(NUM_CLASSES) and entropy[-1] > 0.98 * np.log(NUM_CLASSES)


def test_dirichlet_gives_no_client_the_rounding_remainder():
    """ILoRA's last-client remainder would hand client 99 ~50 extra samples per class."""
    labels = make_labels(per_class=500)
    parts, _ = partition_clients(labels, PartitionConfig(kind="dirichlet", alpha=100.0),
                                 num_clients=100, rng=rng())
    assert max(len(p) for p in parts) < 1.3 * len(labels) / 100


@pytest.mark.parametrize("num_clients,classes_per_client", [(10, 2), (23, 3), (4, 10)])
def test_pathological_clients_hold_exactly_n_classes(num_clients, classes_per_client):
    labels = make_labels()
    cfg = PartitionConfig(kind="pathological", classes_per_client=classes_per_client, min_samples=4)
    parts, _ = partition_clients(labels, cfg, num_clients=num_clients, rng=rng())
    held = [np.unique(labels[p]) for p in parts]
    assert all(len(h) == classes_per_client for h in held)
    holders = np.bincount(np.concatenate(held), minlength=NUM_CLASSES)
    assert holders.max() - holders.min() <= 1, "classes are not spread evenly over clients"
    assert_disjoint_cover(parts, len(labels))


def test_grouped_clients_hold_only_their_groups_classes():
    labels = make_labels()
    cfg = PartitionConfig(kind="grouped", num_groups=4, alpha=3.0)
    parts, groups = partition_clients(labels, cfg, num_clients=20, rng=rng())
    assert np.bincount(groups).tolist() == [5, 5, 5, 5]
    group_classes = [set(np.unique(np.concatenate([labels[parts[k]] for k in np.flatnonzero(groups == g)])))
                     for g in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not group_classes[a] & group_classes[b], "two groups share a class"
    assert set().union(*group_classes) == set(range(NUM_CLASSES))
    assert_disjoint_cover(parts, len(labels))


@pytest.mark.parametrize("within", ["dirichlet", "iid"])
def test_domain_clients_stay_in_their_domain(within):
    labels = make_labels()
    domains = np.random.default_rng(1).integers(0, 3, size=len(labels))
    cfg = PartitionConfig(kind="domain", within_domain=within, alpha=0.5)
    parts, groups = partition_clients(labels, cfg, num_clients=10, rng=rng(), domains=domains)
    assert sorted(np.bincount(groups).tolist()) == [3, 3, 4]
    for k, p in enumerate(parts):
        assert (domains[p] == groups[k]).all()
    assert_disjoint_cover(parts, len(labels))


def test_min_samples_tops_up_inside_the_group():
    labels = make_labels(per_class=60)
    cfg = PartitionConfig(kind="grouped", num_groups=2, alpha=0.01, min_samples=20)
    parts, groups = partition_clients(labels, cfg, num_clients=24, rng=rng())
    assert min(len(p) for p in parts) >= 20
    for g in range(2):
        held = np.concatenate([labels[parts[k]] for k in np.flatnonzero(groups == g)])
        other = np.concatenate([labels[parts[k]] for k in np.flatnonzero(groups != g)])
        assert not set(held) & set(other)


def test_ensure_min_samples_moves_from_the_largest():
    parts = [np.arange(0, 10), np.arange(10, 11), np.arange(11, 13)]
    out = ensure_min_samples(parts, min_samples=3, rng=rng())
    assert [len(p) for p in out] == [7, 3, 3]
    assert_disjoint_cover(out, 13)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological", "grouped"])
def test_same_seed_same_split_other_seed_other_split(kind):
    labels = make_labels()
    cfg = PartitionConfig(kind=kind, alpha=0.5, classes_per_client=2, num_groups=2)
    first, g1 = partition_clients(labels, cfg, num_clients=12, rng=rng(3))
    again, g2 = partition_clients(labels, cfg, num_clients=12, rng=rng(3))
    other, _ = partition_clients(labels, cfg, num_clients=12, rng=rng(4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and np.array_equal(g1, g2)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_matched_test_split_follows_training_mix():
    labels = make_labels()
    test_labels = make_labels(per_class=50, seed=1)
    parts, _ = partition_clients(labels, PartitionConfig(kind="dirichlet", alpha=0.3),
                                 num_clients=9, rng=rng())
    test_parts = matched_test_partition(labels, parts, test_labels, rng=rng())
    assert_disjoint_cover(test_parts, len(test_labels))
    train_counts = np.stack([np.bincount(labels[p], minlength=NUM_CLASSES) for p in parts])
    test_counts = np.stack([np.bincount(test_labels[p], minlength=NUM_CLASSES) for p in test_parts])
    quota = train_counts / train_counts.sum(0) * np.bincount(test_labels)
    assert (np.abs(test_counts - quota) < 1).all(), "a count is not the floor or ceiling of its quota"


def test_unseen_clients_are_sorted_and_sized():
    unseen = choose_unseen(50, fraction=0.2, rng=rng())
    assert len(unseen) == 10 and np.array_equal(unseen, np.unique(unseen))
    assert len(choose_unseen(50, fraction=0.0, rng=rng())) == 0
    with pytest.raises(ValueError, match="unseen_fraction"):
        choose_unseen(2, fraction=0.9, rng=rng())


def test_balanced_groups_are_balanced_and_seeded():
    groups = balanced_groups(10, 3, rng())
    assert sorted(np.bincount(groups).tolist()) == [3, 3, 4]
    assert not np.array_equal(groups, balanced_groups(10, 3, rng(1)))


@pytest.mark.parametrize("cfg,num_clients,match", [
    (PartitionConfig(kind="pathological", classes_per_client=11), 10, "classes_per_client=11"),
    (PartitionConfig(kind="pathological", classes_per_client=2), 3, "cannot hold all 10 classes"),
    (PartitionConfig(kind="iid", min_samples=2), 1001, "1001 clients"),
    (PartitionConfig(kind="grouped", num_groups=11), 20, "num_groups=11"),
    (PartitionConfig(kind="grouped", num_groups=5), 4, "num_clients=4"),
    (PartitionConfig(kind="domain"), 4, "domainnet"),
])
def test_impossible_partitions_raise_naming_the_field(cfg, num_clients, match):
    with pytest.raises(ValueError, match=match):
        partition_clients(make_labels(per_class=200), cfg, num_clients=num_clients, rng=rng())


@pytest.mark.parametrize("field,value", [("alpha", 0.0), ("classes_per_client", 0), ("num_groups", 0),
                                         ("min_samples", 0), ("within_domain", "round_robin")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        PartitionConfig(**{field: value})
