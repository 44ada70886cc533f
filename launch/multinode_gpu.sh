#!/usr/bin/env bash
# One process per node, all GPUs of the node, without a scheduler. Run the same command on every node:
#
#   # node 0 (its address is the coordinator):
#   NNODES=2 NODE_RANK=0 COORDINATOR_ADDR=10.0.0.1 launch/multinode_gpu.sh --config=configs/acdc.py --workdir=/shared/runs/acdc
#   # node 1:
#   NNODES=2 NODE_RANK=1 COORDINATOR_ADDR=10.0.0.1 launch/multinode_gpu.sh --config=configs/acdc.py --workdir=/shared/runs/acdc
#
# Environment:
#   NNODES            number of nodes (= processes), required
#   NODE_RANK         this node's index in [0, NNODES), required; node 0 runs the coordinator
#   COORDINATOR_ADDR  host name or IP of node 0 that every node can reach, required
#   COORDINATOR_PORT  a free TCP port on node 0 (default 12355)
#   PYTHON            interpreter (default: python)
# The workdir must be on a filesystem all nodes share (checkpoints are written collectively, outputs by
# process 0). Arguments are passed to `python -m diffuseg_jax.main`. The process replaces this shell, so a
# SIGTERM sent here reaches it directly: every node checkpoints at one agreed step and exits with 143.
set -euo pipefail

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
: "${COORDINATOR_ADDR:?set COORDINATOR_ADDR (address of node 0)}"
port=${COORDINATOR_PORT:-12355}

cd "$(dirname "$0")/.."
export JAX_COORDINATOR_ADDRESS="${COORDINATOR_ADDR}:${port}"
export NUM_PROCESSES="$NNODES"
export PROCESS_ID="$NODE_RANK"
exec "${PYTHON:-python}" -m diffuseg_jax.main "$@"
