#!/bin/sh
# The main job on a machine with no data and no GPU needed: `sh demo.sh`.
#   synthetic FLARE-like data -> data_prepare -> coarse CPS training -> fine CPS training with UIF (round 1, then
#   DEMO_UIF_ROUNDS filter + retrain cycles, 1 by default)
#   -> export -> predict the held-out validation CTs -> FLARE22 DSC/NSD evaluation + overlays.
# Everything goes to demo_output/ (override with DEMO_OUT=/path). Running it again reuses every finished step.
# The demo uses SMALL networks and volumes (see the overrides below) so it finishes in minutes on 2 CPU cores;
# the real configuration is each stage's config.yaml, unchanged.
set -eu
ROOT=$(cd "$(dirname "$0")" && pwd)
cd "$ROOT"
. "$ROOT/scripts/venv.sh"
ensure_venv requirements.txt
PY="$VENV_PY"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

OUT=$(mkdir -p "${DEMO_OUT:-$ROOT/demo_output}" && cd "${DEMO_OUT:-$ROOT/demo_output}" && pwd)
DS="$OUT/dataset"
WEIGHTS="$OUT/model_weights"
# Demo sizes; the CI test runs this same script with smaller values.
LABELED=${DEMO_LABELED:-8}
UNLABELED=${DEMO_UNLABELED:-12}
VAL=${DEMO_VAL:-4}
DATA_SIZE=${DEMO_DATA_SIZE:-demo}
COARSE_SIZE=${DEMO_COARSE_SIZE:-32}
FINE_SIZE=${DEMO_FINE_SIZE:-32}
CHANNELS=${DEMO_CHANNELS:-[8,16,32,64,128]}
COARSE_ITERS=${DEMO_COARSE_ITERS:-500}
FINE_ITERS=${DEMO_FINE_ITERS:-500}
VAL_INTERVAL=${DEMO_VAL_INTERVAL:-100}
UIF_ROUNDS=${DEMO_UIF_ROUNDS:-1}
start=$(date +%s)

step() {
    echo
    echo "=== [demo $(($(date +%s) - start)) s] $*"
}

echo "SemiSeg-CSSN demo: small networks (channels $CHANNELS, no dropout), small volumes (coarse ${COARSE_SIZE}^3,"
echo "fine ${FINE_SIZE}^3), short schedules with a CPS ramp-up, so that it runs on a CPU in minutes."
echo "The full-size settings are the stages' config.yaml files, unchanged. Outputs: $OUT"

step "1/7 synthetic dataset: $LABELED labeled, $UNLABELED unlabeled (20% hard), $VAL validation cases"
"$PY" -m data_prepare.synthetic --out "$DS" --labeled "$LABELED" --unlabeled "$UNLABELED" --val "$VAL" \
    --size "$DATA_SIZE" --seed 0

C3="[$COARSE_SIZE,$COARSE_SIZE,$COARSE_SIZE]"
F3="[$FINE_SIZE,$FINE_SIZE,$FINE_SIZE]"
step "2/7 data_prepare (coarse ${COARSE_SIZE}^3, fine ${FINE_SIZE}^3)"
sh data_prepare/run.sh data_base_dir="$DS" coarse_size_zyx="$C3" fine_size_zyx="$F3" num_workers=2

SMALL="model.channels=$CHANNELS model.dropout=0.0 data.num_workers=0 schedule.val_interval=$VAL_INTERVAL
 schedule.checkpoint_interval=50 device=cpu"

step "3/7 coarse stage: CPS training of two U-Nets ($COARSE_ITERS iterations), then export"
# shellcheck disable=SC2086
COARSE_ARGS="data_base_dir=$DS output_dir=$OUT/coarse data.size_zyx=$C3 schedule.iterations=$COARSE_ITERS
 cps.rampup_iterations=$((COARSE_ITERS * 2 / 5)) export.dir=$WEIGHTS/base_coarse_model"
# shellcheck disable=SC2086
sh coarse_base_seg/run.sh $COARSE_ARGS $SMALL
# shellcheck disable=SC2086
sh coarse_base_seg/run.sh $COARSE_ARGS $SMALL step=export

step "4/7 fine stage: coarse boxes -> round 1 CPS -> $UIF_ROUNDS x (UIF -> CPS round) -> export ($FINE_ITERS iterations a round)"
FINE_ARGS="data_base_dir=$DS output_dir=$OUT/fine data.size_zyx=$F3 schedule.iterations=$FINE_ITERS
 cps.rampup_iterations=$((FINE_ITERS * 2 / 5)) optim.lr=1.0e-2 boxes.coarse_model_dir=$WEIGHTS/base_coarse_model
 uif.keep_ratio=0.5 uif.rounds=$UIF_ROUNDS"
# Round 1 first, exported on its own, so that its pseudo labels of the unlabeled pool can be checked against the
# synthetic truth (trainu_mask_hidden/, which no stage reads) in the UIF table below.
ROUND1="$OUT/round1_weights"
for s in boxes round1; do
    # shellcheck disable=SC2086
    sh fine_efficient_seg/run.sh $FINE_ARGS $SMALL step=$s
done
if [ ! -f "$ROUND1/efficient_fine_model/model.pt" ]; then
    # shellcheck disable=SC2086
    sh fine_efficient_seg/run.sh $FINE_ARGS $SMALL step=export export.round=1 export.dir="$ROUND1/efficient_fine_model"
fi
[ -e "$ROUND1/base_coarse_model" ] || ln -s "$WEIGHTS/base_coarse_model" "$ROUND1/base_coarse_model"
sh predict.sh "$DS/trainu_images" "$OUT/round1_pool_predictions" --weights-dir "$ROUND1" --device cpu \
    --fine-size "$FINE_SIZE" --ensemble
# shellcheck disable=SC2086
sh fine_efficient_seg/run.sh $FINE_ARGS $SMALL export.dir="$WEIGHTS/efficient_fine_model"
echo
echo "UIF ranking of the unlabeled pool (rank 1 = most certain) beside the true DSC of its round-1 pseudo label:"
"$PY" -m benchmarks.uif_quality ranking --scores "$OUT/fine/uif_scores.csv" --dataset "$DS" \
    --pred "$OUT/round1_pool_predictions"

step "5/7 predict the validation CTs (ensemble of both networks, overlays)"
sh predict.sh "$DS/val_images" "$OUT/predictions" --weights-dir "$WEIGHTS" --device cpu --fine-size "$FINE_SIZE" \
    --ensemble --overlays

step "6/7 FLARE22 DSC/NSD against the validation masks"
"$PY" -m common.evaluate --pred "$OUT/predictions" --gt "$DS/val_mask" --out "$OUT/results.csv"

step "7/7 done in $(($(date +%s) - start)) s"
echo "Outputs in $OUT:"
echo "  dataset/                synthetic CTs, masks and the prepared databases"
echo "  coarse/ fine/           training runs (logs, metrics.jsonl, TensorBoard in */tb, checkpoints)"
echo "  fine/uif_scores.csv     UIF uncertainty of every unlabeled case and which were kept"
echo "  round1_pool_predictions/  round-1 pseudo labels of the pool (scored against dataset/trainu_mask_hidden/)"
echo "  model_weights/          exported coarse and fine models"
echo "  predictions/            masks, predictions.csv (timings, uncertainty), *_overlay.png"
echo "  results.csv             per-case, per-organ DSC and NSD"
