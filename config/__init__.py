"""Configuration: typed models and the YAML loader. Imports nothing else of the project."""
from config.loader import ConfigError, DEFAULT_PATH, load_config, parse_config, resolve_path
from config.models import Config, Deployment, RateLimit, Secret, StaticKey

__all__ = [
    "Config", "ConfigError", "DEFAULT_PATH", "Deployment", "RateLimit", "Secret", "StaticKey",
    "load_config", "parse_config", "resolve_path",
]
