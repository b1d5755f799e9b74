"""DVC `promote` stage: see `pipeline/cli/promote.py`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import run_command
from pipeline.cli.promote import promote

if __name__ == "__main__":
    run_command(promote)
