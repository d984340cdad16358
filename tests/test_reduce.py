"""The declared exchange carried out (`Reduction`) against a float64 Python loop over clients, the same
result on 1 and 3 ranks, and the modelled bytes (`modelled_bytes`) against hand-computed numbers."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from fedhpc.runtime.exchange import Block, Exchange, modelled_bytes

from conftest import REPO, mpiexec_path

sys.path.insert(0, str(Path(__file__).parent / "mpi"))
import reduce_ranks  # noqa: E402


def _loop_reference(participants: np.ndarray) -> dict:
    """Each block's result written as a loop over the participants, in float64."""
    rows = reduce_ranks.uploads(participants)
    out = {}
    for name, block in reduce_ranks.MEANS.items():
        w = reduce_ranks.weights(block)
        means = {k: np.zeros((block["num_groups"], *s)) for k, s in block["keys"].items()}
        totals = np.zeros(block["num_groups"])
        for g in range(block["num_groups"]):
            for i, c in enumerate(participants):
                if block["groups"][c] != g or w[c] == 0:  # a weight-0 client counts nowhere
                    continue
                totals[g] += w[c]
                for k in block["keys"]:
                    means[k][g] += w[c] * rows[k][i].double().numpy()
            if totals[g] > 0:
                for k in block["keys"]:
                    means[k][g] /= totals[g]
        out[name] = (means, totals)
    for name, block in reduce_ranks.GATHERS.items():
        w = reduce_ranks.weights(block)
        keep = [i for i, c in enumerate(participants) if w[c] > 0]  # participants are sorted
        out[name] = ({k: rows[k][keep].numpy() for k in block["keys"]}, participants[keep].tolist(),
                     [w[participants[i]] for i in keep])
    return out


@pytest.mark.parametrize("scenario", list(reduce_ranks.SCENARIOS))
def test_mean_and_gather_blocks_match_a_python_loop(scenario):
    participants = reduce_ranks.SCENARIOS[scenario]
    out = reduce_ranks.main(MPI.COMM_SELF, scenario)
    ref = _loop_reference(participants)
    for name in reduce_ranks.MEANS:
        means, totals = ref[name]
        assert out[name]["dtype"] == "torch.float64"
        assert out[name]["weights"] == totals.tolist()  # sums of small integers: exact
        for key, mean in means.items():
            np.testing.assert_allclose(np.array(out[name]["values"][key]), mean, rtol=1e-6, atol=1e-6,
                                       err_msg=f"{name} {key}")
    for name in reduce_ranks.GATHERS:
        values, clients, weights = ref[name]
        assert out[name]["dtype"] == "torch.float32"
        assert out[name]["clients"] == clients and out[name]["weights"] == weights
        for key, rows in values.items():
            np.testing.assert_array_equal(np.array(out[name]["values"][key], dtype=np.float32), rows)


def test_the_reference_exercises_every_case():
    """The fixture has what the test claims: different groupings, weight-0 clients in one block who
    count in another, a group with only weight-0 clients, an empty group, a gather that drops some."""
    a, b = reduce_ranks.MEANS["a"], reduce_ranks.MEANS["b"]
    ids = reduce_ranks.SCENARIOS["most"]
    assert not np.array_equal(a["groups"], b["groups"])
    zero = ids[a["weights"][ids] == 0]
    assert len(zero) >= 2 and (reduce_ranks.weights(b)[zero] > 0).all()
    _, totals = _loop_reference(ids)["a"]
    assert totals[3] == 0 and (a["groups"][ids] == 3).any()  # group 3 took part, all at weight 0
    assert not (b["groups"][ids] == 5).any()
    g = reduce_ranks.GATHERS["g"]
    assert 0 < (g["weights"][ids] == 0).sum() < len(ids)


@pytest.mark.parametrize("ranks", [3])
def test_reduction_does_not_depend_on_the_rank_count(ranks):
    launcher = mpiexec_path()  # fails, not skips, when mpich is missing
    script = Path(__file__).parent / "mpi" / "reduce_ranks.py"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([launcher, "-n", str(ranks), sys.executable, str(script)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    everything = json.loads(done.stdout)  # per scenario, one copy per rank
    mean_bytes = sum(b["num_groups"] * (sum(int(np.prod(s)) for s in b["keys"].values()) + 1)
                     for b in reduce_ranks.MEANS.values()) * 8
    for scenario, results in everything.items():
        assert len(results) == ranks
        single = reduce_ranks.main(MPI.COMM_SELF, scenario)
        for result in results:
            for name in reduce_ranks.GATHERS:
                assert result[name] == single[name]
            for name in reduce_ranks.MEANS:
                assert result[name]["weights"] == single[name]["weights"]
                for key, value in single[name]["values"].items():
                    np.testing.assert_allclose(result[name]["values"][key], value, rtol=1e-12, atol=1e-12)
        if scenario == "first":  # ranks 1 and 2 host no participant: they join with zeros, group sums only
            assert [r["sent"] for r in results[1:]] == [mean_bytes] * 2


# --- modelled bytes -------------------------------------------------------------------------------
RANKS = np.array([2, 4, 1, 4, 3, 2])
LORA = {"m.lora_A": (4, 7), "m.lora_B": (6, 4)}  # padded to r_max = 4: r*7 + 6*r = 13 r floats at rank r
HEAD = {"head.weight": (3, 5), "head.bias": (3,)}  # 18 floats, rank-free


def test_modelled_bytes_count_each_clients_keys_at_its_rank_and_skip_untrained_blocks():
    num_examples = np.array([5.0, 3.0, 8.0, 2.0, 7.0, 1.0])
    trained = np.array([1.0, 1.0, 0.0, 2.0, 1.0, 0.0])  # clients 2 and 5 did not train the LoRA block
    exchange = Exchange({"lora": Block(LORA, reduce="gather", weights=trained),
                         "head": Block(HEAD, groups=np.array([0, 1, 0, 1, 0, 1]), num_groups=2)},
                        down={**LORA, **HEAD})
    participants = np.array([0, 2, 3, 5])  # clients 1 and 4 sit out
    up, down = modelled_bytes(exchange, participants, RANKS, num_examples)
    # up: LoRA of clients 0 (rank 2) and 3 (rank 4) only; the head of all four
    assert up == (13 * 2 + 13 * 4) * 4 + 4 * 18 * 4
    # down: every participant gets the LoRA at its own rank (2, 1, 4, 2) and the head
    assert down == (13 * (2 + 1 + 4 + 2) + 4 * 18) * 4
    # a block weighted by sample counts: a client with no samples uploads nothing for it
    no_samples = np.array([5.0, 3.0, 0.0, 2.0, 7.0, 1.0])
    up, _ = modelled_bytes(Exchange({"head": Block(HEAD)}), participants, RANKS, no_samples)
    assert up == 3 * 18 * 4


def test_modelled_bytes_honour_per_client_overrides_and_down_ranks():
    num_examples = np.ones(6)
    per_client = np.array([100, 200, 300, 400, 500, 600])
    exchange = Exchange({"head": Block(HEAD), "extra": Block({"x": (10,)}, reduce="gather", bytes_up=per_client)},
                        down=dict(LORA), down_ranks=np.array([9, 9, 9, 9, 9, 3]))
    participants = np.array([1, 4, 5])
    up, down = modelled_bytes(exchange, participants, RANKS, num_examples)
    assert up == 3 * 18 * 4 + (200 + 500 + 600)  # the override replaces the block's float count
    assert down == 13 * (9 + 9 + 3) * 4  # down_ranks, not the clients' own ranks (2, 3, 2)
    fixed = Exchange({"head": Block(HEAD)}, down=dict(LORA), down_ranks=np.full(6, 9),
                     bytes_down=np.array([1, 2, 3, 4, 5, 6]))
    assert modelled_bytes(fixed, participants, RANKS, num_examples) == (3 * 18 * 4, 2 + 5 + 6)
    assert modelled_bytes(Exchange(), participants, RANKS, num_examples) == (0, 0)  # nothing travels


def test_a_client_that_did_not_train_a_block_counts_in_nothing_even_nan():
    """Weight 0: no part in the block's mean (a NaN it uploads included), and no bytes up even
    where the block gives per-client byte counts."""
    import torch

    from fedhpc.runtime.reduce import Reduction

    weights = np.array([2.0, 0.0, 3.0])
    exchange = Exchange({"b": Block({"x": (2,)}, weights=weights, bytes_up=np.array([10, 20, 30]))})
    reduction = Reduction(exchange, np.ones(3))
    reduction.add(np.arange(3), {"x": torch.tensor([[1.0, 2.0], [float("nan"), float("inf")], [4.0, 8.0]])})
    means = reduction.finish(comm=MPI.COMM_SELF)[0]["b"]
    assert means.values["x"].tolist() == torch.tensor([[(2 * 1 + 3 * 4) / 5, (2 * 2 + 3 * 8) / 5]]).tolist()
    assert means.weights.tolist() == [5.0]
    assert modelled_bytes(exchange, np.arange(3), RANKS, np.ones(3))[0] == 10 + 30


def test_a_late_clients_share_scales_its_weight_in_mean_and_gathered_blocks():
    """`scale` (a late client's share of its work, runtime/faults.py) multiplies its weight in every
    block: the mean's per-group totals and the gathered rows' weights, against numbers written here."""
    import torch

    from fedhpc.runtime.reduce import Reduction

    n = np.array([4.0, 2.0, 8.0, 6.0])
    scale = np.array([0.5, 1.0, 0.25, 1.0])
    exchange = Exchange({"m": Block({"x": (2,)}, groups=np.array([0, 0, 1, 1]), num_groups=2),
                         "g": Block({"y": (1,)}, reduce="gather")})
    reduction = Reduction(exchange, n)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    reduction.add(np.arange(4), {"x": x, "y": torch.arange(4.0).view(4, 1)}, scale=scale)
    reduced = reduction.finish(comm=MPI.COMM_SELF)[0]
    w = n * scale  # 2, 2, 2, 6
    assert reduced["m"].weights.tolist() == [4.0, 8.0]
    np.testing.assert_allclose(reduced["m"].values["x"].numpy(),
                               [[(2 * 1 + 2 * 3) / 4, (2 * 2 + 2 * 4) / 4], [(2 * 5 + 6 * 7) / 8, (2 * 6 + 6 * 8) / 8]])
    assert reduced["g"].clients.tolist() == [0, 1, 2, 3] and reduced["g"].weights.tolist() == w.tolist()
