"""The kill loop: SIGKILL a tiny CPU training run N times, resume each time, compare the weights.

    python bench/chaos.py                      # 20 kills, seed 0, data/prepared
    python bench/chaos.py --kills 50 --seed 3 --checkpoint_interval 2 --keep work/

Each kill is followed by `stages/train.py --resume_from_checkpoint latest` (a fresh start when
no checkpoint exists yet). The final weights and optimizer state are compared bit for bit with
an uninterrupted run of the same config. How kills are aimed is described in
`bench/chaos_loop/__init__.py`. Prints every fault, the restarts, and whether the result
matched. Exit code 0 when it matched, 1 when it did not.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from chaos_loop import TINY_OVERRIDES, run_chaos  # bench/chaos_loop/, beside this file

from pipeline.data.prepared import META_FILE


def prepared_folder(requested: str | None, scratch: Path) -> Path:
    """The prepared data to train on: the one asked for, data/prepared, or synthetic tokens."""
    if requested:
        return Path(requested).resolve()
    default = Path(__file__).resolve().parent.parent / "data" / "prepared"
    if (default / META_FILE).is_file():
        return default
    from synthetic_data import synthetic_prepared  # bench/synthetic_data.py, beside this file

    print(f"no {default / META_FILE}: training on synthetic tokens", flush=True)
    return synthetic_prepared(scratch / "prepared", vocab=512, tokens=200_000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to inject (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--checkpoint_interval", type=int, default=3, help="steps (default 3)")
    parser.add_argument("--prepared", help="prepared data folder (default data/prepared)")
    parser.add_argument("--keep", help="keep the runs and child outputs in this folder")
    args = parser.parse_args()
    if args.kills < 1 or args.checkpoint_interval < 1:
        parser.error("--kills and --checkpoint_interval must be at least 1")

    with tempfile.TemporaryDirectory(prefix="chaos-") as scratch:
        workdir = Path(args.keep) if args.keep else Path(scratch)
        prepared = prepared_folder(args.prepared, Path(scratch))
        print(
            f"kill loop: {args.kills} kills, seed {args.seed}, checkpoint every "
            f"{args.checkpoint_interval} steps, data {prepared}, work in {workdir}",
            flush=True,
        )
        report = run_chaos(
            {**TINY_OVERRIDES, "data.prepared_dir": str(prepared)},
            workdir,
            kills=args.kills,
            seed=args.seed,
            checkpoint_interval=args.checkpoint_interval,
            say=lambda line: print(line, flush=True),
        )
    print(report.summary())
    return 0 if report.identical else 1


if __name__ == "__main__":
    sys.exit(main())
