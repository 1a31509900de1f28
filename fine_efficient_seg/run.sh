#!/bin/sh
# Fine stage: boxes -> round1 -> uif -> round2 -> export, each step skipped when already done.
#   sh run.sh                       all steps (training rounds on ${GPUS:-1} GPUs through torchrun)
#   sh run.sh step=uif              one step
#   sh run.sh key=value ...         config overrides (e.g. schedule.iterations=20000 uif.keep_count=200)
#   GPUS=4 sh run.sh                4 processes with DistributedDataParallel for round1/round2 (torchrun)
#   sh run.sh config=my.yaml ...    another config file
# A killed run continues where it stopped when started again with the same arguments.
# Exit codes: 0 done, 2 bad config or input, 1 other failure, 130/143 stopped by SIGINT/SIGTERM (last.pt saved).
set -eu
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
. "$ROOT/scripts/python_env.sh"
GPUS="${GPUS:-1}"

STEP=all
for arg in "$@"; do
    case "$arg" in
        step=*) STEP=${arg#step=} ;;
    esac
done

# The last `step=` wins among the overrides, so appending it selects the step. Only the training rounds use
# several processes; with one GPU no launcher sits in between, so Ctrl-C and `kill` reach the trainer directly.
run_step() {
    step=$1
    shift
    case "$step" in
        round1|round2)
            if [ "$GPUS" != "1" ]; then
                "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" \
                    -m fine_efficient_seg.train "$@" "step=$step"
                return
            fi ;;
    esac
    "$PY" -m fine_efficient_seg.train "$@" "step=$step"
}

# One GPU: the trainer runs every step itself (`step=all`) and replaces this shell (exec), so `kill` and Ctrl-C reach
# it, it saves last.pt, and no orphan is left to race a rerun.
if [ "$GPUS" = "1" ]; then
    exec "$PY" -m fine_efficient_seg.train "$@"
fi
case "$STEP" in
    all)
        for step in boxes round1 uif round2 export; do
            run_step "$step" "$@"
        done ;;
    *)
        run_step "$STEP" "$@" ;;
esac
