#!/usr/bin/env bash
# The README's test command: install (cached) and run the whole test suite on real data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export CNNAPPS_DATA="${CNNAPPS_DATA:-$(cd .. && pwd)/shared/data}"
exec .venv/bin/python -m pytest -q "$@"
