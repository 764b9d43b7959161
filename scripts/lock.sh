#!/usr/bin/env bash
# Refresh requirements.lock, the one pinned set that CI and the README's commands install, from
# pyproject.toml (the project, its test extra and everything they pull in, transitively).
#
# torch is resolved as the CPU build this machine's pip finds in /opt/wheels (so the lock lists
# no CUDA packages) and written without its local label: `torch==2.13.0` installs that CPU build
# here and the user's own build elsewhere. Review the diff, then run scripts/compat.sh locked.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml --extra test --python-version 3.11 --find-links /opt/wheels \
  --constraint .ci/torch.txt --custom-compile-command "bash scripts/lock.sh" --quiet --output-file requirements.lock
sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$/\1/' requirements.lock
