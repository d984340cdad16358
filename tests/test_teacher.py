"""The planted backbone teacher: balanced labels, cluster structure, and a student that learns it."""
import numpy as np
import torch
from mpi4py import MPI

from fedhpc.config import load_config
from fedhpc.data import build_federated_data
from fedhpc.experiment import run
from fedhpc.models.backbone import build_cohort_model
from fedhpc.models.teacher import _label, _teacher_adapters, plant_backbone_teacher

from conftest import REPO, TINY


def _setup(extra=()):
    cfg = load_config(REPO / "configs/quickstart.yaml", TINY + ["num_clients=12", *extra])
    data = build_federated_data(cfg.data, num_clients=cfg.num_clients, seed=cfg.seed)
    model = build_cohort_model(cfg.model, cfg.lora, num_classes=data.num_classes, seed=cfg.seed)
    return cfg, data, model


def test_same_cluster_teachers_agree_more_than_other_clusters():
    cfg, data, model = _setup()
    x = data.global_test_x
    clients = np.arange(cfg.num_clients)
    teachers = _teacher_adapters(model, data.groups, clients, cfg.data.planted, cfg.seed, root_only=False)
    labels = np.stack(_label(model, teachers, x, [np.arange(len(x))] * len(clients)))
    agree = (labels[:, None, :] == labels[None, :, :]).mean(-1)
    same = data.groups[:, None] == data.groups[None, :]
    off = ~np.eye(len(clients), dtype=bool)
    assert agree[same & off].mean() > agree[~same].mean() + 0.15, (agree[same & off].mean(), agree[~same].mean())
    counts = np.bincount(labels.ravel(), minlength=data.num_classes)
    assert counts.min() > 0.3 * counts.mean()  # per-class centring keeps classes balanced


def test_relabelling_keeps_inputs_and_clients():
    cfg, data, model = _setup()
    new = plant_backbone_teacher(model, data, cfg=cfg.data.planted, seed=cfg.seed)
    assert new.train_x is data.train_x and new.client_train is data.client_train
    assert (new.train_y >= 0).all() and (new.test_y >= 0).all()
    again = plant_backbone_teacher(model, data, cfg=cfg.data.planted, seed=cfg.seed)
    assert torch.equal(new.train_y, again.train_y)


def test_fedit_learns_the_planted_task(tmp_path):
    cfg = load_config(REPO / "configs/quickstart.yaml",
                      TINY + [f"out_dir={tmp_path}", "rounds=4", "train.local_epochs=2",
                              "train.optimizer.lr=0.01", "data.planted.samples_per_client=48"])
    summary = run(cfg, comm=MPI.COMM_SELF, progress=False)
    chance = 1 / cfg.data.planted.num_classes
    assert summary["global_accuracy"] > 2.5 * chance, summary


def _labels_fingerprint() -> str:
    import hashlib

    from fedhpc.assemble import assemble

    cfg = load_config(REPO / "configs/quickstart.yaml", TINY + ["num_clients=12", "train.clients_per_pass=2"])
    data = assemble(cfg, MPI.COMM_SELF).data
    return hashlib.sha256(data.train_x.numpy().tobytes() + data.train_y.numpy().tobytes()
                          + data.global_test_y.numpy().tobytes()).hexdigest()


def test_planted_inputs_and_labels_do_not_depend_on_the_thread_count():
    """Another process on one thread builds the same inputs and teacher labels as this one on two."""
    import os
    import subprocess
    import sys

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        here = _labels_fingerprint()
    finally:
        torch.set_num_threads(before)
    code = "from test_teacher import _labels_fingerprint; print(_labels_fingerprint())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO / "tests", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split()[-1] == here
