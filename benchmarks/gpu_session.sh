#!/usr/bin/env bash
# The GPU session of benchmarks/train_throughput.py: the 8B-shaped comparison, then the packed 0.5B one.
#
# Run from the repository root on a machine with one CUDA GPU and no network:
#
#     bash benchmarks/gpu_session.sh            # results and logs go to $OUT (default: benchmarks/results)
#
# 1. installs the wheels carried in .whl/ (liger-kernel, see benchmarks/README.md) into /tmp/site;
# 2. puts this repository on PYTHONPATH (the benchmark imports a snapshot of lightning_lora/ from it);
# 3. runs `train_throughput.py --gpu-8b`, then `--gpu-packed` with the time that is left, each under a
#    timeout; each writes its JSON and markdown after every variant, so a stopped run keeps what it measured.
#
# At most 7 files land in $OUT: train_throughput_gpu8b.{json,md}, train_throughput_gpu_packed.{json,md},
# session.log, logs_gpu8b.txt and logs_gpu_packed.txt (the workers' output). SESSION_SECONDS (default
# 480) is the whole session's budget; GPU8B_SECONDS (default 420) the 8B run's share of it; BENCH_ARGS
# go to both runs (BENCH_ARGS=--dry-run runs this whole script on a CPU).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
SESSION_SECONDS=${SESSION_SECONDS:-480}
GPU8B_SECONDS=${GPU8B_SECONDS:-420}
BENCH_ARGS=${BENCH_ARGS:-}
start=$(date +%s)
exec > >(tee -a "$OUT/session.log") 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'EOF'
import importlib.util
from importlib.metadata import version
for name in ("torch", "transformers", "peft", "lightning", "triton", "liger-kernel"):
    try:
        print(name, version(name))
    except Exception as err:  # noqa: BLE001
        print(name, "missing:", type(err).__name__)
EOF

logs() {  # the workers' stdout and stderr of one run, the ends of long ones
    for f in "$1"/logs/*; do
        [ -f "$f" ] || continue
        echo "===== $f ($(wc -l < "$f") lines)"
        tail -n 150 "$f"
    done > "$2"
}

echo "== --gpu-8b (at most ${GPU8B_SECONDS} s)"
rm -rf /tmp/tt-gpu8b
timeout -k 15 "$GPU8B_SECONDS" python3 benchmarks/train_throughput.py --gpu-8b --retry-fallback \
    --variant-timeout 240 --work /tmp/tt-gpu8b --results "$OUT" $BENCH_ARGS
echo "== --gpu-8b exit status $?, $(( $(date +%s) - start )) s since the start"
logs /tmp/tt-gpu8b "$OUT/logs_gpu8b.txt"

left=$(( SESSION_SECONDS - ($(date +%s) - start) - 10 ))
if [ "$left" -ge 120 ]; then
    echo "== --gpu-packed (at most ${left} s)"
    rm -rf /tmp/tt-gpu-packed
    timeout -k 15 "$left" python3 benchmarks/train_throughput.py --gpu-packed --retry-fallback \
        --variant-timeout 150 --work /tmp/tt-gpu-packed --results "$OUT" $BENCH_ARGS
    echo "== --gpu-packed exit status $?, $(( $(date +%s) - start )) s since the start"
    logs /tmp/tt-gpu-packed "$OUT/logs_gpu_packed.txt"
else
    echo "== --gpu-packed skipped: ${left} s left of SESSION_SECONDS=${SESSION_SECONDS}"
fi
