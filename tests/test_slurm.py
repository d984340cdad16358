"""fedhpc on a real one-node Slurm cluster (slurm/local_cluster.sh): the sbatch template and a
bare srun give mpiexec's summary, broken launches are refused, and a requeued job resumes to the
summary of an uninterrupted run.

Needs root (to install slurm-wlm + munge and start the daemons) or a cluster already up; without
either the module skips, except under CI, where it must run.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, mpiexec
from test_experiment import _close

CLUSTER = REPO / "slurm" / "local_cluster.sh"
RUN = ["configs/quickstart.yaml", *TINY, "rounds=3"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def _sbatch_options(template: Path) -> dict:
    """`#SBATCH --key=value` lines of a job script (commented-out `##SBATCH` lines are not options)."""
    options = {}
    for line in template.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.split()[1].partition("=")
            options[key] = value
    return options


@pytest.mark.parametrize("name", ["cpu.sbatch", "gpu.sbatch", "sweep.sbatch"])
def test_templates_keep_the_launch_invariants(name):
    """Needs no cluster: what the templates must keep whatever a user edits."""
    options = _sbatch_options(REPO / "slurm" / name)
    assert "--requeue" in options and options["--open-mode"] == "append"
    assert re.fullmatch(r"USR1@\d+", options["--signal"])  # to the ranks, not B: (see slurm/launch.sh)
    if "--gpus-per-node" in options:  # one rank per GPU
        assert options["--ntasks-per-node"] == options["--gpus-per-node"]
    assert subprocess.run(["bash", "-n", REPO / "slurm" / name]).returncode == 0


STUB = """#!/bin/bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
[[ $* != *" -m fedhpc "* ]] || exit "$STUB_STATUS"
"""


@pytest.mark.parametrize("status", [0, 75])
def test_sweep_template_runs_its_point_through_launch_sh(tmp_path, status):
    """Needs no cluster (srun and scontrol are stubs that log their arguments): slurm/sweep.sbatch
    runs as slurm/launch.sh does, first removing the MPICH segments a killed start of the task's
    fedhpc step would leave (named by MPICH's hash of "<job>.1", computed here independently),
    then the task's point as step 1, and requeues the task on exit 75 only."""
    for name in ("srun", "scontrol"):
        (tmp_path / name).write_text(STUB)
        (tmp_path / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_STATUS": str(status),
           "SLURM_JOB_ID": "4711", "SLURM_ARRAY_JOB_ID": "4709", "SLURM_ARRAY_TASK_ID": "2", "SLURM_NTASKS": "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1", "PYTHON": "python"}
    done = subprocess.run(["bash", "slurm/sweep.sbatch", "s.yaml"], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=60)
    assert done.returncode == status, done.stdout + done.stderr
    world = _fnv1a("4711.1")
    calls = log.read_text().splitlines()
    assert calls[:2] == [
        f"srun --nodes=1 --ntasks=1 --ntasks-per-node=1 sh -c rm -f /dev/shm/mpich_shm_{world}_* "
        f"/dev/shm/mpich_vci_{world}_*",
        "srun --mpi=pmi2 --wait=60 python -m fedhpc sweep s.yaml --point 2"], calls
    assert calls[2:] == (["scontrol requeue 4711"] if status == 75 else []), calls
    assert ("requeueing job 4711 (array task 4709_2)" in done.stdout) == (status == 75), done.stdout


@pytest.fixture(scope="module")
def slurm():
    """Environment for Slurm commands; brings the local cluster up (and down again if it was down)."""
    cannot = pytest.fail if os.environ.get("CI") else pytest.skip  # CI here is root: there they must run
    was_up = subprocess.run(["bash", CLUSTER, "status"], capture_output=True).returncode == 0
    if not was_up and os.geteuid() != 0:
        cannot("no local Slurm cluster and not root: run `sudo slurm/local_cluster.sh up` first")
    up = subprocess.run(["bash", CLUSTER, "up"], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        cannot("local Slurm cluster did not start: " + ((up.stderr or up.stdout).strip().splitlines() or ["?"])[-1])
    conf = re.search(r"SLURM_CONF=(\S+)", up.stdout).group(1)
    bin_dir = str(Path(sys.executable).parent)
    yield {**os.environ, "SLURM_CONF": conf, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable, "RESUME": "auto"}
    if not was_up:
        subprocess.run(["bash", CLUSTER, "down"], capture_output=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Summary of the same run under `mpiexec -n 2`."""
    out = tmp_path_factory.mktemp("mpiexec")
    proc = mpiexec(2, ["run", *RUN, f"out_dir={out}", "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _summary(out)


def _summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "quickstart" / "summary.json").read_text())


def _slurm(env, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def _sbatch(env, log: Path, *args) -> str:
    """Submit a batch job running in the repository; returns its id."""
    proc = _slurm(env, "sbatch", "--parsable", f"--output={log}", f"--chdir={REPO}", *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(env, job: str) -> dict:
    """`scontrol show job` as a dict (finished jobs stay listed for MinJobAge, 300 s)."""
    line = _slurm(env, "scontrol", "show", "job", "--oneliner", job).stdout
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def _run_to_end(env, job: str) -> dict:
    """Wait for the job to end; Slurm holds a requeued job for about two minutes (Reason=BeginTime),
    so release it early, but only once the node has finished the previous start and a couple of
    seconds have passed: a restart within the second of the requeue meets slurmd's revocation of
    the old start's credential ("Job credential revoked") and fails."""
    def ended():
        info = _job(env, job)
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            if _slurm(env, "sinfo", "-h", "-o", "%T").stdout.strip() == "idle":
                time.sleep(2)
                _slurm(env, "scontrol", "update", f"JobId={job}", "StartTime=now")
        return info["JobState"] in TERMINAL

    _wait_for(ended, f"job {job} to end")
    return _job(env, job)


def _wait_for(condition, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def _fnv1a(text: str) -> str:
    """MPICH's hash of a PMI id, which names its node shared-memory segment."""
    value = 2166136261
    for byte in text.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return f"{value:x}"


def test_sbatch_template_matches_mpiexec(slurm, reference, tmp_path):
    log = tmp_path / "job.log"
    job = _sbatch(slurm, log, "--hold", "slurm/cpu.sbatch", *RUN, f"out_dir={tmp_path}")
    # What ranks killed before MPI_Finalize leave behind for a requeued job: a segment named
    # after its fedhpc step, which would make MPI_Init fail. The template removes it first.
    stale = Path(f"/dev/shm/mpich_shm_{_fnv1a(f'{job}.1')}_0")
    stale.write_bytes(bytes(1 << 20))
    try:
        assert _slurm(slurm, "scontrol", "release", job).returncode == 0
        info = _run_to_end(slurm, job)
    finally:
        stale.unlink(missing_ok=True)
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    summary = _summary(tmp_path)
    assert summary["ranks"] == 2 and "2 tasks" in log.read_text()
    _close(summary, reference)


STAND_IN = """#!/bin/bash
# Stands in for `python -m fedhpc run ...` on each rank, keeping fedhpc's side of the contract:
# on SIGUSR1 write a checkpoint and exit 75; a restart finishes.
if ((${SLURM_RESTART_COUNT:-0} > 0)); then echo "rank $SLURM_PROCID resumed: $*"; exit 0; fi
[[ CRASH == 0 ]] || { echo "rank $SLURM_PROCID crashed"; exit 1; }
trap 'echo "rank $SLURM_PROCID checkpointed"; kill $!; exit 75' USR1
echo "rank $SLURM_PROCID running"
(trap '' USR1; exec sleep 120) & wait  # Slurm signals every process of the step: only this one acts
"""


@pytest.mark.parametrize("crash", [0, 1], ids=["warning", "crash"])
def test_job_script_requeues_only_a_preempted_run(slurm, tmp_path, crash):
    """The template's own logic, with a stand-in for fedhpc: the warning reaches every rank, and
    the job requeues and resumes; a run that fails on its own is not requeued."""
    stand_in, log = tmp_path / "fedhpc_rank", tmp_path / "job.log"
    stand_in.write_text(STAND_IN.replace("CRASH", str(crash)))
    stand_in.chmod(0o755)
    env = {**slurm, "PYTHON": str(stand_in), "RESUME": "auto"}
    job = _sbatch(env, log, "slurm/cpu.sbatch", "configs/quickstart.yaml")
    if not crash:
        _wait_for(lambda: log.exists() and log.read_text().count(" running") == 2, "both ranks")
        # what --signal=USR1@<s> does before the time limit: signal the job's steps, not the shell
        assert _slurm(slurm, "scancel", "--signal=USR1", job).returncode == 0
    info = _run_to_end(slurm, job)
    text = log.read_text()
    if crash:
        assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), text
        assert "requeueing" not in text
    else:
        assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), text
        assert text.count("checkpointed") == 2 and f"requeueing job {job}" in text
        assert text.count("resumed: -m fedhpc run configs/quickstart.yaml --resume auto") == 2, text


def test_srun_matches_mpiexec(slurm, reference, tmp_path):
    proc = _slurm(slurm, "srun", "--mpi=pmi2", "-n", "2", sys.executable, "-m", "fedhpc", "run", *RUN,
                  f"out_dir={tmp_path}", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(tmp_path)
    assert summary["ranks"] == 2
    _close(summary, reference)


def test_srun_without_pmi_is_one_clear_error(slurm, tmp_path):
    proc = _slurm(slurm, "srun", "--mpi=none", "-n", "2", sys.executable, "-m", "fedhpc", "run", *RUN,
                  f"out_dir={tmp_path}")
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("fedhpc")]
    assert ours == ["fedhpc: error: MPI world has 1 rank(s) but srun started 2 tasks, so they would run 2 "
                    "separate copies: launch with `srun --mpi=pmi2` (MPICH) or `--mpi=pmix` (Open MPI); "
                    "`srun --mpi=list` shows what the cluster offers"], proc.stderr
    assert not (tmp_path / "quickstart").exists()


def test_mpiexec_inside_a_job_gets_distinct_local_ranks(slurm, tmp_path):
    # MPICH's mpiexec starts its proxy with a one-task srun, so both ranks inherit SLURM_LOCALID=0.
    probe = ("from mpi4py import MPI; from fedhpc.runtime.world import check_launch, local_rank; "
             "comm = MPI.COMM_WORLD; check_launch(comm); seen = comm.gather((comm.rank, *local_rank(comm))); "
             "comm.rank or print(seen)")
    log = tmp_path / "job.log"
    info = _run_to_end(slurm, _sbatch(slurm, log, "-n", "2", f"--wrap=mpiexec -n 2 {sys.executable} -c '{probe}'"))
    assert info["JobState"] == "COMPLETED", log.read_text()
    assert log.read_text().strip() == "[(0, 0, 2), (1, 1, 2)]"  # (rank, local index, ranks on the node)


@pytest.mark.parametrize("interrupt", ["scontrol requeue", "time-limit warning"])
def test_interrupted_job_resumes_to_the_uninterrupted_summary(slurm, reference, tmp_path, interrupt):
    """Deterministic: the run holds after round 1 until it is signalled (FEDHPC_HOLD_AFTER_ROUND,
    fedhpc/runtime/preempt.py), so the interrupt always lands in the middle of the run, and the
    first start must end with round 1's checkpoint, whatever the machine's speed."""
    log = tmp_path / "job.log"
    env = {**slurm, "FEDHPC_HOLD_AFTER_ROUND": "1"}  # sbatch exports it to the job and its restart
    job = _sbatch(env, log, "slurm/cpu.sbatch", *RUN, "checkpoint.every=1", f"out_dir={tmp_path}")
    _wait_for(lambda: log.exists() and "fedhpc: holding after round 1" in log.read_text(), "the hold after round 1")
    if interrupt == "scontrol requeue":  # what preemption does: SIGTERM to every process, then requeue
        assert _slurm(slurm, "scontrol", "requeue", job).returncode == 0
    else:  # what --signal=USR1@<s> does before the time limit; slurm/launch.sh requeues
        assert _slurm(slurm, "scancel", "--signal=USR1", job).returncode == 0
    info = _run_to_end(slurm, job)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), text[-3000:]
    first, second = text.split(f"job {job} start 2")
    checkpoint = tmp_path / "quickstart" / "checkpoints" / "round-000001.h5"
    assert (f"fedhpc: preempted after round 1; checkpoint {checkpoint}; resume with --resume auto" in first
            and "fedhpc: done" not in first), text[-3000:]
    script = ("fedhpc: checkpoint written after SIGTERM; Slurm requeues" if interrupt == "scontrol requeue"
              else f"fedhpc: requeueing job {job}")
    assert script in first, text[-3000:]  # srun's own "forcing job termination" on SIGTERM leaves the ranks KillWait
    assert f"fedhpc: resumed from {checkpoint} (round 1 of 3)" in second and "fedhpc: done" in second, text[-3000:]
    _close(_summary(tmp_path), reference)


def test_sweep_array_runs_each_point_once(slurm, tmp_path):
    """slurm/sweep.sbatch as a 2-task job array: each task runs its own point of the list `--dry-run`
    froze, each point's summary is that of a plain `fedhpc run` of it, and `--table` reads both."""
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(json.dumps({  # JSON is YAML
        "name": "tiny", "out_dir": str(tmp_path / "runs"), "base": str(REPO / "configs" / "quickstart.yaml"),
        "overrides": [*TINY, "rounds=1"], "methods": {"fedit": ["strategy={name: fedit}"]},
        "seeds": [0, 1], "metrics": ["personalized_mean", "global_accuracy"]}))
    fedhpc = [sys.executable, "-m", "fedhpc", "sweep", str(sweep)]
    listed = _slurm(slurm, *fedhpc, "--dry-run")
    assert "2 points known now, 2 to run" in listed.stdout, listed.stdout + listed.stderr
    log = tmp_path / "task-%a.log"
    job = _sbatch(slurm, log, "--array=0-1", "slurm/sweep.sbatch", str(sweep))

    def states():
        lines = _slurm(slurm, "scontrol", "show", "job", "--oneliner", job).stdout.splitlines()
        return [dict(f.split("=", 1) for f in line.split() if "=" in f)["JobState"] for line in lines]

    _wait_for(lambda: len(states()) == 2 and set(states()) <= TERMINAL, f"array {job} to end")
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("task-*.log")))
    assert states() == ["COMPLETED", "COMPLETED"], logs[-3000:]
    for seed in (0, 1):  # one task per point: each log names its own point once
        assert logs.count(f"fedit/base_s{seed}: running (report)") == 1, logs[-3000:]
    again = _slurm(slurm, *fedhpc, "--dry-run")
    assert "0 to run" in again.stdout, again.stdout
    summaries = [json.loads((tmp_path / "runs" / "tiny" / "fedit" / f"base_s{s}" / "summary.json").read_text())
                 for s in (0, 1)]
    plain = tmp_path / "plain"
    proc = _slurm(slurm, sys.executable, "-m", "fedhpc", "run", "configs/quickstart.yaml", *TINY, "rounds=1",
                  "strategy={name: fedit}", "seed=1", f"out_dir={plain}", "name=base_s1", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _close(summaries[1], json.loads((plain / "base_s1" / "summary.json").read_text()))
    table = _slurm(slurm, *fedhpc, "--table")
    assert table.returncode == 0, table.stderr
    values = [s["personalized_mean"] for s in summaries]
    mean, std = sum(values) / 2, abs(values[0] - values[1]) / 2 ** 0.5  # sample std (ddof 1) of two
    row = next(line for line in table.stdout.splitlines() if line.startswith("| fedit |"))
    assert f"| 2/2 | {mean:.3f} ± {std:.3f} |" in row, table.stdout
