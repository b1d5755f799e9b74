"""DVC `train` stage and the training guide's `train.py`: see `pipeline/cli/train.py`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import run_command
from pipeline.cli.train import train

if __name__ == "__main__":
    run_command(train)
