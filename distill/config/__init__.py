"""The campaign config tree (schema) and its loader."""

from distill.config.loader import config_to_yaml, load_config
from distill.config.schema import CampaignConfig

__all__ = ["CampaignConfig", "config_to_yaml", "load_config"]
