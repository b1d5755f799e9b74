#!/usr/bin/env bash
# Run the default pipeline from the repo root: `dvc repro`, then show the metrics. Offline; a
# few minutes on 2 CPU cores. The clone is already a DVC project (.dvc/ is committed), so this
# changes nothing git tracks except dvc.lock, and writes nothing outside the clone: DVC's
# machine-wide index cache goes to .dvc/tmp (ignored), and nothing is pushed. Sharing outputs
# through a DVC remote is a separate step the user asks for: `gpt3 remote && dvc push`.
set -euo pipefail
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
export DVC_SITE_CACHE_DIR="${DVC_SITE_CACHE_DIR:-$PWD/.dvc/tmp/site_cache}"
[ -d .dvc ] || { echo "error: no .dvc/ here: run this from the root of a clone" >&2; exit 2; }
[ -d .git ] || git init -q   # DVC needs git; a tarball of the repo has no .git
dvc repro
dvc metrics show
