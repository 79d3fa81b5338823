"""Typed settings and the domain values shared by mq, datastore and worker."""

from config.errors import ConfigError, FnqError
from config.settings import Settings, load_settings

__all__ = ["ConfigError", "FnqError", "Settings", "load_settings"]
