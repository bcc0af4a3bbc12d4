"""Exceptions the package raises for bad input: each message names the file, field or value at fault."""


class MiniCPM4Error(Exception):
    """Base class: the CLI prints these as one clean line instead of a traceback."""


class CheckpointError(MiniCPM4Error):
    """A checkpoint file is missing, corrupt, or does not match its config."""


class ConfigError(MiniCPM4Error):
    """A config value is unknown, missing or inconsistent."""


class InputError(MiniCPM4Error):
    """A request (prompt, sampling option) cannot be served as given."""
