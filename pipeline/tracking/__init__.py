"""Where metrics go: one tracker interface, with TensorBoard, log-file, DVC and MLflow backends."""

from pipeline.tracking.base import Tracker, TrackerGroup

__all__ = ["Tracker", "TrackerGroup"]
