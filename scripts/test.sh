#!/usr/bin/env bash
# The project's test command (README "Run the tests"). Builds DeepSpeed's CPU ops on first use.
# Two xdist workers fit the 2-core CI machine; PYTEST_WORKERS=N uses N (each file stays on one worker).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DS_ACCELERATOR=cpu
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
