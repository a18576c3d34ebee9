"""slimdeploy library: pure functions the DVC stages call. Nothing here reads params.yaml,
parses arguments or chooses file paths on its own."""

__version__ = "0.1.0"
