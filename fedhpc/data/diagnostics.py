"""Checks that the planted benchmark has the structure it claims, with numbers to report.

- balance: class frequencies of the pooled training labels and of the global test set;
- agreement: on the same latent codes, how often two clients' teachers give the same
  label, for pairs in the same cluster and in different clusters (the cluster signal a
  hierarchical method can exploit), and each client against the root teacher;
- learnability: a linear classifier on the flattened images of one client's samples,
  scored on fresh samples of the same client, beside the same classifier on the latent
  codes (the ceiling: images lose nothing if the two match); and a linear head on the
  features of a frozen random-init tiny ViT (what LoRA fine-tuning starts from).

    python -m fedhpc.data.diagnostics [--num-clients 32] [--seed 0]
"""
from __future__ import annotations

import argparse

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from . import build_federated_data
from .config import DataConfig
from .planted import image_decoder, plant_teachers, render_images, teacher_labels
from ..rng import make_rng

__all__ = ["class_balance", "label_agreement", "linear_probe", "planted_report"]


def class_balance(labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Smallest and largest class frequency, times the number of classes (1 = uniform)."""
    freq = np.bincount(labels, minlength=num_classes) / len(labels) * num_classes
    return {"min": float(freq.min()), "max": float(freq.max())}


def label_agreement(cfg: DataConfig, *, num_clients: int, seed: int,
                    num_codes: int = 4096) -> dict[str, float]:
    """Mean label agreement of teacher pairs on shared latent codes."""
    teachers = plant_teachers(cfg.planted, num_clients=num_clients, seed=seed)
    z = make_rng(seed, "diagnostics-codes").standard_normal((num_codes, cfg.planted.latent_dim))
    labels = teacher_labels(teachers.weight, teachers.bias, z)
    root = teacher_labels(teachers.root_weight, teachers.root_bias, z)
    agree = (labels[:, None, :] == labels[None, :, :]).mean(axis=-1)
    same = teachers.clusters[:, None] == teachers.clusters[None, :]
    distinct = ~np.eye(num_clients, dtype=bool)
    return {"same_cluster": float(agree[same & distinct].mean()),
            "cross_cluster": float(agree[~same].mean()),
            "with_root": float((labels == root).mean())}


def linear_probe(cfg: DataConfig, *, num_clients: int, seed: int, num_train: int,
                 client: int = 0, num_fresh: int = 2000) -> dict[str, float]:
    """A linear classifier (PCA to 2m dimensions, then logistic regression) fit on the
    flattened images of `num_train` samples of one client and scored on `num_fresh` new
    ones; the same regression on the latent codes themselves is the ceiling."""
    planted = cfg.planted
    teachers = plant_teachers(planted, num_clients=num_clients, seed=seed)
    decoder = image_decoder(planted.latent_dim, cfg.image_size, seed)
    rng = make_rng(seed, "diagnostics-probe")
    z = rng.standard_normal((num_train + num_fresh, planted.latent_dim))
    x = render_images(z, rng, decoder=decoder).reshape(len(z), -1)
    y = teacher_labels(teachers.weight[client], teachers.bias[client], z)
    fit, score = slice(None, num_train), slice(num_train, None)
    probe = make_pipeline(PCA(2 * planted.latent_dim, random_state=0),
                          LogisticRegression(max_iter=1000)).fit(x[fit], y[fit])
    ceiling = LogisticRegression(max_iter=1000).fit(z[fit], y[fit])
    return {"num_train": num_train, "train_acc": float(probe.score(x[fit], y[fit])),
            "fresh_acc": float(probe.score(x[score], y[score])),
            "latent_ceiling": float(ceiling.score(z[score], y[score])),
            "chance": 1.0 / planted.num_classes}


def random_vit_probe(cfg: DataConfig, *, seed: int, num_train: int = 2000,
                     num_fresh: int = 1000, patch_size: int = 4) -> dict[str, float]:
    """Logistic regression on the output features of a frozen random-init tiny ViT (the
    quickstart's shape), on root-labelled planted images."""
    import timm  # lazy: only this check needs a model
    import torch

    planted = cfg.planted
    teachers = plant_teachers(planted, num_clients=1, seed=seed)
    rng = make_rng(seed, "diagnostics-vit")
    z = rng.standard_normal((num_train + num_fresh, planted.latent_dim))
    x = render_images(z, rng, decoder=image_decoder(planted.latent_dim, cfg.image_size, seed))
    y = teacher_labels(teachers.root_weight, teachers.root_bias, z)
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                            img_size=cfg.image_size, patch_size=patch_size, depth=4,
                            embed_dim=64, num_heads=4).eval()
    with torch.no_grad():
        features = vit(torch.from_numpy(x)).numpy()
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    head.fit(features[:num_train], y[:num_train])
    return {"num_train": num_train, "fresh_acc": float(head.score(features[num_train:], y[num_train:])),
            "chance": 1.0 / planted.num_classes}


def planted_report(cfg: DataConfig, *, num_clients: int, seed: int) -> dict[str, dict]:
    data = build_federated_data(cfg, num_clients=num_clients, seed=seed)
    k = cfg.planted.num_classes
    return {
        "train_balance": class_balance(data.train_y.numpy(), k),
        "global_test_balance": class_balance(data.global_test_y.numpy(), k),
        "agreement": label_agreement(cfg, num_clients=num_clients, seed=seed),
        "probe_one_client": linear_probe(cfg, num_clients=num_clients, seed=seed,
                                         num_train=len(data.client_train[0])),
        "probe_1000_samples": linear_probe(cfg, num_clients=num_clients, seed=seed, num_train=1000),
        "random_vit_probe": random_vit_probe(cfg, seed=seed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, values in planted_report(DataConfig(), num_clients=args.num_clients,
                                       seed=args.seed).items():
        print(f"{name:20s} " + "  ".join(f"{key}={value:.3f}" if isinstance(value, float)
                                           else f"{key}={value}" for key, value in values.items()))


if __name__ == "__main__":
    main()
