#!/usr/bin/env bash
# Mixture of Experts on 1 node with 2 ranks: expert-parallel size 2, 2 experts, top-1
# gating with RSample noise, MoE parameter groups. Extra arguments go to cifar10_deepspeed.py.
#
# Settings (environment): NUM_NODES (default 1), NUM_GPUS (ranks per node, default 2),
# EP_SIZE (expert-parallel size, default 2), EXPERTS (experts per MoE layer, one
# layer per number, default "2"), BIND_CORES (see run_ds.sh).
set -euo pipefail

export NUM_NODES="${NUM_NODES:-1}"
export NUM_GPUS="${NUM_GPUS:-2}"
EP_SIZE="${EP_SIZE:-2}"
read -ra experts <<< "${EXPERTS:-2}"

exec "$(dirname "$0")/run_ds.sh" \
  --log-interval 100 \
  --moe \
  --ep-world-size "$EP_SIZE" \
  --num-experts "${experts[@]}" \
  --top-k 1 \
  --noisy-gate-policy RSample \
  --moe-param-group \
  "$@"
