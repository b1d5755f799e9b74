"""Is this process inside a SLURM job? The one question that decides submit versus train.

`distributed.launcher: slurm` means "run this as a batch job". Outside a job,
`stages/train.py` submits one and waits; inside it, the same command (and the same config)
must train instead, or the job would submit itself again and again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

JOB_MARKER = "GPT3_SLURM_JOB"
"""Exported by the batch script (`pipeline/slurm/script.py`) to every process it starts."""


def inside_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """True in our batch job (the marker) or in any SLURM allocation (`SLURM_JOB_ID`).

    An allocation counts too: `salloc` then `python stages/train.py` trains on the allocated
    node, as it would anywhere else, rather than queueing a second job from inside the first.
    """
    environ = os.environ if environ is None else environ
    return bool(environ.get(JOB_MARKER) or environ.get("SLURM_JOB_ID"))
