"""Start-up checks under Slurm, driven by the environment variables srun sets for each task."""
import os
from types import SimpleNamespace

import pytest
import torch
from mpi4py import MPI

from fedhpc.runtime.world import check_launch, make_world

SLURM_VARS = ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_PROCID",
              "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")  # the last is not Slurm's, but decides threads too


@pytest.fixture
def slurm_env(monkeypatch):
    """A clean slate of Slurm variables (the tests may themselves run inside a Slurm job)."""
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
    return set_env


@pytest.fixture
def four_gpus(monkeypatch):
    """Pretend this node has 4 visible GPUs; records the device torch is pointed at."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def world_of(size):
    return SimpleNamespace(Get_size=lambda: size)


def test_srun_copies_without_pmi_are_refused(slurm_env):
    # srun -n 2 without PMI: each task is rank 0 of a one-rank world
    slurm_env(SLURM_STEP_ID=0, SLURM_STEP_NUM_TASKS=2, SLURM_NTASKS=2, SLURM_PROCID=1)
    with pytest.raises(RuntimeError, match=r"1 rank\(s\) but srun started 2 tasks.*srun --mpi=pmi2"):
        check_launch(MPI.COMM_SELF)
    # Slurm versions without SLURM_STEP_NUM_TASKS still set SLURM_NTASKS for the step
    os.environ.pop("SLURM_STEP_NUM_TASKS")
    with pytest.raises(RuntimeError, match="srun started 2 tasks"):
        check_launch(MPI.COMM_SELF)


def test_worlds_that_are_one_launch_are_accepted(slurm_env):
    check_launch(MPI.COMM_SELF)  # no Slurm at all
    slurm_env(SLURM_NTASKS=4)  # python run straight from a 4-task batch script: not a step
    check_launch(MPI.COMM_SELF)
    slurm_env(SLURM_STEP_ID=0, SLURM_STEP_NUM_TASKS=4, SLURM_NTASKS=4)
    check_launch(world_of(4))  # srun --mpi=pmi2 -n 4
    slurm_env(SLURM_STEP_NUM_TASKS=1, SLURM_NTASKS=1)
    check_launch(world_of(2))  # mpiexec -n 2 in a job: its proxy is a one-task srun step


def test_device_is_slurm_localid_modulo_visible_gpus(slurm_env, four_gpus, keep_threads):
    slurm_env(SLURM_STEP_ID=0, SLURM_STEP_NUM_TASKS=1, SLURM_NTASKS=1, SLURM_LOCALID=5)
    assert make_world(MPI.COMM_SELF, num_clients=4).device == torch.device("cuda", 1)
    assert four_gpus == [1]
    slurm_env(SLURM_LOCALID=3)
    assert make_world(MPI.COMM_SELF, num_clients=4).device == torch.device("cuda", 3)


def test_stale_localid_outside_a_matching_step_is_ignored(slurm_env, four_gpus, keep_threads):
    # Ranks not started by srun (no step, or a step of another size) inherit the batch shell's
    # SLURM_LOCALID; the node-local MPI rank (0 in a one-rank world) decides instead.
    slurm_env(SLURM_LOCALID=3, SLURM_NTASKS=2)
    assert make_world(MPI.COMM_SELF, num_clients=4).device == torch.device("cuda", 0)
    slurm_env(SLURM_STEP_ID=0, SLURM_STEP_NUM_TASKS=2)
    assert make_world(MPI.COMM_SELF, num_clients=4).device == torch.device("cuda", 0)


def test_torch_threads_follow_omp_num_threads_then_cpus_per_task(slurm_env, keep_threads):
    slurm_env(SLURM_CPUS_PER_TASK=3)
    make_world(MPI.COMM_SELF, num_clients=4)
    assert torch.get_num_threads() == 3
    os.environ.pop("SLURM_CPUS_PER_TASK")
    make_world(MPI.COMM_SELF, num_clients=4)  # one rank on this node: every core
    assert torch.get_num_threads() == _online_cores()
    slurm_env(SLURM_CPUS_PER_TASK=3, OMP_NUM_THREADS=1)  # the user's explicit choice wins
    make_world(MPI.COMM_SELF, num_clients=4)
    assert torch.get_num_threads() == 1


def _online_cores() -> int:
    """The node's online cores, from getconf (not from the code under test)."""
    import subprocess

    return int(subprocess.run(["getconf", "_NPROCESSORS_ONLN"], capture_output=True, text=True, check=True).stdout)


def test_ranks_on_one_node_share_its_cores(tmp_path):
    """Two ranks on this node, no OMP_NUM_THREADS and no Slurm: each takes half the cores (at least 1)."""
    import json
    import subprocess
    import sys

    from conftest import REPO, mpiexec_path

    code = ("import json, torch; from mpi4py import MPI; from fedhpc.runtime.world import make_world; "
            "make_world(MPI.COMM_WORLD, num_clients=4); threads = MPI.COMM_WORLD.gather(torch.get_num_threads()); "
            "MPI.COMM_WORLD.rank == 0 and print(json.dumps(threads))")  # one line: two ranks' prints can interleave
    env = {k: v for k, v in os.environ.items() if k not in SLURM_VARS and k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([mpiexec_path(), "-n", "2", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [max(1, _online_cores() // 2)] * 2


def _fresh_python(code: str, **env) -> str:
    import subprocess
    import sys

    from conftest import REPO

    environ = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"} | {"PYTHONPATH": str(REPO)} | env
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environ)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


SPLIT_SIGMOID = ("import torch; torch.manual_seed(0); x = torch.randn(64); "
                 "whole, parts = torch.sigmoid(x), torch.cat([torch.sigmoid(x[:48]), torch.sigmoid(x[48:])]); "
                 "print(torch.backends.cpu.get_cpu_capability(), torch.equal(whole, parts))")


def test_importing_fedhpc_pins_the_cpu_kernels_so_an_op_does_not_depend_on_the_tensor_around_it():
    """Sigmoid of 64 floats at once against 48 then 16: with AVX-512 kernels floats 32-47 came out an ulp
    apart; after `import fedhpc` (before any op) the kernels are AVX2's (or below) and the two agree."""
    chosen, same = _fresh_python("import fedhpc; " + SPLIT_SIGMOID).split()
    assert chosen in ("AVX2", "DEFAULT"), chosen
    assert same == "True"


def test_an_explicit_aten_cpu_capability_wins():
    assert _fresh_python("import fedhpc, torch; print(torch.backends.cpu.get_cpu_capability())",
                         ATEN_CPU_CAPABILITY="default") == "DEFAULT"


def test_kernels_chosen_before_the_pin_are_warned_about(monkeypatch, capsys):
    from fedhpc import CPU_KERNELS
    from fedhpc.runtime.world import _check_cpu_kernels

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", CPU_KERNELS)
    _check_cpu_kernels("AVX2")
    assert capsys.readouterr().err == ""
    _check_cpu_kernels("AVX512")
    assert "import fedhpc before running any torch op" in capsys.readouterr().err
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")  # asked for: no warning
    _check_cpu_kernels("AVX512")
    assert capsys.readouterr().err == ""
