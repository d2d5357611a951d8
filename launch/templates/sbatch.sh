#!/bin/bash
# A scalegpt SLURM job, rendered from launch/templates/sbatch.sh by
#   {{command}}
# One srun task per node runs that node's launcher ({{launcher}}), which starts {{ranks_per_node}} rank(s), each
# `python -m scalegpt train`. Submitting the same command again resumes from the run's latest checkpoint.
#SBATCH --job-name={{job_name}}
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node=1
{{resources}}
#SBATCH --exclusive
#SBATCH --time={{time}}
#SBATCH --output={{output}}
#SBATCH --open-mode=append
# SIGUSR1 three minutes before the time limit: the ranks finish their step, save and exit 0.
#SBATCH --signal=USR1@180
# A requeued job (node failure, preemption) reruns this script and resumes from the latest checkpoint.
#SBATCH --requeue
{{optional_directives}}

set -euo pipefail
cd {{workdir}}
mkdir -p {{run_dir}}
LAUNCHER={{launcher}}

# NCCL: the settings that matter across nodes (README, "Launching at scale").
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}     # one line per real problem; INFO while diagnosing a hang
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed or timed-out collective kills the rank instead of hanging
export NCCL_ASYNC_ERROR_HANDLING=1        # the same switch under its name before torch 2.2
# export NCCL_IB_DISABLE=1                # no InfiniBand/RoCE between the nodes: use TCP sockets
# export NCCL_SOCKET_IFNAME=eth0          # the interface that links the nodes (never lo or docker0)
{{exports}}
# The first node of the allocation hosts the rendezvous; SLURM_NODEID 0 is that node.
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${NODES[0]}
MASTER_PORT={{master_port}}
export MASTER_ADDR MASTER_PORT
if [[ $LAUNCHER == deepspeed ]]; then
    # DeepSpeed reads the nodes from a hostfile; with --no_ssh each node starts only its own ranks.
    HOSTFILE={{run_dir}}/hostfile.$SLURM_JOB_ID
    printf '%s slots={{ranks_per_node}}\n' "${NODES[@]}" >"$HOSTFILE"
fi
echo "scalegpt: job $SLURM_JOB_ID, ${#NODES[@]} node(s) x {{ranks_per_node}} rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT"

# SLURM sends the time-limit USR1 to every process of the step. The node launcher ignores it (the ranks set
# their own handler), so the ranks save a checkpoint and exit 0, and the launcher then exits on its own.
# "$0" is the launcher; the node rank is added inside the task, the only place SLURM_NODEID is known.
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 \
    bash -c 'trap "" USR1; exec "$0" --node_rank "$SLURM_NODEID" "$@"' \
    {{launcher_command}}
