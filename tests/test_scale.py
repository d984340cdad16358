"""Issue 21 at test size: the paged store, streamed checkpoints and sampled evaluation against the
in-memory, gathered, all-clients runs they replace (which are the references)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, TINY, mpiexec
from fedhpc.config import load_config
from fedhpc.evaluate import evaluated_clients
from fedhpc.io.checkpoint import find_resumable, verify

CONFIG = str(REPO / "configs/quickstart.yaml")
FEDSA = ["strategy.name=fedsa_lora", "strategy.keep_optimizer_state=true", "rounds=3"]
PAGED = ["store.memory_cap_mb=0.004", "checkpoint.chunk_mb=0.01"]  # pages every round, several chunks per rank
STREAM = ["checkpoint.gather_limit_mb=0"]
WALL_CLOCK = {"round_seconds", "clients_per_second", "wall_seconds", "ranks", "name", "mpi_bytes"}  # mpi_bytes: per rank


def _run(n: int, out: Path, name: str, extra: list[str]) -> Path:
    proc = mpiexec(n, ["run", CONFIG, *TINY, *FEDSA, f"out_dir={out}", f"name={name}", "--quiet", *extra], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / name


def _summary(run_dir: Path) -> dict:
    return {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k not in WALL_CLOCK}


def _datasets(path: Path) -> dict:
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, (obj[()], dict(obj.attrs)))
                     if isinstance(obj, h5py.Dataset) and name not in ("metrics", "config") else None)
    return found


def _assert_same_file(a: Path, b: Path):
    da, db = _datasets(a), _datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        assert np.array_equal(da[name][0], db[name][0]), name
        assert da[name][1] == db[name][1], name  # crc32 and torch dtype
    assert all(ok for *_, ok in verify(b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One rank, in-memory store, gathered checkpoints, every client evaluated."""
    return _run(1, tmp_path_factory.mktemp("ref"), "ref", [])


def test_two_ranks_paged_and_streamed_equal_one_rank_in_memory(reference, tmp_path):
    paged = _run(2, tmp_path, "paged", PAGED)
    for rank in (0, 1):  # the store really paged: rows went to the per-rank files
        assert (paged / "store" / f"clients-rank{rank:05d}.bin").stat().st_size > 0
        assert (paged / "store" / f"optimizer-rank{rank:05d}.bin").stat().st_size > 0
    assert _summary(paged) == _summary(reference)
    assert json.loads((paged / "client_accuracy.json").read_text()) == \
        json.loads((reference / "client_accuracy.json").read_text())
    _assert_same_file(reference / "checkpoints/round-000003.h5", paged / "checkpoints/round-000003.h5")


def test_streamed_checkpoint_equals_the_gathered_one(reference, tmp_path):
    streamed = _run(2, tmp_path, "streamed", STREAM + ["checkpoint.chunk_mb=0.01"])
    _assert_same_file(reference / "checkpoints/round-000003.h5", streamed / "checkpoints/round-000003.h5")
    inspect = subprocess.run([sys.executable, "-m", "fedhpc", "inspect", str(streamed / "checkpoints/round-000003.h5")],
                             capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert inspect.returncode == 0 and "all checksums ok" in inspect.stdout, inspect.stdout + inspect.stderr


@pytest.mark.slow  # ~35-60 s on 2 shared cores
def test_paged_run_resumes_on_another_rank_count(reference, tmp_path):
    first = _run(2, tmp_path, "resumed", PAGED + ["rounds=2"])
    proc = mpiexec(1, ["run", "--resume", str(first), "rounds=3", "--quiet"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _summary(first) == _summary(reference)


KILLER = r"""
import os, signal, sys
sys.path.insert(0, "tests")
import fedhpc.io.checkpoint.stream as stream
from conftest import TINY
from mpi4py import MPI
from fedhpc.config import load_config
from fedhpc.experiment import run

calls = []
real = stream._write_chunk
def dying(*args):
    if stream_round[0] == 2:
        calls.append(1)
        if len(calls) > 3:  # in the middle of round 2's rows
            os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
stream._write_chunk = dying
stream_round = [0]
real_write = stream.write_streamed
def tracked(path, *a, **k):
    stream_round[0] = int(path.name[6:12])
    return real_write(path, *a, **k)
stream.write_streamed = tracked
cfg = load_config(sys.argv[1], TINY + sys.argv[2:])
run(cfg, comm=MPI.COMM_SELF, progress=False)
"""


@pytest.mark.slow  # ~35-60 s on 2 shared cores
def test_sigkill_during_a_streamed_write_leaves_the_previous_checkpoint(reference, tmp_path):
    args = [*FEDSA, *PAGED, f"out_dir={tmp_path}", "name=killed"]
    proc = subprocess.run([sys.executable, "-c", KILLER, CONFIG, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "round-000002.h5.tmp").exists() and not (ckpts / "round-000002.h5").exists()
    from mpi4py import MPI

    assert find_resumable(tmp_path / "killed", comm=MPI.COMM_SELF) == ckpts / "round-000001.h5"
    resumed = mpiexec(2, ["run", "--resume", str(tmp_path / "killed"), "--quiet"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not any(p.suffix == ".tmp" for p in ckpts.iterdir())
    assert _summary(tmp_path / "killed") == _summary(reference)


def test_sampled_evaluation_measures_a_seeded_subset_of_the_same_accuracies(reference, tmp_path):
    sampled = _run(1, tmp_path, "sampled", ["eval.fraction=0.5", "eval.final=sample"])
    got = json.loads((sampled / "client_accuracy.json").read_text())
    want = json.loads((reference / "client_accuracy.json").read_text())
    seen = np.array(want["clients"])
    cfg = load_config(CONFIG, TINY + ["eval.fraction=0.5", "eval.final=sample"])
    chosen = evaluated_clients(seen, cfg.eval, seed=cfg.seed, round_index=3, final=True)
    assert got["clients"] == chosen.tolist() and len(chosen) == round(0.5 * len(seen))
    full = dict(zip(want["clients"], want["personalized_accuracy"]))
    assert got["personalized_accuracy"] == [full[c] for c in got["clients"]]  # training is untouched
    last = json.loads((sampled / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["evaluated_clients"] == len(chosen)
    assert last["personalized_mean"] == pytest.approx(np.nanmean(got["personalized_accuracy"]), abs=1e-12)
    assert _summary(sampled)["final_train_loss"] == _summary(reference)["final_train_loss"]
    # the last round evaluates everyone unless asked otherwise; samples differ by round; count wins
    assert len(evaluated_clients(seen, cfg.eval, seed=0, round_index=3, final=False)) == len(chosen)
    cfg_all = load_config(CONFIG, TINY + ["eval.fraction=0.5"])
    assert evaluated_clients(seen, cfg_all.eval, seed=0, round_index=3, final=True).tolist() == seen.tolist()
    big = np.arange(1000)
    draws = {tuple(evaluated_clients(big, cfg.eval, seed=0, round_index=r, final=False)) for r in range(1, 4)}
    assert len(draws) == 3
    counted = load_config(CONFIG, TINY + ["eval.count=7", "eval.fraction=0.5"])
    assert len(evaluated_clients(big, counted.eval, seed=0, round_index=1, final=False)) == 7


@pytest.mark.slow  # ~35-60 s on 2 shared cores
def test_bfloat16_store_keeps_bfloat16_rows_and_resumes(tmp_path):
    run_dir = _run(1, tmp_path, "bf16", ["store.dtype=bfloat16", "rounds=2"])
    rows = _datasets(run_dir / "checkpoints/round-000002.h5")
    dtypes = {name: attrs["torch_dtype"] for name, (_, attrs) in rows.items() if name.startswith("clients/")}
    assert dtypes and set(dtypes.values()) == {"bfloat16"}
    proc = mpiexec(2, ["run", "--resume", str(run_dir), "rounds=3", "--quiet"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3


def test_bad_store_and_eval_values_name_the_key():
    with pytest.raises(Exception, match="memory_cap_mb"):
        load_config(CONFIG, ["store.memory_cap_mb=-1"])
    with pytest.raises(Exception, match="fraction"):
        load_config(CONFIG, ["eval.fraction=0"])
    with pytest.raises(Exception, match="gather_limit_mb"):
        load_config(CONFIG, ["checkpoint.gather_limit_mb=-2"])


def _planted_statistics(rng, truth, dims, r, noise):
    from fedhpc.strategies.subspace_clustering import Statistic

    out = []
    for p in dims:
        U = [np.linalg.qr(rng.standard_normal((p, r)))[0] for _ in range(truth.max() + 1)]
        out.append(Statistic(torch.tensor(np.stack([U[c] @ rng.standard_normal((r, r)) + noise * rng.standard_normal((p, r))
                                                    for c in truth]))))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_scalable_clustering_finds_the_planted_clusters_the_exact_path_finds(seed):
    from sklearn.metrics import adjusted_rand_score

    from fedhpc.strategies.subspace_clustering import cluster_clients, cluster_clients_scalable

    rng = np.random.default_rng(seed)
    truth = rng.permutation(np.arange(150) % 3)
    stats = _planted_statistics(rng, truth, (96, 128, 80, 96), 4, 0.1)
    exact = cluster_clients(stats, k_min=2, k_max=8)
    scalable = cluster_clients_scalable(stats, k_min=2, k_max=8, neighbors=30)
    assert adjusted_rand_score(truth, exact.labels) == 1.0
    assert scalable.count == exact.count == 3
    assert adjusted_rand_score(truth, scalable.labels) == 1.0
    assert scalable.affinity.nnz < 150 * 150 / 2  # a sparse graph


def test_projected_similarities_estimate_the_exact_ones():
    """Principal angles (biased up by about r / width for every pair) and cosines (unbiased) of
    projected statistics against subspace_distance / cosine_distance in float64."""
    from fedhpc.strategies.subspace_clustering import (_pair_similarity, cosine_distance, project_statistics,
                                                       subspace_distance, bases)

    rng = np.random.default_rng(3)
    truth = np.arange(40) % 4
    stats = _planted_statistics(rng, truth, (300, 200), 4, 0.1)
    i = np.arange(40)
    j = np.tile(np.arange(40), (40, 1))
    exact = 1 - subspace_distance([bases(s.B) for s in stats])
    got = _pair_similarity(project_statistics(stats, similarity="subspace", width=256), i, j).numpy()
    off = ~np.eye(40, dtype=bool)
    assert np.abs(got - exact - 4 / 256)[off].mean() < 0.03
    assert np.corrcoef(got[off], exact[off])[0, 1] > 0.95
    exact_cos = 1 - cosine_distance(stats)
    got_cos = _pair_similarity(project_statistics(stats, similarity="cosine", width=256), i, j).numpy()
    assert np.abs(got_cos - exact_cos)[off].mean() < 0.05
    assert np.corrcoef(got_cos[off], exact_cos[off])[0, 1] > 0.85


def test_hilora_runs_with_the_scalable_clustering(tmp_path):
    from mpi4py import MPI

    from fedhpc.experiment import run

    opts = ["strategy.name=hilora", "strategy.root_rounds=1", "strategy.cluster_rounds=1", "rounds=3",
            f"out_dir={tmp_path}"]
    exact = run(load_config(CONFIG, TINY + opts + ["name=exact"]), comm=MPI.COMM_SELF, progress=False)
    scalable = run(load_config(CONFIG, TINY + opts + ["name=scalable", "strategy.clustering=scalable",
                                                      "strategy.scalable_neighbors=3"]),
                   comm=MPI.COMM_SELF, progress=False)
    assert scalable["num_clusters"] >= 1 and np.isfinite(scalable["personalized_mean"])
    assert exact["num_clusters"] >= 1


@pytest.mark.parametrize("seed", [0, 1])
def test_principal_bases_keep_the_exact_paths_clusters_on_noisy_statistics(seed):
    """Noise 0.3 on 256-row statistics: the exact path still finds the 3 planted clusters (ARI 1);
    a random Gaussian map to 64 rows loses them (ARI ~0.9, the map's ±1/√64 error on inner
    products swamps the shared part), projecting on the principal bases keeps them (ARI 1)."""
    from sklearn.metrics import adjusted_rand_score

    from fedhpc.strategies.subspace_clustering import cluster_clients, cluster_clients_scalable

    rng = np.random.default_rng(seed)
    truth = rng.permutation(np.arange(150) % 3)
    stats = _planted_statistics(rng, truth, (256, 256, 256, 256), 4, 0.3)
    exact = cluster_clients(stats, k_min=2, k_max=8)
    principal = cluster_clients_scalable(stats, k_min=2, k_max=8, neighbors=30)
    gaussian = cluster_clients_scalable(stats, k_min=2, k_max=8, neighbors=30, basis="gaussian")
    assert adjusted_rand_score(truth, exact.labels) == 1.0
    assert adjusted_rand_score(truth, principal.labels) == 1.0 and principal.count == exact.count
    assert adjusted_rand_score(truth, gaussian.labels) < 0.99


def test_principal_bases_span_the_planted_subspaces():
    """Orthonormal [p, width] bases (float64 QR check); every planted subspace U_c lies in their
    span (||Gᵀ U_c||² / r near 1, where a random 16-of-200 span keeps ~16/200); keyed: same bits twice."""
    from fedhpc.strategies.subspace_clustering import principal_bases

    rng = np.random.default_rng(4)
    truth = np.arange(90) % 3
    p, r = 200, 4
    U = [np.linalg.qr(rng.standard_normal((p, r)))[0] for _ in range(3)]
    from fedhpc.strategies.subspace_clustering import Statistic
    stats = [Statistic(torch.tensor(np.stack([U[c] @ rng.standard_normal((r, r)) + 0.05 * rng.standard_normal((p, r))
                                              for c in truth]), dtype=torch.float32))]
    G = principal_bases(stats, width=16, sample=60, seed=1)[0].double()
    assert G.shape == (p, 16)
    assert torch.allclose(G.T @ G, torch.eye(16, dtype=torch.float64), atol=1e-5)
    for Uc in U:
        assert (G.T @ torch.tensor(Uc)).square().sum() / r > 0.97
    assert torch.equal(principal_bases(stats, width=16, sample=60, seed=1)[0], G.float())


@pytest.mark.parametrize("similarity", ["subspace", "cosine", "product"])
def test_pair_similarity_against_a_float64_loop(similarity):
    """The batched candidate scores (gathered Lᵀ_j, one bmm per matrix) against a per-pair float64
    loop over the same projected factors: ||L_jᵀ L_i||² / q, <L_i, L_j>, <L_i R_i, L_j R_j>."""
    from fedhpc.strategies.subspace_clustering import Statistic, _pair_similarity, project_statistics

    rng = np.random.default_rng(7)
    n, q = 30, 3
    stats = [Statistic(torch.randn(n, p, q, dtype=torch.float64),
                       torch.randn(n, q, 20, dtype=torch.float64) if similarity == "product" else None)
             for p in (40, 24)]
    projected = project_statistics(stats, similarity="subspace" if similarity == "subspace" else "cosine", width=16)
    i = np.array([0, 5, 29, 7])
    j = rng.integers(0, n, (4, 6))
    got = _pair_similarity(projected, i, j).numpy()
    want = np.zeros((4, 6))
    for a, row in enumerate(i):
        for b, col in enumerate(j[a]):
            for kind, L, R in projected:
                Li, Lj = L[row].double().numpy(), L[col].double().numpy()
                if kind == "square":
                    want[a, b] += np.square(Lj.T @ Li).sum() / q
                elif kind == "linear":
                    want[a, b] += (Li * Lj).sum()
                else:
                    want[a, b] += ((Li @ R[row].double().numpy()) * (Lj @ R[col].double().numpy())).sum()
    np.testing.assert_allclose(got, want / len(projected), rtol=1e-4, atol=1e-5)


def test_crc32_combine_and_known_ranges_against_zlib(tmp_path):
    """crc32_combine against zlib.crc32 of the joined bytes; the whole-file CRC from known ranges
    (not read back) against reading every byte; a range past the end is refused."""
    import zlib

    from fedhpc.io.checkpoint.format import USERBLOCK, _body_crc, crc32_combine

    rng = np.random.default_rng(0)
    for la, lb in ((0, 0), (0, 7), (9, 0), (1, 1), (1000, 4097), (3, 1 << 20)):
        a, b = rng.bytes(la), rng.bytes(lb)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), lb) == zlib.crc32(a + b)
    body = rng.bytes(100_000)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * USERBLOCK + body)
    known = [(USERBLOCK + lo, hi - lo, zlib.crc32(body[lo:hi])) for lo, hi in ((0, 10), (50, 3000), (3000, 3001),
                                                                               (70_000, 100_000))]
    assert _body_crc(path, known) == _body_crc(path) == (zlib.crc32(body), len(body))
    with pytest.raises(ValueError, match="overlaps"):
        _body_crc(path, [(USERBLOCK + 99_990, 20, 0)])


def test_chunk_offsets_equal_per_row_chunk_info(tmp_path):
    from types import SimpleNamespace

    from fedhpc.io.checkpoint.format import _allocated_per_client
    from fedhpc.io.checkpoint.format import chunk_offsets

    with h5py.File(tmp_path / "f.h5", "w", userblock_size=512) as f:
        for key, shape in (("a", (300, 10, 7)), ("b", (300,)), ("c", (5, 1000))):
            ds = _allocated_per_client(f, key, SimpleNamespace(shape=shape, dtype=np.dtype(np.float32)))
            assert np.array_equal(chunk_offsets(ds), [ds.id.get_chunk_info(i).byte_offset for i in range(shape[0])])
