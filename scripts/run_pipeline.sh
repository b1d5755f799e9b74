#!/usr/bin/env bash
# Run the default pipeline from the repo root: make it a git + DVC repo if it is not one yet,
# then `dvc repro`, show the metrics, and push the outputs to the DVC remote params.yaml names
# (`storage`: a folder beside the repo by default). Offline; a few minutes on 2 CPU cores.
set -euo pipefail
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
[ -d .git ] || git init -q
[ -d .dvc ] || { dvc init -q; dvc config core.analytics false; }
dvc repro
dvc metrics show
gpt3 remote     # storage.remote -> storage.url from params.yaml, the default DVC remote
dvc push
