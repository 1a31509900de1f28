#!/bin/sh
# Segment every CT in IN_DIR into OUT_DIR/<id>.nii.gz (+ predictions.csv) with the models in model_weights/.
# Usage: sh predict.sh IN_DIR OUT_DIR [--device cuda|cpu] [--precision fp16|bf16|fp32] [--fine-size 192|160]
#                      [--ensemble] [--overwrite] [--overlays] [--workers N] [--weights-dir DIR] ...
# (all options: sh predict.sh IN OUT --help). Exit code 0 = all fine, 1 = some case failed, 2 = setup error.
set -eu
ROOT=$(cd "$(dirname "$0")" && pwd)
if [ "$#" -lt 2 ]; then
    echo "usage: sh predict.sh IN_DIR OUT_DIR [options]   (sh predict.sh IN OUT --help for the options)" >&2
    exit 2
fi
IN_DIR=$1
OUT_DIR=$2
shift 2
. "$ROOT/scripts/python_env.sh"
exec "$PY" "$ROOT/predict.py" -i "$IN_DIR" -o "$OUT_DIR" "$@"
