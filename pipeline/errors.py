"""Errors a user can act on. Entry points print them without a traceback and exit with 2.

The base class and ``ConfigError`` live in ``models.errors`` (the architectures raise them and
must not import ``pipeline``); they are the same classes here."""

from models.errors import ConfigError, SlimdeployError

__all__ = ["CheckpointError", "ConfigError", "DataError", "SlimdeployError", "TrainingDiverged"]


class DataError(SlimdeployError):
    """Input data is missing, unreadable or inconsistent."""


class CheckpointError(SlimdeployError):
    """A checkpoint or artifact is missing, malformed or does not match its architecture."""


class TrainingDiverged(SlimdeployError):
    """Training produced a non-finite loss, or a model no better than chance: nothing is written."""
