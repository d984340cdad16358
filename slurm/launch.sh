# Sourced by the sbatch templates in this folder (not run on its own): start fedhpc on every
# task with srun, and turn Slurm's time-limit warning into checkpoint + requeue.
#
# Who gets the signal: the templates ask for `--signal=B:USR1@<s>`, so Slurm signals only this
# batch shell. It is the one process that can requeue the job, and the only one that knows the
# ranks stopped because of the warning rather than by failing; it hands the signal to srun,
# which relays it to every rank on every node. fedhpc's ranks agree at the end of the round,
# write a checkpoint and exit non-zero; this shell then requeues, and the next start resumes
# (`--resume auto`). Preemption, `scontrol requeue` and `scancel` send SIGTERM to all the
# job's processes instead, and Slurm requeues (or not) by itself.

if (($#)); then CONFIG=$1; OVERRIDES=("${@:2}"); fi
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RESUME=${RESUME-auto}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch; this passes it on.
[[ -z ${SLURM_CPUS_PER_TASK:-} ]] || export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

echo "fedhpc: job ${SLURM_JOB_ID} start $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST}:" \
     "${SLURM_NTASKS} tasks, $CONFIG ${OVERRIDES[*]}"
signaled=
trap 'signaled=1; echo "fedhpc: time-limit warning: checkpointing"; [[ -z ${step:-} ]] || kill -USR1 "$step"' USR1

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

# --kill-on-bad-exit: a rank that dies ends the step instead of leaving the others waiting.
srun --mpi="${MPI_PLUGIN:-pmi2}" --kill-on-bad-exit=1 "$PYTHON" -m fedhpc run "$CONFIG" "${OVERRIDES[@]}" \
     ${RESUME:+--resume "$RESUME"} &
step=$!
wait "$step"
status=$?
# An interrupted `wait` returns 128+signal while srun still runs: wait for its real status.
if [[ -n $signaled ]]; then wait "$step"; status=$?; fi
if [[ -n $signaled && $status != 0 ]]; then
    echo "fedhpc: requeueing job ${SLURM_JOB_ID}; it resumes from the checkpoint"
    scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$status"
