"""A reproducible GPT-3-family training pipeline: config, data, model, training, tracking."""

__version__ = "0.1.0"
