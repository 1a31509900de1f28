# Sourced by tests/run.sh and demo.sh: create or reuse $ROOT/.venv and install a requirements file into it.
# The install is skipped when the requirements file has not changed since the last successful install.
ensure_venv() {
    req="$ROOT/$1"
    VENV="$ROOT/.venv"
    VENV_PY="$VENV/bin/python"
    if [ ! -x "$VENV_PY" ]; then
        echo "[setup] creating $VENV"
        python3 -m venv "$VENV"
    fi
    stamp="$VENV/.installed-$(basename "$req")"
    want=$(cat "$ROOT/requirements.txt" "$req" | cksum)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "[setup] installing $(basename "$req") into $VENV"
        "$VENV_PY" -m pip install -q --disable-pip-version-check -r "$req"
        echo "$want" > "$stamp"
    fi
}
