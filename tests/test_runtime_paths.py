"""Checkpoint options (every, keep, background, bfloat16, the changes a resume allows), the preemption
guard's handlers and a signal after the last round, and `fedhpc export` of HiLoRA and FLoRA clients."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import REPO, TINY
from fedhpc.config import load_config, to_dict
from fedhpc.experiment import run
from fedhpc.io.checkpoint import CheckpointError, load
from fedhpc.io.checkpoint.resume import resume_config
from fedhpc.io.checkpoint.writer import CheckpointConfig, Checkpointer
from fedhpc.runtime.preempt import PreemptionGuard

CONFIG = REPO / "configs/quickstart.yaml"


# --- checkpoints -----------------------------------------------------------------------------------
def _checkpointer(tmp_path, rounds, **options):
    return Checkpointer(tmp_path / "run", CheckpointConfig(**options), comm=MPI.COMM_SELF, rounds=rounds,
                        config={"strategy": {"name": "fedit"}}, num_clients=3, fresh=True)


def _save(ckpt, round_index, server, clients):
    return ckpt.save(round_index, server=server, clients=clients, optimizer=None,
                     totals={"bytes_up": 1, "bytes_down": 2, "mpi_bytes": 3},
                     metrics=[{"round": round_index}], wall_seconds=0.0)


@pytest.mark.parametrize("every, rounds, due", [(1, 4, [1, 2, 3, 4]), (3, 7, [3, 6, 7]), (2, 6, [2, 4, 6]),
                                                (0, 5, []), (5, 3, [3])])
def test_checkpoint_every_n_rounds_and_always_the_last(tmp_path, every, rounds, due):
    ckpt = _checkpointer(tmp_path, rounds, every=every)
    assert [r for r in range(1, rounds + 1) if ckpt.due(r)] == due


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_only_the_newest_keep_checkpoints_stay_and_a_synchronous_write_is_on_disk_at_once(tmp_path, keep):
    ckpt = _checkpointer(tmp_path, 6, keep=keep, background=False)
    server = {"w": torch.arange(6.0).view(2, 3)}
    clients = {"c": torch.zeros(3, 2)}
    for r in range(1, 6):
        path = _save(ckpt, r, server, clients)
        assert ckpt.thread is None and path.is_file()  # background=False: written before save returns
        names = sorted(p.name for p in ckpt.folder.iterdir())
        assert names == [f"round-{i:06d}.h5" for i in range(max(1, r - keep + 1), r + 1)]


def test_background_write_lands_after_wait(tmp_path):
    ckpt = _checkpointer(tmp_path, 3, keep=2, background=True)
    path = _save(ckpt, 1, {"w": torch.ones(2)}, {"c": torch.zeros(3, 1)})
    ckpt.wait()
    assert path.is_file() and ckpt.latest == path


def test_bfloat16_server_and_client_tensors_round_trip_bit_for_bit(tmp_path):
    ckpt = _checkpointer(tmp_path, 1, background=False)
    g = torch.Generator().manual_seed(0)
    server = {"w": torch.randn(2, 5, generator=g).bfloat16(), "f": torch.randn(4, generator=g)}
    clients = {"a": torch.randn(3, 2, 4, generator=g).bfloat16(), "n": torch.arange(3, dtype=torch.int64).view(3, 1)}
    path = _save(ckpt, 1, server, clients)
    back = load(path, clients=np.arange(3), device="cpu")
    for mine, theirs in ((server, back.server), (clients, back.clients)):
        for key, value in mine.items():
            assert theirs[key].dtype == value.dtype, key
            assert torch.equal(theirs[key].view(torch.int16) if value.dtype == torch.bfloat16 else theirs[key],
                               value.view(torch.int16) if value.dtype == torch.bfloat16 else value), key


def test_resume_allows_exactly_the_documented_changes():
    stored = to_dict(load_config(CONFIG, TINY + ["rounds=3", "train.clients_per_pass=3"]))
    allowed = ["rounds=5", "device=cpu", "train.clients_per_pass=2", "store.memory_cap_mb=64.0", "checkpoint.keep=7",
               "checkpoint.every=2", "checkpoint.background=false", "out_dir=/elsewhere", "name=other"]
    for change in allowed:
        requested = to_dict(load_config(CONFIG, TINY + ["rounds=3", "train.clients_per_pass=3", change]))
        out = resume_config(stored, requested, saved_round=2)
        key, value = change.split("=")
        node = out
        for part in key.split(".")[:-1]:
            node = node[part]
        assert str(node[key.split(".")[-1]]).lower() == value.lower(), change
    probed = to_dict(load_config(CONFIG, TINY + ["rounds=3", "train.clients_per_pass=0"]))
    assert resume_config(stored, probed, saved_round=2)["train"]["clients_per_pass"] == 3  # 0 keeps the probed value
    for change in ("seed=1", "sampling.fraction=0.5", "train.batch_size=4", "lora.lora_alpha=4", "strategy.name=fedsa_lora",
                   "store.dtype=bfloat16", "eval.every=2"):
        requested = to_dict(load_config(CONFIG, TINY + ["rounds=3", "train.clients_per_pass=3", change]))
        key = "strategy" if change.startswith("strategy.name") else change.split("=")[0]  # another method's first key
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + ".* differs from the checkpoint"):
            resume_config(stored, requested, saved_round=2)


def test_a_run_extended_on_resume_with_other_passes_and_checkpoints_equals_the_longer_run(tmp_path):
    """rounds, train.clients_per_pass and checkpoint.* changed on resume: the same numbers as one run."""
    base = TINY + ["strategy.name=fedsa_lora", "strategy.keep_optimizer_state=true"]
    longer = run(load_config(CONFIG, base + ["rounds=3", f"out_dir={tmp_path / 'a'}"]), comm=MPI.COMM_SELF, progress=False)
    run(load_config(CONFIG, base + ["rounds=2", f"out_dir={tmp_path / 'b'}"]), comm=MPI.COMM_SELF, progress=False)
    path = tmp_path / "b/quickstart/checkpoints/round-000002.h5"
    resumed = run(load_config(CONFIG, base + ["rounds=3", f"out_dir={tmp_path / 'b'}", "train.clients_per_pass=2",
                                              "checkpoint.keep=1", "checkpoint.background=false"]),
                  comm=MPI.COMM_SELF, progress=False, resume=path)
    wall = {"wall_seconds", "round_seconds", "clients_per_second", "clients_per_pass"}
    assert {k: v for k, v in resumed.items() if k not in wall} == {k: v for k, v in longer.items() if k not in wall}
    last = lambda folder: {k: v for k, v in json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1]).items()
                           if k not in wall}
    assert last(tmp_path / "b/quickstart") == last(tmp_path / "a/quickstart")
    assert sorted(p.name for p in (tmp_path / "b/quickstart/checkpoints").iterdir()) == ["round-000003.h5"]


# --- preemption --------------------------------------------------------------------------------------
def test_preemption_guard_catches_the_signals_and_restores_the_handlers():
    seen = []
    mine = lambda signum, frame: seen.append(signum)
    old = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with PreemptionGuard() as guard:
            assert not guard.requested and not guard.agreed(comm=MPI.COMM_SELF)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert guard.requested and guard.agreed(comm=MPI.COMM_SELF) and seen == []
        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.requested and seen == []
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGUSR1) is mine
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        for s, h in old.items():
            signal.signal(s, h)


SIGNAL_AFTER_LAST_ROUND = """
import os, signal, sys
import fedhpc.experiment as experiment
from fedhpc import cli

summary = experiment._summary
def signalled_summary(*args, **kwargs):  # after the last round's agreement, before the summary
    os.kill(os.getpid(), signal.SIGTERM)
    return summary(*args, **kwargs)
experiment._summary = signalled_summary
sys.argv = ["fedhpc", *sys.argv[1:]]
code = cli.main()
os.kill(os.getpid(), signal.SIGUSR1)  # and one while the finished program exits
sys.exit(code)
"""


def test_a_signal_after_the_last_round_lets_the_run_finish_with_exit_0(tmp_path):
    args = ["run", str(CONFIG), *TINY, "rounds=1", f"out_dir={tmp_path}", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_LAST_ROUND, *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "preempted" not in done.stdout
    assert json.loads((tmp_path / "quickstart/summary.json").read_text())["rounds"] == 1


# --- export of HiLoRA and FLoRA clients -----------------------------------------------------------------
@pytest.mark.parametrize("strategy, options", [
    ("hilora", ["rounds=3", "strategy.root_rounds=1", "strategy.cluster_rounds=1", "strategy.probe_steps=2"]),
    ("flora", ["rounds=2", "lora.ranks=[2, 4]"]),
])
def test_exported_hilora_and_flora_clients_give_the_logits_fedhpc_evaluates(strategy, options, tmp_path):
    from test_export import _peft

    from fedhpc.assemble import assemble
    from fedhpc.cli import main
    from fedhpc.io.checkpoint import find_resumable
    from fedhpc.models.ranks import mask_to_ranks

    cfg = load_config(CONFIG, TINY + [f"out_dir={tmp_path}", f"strategy.name={strategy}", *options])
    run(cfg, comm=MPI.COMM_SELF, progress=False)
    r = assemble(cfg, MPI.COMM_SELF)
    evaluated = json.loads((tmp_path / "quickstart/client_accuracy.json").read_text())
    for client in (int(r.data.seen[0]), int(r.data.seen[-1])):
        out = tmp_path / f"k{client}"
        assert main(["export", str(tmp_path / "quickstart"), "--client", str(client), "--out", str(out)]) == 0
        ids = np.array([client])
        saved = load(find_resumable(tmp_path / "quickstart", comm=MPI.COMM_SELF), clients=ids, device="cpu")
        adapters = mask_to_ranks(r.strategy.configure_evaluate(saved.server, saved.clients, ids), r.ranks.of(ids))
        x, y = r.data.test_x[r.data.client_test[client]], r.data.test_y[r.data.client_test[client]]
        with torch.no_grad():
            bound = {k: v if k.endswith(".base_delta") else v.expand(len(x), *v.shape[1:]) for k, v in adapters.items()}
            ours = r.model(x, bound, scaling=r.scaling(ids).expand(len(x)))
            theirs = _peft(cfg, out, r.data.num_classes)(x)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
        accuracy = float((theirs.argmax(-1) == y).double().mean())
        assert accuracy == evaluated["personalized_accuracy"][evaluated["clients"].index(client)]


PROBE = """
import json, os, subprocess, sys

def test_probe():  # runs after the kernel test in the same session
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('TRITON_INTERPRET'))"],
                           capture_output=True, text=True, check=True)
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump({"test": os.environ.get("TRITON_INTERPRET"), "child": child.stdout.strip()}, f)
"""


def test_no_triton_interpret_leaks_out_of_the_kernel_tests(tmp_path):
    """tests/kernel_tests sets TRITON_INTERPRET while its conftest imports the Triton kernels and per test
    only: a later test of the same session, and the subprocesses it starts, see the environment the
    session started with (here: unset). Self-contained, whatever ran before: a pytest session of its
    own runs a kernel test, then a probe test."""
    probe, seen = tmp_path / "test_probe.py", tmp_path / "seen.json"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PROBE_OUT=str(seen))
    kernel_test = "tests/kernel_tests/test_kernel_dispatch.py::test_cpu_tensors_use_torch_automatically"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pytest.ini"),
                           "--rootdir", str(REPO), kernel_test, str(probe)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(seen.read_text()) == {"test": None, "child": "None"}
