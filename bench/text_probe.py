"""Can a text backbone learn a planted text task at all? Linear probes on the global test set of
a config's planted text (labelled by the root teacher): a logistic regression on the bag of tokens
(what the tokens tell of the label, with no model) and on the frozen backbone's features (what the
pretrained model sees before any LoRA). docs/results.md ("HiLoRA", MiniLM) and configs/minilm_planted.yaml.

    OMP_NUM_THREADS=1 python bench/text_probe.py configs/minilm_planted.yaml
    OMP_NUM_THREADS=1 python bench/text_probe.py configs/minilm_planted.yaml data.planted.latent_dim=16

The probe draws `--samples` codes for the global test set (train on the first `--train`, score on
the rest); features are the backbone's last hidden state at position 0 and its mean over positions,
each standardised on the training part. Prints one line per probe.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from fedhpc.config import load_config
from fedhpc.data import build_federated_data
from fedhpc.models.backbone import build_backbone


def probe(x: np.ndarray, y: np.ndarray, train: int, *, standardise: bool) -> float:
    if standardise:
        x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    model = LogisticRegression(C=0.1 if standardise else 1.0, max_iter=3000).fit(x[:train], y[:train])
    return model.score(x[train:], y[train:])


def frozen_features(cfg, ids: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    model, _, _ = build_backbone(cfg.model, num_classes=num_classes, seed=cfg.seed)
    encoder = model.base_model.eval()  # BERT's encoder under the classification head
    first, mean = [], []
    with torch.no_grad():
        for lo in range(0, len(ids), 128):
            hidden = encoder(input_ids=ids[lo:lo + 128]).last_hidden_state
            first.append(hidden[:, 0])
            mean.append(hidden.mean(1))
    return torch.cat(first).numpy(), torch.cat(mean).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--samples", type=int, default=1800)
    parser.add_argument("--train", type=int, default=800)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [*args.overrides, f"data.planted.global_test_size={args.samples}"])
    if cfg.model.family != "hf" or cfg.data.name != "planted":
        raise SystemExit("text_probe: needs planted data and model.family: hf")
    data = build_federated_data(cfg.data, num_clients=cfg.num_clients, seed=cfg.seed, modality="text",
                                seq_len=cfg.model.seq_len, tokenizer=cfg.model.name)
    ids, y = data.global_test_x, data.global_test_y.numpy()
    _, token = np.unique(ids.numpy(), return_inverse=True)  # one column per distinct token id
    bag = np.zeros((len(ids), token.max() + 1))
    np.add.at(bag, (np.repeat(np.arange(len(ids)), ids.shape[1]), token.ravel()), 1)
    start = time.process_time()
    first, mean = frozen_features(cfg, ids, data.num_classes)
    print(f"text_probe: {args.config} {' '.join(args.overrides)}: {data.num_classes} classes, "
          f"train {args.train} / test {len(y) - args.train}, class shares "
          f"{np.round(np.bincount(y, minlength=data.num_classes) / len(y), 2).tolist()}")
    print(f"  bag of tokens            {probe(bag.astype(float), y, args.train, standardise=False):.3f}")
    print(f"  frozen features, pos 0   {probe(first, y, args.train, standardise=True):.3f}")
    print(f"  frozen features, mean    {probe(mean, y, args.train, standardise=True):.3f}"
          f"   ({time.process_time() - start:.0f} s of CPU for the features)")


if __name__ == "__main__":
    main()
