"""The one base class of every error whose message is a complete diagnosis (what is wrong, which file or option,
and the fix). The CLI prints such an error as one line and exits 2; anything else is a bug and keeps its traceback.
This module imports nothing, so catching the base costs nothing."""


class FedclipCacheError(Exception):
    """A user-facing error: bad input, an unusable dataset, model or cache. The message names the fix."""


class ConfigError(FedclipCacheError, ValueError):
    """A bad option or an incompatible cache; the message names the option and the fix."""
