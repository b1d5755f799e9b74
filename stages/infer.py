"""The usage guide's `infer.py` (text generation): see `pipeline/cli/generate.py`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import run_command
from pipeline.cli.generate import generate

if __name__ == "__main__":
    run_command(generate)
