"""Configuration of a federated run (placeholder; filled by the federate stage)."""


class ConfigError(ValueError):
    """A bad option or an incompatible cache; the message names the option and the fix."""
