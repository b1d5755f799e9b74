"""Parallelism from outside the model: who is running (environment), how workers are started
(launch), how the model is wrapped and stepped (strategy: single device, DDP, DeepSpeed), and
what fits where (planner). `pipeline/model.py` imports none of this.
"""
