#!/usr/bin/env bash
# `make test`'s ruff: over the Python files git tracks, so a user's untracked scratch script
# cannot fail the project's test command. Outside a git checkout (a tarball), over the tree.
# RUFF names the ruff to run (default: the one on PATH); the exit code is ruff's.
set -euo pipefail
ruff=${RUFF:-ruff}
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  exec "$ruff" check .
fi
files=()
while IFS= read -r -d '' file; do
  [ -f "$file" ] && files+=("$file")  # a tracked file deleted on disk is not ruff's business
done < <(git ls-files -z -- '*.py')
[ "${#files[@]}" -gt 0 ] || exit 0
# --force-exclude: pyproject's excludes hold for files named on the command line too
exec "$ruff" check --force-exclude "${files[@]}"
