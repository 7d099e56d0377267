"""Errors a user can cause and fix; scripts log their one-line message and exit non-zero."""


class UserError(Exception):
    """Base class: bad input from the command line, the data on disk or a checkpoint."""


class ConfigError(UserError, ValueError):
    """An unknown or inconsistent setting (flag, data set, class, model name)."""


class DataError(UserError):
    """A data set on disk is missing, has an unknown layout, or holds an unreadable file."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or was written by another configuration."""
