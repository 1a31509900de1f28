#!/bin/sh
# Prepare the dataset for training: `sh run.sh [key=value ...]` (keys of config.yaml).
#   sh run.sh                                   reads ../dataset, writes db/, coarse_image/, fine_image/, ... into it
#   sh run.sh data_base_dir=/data/flare22 num_workers=8
#   sh run.sh config=my.yaml overwrite=true     another config file; prepare every case again
# A rerun skips finished cases. Exit codes: 0 all cases prepared, 1 some cases failed (listed in
# db/failed_cases.txt; the others are prepared), 2 bad config or missing dataset folder.
set -eu
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
. "$ROOT/scripts/python_env.sh"
exec "$PY" -m data_prepare.run "$@"
