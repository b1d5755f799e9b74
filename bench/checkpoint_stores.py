"""How long a checkpoint save holds training, per store, on one process (CPU or one GPU).

For each store: the stall (until `save_states` returns: the host copy for the async stores,
the whole write for the blocking ones) and the total (until `wait()` says the checkpoint is
published, checksums included). The state is an AdamW-like one: weights + two moments.

    python bench/checkpoint_stores.py --mib 256 --repeats 3

On a GPU the async stores copy into pinned host memory; on the CPU the copy is a memcpy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pipeline.checkpoint import SingleFileStore
from pipeline.checkpoint.dcp_store import DCPStore


class Tensors:
    """A named state of a few large tensors (a `Stateful`)."""

    def __init__(self, mib: int, device: str) -> None:
        per = 1 << 22  # 16 MiB of fp32 per tensor
        count = max(1, mib // 16)
        self.tensors = {f"t{i}": torch.randn(per, device=device) for i in range(count)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        for name, value in state_dict.items():
            self.tensors[name].copy_(value)


def measure(store: object, states: dict, repeats: int) -> dict[str, float]:
    stalls, totals = [], []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        store.save_states(states, step)  # type: ignore[attr-defined]
        returned = time.perf_counter()
        store.wait()  # type: ignore[attr-defined]
        done = time.perf_counter()
        stalls.append(returned - start)
        totals.append(done - start)
    return {"stall_s": min(stalls), "total_s": min(totals)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="state size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    states = {"model": Tensors(args.mib, args.device), "trainer": {"step": 0}}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        root = Path(tmp)
        stores = {
            "single_file": SingleFileStore(root / "single", keep=1),
            "single_file_async": SingleFileStore(root / "single_async", keep=1, async_write=True),
            "dcp_blocking": DCPStore(root / "dcp_sync", keep=1, async_save=False),
            "dcp_async": DCPStore(root / "dcp_async", keep=1),
        }
        for name, store in stores.items():
            results[name] = measure(store, states, args.repeats)
            print(name, json.dumps(results[name]), flush=True)
    print(json.dumps({"mib": args.mib, "device": args.device, "results": results}))


if __name__ == "__main__":
    main()
