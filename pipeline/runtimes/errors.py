"""Errors of the runtimes: one that is missing here, and a model a runtime cannot take."""

from __future__ import annotations

from pipeline.errors import SlimdeployError


class RuntimeUnavailable(SlimdeployError):
    """The requested runtime is not installed or has no device here."""


class ConversionError(SlimdeployError):
    """A model could not be converted for a runtime: the ONNX check, TensorRT's parser or its
    builder refused it."""
