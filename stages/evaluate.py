"""DVC `evaluate` stage and the usage guide's `evaluate.py`: see `pipeline/cli/evaluate.py`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import run_command
from pipeline.cli.evaluate import evaluate

if __name__ == "__main__":
    run_command(evaluate)
