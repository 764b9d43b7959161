#!/usr/bin/env bash
# The project's test command (README "Run the tests"). Builds DeepSpeed's CPU ops on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DS_ACCELERATOR=cpu
python -m pytest -q -n 2 --dist loadfile "$@"
