"""Loaders of real data sets, on tiny files the tests write in the real on-disk formats."""
import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedhpc.data import DataConfig, PartitionConfig, build_federated_data, list_datasets
from fedhpc.data.domainnet import DOMAINNET_DOMAINS

REPO = Path(__file__).resolve().parents[2]


def iid(**fields):
    return PartitionConfig(kind="iid", **fields)


# ---------------------------------------------------------------- registry and modality
def test_registry_lists_every_data_set():
    assert list_datasets() == ["cifar100", "digits", "domainnet", "folder", "hf", "planted", "python"]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: cifar100, digits, domainnet, folder, hf, planted, python"):
        build_federated_data(DataConfig(name="mnist"), num_clients=2, seed=0)


def test_text_modality_needs_a_text_data_set():
    with pytest.raises(ValueError, match="images only"):
        build_federated_data(DataConfig(name="digits"), num_clients=2, seed=0, modality="text")


@pytest.mark.parametrize("field,value", [("test_fraction", 1.0), ("unseen_fraction", 1.0),
                                         ("image_size", 4), ("max_samples", -1)])
def test_data_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DataConfig(**{field: value})


# ---------------------------------------------------------------- digits
def test_digits_pools_shapes_and_labels():
    from sklearn.datasets import load_digits

    data = build_federated_data(DataConfig(name="digits", unseen_fraction=0.2), num_clients=10, seed=0)
    assert data.train_x.shape == (1797 - 359, 3, 32, 32) and data.test_x.shape == (359, 3, 32, 32)
    assert data.global_test_x is data.test_x
    assert torch.equal(data.train_x[:, 0], data.train_x[:, 2]), "grey images repeat over channels"
    labels = np.concatenate([data.train_y.numpy(), data.test_y.numpy()])
    assert np.array_equal(np.bincount(labels), np.bincount(load_digits().target))
    assert abs(float(data.train_x.mean())) < 0.05 and abs(float(data.train_x.std()) - 1) < 0.1
    assert len(data.unseen) == 2 and data.num_examples.sum() == len(data.train_y)
    assert min(len(ix) for ix in data.client_test) >= 1


def test_local_test_splits_hold_the_clients_training_classes():
    cfg = DataConfig(name="digits", partition=PartitionConfig(kind="pathological", classes_per_client=2))
    data = build_federated_data(cfg, num_clients=10, seed=1)
    for train, test in zip(data.client_train, data.client_test):
        assert set(data.test_y[test].tolist()) <= set(data.train_y[train].tolist())
    test_ix = np.concatenate(data.client_test)
    assert len(test_ix) == len(np.unique(test_ix))


def test_max_samples_caps_the_pools():
    data = build_federated_data(DataConfig(name="digits", max_samples=200, image_size=16),
                                num_clients=5, seed=0)
    assert data.train_x.shape == (200, 3, 16, 16)
    assert len(data.test_y) == round(359 * 200 / 1438)


def test_more_clients_than_samples_raises():
    with pytest.raises(ValueError, match="lower num_clients"):
        build_federated_data(DataConfig(name="digits", max_samples=20), num_clients=15, seed=0)


def test_pathological_with_too_many_classes_raises():
    cfg = DataConfig(name="digits", partition=PartitionConfig(kind="pathological", classes_per_client=11))
    with pytest.raises(ValueError, match="classes_per_client=11"):
        build_federated_data(cfg, num_clients=10, seed=0)


def _fingerprint(name: str) -> str:
    data = build_federated_data(DataConfig(name=name, unseen_fraction=0.25), num_clients=8, seed=5)
    digest = hashlib.sha256()
    for t in (data.train_x, data.train_y, data.test_x, data.global_test_x, data.global_test_y):
        digest.update(t.numpy().tobytes())
    for ix in data.client_train + data.client_test + [data.groups, data.unseen]:
        digest.update(np.asarray(ix).tobytes())
    return digest.hexdigest()


def test_another_process_builds_the_same_bits():
    """No hidden per-process state (hash salt, global RNG) reaches the data."""
    code = ("from tests.data.test_loaders import _fingerprint; "
            "print(_fingerprint('digits'), _fingerprint('planted'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == [_fingerprint("digits"), _fingerprint("planted")]


# ---------------------------------------------------------------- CIFAR-100
@pytest.fixture
def cifar_root(tmp_path):
    """A `cifar-100-python/` folder in torchvision's format: 60 train and 30 test images."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 30)):
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"fine_labels": [int(i % 7) * 11 for i in range(n)],
                 b"coarse_labels": [0] * n, b"filenames": [b"x.png"] * n, b"batch_label": b"tiny"}
        with open(folder / split, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"c%d" % i for i in range(100)]}, f)
    return tmp_path


def test_cifar100_reads_the_pickle_format(cifar_root):
    cfg = DataConfig(name="cifar100", root=str(cifar_root), partition=iid())
    data = build_federated_data(cfg, num_clients=4, seed=0)
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    images = raw[b"data"].reshape(-1, 3, 32, 32).astype(np.float64)
    mean, std = images.mean(axis=(0, 2, 3)), images.std(axis=(0, 2, 3))
    expected = (images - mean[:, None, None]) / std[:, None, None]
    assert data.num_classes == 100 and data.train_x.shape == (60, 3, 32, 32)
    assert np.allclose(data.train_x.numpy(), expected, atol=1e-5)
    assert data.train_y.tolist() == raw[b"fine_labels"]
    assert data.test_x.shape == (30, 3, 32, 32) and data.global_test_y.shape == (30,)


@pytest.mark.parametrize("image_size", [16, 48])
def test_cifar100_resizes_and_accepts_the_folder_itself(cifar_root, image_size):
    cfg = DataConfig(name="cifar100", root=str(cifar_root / "cifar-100-python"),
                     image_size=image_size, partition=iid())
    data = build_federated_data(cfg, num_clients=3, seed=0)
    assert data.train_x.shape == (60, 3, image_size, image_size)


def test_cifar100_missing_folder_names_the_expected_path(tmp_path):
    cfg = DataConfig(name="cifar100", root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        build_federated_data(cfg, num_clients=2, seed=0)
    assert str(tmp_path / "nowhere" / "cifar-100-python" / "train") in str(err.value)
    assert "cifar-100-python.tar.gz" in str(err.value) and "\n" not in str(err.value)


def test_cifar100_empty_root_says_to_set_it():
    with pytest.raises(FileNotFoundError, match="data.root is empty"):
        build_federated_data(DataConfig(name="cifar100"), num_clients=2, seed=0)


# ---------------------------------------------------------------- DomainNet
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.fixture
def domainnet_root(tmp_path):
    """Two domains, three classes; class c is a solid colour; PNG for clipart, JPEG for sketch."""
    for domain, ext in (("clipart", "png"), ("sketch", "jpg")):
        for split, per_class in (("train", 6), ("test", 3)):
            lines = []
            for c, colour in enumerate(COLOURS):
                (tmp_path / domain / f"class{c}").mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    rel = f"{domain}/class{c}/{split}_{i}.{ext}"
                    Image.new("RGB", (20 + i, 12), colour).save(tmp_path / rel)
                    lines.append(f"{rel} {c}")
            (tmp_path / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_domainnet_loads_images_labels_and_domains(domainnet_root):
    cfg = DataConfig(name="domainnet", root=str(domainnet_root), domains=["clipart", "sketch"],
                     image_size=8, partition=PartitionConfig(kind="domain", within_domain="iid"))
    data = build_federated_data(cfg, num_clients=4, seed=0)
    assert data.train_x.shape == (36, 3, 8, 8) and data.test_x.shape == (18, 3, 8, 8)
    assert data.num_classes == 3 and data.domain_names == ("clipart", "sketch")
    assert data.train_domain.tolist() == [0] * 18 + [1] * 18
    assert np.array_equal(data.global_test_domain, data.test_domain)
    for c in range(3):
        mean_colour = data.train_x[data.train_y == c].mean(dim=(0, 2, 3))
        assert int(mean_colour.argmax()) == c, "channel order or labels are off"
    assert sorted(np.bincount(data.groups).tolist()) == [2, 2]
    for k in range(4):
        assert (data.train_domain[data.client_train[k]] == data.groups[k]).all()
        assert (data.test_domain[data.client_test[k]] == data.groups[k]).all()


def test_domainnet_defaults_to_all_six_domains(domainnet_root):
    cfg = DataConfig(name="domainnet", root=str(domainnet_root))
    with pytest.raises(FileNotFoundError, match="infograph_train.txt"):
        build_federated_data(cfg, num_clients=2, seed=0)
    assert DOMAINNET_DOMAINS[1] == "infograph"


def test_domainnet_missing_list_names_the_file(domainnet_root):
    (domainnet_root / "sketch_test.txt").unlink()
    cfg = DataConfig(name="domainnet", root=str(domainnet_root), domains=["clipart", "sketch"])
    with pytest.raises(FileNotFoundError, match=str(domainnet_root / "sketch_test.txt")):
        build_federated_data(cfg, num_clients=2, seed=0)


def test_domainnet_missing_root_and_unknown_domain(tmp_path, domainnet_root):
    with pytest.raises(FileNotFoundError, match="DomainNet folder not found"):
        build_federated_data(DataConfig(name="domainnet", root=str(tmp_path / "none")),
                             num_clients=2, seed=0)
    with pytest.raises(ValueError, match="unknown DomainNet domains \\['photos'\\]"):
        build_federated_data(DataConfig(name="domainnet", root=str(domainnet_root), domains=["photos"]),
                             num_clients=2, seed=0)


def test_domain_partition_needs_domains():
    cfg = DataConfig(name="digits", partition=PartitionConfig(kind="domain"))
    with pytest.raises(ValueError, match="needs a data set with domains"):
        build_federated_data(cfg, num_clients=4, seed=0)
