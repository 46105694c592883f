"""Site configuration: pydantic models and the loader that reports file, key path and line."""

from gateway.config.load import Problem, check_site, load_config, parse_config
from gateway.config.model import SiteConfig

__all__ = ["Problem", "SiteConfig", "check_site", "load_config", "parse_config"]
