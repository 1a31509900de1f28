#!/bin/sh
# Fine stage: boxes -> round1 -> uif -> round2 (-> uif2 -> round3 ... with uif.rounds > 1) -> export, each step
# skipped when already done. The steps are orchestrated in one place, fine_efficient_seg/train.py; this script only
# picks the launcher and execs it.
#   sh run.sh                       all steps (on ${GPUS:-1} GPUs)
#   sh run.sh step=uif              one step
#   sh run.sh key=value ...         config overrides (e.g. schedule.iterations=20000 uif.keep_count=200)
#   GPUS=4 sh run.sh                4 processes through torchrun: the rounds use DistributedDataParallel,
#                                   boxes and uif share their cases across the ranks, export runs on rank 0
#   sh run.sh config=my.yaml ...    another config file
# A killed run continues where it stopped when started again with the same arguments.
# Exit codes: 0 done, 2 bad config or input, 1 other failure, 130/143 stopped by SIGINT/SIGTERM (last.pt saved).
set -eu
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
. "$ROOT/scripts/python_env.sh"
GPUS="${GPUS:-1}"

# exec: with one GPU no shell or launcher sits in between, so Ctrl-C and `kill` reach the trainer directly.
if [ "$GPUS" != "1" ]; then
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m fine_efficient_seg.train "$@"
fi
exec "$PY" -m fine_efficient_seg.train "$@"
