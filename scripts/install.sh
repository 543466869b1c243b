#!/usr/bin/env bash
# Create (once) a virtual environment keyed by pyproject.toml's hash outside the clone, install cnnapps into it
# in editable mode, and link it as ./.venv. Re-running is cheap: only the editable install is redone.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(sha256sum pyproject.toml | cut -c1-16)
venv="${CNNAPPS_VENV:-$HOME/.cache/cnnapps/venv-$key}"
python="${PYTHON:-python3}"
if [ ! -f "$venv/.complete" ]; then
    echo "cnnapps: creating $venv (first run installs torch and friends, a few minutes)" >&2
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
    "$venv/bin/python" -m pip install --quiet -e ".[test,export,bench]"
    touch "$venv/.complete"
fi
# The editable install points at this clone (the cached venv may have served another one).
if ! log=$("$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1); then
    echo "$log" >&2; exit 1
fi
ln -sfn "$venv" .venv
