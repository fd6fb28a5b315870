#!/usr/bin/env bash
# Train with DeepSpeed's launcher. Extra arguments go to cifar10_deepspeed.py.
#
# Settings (environment):
#   NUM_NODES   nodes to launch on (default: the launcher's: this node, or every node of the hostfile)
#   NUM_GPUS    ranks per node (default: the launcher's: one per GPU, one per NUMA node on CPU)
#   BIND_CORES  auto (default: bind cores to ranks when numactl is installed), 1 (always) or 0 (never)
set -euo pipefail

script="$(dirname "$0")/cifar10_deepspeed.py"
launcher_args=()
if [[ -n "${NUM_NODES:-}" ]]; then launcher_args+=(--num_nodes "$NUM_NODES"); fi
if [[ -n "${NUM_GPUS:-}" ]]; then launcher_args+=(--num_gpus "$NUM_GPUS"); fi

case "${BIND_CORES:-auto}" in
  1) launcher_args+=(--bind_cores_to_rank) ;;
  0) echo "run_ds.sh: core binding off (BIND_CORES=0); each rank sizes its thread pool to its share of the cores" >&2 ;;
  auto)
    if command -v numactl >/dev/null; then
      launcher_args+=(--bind_cores_to_rank)
    else
      echo "run_ds.sh: numactl not found, so cores are not bound to ranks; each rank sizes its thread pool to its share of the cores" >&2
    fi ;;
  *) echo "run_ds.sh: error: BIND_CORES must be auto, 1 or 0, got '${BIND_CORES}'" >&2; exit 2 ;;
esac

exec deepspeed "${launcher_args[@]}" "$script" --deepspeed "$@"
