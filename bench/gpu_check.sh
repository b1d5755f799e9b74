#!/usr/bin/env bash
# One device call: install the carried wheels, run bench/train.py's GPU cases, keep the logs.
#   run(command="bash bench/gpu_check.sh 125M,350M,1.3B 480", carry=[".whl"])
# $1: comma-separated cases (bench/train.py --list), $2: seconds after which no case starts.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/benchlogs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
df -h /tmp | tail -1; free -g | sed -n 2p
timeout $(( ${2:-480} + 60 )) python3 bench/train.py --shapes "$1" --budget_s "${2:-480}" \
  --out "$OUT/results.jsonl" --logs /tmp/benchlogs 2>&1 | tee "$OUT/bench.txt"
tail -n 30 /tmp/benchlogs/*.log > "$OUT/log_tails.txt" 2>/dev/null
tar czf "$OUT/logs.tgz" -C /tmp benchlogs
# Wheels: ../shared/gpu/wheelhouse.sh, plus MLflow's SQLite store needs cryptography there:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_34_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     cryptography==50.0.2 cffi==2.0.0 pycparser
