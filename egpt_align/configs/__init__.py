"""Configs: `base.get_config()` declares every key; experiments/ override."""
