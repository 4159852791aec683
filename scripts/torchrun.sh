#!/usr/bin/env bash
# Launch train.py on one or many nodes with torchrun; every argument after the options goes to train.py.
#
#   scripts/torchrun.sh fit --config configs/lm/760m.yaml                       # one node, all GPUs
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 scripts/torchrun.sh fit --config ...   # on each of 4 nodes
#
# NPROC_PER_NODE defaults to the visible GPU count (1 without GPUs); Lightning reads the torchrun environment,
# so trainer.num_nodes and trainer.devices are passed to match.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    train.py "$@" --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC_PER_NODE"
