#!/bin/sh
# Train the two coarse networks with cross pseudo supervision: `sh run.sh [key=value ...]`.
#   sh run.sh                                  one process: the GPU (or the CPU when there is none)
#   GPUS=4 sh run.sh                           4 processes on this machine with DistributedDataParallel (torchrun)
#   sh run.sh step=export                      copy the best weights to ../model_weights/base_coarse_model
#   sh run.sh config=my.yaml optim.lr=1.0e-3   another config file, and overrides of its keys
# Rerunning the same command resumes from output/checkpoints/last.pt; a finished run says so and stops.
# Several nodes: run torchrun yourself on every node from the repository root, e.g.
#   PYTHONPATH=$PWD torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
#       --rdzv_endpoint=HOST:29500 --rdzv_id=coarse -m coarse_base_seg.train [key=value ...]
# Exit codes: 0 done, 2 bad config or input, 1 other failure, 130/143 stopped by SIGINT/SIGTERM (last.pt saved).
set -eu
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
. "$ROOT/scripts/python_env.sh"
GPUS="${GPUS:-1}"
if [ "$GPUS" = "1" ]; then
    # One process: no launcher in between, so Ctrl-C and `kill` reach the trainer directly.
    exec "$PY" -m coarse_base_seg.train "$@"
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m coarse_base_seg.train "$@"
