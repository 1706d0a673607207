"""Library exceptions.  The CLI maps them to messages and exit codes at the edge."""

from __future__ import annotations


class BatchSRError(Exception):
    """Base class of every error batchsr raises on purpose."""


class ConfigError(BatchSRError):
    """The configuration (file, flags or training config) is invalid."""


class ImageError(BatchSRError):
    """One image could not be read, decoded or written."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ModelError(BatchSRError):
    """A model checkpoint is missing, corrupt or does not match its description."""


class InputError(BatchSRError):
    """The input folder is missing or unreadable."""


class OutputError(BatchSRError):
    """The output folder cannot be created or written."""


class LockedError(BatchSRError):
    """Another batchsr process holds the lock on the same folder."""
