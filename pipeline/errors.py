"""Errors a user can act on. Entry points print them without a traceback and exit with 2."""


class SlimdeployError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ConfigError(SlimdeployError):
    """A params value or model configuration is not allowed."""


class DataError(SlimdeployError):
    """Input data is missing, unreadable or inconsistent."""


class CheckpointError(SlimdeployError):
    """A checkpoint or artifact is missing, malformed or does not match its architecture."""


class TrainingDiverged(SlimdeployError):
    """Training produced a non-finite loss, or a model no better than chance: nothing is written."""
