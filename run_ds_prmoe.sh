#!/usr/bin/env bash
# Pyramid-Residual MoE (PR-MoE): run_ds_moe.sh with two residual MoE layers of 2 and 4
# experts. Extra arguments go to cifar10_deepspeed.py; settings as in run_ds_moe.sh,
# with EXPERTS defaulting to "2 4".
set -euo pipefail

EXPERTS="${EXPERTS:-2 4}" exec "$(dirname "$0")/run_ds_moe.sh" --mlp-type residual "$@"
