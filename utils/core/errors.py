"""Errors a user can cause and fix; scripts log their one-line message and exit non-zero."""


class UserError(Exception):
    """Base class: bad input from the command line, the data on disk or a checkpoint."""


class ConfigError(UserError, ValueError):
    """An unknown or inconsistent setting (flag, data set, class, model name)."""


class DataError(UserError):
    """A data set on disk is missing, has an unknown layout, or holds an unreadable file."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or was written by another configuration."""


class StorageError(UserError, OSError):
    """A file could not be written (disk full, read-only folder, size limit); nothing that was
    written before is lost."""


class TrainingDiverged(UserError):
    """The loss or the gradients stopped being finite; the last good checkpoint is kept."""


class Interrupted(UserError):
    """The run was stopped by a signal (Ctrl-C, SIGTERM); complete files stay intact."""
