from memlm.config.base import Config, apply_overrides  # noqa: F401
