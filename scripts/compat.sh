#!/usr/bin/env bash
# Compatibility run: install one dependency set into a fresh virtualenv and run the smoke tier on it.
#
#   bash scripts/compat.sh oldest   every direct dependency at its pyproject.toml floor (uv's lowest-direct)
#   bash scripts/compat.sh locked   requirements.lock, what CI installs
#   bash scripts/compat.sh latest   the newest release of everything that pip here will install
#
# Writes compat/results/SET.json: the resolved versions, the pip settings in effect (and any
# machine-wide constraint that held a package below its newest release), the smoke tier's outcome
# and its pytest wall time (install and DeepSpeed's one-time op build excluded). Commit it, then run
# `python scripts/tested_with.py` to refresh the README's "Tested with" table; the ends of
# lightning_lora/versions.py's TESTED are the oldest and latest results (tests/test_versions.py).
set -euo pipefail
set_name="${1:-}"
case "$set_name" in oldest|locked|latest) ;; *) echo "usage: $0 oldest|locked|latest" >&2; exit 2 ;; esac
shift
cd "$(dirname "$0")/.."
work=".compat/$set_name"
rm -rf "$work"
mkdir -p "$work" compat/results
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip uv
case "$set_name" in
  locked) python -m pip install -q -c requirements.lock -e ".[test]" ;;
  latest) python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" ;;
  oldest)
    # uv resolves the floors (it reads no pip configuration: no machine-wide cap applies), pip installs them.
    uv pip compile pyproject.toml --extra test --resolution lowest-direct --python-version 3.11 --quiet \
      --output-file "$work/oldest.txt"
    python -m pip install -q -r "$work/oldest.txt"
    python -m pip install -q --no-deps -e . ;;
esac
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/$work/torch_extensions"
# DeepSpeed builds its CPU communication op on first use (about 40 s): built here, outside the timing.
python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" >/dev/null 2>&1 || true
start=$(date +%s.%N)
set +e
python -m pytest -q -m smoke -p no:cacheprovider "$@" 2>&1 | tee "$work/pytest.log"
status=${PIPESTATUS[0]}
set -e
seconds=$(python -c "import time; print(round(time.time() - $start, 1))")
python scripts/compat_record.py "$set_name" "$status" "$seconds" "$work/pytest.log" "compat/results/$set_name.json"
exit "$status"
