"""SLURM: train a run as a batch job that survives time limits and preemption.

`environment` tells whether this process is inside a SLURM job (then it trains, never submits);
`script` renders the batch script from the resolved config (resources, `srun torchrun` or the
deepspeed launcher, and the USR1 -> checkpoint -> requeue -> resume protocol); `submit` writes
it under the run directory and runs `sbatch`. `gpt3 slurm script|submit` and, with
`distributed.launcher: slurm`, DVC's `python stages/train.py` are the ways in.
"""
