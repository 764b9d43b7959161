#!/usr/bin/env bash
# The project's test command (README "Run the tests"). Builds DeepSpeed's CPU ops on first use.
# Three xdist workers on the 2-core CI machine: the multi-process tests leave a core idle while their
# processes start and wait on each other (measured: 9:49 with three, 10:06 with two, same suite);
# PYTEST_WORKERS=N uses N (each file stays on one worker).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DS_ACCELERATOR=cpu
python -m pytest -q -n "${PYTEST_WORKERS:-3}" --dist loadfile --durations=15 "$@"
