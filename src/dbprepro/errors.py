"""The package's error types that several layers raise (no imports: every module may use them)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""
