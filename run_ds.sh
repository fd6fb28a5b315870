#!/usr/bin/env bash
# Train with DeepSpeed's launcher. Extra arguments go to cifar10_deepspeed.py.
#
# Settings (environment):
#   NUM_NODES    nodes to launch on (default: the launcher's: this node, or every node of the hostfile)
#   NUM_GPUS     ranks per node (default: the launcher's: one per GPU, one per NUMA node on CPU)
#   HOSTFILE     the hostfile, lines of "<host> slots=<ranks>" (default: the launcher's, /job/hostfile)
#   MASTER_ADDR  address of the node of rank 0 (default: the launcher's: 127.0.0.1 on one node)
#   MASTER_PORT  its port (default: a free port on one node, so that two runs can share a machine;
#                the launcher's 29500 on several, where every node must name the same)
#   CUDA_VISIBLE_DEVICES  on one node, the GPUs to train on, one rank each, or the first NUM_GPUS of them
#   LAUNCHER     the launcher to the other nodes: pdsh, openmpi, mvapich, mpich, impi or slurm (default: pdsh)
#   NODE_RANK    this node's rank, for clusters without ssh: run the same command on every node, each
#                with its NODE_RANK (DeepSpeed's --no_ssh --node_rank; needs HOSTFILE and MASTER_ADDR)
#   BIND_CORES   auto (default: bind cores to ranks when numactl is installed and each rank gets one), 1 (always)
#                or 0 (never)
set -euo pipefail

script="$(dirname "$0")/cifar10_deepspeed.py"
fail() { echo "run_ds.sh: error: $*" >&2; exit 2; }

for setting in NUM_NODES NUM_GPUS NODE_RANK; do
  value="${!setting:-}"
  least=$([[ $setting == NODE_RANK ]] && echo 0 || echo 1)
  if [[ -n "$value" ]] && ! [[ "$value" =~ ^[0-9]+$ && 10#$value -ge $least ]]; then
    fail "$setting must be a whole number of at least $least, got '$value'"
  fi
done

hostfile="${HOSTFILE:-/job/hostfile}"
if [[ -n "${HOSTFILE:-}" && ! -f "$HOSTFILE" ]]; then fail "HOSTFILE=$HOSTFILE does not exist"; fi
if [[ -n "${NUM_NODES:-}" && "$NUM_NODES" -gt 1 ]]; then
  if [[ ! -f "$hostfile" ]]; then
    fail "NUM_NODES=$NUM_NODES needs a hostfile listing the nodes: set HOSTFILE (there is no $hostfile)"
  fi
  nodes=$(grep -cE '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$hostfile" || true)
  if (( nodes < NUM_NODES )); then fail "NUM_NODES=$NUM_NODES but $hostfile lists $nodes node(s)"; fi
fi
if [[ -n "${NODE_RANK:-}" ]]; then
  if [[ ! -f "$hostfile" ]]; then fail "NODE_RANK needs HOSTFILE: the nodes, in the same order on every node"; fi
  if [[ -z "${MASTER_ADDR:-}" ]]; then fail "NODE_RANK needs MASTER_ADDR: the address of the node of rank 0"; fi
fi

one_node=false
if [[ "${NUM_NODES:-}" == 1 || ( -z "${NUM_NODES:-}" && -z "${NODE_RANK:-}" && ! -f "$hostfile" ) ]]; then
  one_node=true
fi
if [[ -z "${MASTER_PORT:-}" ]] && $one_node; then
  MASTER_PORT=$(python3 "$(dirname "$0")/cifar10ds/launch.py" free-port)
fi

launcher_args=()
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]] && $one_node && [[ ! -f "$hostfile" ]]; then
  # DeepSpeed's launcher trains on the GPUs CUDA_VISIBLE_DEVICES names only without --num_gpus and --num_nodes:
  # with either, it trains on GPUs 0 to N-1, another run's perhaps.
  IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
  if [[ -n "${NUM_GPUS:-}" ]]; then
    if (( NUM_GPUS > ${#gpus[@]} )); then
      fail "NUM_GPUS=$NUM_GPUS but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES names ${#gpus[@]} GPU(s)"
    fi
    CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${gpus[*]:0:NUM_GPUS}")
  fi
else
  if [[ -n "${NUM_NODES:-}" ]]; then launcher_args+=(--num_nodes "$NUM_NODES"); fi
  if [[ -n "${NUM_GPUS:-}" ]]; then launcher_args+=(--num_gpus "$NUM_GPUS"); fi
fi
if [[ -n "${HOSTFILE:-}" ]]; then launcher_args+=(--hostfile "$HOSTFILE"); fi
if [[ -n "${MASTER_ADDR:-}" ]]; then launcher_args+=(--master_addr "$MASTER_ADDR"); fi
if [[ -n "${MASTER_PORT:-}" ]]; then launcher_args+=(--master_port "$MASTER_PORT"); fi
if [[ -n "${LAUNCHER:-}" ]]; then launcher_args+=(--launcher "$LAUNCHER"); fi
if [[ -n "${NODE_RANK:-}" ]]; then launcher_args+=(--no_ssh --node_rank "$NODE_RANK"); fi

# DeepSpeed's launcher binds each rank to cores of its own, as psutil counts them, and asserts where there are too few
cores=$(python3 -c 'import psutil; print(psutil.cpu_count(logical=False) or 1)' 2>/dev/null || nproc)
too_many=$([[ -n "${NUM_GPUS:-}" ]] && (( 10#$NUM_GPUS > cores )) && echo true || echo false)
case "${BIND_CORES:-auto}" in
  1)
    if $too_many; then fail "BIND_CORES=1 needs a core for each rank: NUM_GPUS=$NUM_GPUS ranks, $cores core(s)"; fi
    launcher_args+=(--bind_cores_to_rank) ;;
  0) echo "run_ds.sh: core binding off (BIND_CORES=0); each rank sizes its thread pool to its share of the cores" >&2 ;;
  auto)
    if ! command -v numactl >/dev/null; then
      echo "run_ds.sh: numactl not found, so cores are not bound to ranks; each rank sizes its thread pool to its share of the cores" >&2
    elif $too_many; then
      echo "run_ds.sh: NUM_GPUS=$NUM_GPUS ranks on $cores core(s), so cores are not bound to ranks; each rank sizes its thread pool to its share of the cores" >&2
    else
      launcher_args+=(--bind_cores_to_rank)
    fi ;;
  *) fail "BIND_CORES must be auto, 1 or 0, got '${BIND_CORES}'" ;;
esac

# Ctrl-C: DeepSpeed's runner sets no SIGINT handler on one node (deepspeedai/DeepSpeed#3645), so it would print a
# KeyboardInterrupt traceback and give the prompt back while the ranks still save. Ignoring SIGINT here, the runner
# waits for its per-node launcher, which passes Ctrl-C on to the ranks; they save and say where (docs/checkpoints.md).
trap '' INT
exec deepspeed "${launcher_args[@]}" "$script" --deepspeed "$@"
