"""Fisher scores per client and layer against a per-client, per-sample loop through a peft-free
dense reference: the same model run for one client and one sample at a time."""
import numpy as np
import pytest
import torch

from fedhpc.models.backbone import build_cohort_model
from fedhpc.models.config import LoraConfig, ModelConfig
from fedhpc.train.scoring import fisher_scores


@pytest.mark.parametrize("target", ["logit", "log_prob"])
def test_fisher_scores_match_one_client_one_sample_at_a_time(target):
    torch.manual_seed(0)
    model = build_cohort_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=dict(
        img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=2)),
        LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "fc1"]), num_classes=3, seed=0)
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    adapters = {k: torch.randn(3, *s, generator=gen, dtype=torch.float64) * 0.3 for k, s in model.shapes.items()}
    x = torch.randn(10, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    indices = [np.array([0, 4, 7]), np.array([1]), np.array([2, 3])]  # uneven: clients sit positions out
    keys = [k for k in model.shapes if k.endswith("lora_A") or k.endswith("lora_B")]
    scores = fisher_scores(model, adapters, x=x, y=y, indices=indices, keys=keys, target=target)
    for c, ix in enumerate(indices):
        own = {k: v[c:c + 1].clone().requires_grad_(k in keys) for k, v in adapters.items()}
        expected = {k: 0.0 for k in keys}
        for i in ix:
            out = model(x[i:i + 1], own)
            if target == "log_prob":
                out = out.log_softmax(-1)
            grads = torch.autograd.grad(out[0, y[i]], [own[k] for k in keys])
            for k, g in zip(keys, grads):
                expected[k] += float(g.square().sum())
        for k in keys:
            assert scores[k][c].item() == pytest.approx(expected[k], rel=1e-9), (c, k)
    assert all(float(scores[k].min()) > 0 for k in keys if k.endswith("lora_A"))


def test_a_plan_that_asks_for_scores_gets_them_before_training(tmp_path):
    """`ClientPlan.score_batches`: the hooks see the scores of the round's first batches, computed
    on the starting adapters, before any step."""
    from mpi4py import MPI

    from fedhpc.assemble import assemble
    from fedhpc.clients import train_pass
    from fedhpc.config import ExperimentConfig
    from fedhpc.configtree import build
    from fedhpc.train.local import client_batches
    from fedhpc.train.plan import LocalHooks, Task

    cfg = build(ExperimentConfig, {
        "name": "scored", "num_clients": 4, "out_dir": str(tmp_path),
        "data": {"name": "planted", "planted": {"num_clusters": 2, "num_classes": 4, "samples_per_client": 24}},
        "model": {"kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}},
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["qkv"]},
        "train": {"batch_size": 4, "clients_per_pass": 4}})
    r = assemble(cfg, MPI.COMM_SELF)

    class Record(LocalHooks):
        def scored(self, scores):
            self.scores = scores

    ids = np.array([0, 1, 2, 3])
    plan = r.strategy.configure_client(r.strategy.init_server(r.init, frozen={}), {}, ids, Task.TRAIN)
    plan.hooks, plan.score_batches = Record(), 2
    start = {k: v.clone() for k, v in plan.start.items()}
    train_pass(r, plan, ids, task=Task.TRAIN, round_index=3)
    first = [np.concatenate(client_batches(r.data.client_train[c], seed=cfg.seed, client=int(c), round_index=3,
                                           cfg=cfg.train)[:2]) for c in ids]
    expected = fisher_scores(r.model, start, x=r.data.train_x, y=r.data.train_y, indices=first, keys=plan.trainable,
                             scaling=r.scaling(ids))
    assert set(plan.hooks.scores) == set(plan.trainable)
    for k in plan.trainable:
        torch.testing.assert_close(plan.hooks.scores[k], expected[k], rtol=1e-12, atol=0)
    assert not torch.equal(plan.start["head.weight"], start["head.weight"])  # and then it trained
