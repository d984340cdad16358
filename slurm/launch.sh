# Sourced by the sbatch templates in this folder (not run on its own): start fedhpc on every
# task with srun, and requeue the job when fedhpc stopped early with a checkpoint.
#
# What each task runs: `$PYTHON -m fedhpc "${FEDHPC_ARGS[@]}"`. A template that sets the array
# FEDHPC_ARGS before sourcing this file runs that (slurm/sweep.sbatch: `sweep SWEEP --point I`);
# otherwise it is `run $CONFIG $OVERRIDES --resume $RESUME`, with CONFIG and OVERRIDES taken from
# the job's arguments when it has any (cpu.sbatch, gpu.sbatch). Whatever runs must keep fedhpc's
# side of the contract below: exit 75 after a checkpoint on SIGUSR1 / SIGTERM, resume on restart.
#
# Who gets the signal: the fedhpc ranks, since they hold the state and write the checkpoint.
# The templates ask for `--signal=USR1@<s>` without `B:`, so slurmstepd signals every task of
# the running step on every node directly (and not this shell); with `B:` only this shell
# would get it and would have to relay it through srun. The ranks agree at the end of the
# round, write a checkpoint and exit 75 ("preempted, resume me"); on that status this shell
# requeues the job, and the next start continues from the checkpoint (`--resume auto`). Any
# other failure ends the job, so a broken run is not requeued forever. Preemption, `scontrol
# requeue` and `scancel` send SIGTERM to every process of the job instead: fedhpc checkpoints
# the same way, and Slurm requeues (or cancels) the job itself.
#
# Three things keep this independent of timing:
# - this shell traps SIGTERM: untrapped, bash dies at once, the batch step ends under the ranks
#   and they may be killed before their checkpoint. Trapped, bash waits for srun (traps run once
#   the foreground command has ended), while slurmstepd gives the ranks KillWait seconds (default
#   30; GraceTime for preemption) before SIGKILL. srun itself answers SIGTERM with "forcing job
#   termination", which still leaves the ranks that grace period.
# - after SIGTERM the script never requeues: Slurm is already requeueing (preemption, `scontrol
#   requeue`) or cancelling (`scancel`) the job, and a second requeue would race the first.
# - fedhpc catches SIGTERM / SIGUSR1 from its first line to its exit (runtime/preempt.py): a
#   signal during start-up or after the last round is never fatal, so a status other than 0 or 75
#   is a real failure, never a signal that arrived at the wrong moment.

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ $(declare -p FEDHPC_ARGS 2>/dev/null) != "declare -a"* ]]; then  # a template's array, not an env string
    if (($#)); then CONFIG=$1; OVERRIDES=("${@:2}"); fi
    RESUME=${RESUME-auto}
    FEDHPC_ARGS=(run "$CONFIG" "${OVERRIDES[@]}" ${RESUME:+--resume "$RESUME"})
fi
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch; this passes it on.
[[ -z ${SLURM_CPUS_PER_TASK:-} ]] || export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

echo "fedhpc: job ${SLURM_JOB_ID} start $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST}:" \
     "${SLURM_NTASKS} tasks, fedhpc ${FEDHPC_ARGS[*]}"
# MPICH names its node shared-memory segment after a hash of the step's PMI id ("job.step"),
# so the same step of a requeued job reuses the name; a segment left by ranks that were killed
# before MPI_Finalize then breaks MPI_Init of the restart. Step 0 removes it on every node,
# and fedhpc always runs as step 1.
fnv1a() {  # 32-bit FNV-1a of $1, as MPICH hashes the PMI id
    local hash=2166136261 i byte
    for ((i = 0; i < ${#1}; i++)); do
        printf -v byte %d "'${1:i:1}"
        hash=$(( ((hash ^ byte) * 16777619) & 0xffffffff ))
    done
    printf %x "$hash"
}
world=$(fnv1a "${SLURM_JOB_ID}.1")
srun --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 \
     sh -c "rm -f /dev/shm/mpich_shm_${world}_* /dev/shm/mpich_vci_${world}_*"

terminated=0
trap 'terminated=1' TERM
# --wait: if a rank dies, the others are ended a minute later instead of waiting in MPI forever.
srun --mpi="${MPI_PLUGIN:-pmi2}" --wait=60 "$PYTHON" -m fedhpc "${FEDHPC_ARGS[@]}"
status=$?
if [[ $status == 75 && $terminated == 1 ]]; then
    echo "fedhpc: checkpoint written after SIGTERM; Slurm requeues or cancels job ${SLURM_JOB_ID} itself"
elif [[ $status == 75 ]]; then
    echo "fedhpc: requeueing job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})};" \
         "it resumes from the checkpoint"
    scontrol requeue "${SLURM_JOB_ID}" || echo "fedhpc: error: scontrol requeue ${SLURM_JOB_ID} failed; resubmit" \
        "the job${SLURM_ARRAY_TASK_ID:+ (this array task alone: --array=${SLURM_ARRAY_TASK_ID})}; it resumes from the checkpoint" >&2
fi
exit "$status"
