"""DVC stage `prepare`: the same as `gpt3 prepare` (flags and params.yaml alike)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout too

from pipeline.cli import run_command
from pipeline.cli.prepare import prepare

if __name__ == "__main__":
    run_command(prepare)
