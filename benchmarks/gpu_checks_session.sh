#!/usr/bin/env bash
# The GPU checks the CPU suite cannot make, in one command on a machine with one CUDA GPU and no network:
#
#     bash benchmarks/gpu_checks_session.sh      # results and logs go to $OUT (default: benchmarks/results)
#
# 1. installs the wheels carried in .whl/ into /tmp/site (deepspeed and its hjson and pydantic,
#    jsonargparse and its needs for the CLI, liger-kernel: see benchmarks/README.md);
# 2. runs the `gpu`-marked tests (tests/test_training_path.py: Liger, flex attention and compiled
#    blocks against the plain path on the GPU) and records their outcome in gpu_tests.{txt,xml};
# 3. runs benchmarks/gpu_checks.py (DeepSpeed ZeRO-3 over NCCL and the FSDP preset: fit + HFExport,
#    merged model against PEFT's adapter model), which writes gpu_checks.{json,md}.
# About 4 minutes (estimated: it has not run on a GPU yet). At most 6 files land in $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/checks_session.log") 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft, lightning, deepspeed; print(torch.__version__, transformers.__version__, peft.__version__, lightning.__version__, deepspeed.__version__, torch.cuda.get_device_name())"
timeout -k 15 240 python3 -m pytest -q -m gpu tests/test_training_path.py -p no:cacheprovider \
    --junitxml "$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.txt"
timeout -k 15 300 python3 benchmarks/gpu_checks.py --results "$OUT"
