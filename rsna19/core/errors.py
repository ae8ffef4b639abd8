"""Exceptions with messages meant for people."""


class UserError(Exception):
    """A failure caused by the user's input (a path, a config, a file), reported as one clear line."""


class ConfigError(UserError):
    """A config file or override that does not match its schema."""
