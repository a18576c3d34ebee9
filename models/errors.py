"""The error base classes, defined here so that ``models/`` imports nothing from ``pipeline/``
(``pipeline.errors`` re-exports them and adds the rest). Entry points print a SlimdeployError
without a traceback and exit with 2."""


class SlimdeployError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ConfigError(SlimdeployError):
    """A params value or model configuration is not allowed."""
