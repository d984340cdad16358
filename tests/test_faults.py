"""Client faults (`faults`: fedhpc/runtime/faults.py): who drops out or is late is drawn per (seed,
client, round); a dropped client trains nothing, uploads nothing and keeps its state; partial work
counts with its share of steps; a diverged client is named and stopped on or left out; HiLoRA and
FedTreeLoRA route a client that missed their gathering round; any rank count gives the same run.

References: the keyed draws redone by hand with numpy, a float64 weighted mean over the recorded
uploads, a shorter `train.local_steps` run for partial work, numpy principal angles / distances
for the routing, and a 3-rank launch against one rank.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import REPO, TINY
from fedhpc.cli import main
from fedhpc.config import load_config
from fedhpc.experiment import run
from fedhpc.io.checkpoint import find_resumable
from fedhpc.io.checkpoint import load as load_checkpoint
from fedhpc.runtime.faults import FaultsConfig, draw_faults, steps_done
from fedhpc.strategies.base import STRATEGIES, Strategy
from fedhpc.strategies.fedsa_lora import FedSALoRA
from fedhpc.train.plan import LocalHooks, Task

CONFIG = str(REPO / "configs/quickstart.yaml")


def _draws(seed, participants, round_index, p_drop, p_late, lo=0.1, hi=0.9):
    """The fault draws by hand: numpy's generator on [seed, client, round, 10] (Purpose.FAULTS)."""
    dropped, late, work = [], [], {}
    for c in participants:
        u = np.random.default_rng([seed, int(c), round_index, 10]).random(3)
        if u[0] < p_drop:
            dropped.append(int(c))
        elif u[1] < p_late:
            late.append(int(c))
            work[int(c)] = lo + (hi - lo) * u[2]
    return dropped, late, work


def test_draws_are_keyed_by_seed_client_and_round():
    cfg = FaultsConfig(dropout=0.3, stragglers=0.4, policy="partial")
    participants = np.arange(40)
    for round_index in (1, 7):
        got = draw_faults(cfg, participants, seed=3, round_index=round_index)
        dropped, late, work = _draws(3, participants, round_index, 0.3, 0.4)
        assert got.dropped.tolist() == dropped and got.late.tolist() == late and got.work == pytest.approx(work)
        assert got.returned.tolist() == [c for c in range(40) if c not in dropped]
        # a client's draw does not depend on who else takes part (nor on the rank hosting it)
        alone = draw_faults(cfg, participants[::3], seed=3, round_index=round_index)
        assert alone.dropped.tolist() == [c for c in dropped if c % 3 == 0]
    # rates: 4000 draws, within 5 standard deviations of the configured probabilities
    many = [draw_faults(cfg, participants, seed=0, round_index=r) for r in range(100)]
    n = 4000
    dropped = sum(len(f.dropped) for f in many)
    late = sum(len(f.late) for f in many)
    assert abs(dropped - 0.3 * n) < 5 * math.sqrt(n * 0.3 * 0.7)
    assert abs(late - 0.4 * 0.7 * n) < 5 * math.sqrt(n * 0.28 * 0.72)
    works = [w for f in many for w in f.work.values()]
    assert min(works) >= 0.1 and max(works) <= 0.9 and abs(np.mean(works) - 0.5) < 0.03
    # policies: wait trains late clients fully, drop treats them as dropped out
    wait = draw_faults(FaultsConfig(stragglers=0.5), participants, seed=0, round_index=1)
    drop = draw_faults(FaultsConfig(stragglers=0.5, policy="drop"), participants, seed=0, round_index=1)
    assert len(wait.late) and not wait.work and len(wait.returned) == 40
    assert drop.dropped.tolist() == drop.late.tolist() == wait.late.tolist()
    off = draw_faults(FaultsConfig(), participants, seed=0, round_index=1)
    assert off.returned.tolist() == list(range(40)) and not len(off.dropped) and not len(off.late)


def test_steps_done():
    assert [steps_done(10, w) for w in (0.0, 0.05, 0.1, 0.55, 0.99, 1.0)] == [1, 1, 1, 5, 9, 10]
    assert steps_done(0, 0.5) == 0


def test_partial_work_equals_a_shorter_run():
    """A late client limited to k steps ends exactly where a run of train.local_steps=k ends."""
    from fedhpc.assemble import assemble
    from fedhpc.clients import train_pass

    ids = np.array([0, 1, 2])
    results = []
    for steps, limit in ((5, np.array([2, 5, 3])), (5, None), (2, None), (3, None)):
        r = assemble(load_config(CONFIG, TINY + [f"train.local_steps={steps}"]), MPI.COMM_SELF)
        server = r.strategy.init_server(r.init, frozen=r.model.frozen_weights())
        plan = r.strategy.configure_client(server, {}, ids, Task.TRAIN)
        losses, _ = train_pass(r, plan, ids, task=Task.TRAIN, round_index=1, limit=limit)
        results.append(({k: v.clone() for k, v in plan.start.items()}, losses))
    (limited, loss), (five, loss5), (two, loss2), (three, loss3) = results
    for key in limited:
        assert torch.equal(limited[key][0], two[key][0]), key    # client 0: 2 steps
        assert torch.equal(limited[key][1], five[key][1]), key   # client 1: all 5
        assert torch.equal(limited[key][2], three[key][2]), key  # client 2: 3 steps
        assert not torch.equal(two[key][0], five[key][0]) or key.endswith("lora_A"), key  # the steps matter
    assert torch.equal(loss[[0, 1, 2]], torch.stack([loss2[0], loss5[1], loss3[2]]))


class Recorder(Strategy):
    """FedIT that records every upload (the test's independent view of what reached the server)."""
    uploads: list = []

    def finish_client(self, server, trained, state, clients):
        new, upload = super().finish_client(server, trained, state, clients)
        for i, c in enumerate(clients):
            Recorder.uploads.append((int(c), {k: upload[k][i].detach().double().clone() for k in self.keys}))
        return new, upload


class PoisonHooks(LocalHooks):
    """Client `victim`'s loss (and so its update) becomes NaN; the others' arithmetic is unchanged."""

    def __init__(self, clients, victim):
        self.nan = torch.tensor([math.nan if c == victim else 0.0 for c in clients])

    def loss(self, adapters, start):
        key = next(k for k in adapters if k.endswith("lora_B"))
        return adapters[key].flatten(1).sum(1) * self.nan.to(adapters[key].device)


class Poisoned(FedSALoRA):
    """FedSA-LoRA (private B) whose client 3 diverges whenever it trains."""

    def configure_client(self, server, state, clients, task):
        plan = super().configure_client(server, state, clients, task)
        if task == Task.TRAIN:
            plan.hooks = PoisonHooks(clients, 3)
        return plan


class NaNServer(Strategy):
    """FedIT whose aggregate puts a NaN into the head bias in round 2."""

    def aggregate_train(self, server, reduced, *, round_index):
        new = super().aggregate_train(server, reduced, round_index=round_index)
        if round_index == 2:
            new["head.bias"] = new["head.bias"].clone()
            new["head.bias"][0, 1] = math.nan
        return new


@pytest.fixture
def registered():
    """Test strategies under `strategy.name` for these tests only (others list every registered method)."""
    added = {"test_recorder": Recorder, "test_poisoned": Poisoned, "test_nan_server": NaNServer}
    STRATEGIES.update(added)
    Recorder.uploads.clear()
    yield
    for name in added:
        del STRATEGIES[name]


def _seen(seed: int) -> np.ndarray:
    """The clients that train in TINY's data for this seed."""
    from fedhpc.data import build_federated_data

    return build_federated_data(load_config(CONFIG, TINY).data, num_clients=8, seed=seed).seen


def test_dropped_clients_count_in_nothing_and_partial_work_counts_by_steps_done(tmp_path, registered):
    from fedhpc.assemble import assemble

    overrides = TINY + ["strategy.name=test_recorder", "rounds=1", "train.local_epochs=2", "faults.dropout=0.3",
                        "faults.stragglers=0.5", "faults.policy=partial", f"out_dir={tmp_path}"]
    for seed in range(100):  # a seed with a dropped, a late and an on-time client
        seen = _seen(seed)
        dropped, late, work = _draws(seed, seen, 1, 0.3, 0.5)
        if dropped and late and len(dropped) + len(late) < len(seen):
            break
    cfg = load_config(CONFIG, overrides + [f"seed={seed}"])
    r = assemble(cfg, MPI.COMM_SELF)
    run(cfg, comm=MPI.COMM_SELF, progress=False)
    returned = [c for c in seen if c not in dropped]
    assert sorted(c for c, _ in Recorder.uploads) == returned  # a dropped client does not train at all
    n = r.data.num_examples
    weight = {}
    for c in returned:
        total = cfg.train.local_epochs * math.ceil(len(r.data.client_train[c]) / cfg.train.batch_size)
        done = max(1, math.floor(work[c] * total)) if c in late else total
        weight[c] = n[c] * max(1, round(256 * done / total)) / 256  # steps done / asked, to 1/256
    saved = load_checkpoint(tmp_path / "quickstart/checkpoints/round-000001.h5", clients=np.arange(8), device="cpu")
    uploads = dict(Recorder.uploads)
    for key in r.model.shapes:
        expected = sum(weight[c] * uploads[c][key] for c in returned) / sum(weight.values())
        torch.testing.assert_close(saved.server[key][0], expected.float(), rtol=0, atol=2e-6, msg=key)
    (m,) = [json.loads(line) for line in (tmp_path / "quickstart/metrics.jsonl").read_text().splitlines()]
    assert (m["participants"], m["returned"], m["dropped"], m["late"], m["diverged"]) == (
        len(seen), len(returned), len(dropped), len(late), 0)
    per_client = sum(int(np.prod(s)) for s in r.model.shapes.values()) * 4  # FedIT: every key, float32, both ways
    assert (m["bytes_up"], m["bytes_down"]) == (len(returned) * per_client, len(seen) * per_client)


def test_a_round_nobody_returns_from_leaves_the_server_as_it_was(tmp_path):
    overrides = TINY + ["rounds=3", "sampling.count=1", "faults.dropout=0.5", "checkpoint.keep=3",
                        f"out_dir={tmp_path}"]
    from fedhpc.config import SamplingConfig
    from fedhpc.experiment import sample_clients

    def nobody_in_round_2(seed):
        sampled = sample_clients(_seen(seed), SamplingConfig(count=1), seed=seed, round_index=2)
        return len(draw_faults(FaultsConfig(dropout=0.5), sampled, seed=seed, round_index=2).returned) == 0

    seed = next(s for s in range(100) if nobody_in_round_2(s))
    run(load_config(CONFIG, overrides + [f"seed={seed}"]), comm=MPI.COMM_SELF, progress=False)
    ckpts = tmp_path / "quickstart/checkpoints"
    one, two = (load_checkpoint(ckpts / f"round-00000{i}.h5", clients=np.arange(8), device="cpu") for i in (1, 2))
    assert all(torch.equal(one.server[k], two.server[k]) for k in one.server)
    rounds = [json.loads(line) for line in (tmp_path / "quickstart/metrics.jsonl").read_text().splitlines()]
    assert rounds[1]["returned"] == 0 and rounds[1]["train_loss"] is None
    assert rounds[1]["bytes_up"] == rounds[0]["bytes_up"] and rounds[1]["bytes_down"] > rounds[0]["bytes_down"]


def test_a_diverged_client_is_left_out_and_named(tmp_path, registered, capsys):
    overrides = TINY + ["strategy.name=test_poisoned", "rounds=2", "faults.diverged=exclude", "checkpoint.keep=2",
                        f"out_dir={tmp_path}"]
    assert main(["run", CONFIG, *overrides]) == 0
    out = capsys.readouterr().out
    for round_index in (1, 2):
        assert (f"fedhpc: warning: round {round_index}: client(s) 3 diverged (loss or update NaN / inf); left out "
                "of the aggregate, their state kept from before the round") in out.splitlines()
    rounds = [json.loads(line) for line in (tmp_path / "quickstart/metrics.jsonl").read_text().splitlines()]
    assert [m["diverged"] for m in rounds] == [1, 1] and all(math.isfinite(m["train_loss"]) for m in rounds)
    saved = load_checkpoint(tmp_path / "quickstart/checkpoints/round-000002.h5", clients=np.arange(8), device="cpu")
    assert all(bool(torch.isfinite(v).all()) for v in saved.server.values())
    for key, value in saved.clients.items():  # client 3's private B and head never moved from the initial ones
        assert torch.isfinite(value).all(), key
        if key.endswith("lora_B"):
            assert torch.equal(value[3], torch.zeros_like(value[3])) and value[0].abs().sum() > 0, key


def test_a_diverged_client_stops_the_run_in_one_line(tmp_path, registered, capsys):
    assert main(["run", CONFIG, *TINY, "strategy.name=test_poisoned", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err == ("fedhpc: error: round 1: client 3 diverged (loss or update NaN / inf); lower train.optimizer.lr, "
                   "set train.max_grad_norm, or set faults.diverged=exclude to leave diverged clients out of the "
                   "aggregate\n")


def test_a_nan_the_aggregate_makes_stops_the_run_in_one_line(tmp_path, registered, capsys):
    assert main(["run", CONFIG, *TINY, "strategy.name=test_nan_server", f"out_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == ("fedhpc: error: round 2: strategy test_nan_server's aggregate put NaN / inf "
                                       "into server tensor 'head.bias'; the run stops rather than carry it on\n")


def _seed_where(condition, rounds, p_drop):
    """A seed whose dropped clients per round (every seen client takes part) satisfy `condition`."""
    for seed in range(200):
        seen = _seen(seed)
        draws = {r: set(_draws(seed, seen, r, p_drop, 0.0)[0]) for r in rounds}
        found = condition(draws)
        if found:
            return seed, found
    raise AssertionError("no seed found")


def _bases(B: np.ndarray) -> np.ndarray:
    return np.linalg.qr(B)[0]


def test_hilora_routes_a_client_that_missed_the_clustering_round(tmp_path):
    """Round 2 clusters; a client dropped then is routed by its EMA statistic (numpy principal
    angles against the member means) on the client, and by the server in its join round."""
    seed, missed = _seed_where(lambda d: sorted(d[2]) if d[2] and not d[2] & d[3] and len(d[2]) <= 2 else None,
                               (2, 3), 0.3)
    seen = _seen(seed)
    overrides = TINY + ["strategy.name=hilora", "rounds=4", "strategy.root_rounds=2", "strategy.cluster_rounds=2",
                        "strategy.k_max=3", "faults.dropout=0.3", "checkpoint.keep=4", f"seed={seed}",
                        f"out_dir={tmp_path}"]
    run(load_config(CONFIG, overrides), comm=MPI.COMM_SELF, progress=False)
    ckpts = tmp_path / "quickstart/checkpoints"
    two, three = (load_checkpoint(ckpts / f"round-00000{i}.h5", clients=np.arange(8), device="cpu") for i in (2, 3))
    clusters = two.server["clusters"].numpy()
    assert (clusters[missed] == -1).all() and (clusters[np.setdiff1d(seen, missed)] >= 0).all()
    modules = [k[:-len(".ema_B")] for k in two.clients if k.endswith(".ema_B")]
    k = int(clusters.max()) + 1
    for m in modules:  # the centres are the member means of the statistic
        stats = two.clients[f"{m}.ema_B"].double().numpy()
        means = np.stack([stats[clusters == j].mean(0) for j in range(k)])
        np.testing.assert_allclose(two.server[f"{m}.centre_B"].numpy(), means, rtol=0, atol=1e-6)
    for c in missed:  # numpy: mean over modules of ||U_cᵀ U_j||_F² / r, the closest centre
        sims = np.zeros(k)
        for m in modules:
            U = _bases(two.clients[f"{m}.ema_B"][c].double().numpy())
            for j in range(k):
                V = _bases(two.server[f"{m}.centre_B"][j].double().numpy())
                sims[j] += np.square(U.T @ V).sum() / U.shape[1] / len(modules)
        assert three.server["clusters"][c] == int(np.argmax(sims)), (c, sims)
    m3 = json.loads((tmp_path / "quickstart/metrics.jsonl").read_text().splitlines()[2])
    assert m3["returned"] == len(seen) - len(_draws(seed, seen, 3, 0.3, 0.0)[0])
    # the join round's plan: the missed clients count in no mean and send their statistic
    from fedhpc.assemble import assemble

    strategy = assemble(load_config(CONFIG, overrides), MPI.COMM_SELF).strategy
    blocks = strategy.configure_train(two.server, seen, seen).exchange.blocks
    tier = blocks["tier"].weight_of(seen, strategy.population.num_examples).numpy()
    assert (tier[np.isin(seen, missed)] == 0).all() and (tier[~np.isin(seen, missed)] > 0).all()
    assert blocks["join"].reduce == "gather" and np.flatnonzero(blocks["join"].weights).tolist() == missed


def test_fedtreelora_places_a_client_that_missed_the_gathering_round(tmp_path):
    """Round 2 builds the tree; a client that trained in round 1 and missed round 2 is placed, per
    layer, at the cluster whose mean B is nearest its own (numpy Frobenius distances)."""
    seed, missed = _seed_where(lambda d: sorted(d[2]) if d[2] and not d[2] & (d[1] | d[3]) and len(d[2]) <= 2
                               else None, (1, 2, 3), 0.3)
    overrides = TINY + ["strategy.name=fedtreelora", "rounds=3", "strategy.warmup_rounds=2", "strategy.tau=-1",
                        "faults.dropout=0.3", "checkpoint.keep=3", f"seed={seed}", f"out_dir={tmp_path}"]
    run(load_config(CONFIG, overrides), comm=MPI.COMM_SELF, progress=False)
    ckpts = tmp_path / "quickstart/checkpoints"
    two, three = (load_checkpoint(ckpts / f"round-00000{i}.h5", clients=np.arange(8), device="cpu") for i in (2, 3))
    labels = two.server["tree.labels"].numpy()
    assert (labels[:, missed] == -1).all()
    layers = sorted({k.split(".")[1] for k in two.clients if k.endswith(".lora_B")})
    for index, layer in enumerate(layers):
        keys = sorted(k for k in two.clients if k.endswith(".lora_B") and k.split(".")[1] == layer)
        for c in missed:
            own = np.concatenate([two.clients[k][c].double().numpy().ravel() for k in keys])
            means = [np.concatenate([two.server[k][j].double().numpy().ravel() for k in keys])
                     for j in range(int(two.server["tree.counts"][index]))]
            assert np.abs(own).sum() > 0  # it trained in round 1
            nearest = int(np.argmin([np.linalg.norm(own - mean) for mean in means]))
            assert three.server["tree.labels"][index, c] == nearest
    from fedhpc.assemble import assemble

    strategy = assemble(load_config(CONFIG, overrides), MPI.COMM_SELF).strategy
    seen = _seen(seed)
    blocks = strategy.configure_train(two.server, seen, seen).exchange.blocks
    assert np.flatnonzero(blocks["join"].weights).tolist() == missed
    for name, block in blocks.items():
        if name != "join":
            w = block.weight_of(seen, strategy.population.num_examples).numpy()
            assert (w[np.isin(seen, missed)] == 0).all() and (w[~np.isin(seen, missed)] > 0).all(), name


RANK_CASES = {
    "fedit_faults": ["strategy.name=fedit", "faults.dropout=0.3", "faults.stragglers=0.5", "faults.policy=partial",
                     "sampling.fraction=0.7", "rounds=3"],
    "hilora_faults": ["strategy.name=hilora", "strategy.root_rounds=1", "strategy.cluster_rounds=1",
                      "faults.dropout=0.4", "rounds=3", "seed=1"],
    "fedtreelora_faults": ["strategy.name=fedtreelora", "strategy.warmup_rounds=1", "faults.dropout=0.4",
                           "faults.stragglers=0.5", "faults.policy=drop", "rounds=3", "seed=1"],
}


def test_faults_are_the_same_on_any_rank_count(tmp_path):
    from test_experiment import _close

    launcher = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    assert launcher is not None, "mpiexec not found (pip install -r requirements.txt)"
    driver = ("import sys; from fedhpc.cli import main; cases = eval(sys.argv[1]); "
              "[main(['run', sys.argv[2], *c, '--quiet']) for c in cases]")
    cases = [[*TINY, *o, f"name={name}", f"out_dir={tmp_path / 'n3'}"] for name, o in RANK_CASES.items()]
    proc = subprocess.run([launcher, "-n", "3", sys.executable, "-c", driver, repr(cases), CONFIG], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, o in RANK_CASES.items():
        run(load_config(CONFIG, [*TINY, *o, f"name={name}", f"out_dir={tmp_path / 'n1'}"]), comm=MPI.COMM_SELF,
            progress=False)
        one, three = (tmp_path / n / name for n in ("n1", "n3"))
        _close(json.loads((three / "summary.json").read_text()), json.loads((one / "summary.json").read_text()),
               rel=0)
        lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, three)]
        assert len(lines[0]) == len(lines[1]) == 3
        for a, b in zip(*lines):
            _close(*({k: v for k, v in m.items() if k != "round_seconds"} for m in (a, b)), rel=0)
            assert [a[k] for k in ("returned", "dropped", "late", "bytes_up", "bytes_down")] == \
                [b[k] for k in ("returned", "dropped", "late", "bytes_up", "bytes_down")]
        assert sum(m["dropped"] for m in lines[0]) > 0 and sum(m["late"] for m in lines[0]) >= ("stragglers" in str(o))


def test_a_run_with_faults_resumes_to_the_uninterrupted_run(tmp_path):
    from test_checkpoint import _assert_same_run

    overrides = TINY + ["rounds=3", "faults.dropout=0.3", "faults.stragglers=0.5", "faults.policy=partial",
                        "strategy.name=fedsa_lora", "strategy.keep_optimizer_state=true", "checkpoint.keep=3"]
    run(load_config(CONFIG, overrides + [f"out_dir={tmp_path / 'a'}"]), comm=MPI.COMM_SELF, progress=False)
    full, part = tmp_path / "a/quickstart", tmp_path / "b/quickstart"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints/round-000001.h5", part / "checkpoints")
    shutil.copy(full / "config.yaml", part)
    run(load_config(CONFIG, overrides + [f"out_dir={tmp_path / 'b'}"]), comm=MPI.COMM_SELF, progress=False,
        resume=find_resumable(part, comm=MPI.COMM_SELF))
    _assert_same_run(part, full)


def _every_method():
    from fedhpc.strategies import list_strategies

    return list_strategies()


@pytest.mark.parametrize("strategy", _every_method())
def test_every_method_runs_through_dropout_late_clients_and_empty_rounds(strategy, tmp_path):
    """One or two participants a round, most of them dropped or late: rounds nobody returns from,
    rounds with one partial client, and (HiLoRA, FedTreeLoRA) clients that miss the gathering round."""
    from test_checkpoint import OPTIONS

    overrides = TINY + [f"strategy.name={strategy}", *OPTIONS.get(strategy, []), "rounds=4", "sampling.count=2",
                        "faults.dropout=0.5", "faults.stragglers=0.5", "faults.policy=partial", "seed=2",
                        f"out_dir={tmp_path}"]
    summary = run(load_config(CONFIG, overrides), comm=MPI.COMM_SELF, progress=False)
    rounds = [json.loads(line) for line in (tmp_path / "quickstart/metrics.jsonl").read_text().splitlines()]
    returned = [m["returned"] for m in rounds]
    assert 0 in returned and max(returned) > 0 and sum(m["late"] for m in rounds) > 0, returned
    assert summary["personalized_mean"] is not None and math.isfinite(summary["personalized_mean"])


def test_waiting_for_late_clients_changes_no_number(tmp_path):
    """policy wait: late clients do their full work, so the run is the fault-free one (counts aside)."""
    runs = {}
    for name, extra in (("plain", []), ("wait", ["faults.stragglers=0.7", "faults.policy=wait"])):
        run(load_config(CONFIG, TINY + extra + [f"out_dir={tmp_path / name}", "sampling.fraction=0.7"]),
            comm=MPI.COMM_SELF, progress=False)
        runs[name] = [json.loads(x) for x in (tmp_path / name / "quickstart/metrics.jsonl").read_text().splitlines()]
    assert sum(m["late"] for m in runs["wait"]) > 0 and all(m["dropped"] == 0 for m in runs["wait"])
    clock = {"round_seconds", "clients_per_second", "returned", "dropped", "late", "diverged"}
    for a, b in zip(runs["plain"], runs["wait"]):
        assert {k: v for k, v in a.items() if k not in clock} == {k: v for k, v in b.items() if k not in clock}


def test_a_diverging_method_with_a_shared_entry_is_named_not_crashed(tmp_path, capsys):
    """ILoRA's pass state carries an entry the clients share (its dense residual, leading dimension 1):
    a diverged client must still be named in one line (stop) or left out (exclude), not end in an
    IndexError from filtering that entry by client (found by a sweep at lr 0.1)."""
    ilora = [*TINY, "strategy={name: ilora, aggregation: qr, init: qr, compensation: 1.0}", "train.optimizer.lr=1000"]
    assert main(["run", CONFIG, *ilora, f"out_dir={tmp_path / 'stop'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedhpc: error: round 1: client") and "diverged (loss or update NaN / inf)" in err
    assert main(["run", CONFIG, *ilora, "faults.diverged=exclude", f"out_dir={tmp_path / 'exclude'}"]) == 0
    assert "diverged (loss or update NaN / inf); left out of the aggregate" in capsys.readouterr().out


def test_keep_rows_filters_clients_and_keeps_shared_entries():
    from fedhpc.runtime.faults import keep_rows

    part = {"b": torch.arange(6.0).reshape(3, 2), "shared": torch.ones(1, 4), "scalar": torch.tensor(2.0)}
    kept = keep_rows(part, torch.tensor([True, False, True]))
    assert torch.equal(kept["b"], torch.tensor([[0.0, 1.0], [4.0, 5.0]]))
    assert kept["shared"] is part["shared"] and kept["scalar"] is part["scalar"]
