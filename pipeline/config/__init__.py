"""Typed configuration: the schema and the layered loader."""

from pipeline.config.loader import dump_config, flatten_config, load_config
from pipeline.config.schema import Config

__all__ = ["Config", "dump_config", "flatten_config", "load_config"]
