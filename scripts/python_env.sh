# Sourced by the stage run.sh files and predict.sh after they set ROOT (the repository root): puts the repository
# on PYTHONPATH and picks the Python of $ROOT/.venv when it exists (python3 otherwise) as $PY.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
else
    PY=python3
fi
