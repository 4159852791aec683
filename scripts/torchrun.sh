#!/usr/bin/env bash
# Launch train.py on one or many nodes with torchrun; every argument after the options goes to train.py.
#
#   scripts/torchrun.sh fit --config configs/lm/760m.yaml                          # one node, all GPUs
#   NNODES=4 MASTER_ADDR=node0 scripts/torchrun.sh fit --config ... --ckpt_path last_or_fresh   # on each node
#
# The nodes meet in a c10d rendezvous at MASTER_ADDR:MASTER_PORT (any one of them, reachable by all; it also
# works with every "node" on one machine, which is how tests/test_multinode.py runs it); ranks are assigned by
# the rendezvous. NPROC_PER_NODE defaults to the visible GPU count (1 without GPUs); Lightning reads the
# torchrun environment, so trainer.num_nodes and trainer.devices are passed to match.
# On SIGTERM torchrun forwards the signal to its workers, which save a checkpoint and exit (modules/resilience.py);
# it kills them 30 s later, so give the job's stop grace period at least that (plus the time of one step).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NNODES=${NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-lact}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
    train.py "$@" --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC_PER_NODE"
